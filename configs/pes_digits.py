"""The Part 5 workload on offline data: MLPLOpt meta-trained with truncated PES (trunc 50,
log-uniform lengths 100-300, 4 tasks each) on the quadratic family + the 8x8 digits MLP, Adam 1e-3.

  python main.py --config=configs/pes_digits.py --workdir=/tmp/lopt_pes_digits

Expected on a 2-core CPU: see the README's "Results" section (figures measured, not guessed).
"""

from configs import default


def get_config():
  return default.get_config()

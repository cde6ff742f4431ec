"""The Part 5 workload on offline data: MLPLOpt meta-trained with truncated PES (trunc 50,
log-uniform lengths 100-300, 4 tasks each) on the quadratic family + the 8x8 digits MLP, Adam 1e-3.

  python main.py --config=configs/pes_digits.py --workdir=/tmp/lopt_pes_digits

Measured on the 2-core CPU (2026-11-21, 1 XLA device, machine loaded to ~4.7 by other jobs):
67 s wall for the whole command (500 outer steps + evaluation), peak RSS 1.2 GiB (with
TensorFlow's TensorBoard writer loaded); meta-loss 7.6 at step 10, 5.0 at step 250 (it swings
with where the truncations fall in the inner runs). End-of-run evaluation, 300 inner steps on 3
held-out seeds: learned mean loss 1.11 ± 0.01, final 0.38; Adam's best lr (0.03) 0.111 and
0.013 — 500 steps of Part 5 meta-training gives an optimizer about as good as Adam at 1e-3,
not a tuned Adam (see configs/quality_digits.py for one that is).
"""

from configs import default


def get_config():
  return default.get_config()

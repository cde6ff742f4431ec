"""The Part 5 workload as in the tutorial: Fashion-MNIST resized to 8x8 (needs internet for the
first TFDS download) + the quadratic family, MLPLOpt, truncated PES.

  python main.py --config=configs/pes_fmnist.py --workdir=/tmp/lopt_pes_fmnist

Not measured here: the project's machines have no internet, so TFDS cannot download the data.
The step cost equals configs/pes_digits.py's (same 8x8 MLP, so the same FLOPs per step); expect
its ~1 minute on 2 cores plus the one-time download and preparation.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.task_families.mlp.name = "fmnist8_mlp"  # Fashion-MNIST 8x8, 32-unit ReLU MLP
  # Present so that the command line can change them (an override cannot add a key): e.g.
  # --config.task_families.mlp.kwargs.download=False fails at once offline.
  config.task_families.mlp.kwargs.download = True  # let TFDS download and prepare the data
  config.eval.task = "fmnist8_mlp"
  config.eval.task_kwargs.download = True
  return config

"""A tiny config that runs in seconds; drives the end-to-end tests.

  python main.py --config=configs/test.py --workdir=/tmp/lopt_test

Measured (2-core CPU, loaded): about 20 s for the whole command, most of it start-up and
compilation; 6 outer steps, checkpoints at 2, 4, 6, and a 20-step evaluation.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_outer_steps = 6
  config.estimator.num_tasks = 8
  config.estimator.trunc_length = 5
  config.estimator.min_length = 10
  config.estimator.max_length = 20
  config.estimator.random_initial_iteration_offset = 20
  config.log_every = 2
  config.checkpoint_every = 2
  config.eval.task = "quadratic_family"
  config.eval.task_kwargs = {"dim": 10}
  config.eval.num_steps = 20
  config.eval.num_seeds = 2
  return config

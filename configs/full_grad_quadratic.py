"""Full backpropagation through 50-step inner runs on the quadratic family, meta-learning
MetaSGDWD's learning rate and weight decay.

  python main.py --config=configs/full_grad_quadratic.py --workdir=/tmp/lopt_full_grad
"""

from configs import full_es_quadratic


def get_config():
  config = full_es_quadratic.get_config()
  config.estimator.name = "full_grad"
  config.estimator.num_tasks = 8
  return config

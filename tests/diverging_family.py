"""A task family some of whose instances diverge: for tests of non-finite inner runs."""

import jax
import jax.numpy as jnp

from lopt_tpu.tasks import base as tasks_base
from lopt_tpu.tasks import quadratics


class SometimesDivergingFamily(tasks_base.TaskFamily):
  """Quadratics of curvature 1 or (with probability 1/2) 1000: at lr 0.1, SGD multiplies the
  latter's distance to the target by 99 a step, so within 20 steps it overflows to inf."""

  name = "sometimes_diverging"

  def sample(self, key):
    return {"scale": jnp.where(jax.random.uniform(key) < 0.5, 1000.0, 1.0)}

  def task_fn(self, task_params):
    return quadratics.QuadraticTask(2, target=jnp.ones(2),
                                    scale=jnp.full([2], task_params["scale"]))

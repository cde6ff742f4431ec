"""Quadratic inner problems: cheap, smooth, with known structure (good for estimator tests)."""

import jax
import jax.numpy as jnp

from lopt_tpu.tasks import base


class QuadraticTask(base.Task):
  """Minimizes `0.5 * sum(scale * (x - target)**2)` over a `dim`-vector `x`.

  The "batch" is a small Gaussian perturbation of the target (observation noise with std
  `noise`), so the task is stochastic like a real training problem; `noise=0` makes it exact.
  """

  def __init__(self, dim: int = 10, target=None, scale=None, noise: float = 0.0,
               init_scale: float = 1.0):
    self.dim = dim
    self.target = jnp.zeros([dim]) if target is None else jnp.asarray(target)
    self.scale = jnp.ones([dim]) if scale is None else jnp.asarray(scale)
    self.noise = noise
    self.init_scale = init_scale

  def init(self, key):
    return jax.random.normal(key, [self.dim]) * self.init_scale

  def sample_batch(self, key, split="train"):
    del split
    return self.target + self.noise * jax.random.normal(key, [self.dim])

  def loss(self, params, key, batch):
    del key
    return 0.5 * jnp.sum(self.scale * (params - batch) ** 2)


class FixedDimQuadraticFamily(base.TaskFamily):
  """Quadratics of a fixed dimension with a random target per sampled task."""

  name = "quadratic_family"

  def __init__(self, dim: int = 10, noise: float = 0.0, target_scale: float = 1.0):
    self.dim = dim
    self.noise = noise
    self.target_scale = target_scale

  def sample(self, key):
    return {"target": jax.random.normal(key, [self.dim]) * self.target_scale}

  def task_fn(self, task_params):
    return QuadraticTask(self.dim, target=task_params["target"], noise=self.noise)

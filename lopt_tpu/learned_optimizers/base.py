"""The `LearnedOptimizer` interface: meta-parameters `theta` in, an inner `Optimizer` out."""

from typing import Any

import jax

from lopt_tpu.optimizers import base as opt_base

MetaParams = Any


class LearnedOptimizer:
  """An optimizer whose behaviour is set by meta-parameters `theta` (a pytree of arrays).

  `opt_fn(theta)` must be cheap and pure: the meta-training code calls it inside `jit`/`vmap`
  with traced (and, for evolution strategies, per-task perturbed) `theta`.
  """

  name = "learned_optimizer"

  def init(self, key: jax.Array) -> MetaParams:
    raise NotImplementedError

  def opt_fn(self, theta: MetaParams, is_training: bool = False) -> opt_base.Optimizer:
    raise NotImplementedError

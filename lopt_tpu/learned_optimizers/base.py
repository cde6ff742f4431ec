"""The `LearnedOptimizer` interface: meta-parameters `theta` in, an inner `Optimizer` out."""

import math
import numbers
from typing import Any

import jax
import numpy as np

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


def check_args(owner: str, *, widths=None, counts=None, positive=None, non_negative=None,
               decays=None):
  """Refuses constructor arguments no learned optimizer can run with, as a ValueError naming
  the argument (config checks report it against `learned_optimizer.kwargs`): a width of 0
  crashed deep in an initializer, a negative learning rate trained an optimizer that climbs
  the loss, a decay >= 1 never forgets. Each argument maps names to values; a decay's value
  may be a sequence of decays. Values that are not plain numbers (arrays) are not checked.
  """
  def fail(name, value, accepted):
    raise ValueError(f"{owner}: {name}={value!r} must be {accepted}")

  for name, value in (widths or {}).items():
    if not _is_int(value) or value < 1:
      fail(name, value, "an integer >= 1")
  for name, value in (counts or {}).items():
    if not _is_int(value) or value < 0:
      fail(name, value, "an integer >= 0")
  for name, value in (positive or {}).items():
    if _is_real(value) and not (math.isfinite(value) and value > 0):
      fail(name, value, "a finite number > 0")
  for name, value in (non_negative or {}).items():
    if _is_real(value) and not (math.isfinite(value) and value >= 0):
      fail(name, value, "a finite number >= 0")
  for name, value in (decays or {}).items():
    for d in (value if isinstance(value, (list, tuple)) else (value,)):
      if _is_real(d) and not 0 <= d < 1:
        fail(name, value, "in [0, 1) (a decay of 1 or more never forgets)")


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)

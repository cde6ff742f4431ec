"""A (meta-trained) learned optimizer as an `optax.GradientTransformation`.

This is how a user trains *their own* model with a learned optimizer, in a standard optax loop:

  tx = optax_export.as_optax(learned_opt, theta)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params, value=loss)
  params = optax.apply_updates(params, updates)

The inner `Optimizer` returns new params rather than updates, so the update is
`new_params - params`, computed in at least float32: for bfloat16/float16 params the update is
float32, because their difference rounded to the params' precision would no longer add up to
the new params (`optax.apply_updates` adds in float32 and casts back, giving them exactly).
The params the caller passes are put into the inner state before every step (the inner state
does not keep its own copy between steps), which keeps the result correct when the
transformation is chained after others (e.g. gradient clipping) or when the caller changes
params between steps. The reverse direction (optax -> inner Optimizer) is
`lopt_tpu.optimizers.base.OptaxOptimizer`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lopt_tpu.learned_optimizers import base as lopt_base


class LearnedOptaxState(NamedTuple):
  """optax state of `as_optax`: the learned optimizer's inner state with `params=None`."""
  inner: Any


def _with_params(inner_state, params):
  # Inner states are flax.struct dataclasses (`.replace`) or NamedTuples (`._replace`).
  if hasattr(inner_state, "replace"):
    return inner_state.replace(params=params)
  return inner_state._replace(params=params)


def _difference(new, old):
  """new - old, exact enough that old + (new - old) rounds back to new in old's dtype."""
  dtype = jnp.promote_types(jnp.result_type(old), jnp.float32)
  return new.astype(dtype) - jnp.asarray(old).astype(dtype)


def as_optax(learned_opt: lopt_base.LearnedOptimizer, theta: Any,
             num_steps: Optional[int] = None,
             seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps `learned_opt` at meta-parameters `theta` as an optax gradient transformation.

  Args:
    learned_opt: the learned optimizer.
    theta: its (trained) meta-parameters; closed over, so `jit` sees them as constants.
    num_steps: training horizon, passed to the inner `init` (some optimizers condition on it).
    seed: the inner optimizer's keys (for learned optimizers that are stochastic) derive from
      `key(seed)`: one for `init`, and `fold_in(., iteration)` for each step.

  Returns:
    A `GradientTransformationExtraArgs`. `update(grads, state, params, value=loss)` requires
    `params`; `value` (the training loss) is optional and passed on as `loss=` for loss-aware
    optimizers (e.g. `hparam_controller`, which raises if it is missing). Other extra
    arguments are ignored, so the transformation can sit in an `optax.chain`.
  """
  opt = learned_opt.opt_fn(theta, is_training=False)
  init_key, step_key = jax.random.split(jax.random.key(seed))

  def init_fn(params):
    inner = opt.init(params, model_state=None, num_steps=num_steps,
                     key=init_key)
    return LearnedOptaxState(inner=_with_params(inner, None))

  def update_fn(updates, state, params=None, value=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("as_optax(...).update needs the current params: call "
                       "tx.update(grads, opt_state, params) (the learned optimizer reads them "
                       "and returns new params, from which the update is computed).")
    inner = _with_params(state.inner, params)
    key = jax.random.fold_in(step_key, inner.iteration)
    inner = opt.update(inner, updates, loss=value, key=key)
    new_params = opt.get_params(inner)
    step = jax.tree_util.tree_map(_difference, new_params, params)
    return step, LearnedOptaxState(inner=_with_params(inner, None))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

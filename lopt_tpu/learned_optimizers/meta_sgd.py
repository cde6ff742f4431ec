"""MetaSGDWD: SGD whose log learning rate and log weight decay are meta-learned."""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base
from lopt_tpu.optimizers import base as opt_base


@flax.struct.dataclass
class MetaSGDState:
  params: object
  model_state: object
  iteration: jax.Array


class MetaSGDWD(base.LearnedOptimizer):
  """`p <- p - lr * g - wd * p` with `theta = {log_lr, log_wd}` (log space keeps both positive)."""

  name = "meta_sgd_wd"

  def __init__(self, initial_lr: float = 1e-3, initial_wd: float = 1e-4):
    # Both are stored as logs in theta: 0 would be -inf.
    base.check_args(self.name, positive={"initial_lr": initial_lr, "initial_wd": initial_wd})
    self.initial_lr = initial_lr
    self.initial_wd = initial_wd

  def init(self, key):
    del key
    return {"log_lr": jnp.log(jnp.asarray(self.initial_lr, jnp.float32)),
            "log_wd": jnp.log(jnp.asarray(self.initial_wd, jnp.float32))}

  def opt_fn(self, theta, is_training=False):
    return _MetaSGDOptimizer(theta)


class _MetaSGDOptimizer(opt_base.Optimizer):

  def __init__(self, theta):
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    return MetaSGDState(params=params, model_state=model_state,
                        iteration=jnp.asarray(0, jnp.int32))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lr = jnp.exp(self.theta["log_lr"])
    wd = jnp.exp(self.theta["log_wd"])
    def step(p, g):
      p = jnp.asarray(p)
      if not jnp.issubdtype(p.dtype, jnp.inexact):  # integer leaves are not trained
        return p
      # Cast back: float32 lr/wd would otherwise promote bfloat16 params (a scan-carry change).
      return (p - lr * g - wd * p).astype(p.dtype)

    params = jax.tree_util.tree_map(step, opt_state.params, grads)
    return MetaSGDState(
        params=params,
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1)

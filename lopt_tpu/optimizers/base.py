"""The inner `Optimizer` interface and hand-designed optimizers backed by optax.

An optimizer's state always carries the current `params`, the task's `model_state` and an
`iteration` counter, so the meta-training code can read params and step count from any optimizer
(hand-designed or learned) the same way.
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

Params = Any
ModelState = Any
OptState = Any


class Optimizer:
  """Pure-function optimizer: `init` builds a state, `update` returns the next one."""

  def init(self, params: Params, model_state: ModelState = None,
           num_steps: Optional[int] = None, key: Optional[jax.Array] = None) -> OptState:
    raise NotImplementedError

  def update(self, opt_state: OptState, grads: Params, loss: Optional[jax.Array] = None,
             model_state: ModelState = None, key: Optional[jax.Array] = None) -> OptState:
    raise NotImplementedError

  def get_params(self, opt_state: OptState) -> Params:
    return opt_state.params

  def get_state(self, opt_state: OptState) -> ModelState:
    return opt_state.model_state


@flax.struct.dataclass
class OptaxState:
  params: Params
  model_state: ModelState
  iteration: jax.Array
  optax_state: Any


class OptaxOptimizer(Optimizer):
  """Any `optax.GradientTransformation` seen through the inner `Optimizer` interface."""

  def __init__(self, tx: optax.GradientTransformation):
    # Extra-args support lets loss-aware transformations (e.g. reduce_on_plateau) see `value`.
    self.tx = optax.with_extra_args_support(tx)

  def init(self, params, model_state=None, num_steps=None, key=None):
    del num_steps, key
    return OptaxState(params=params, model_state=model_state,
                      iteration=jnp.asarray(0, jnp.int32), optax_state=self.tx.init(params))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    del key
    updates, optax_state = self.tx.update(grads, opt_state.optax_state, opt_state.params,
                                          value=loss)
    params = optax.apply_updates(opt_state.params, updates)
    return OptaxState(
        params=params,
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, optax_state=optax_state)


class SGD(OptaxOptimizer):

  def __init__(self, learning_rate: float = 1e-2):
    self.learning_rate = learning_rate
    super().__init__(optax.sgd(learning_rate))


class Momentum(OptaxOptimizer):

  def __init__(self, learning_rate: float = 1e-2, decay: float = 0.9):
    self.learning_rate = learning_rate
    super().__init__(optax.sgd(learning_rate, momentum=decay))


class Adam(OptaxOptimizer):

  def __init__(self, learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8):
    self.learning_rate = learning_rate
    super().__init__(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))

"""HParamController: an LSTM that reads the training loss and sets a global learning rate.

The controller runs once per step on a handful of loss features, so its cost does not grow
with the number of parameters; the parameter update itself is SGD with (heavy-ball) momentum.
"""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import recurrent
from lopt_tpu.optimizers import base as opt_base

NUM_LOSS_FEATURES = 5


@flax.struct.dataclass
class HParamControllerState:
  params: object
  model_state: object
  iteration: jax.Array
  momentum: jax.Array  # [P] float32 heavy-ball buffer over the flat params
  lstm_carry: recurrent.Carry  # ([H], [H]) float32
  first_loss: jax.Array  # () float32: the loss seen by the first update
  loss_ema: jax.Array  # () float32: running mean of the loss


def loss_features(loss, first_loss, loss_ema, iteration) -> jax.Array:
  """Bounded features of the scalar loss, robust to its scale and sign.

  The log of |loss| (clipped), the log-ratio of the loss to the first loss and to its running
  mean (squashed by tanh; the latter also magnified 10x because step-to-step changes are
  small), the sign of the loss (losses may be negative) and the tanh time embedding.

  Args:
    loss: the current training loss (float32 scalar).
    first_loss: the loss at the first update.
    loss_ema: the running mean of earlier losses.
    iteration: the inner step.

  Returns:
    [NUM_LOSS_FEATURES + len(features.TIMESCALES)] float32.
  """
  log_abs = lambda x: jnp.log(jnp.abs(x) + 1e-8)
  log_loss = log_abs(loss)
  rel_first = log_loss - log_abs(first_loss)
  rel_ema = log_loss - log_abs(loss_ema)
  scalars = jnp.stack([0.1 * jnp.clip(log_loss, -20., 20.), jnp.tanh(rel_first),
                       jnp.tanh(rel_ema), jnp.tanh(10. * rel_ema), jnp.sign(loss)])
  return jnp.concatenate([scalars, feat.tanh_time_embedding(iteration)])


class HParamController(base.LearnedOptimizer):
  """SGD with momentum whose learning rate an LSTM sets every step from loss features.

  `lr = base_lr * exp(soft_clip(readout(h), log_lr_bound))`, then `buf <- momentum * buf + g`
  and `p <- p - lr * buf` (optax's `sgd(lr, momentum)` convention; `momentum=0` is plain SGD).
  theta holds the LSTM/read-out weights and the LSTM's initial carry, which is meta-learned
  (zero at init) and copied into the inner state by `init`. The read-out starts small, so at
  theta-init `lr ~= base_lr`. `update` requires the training loss.

  Args:
    hidden_size: LSTM width.
    base_lr: learning rate when the controller outputs zero.
    momentum: heavy-ball momentum of the inner update.
    loss_ema_decay: decay of the running mean of the loss used as a feature.
    log_lr_bound: the log learning-rate multiplier is softly clipped to +-this.
  """

  name = "hparam_controller"

  def __init__(self, hidden_size: int = 32, base_lr: float = 1e-3, momentum: float = 0.9,
               loss_ema_decay: float = 0.9, log_lr_bound: float = 10.):
    base.check_args(self.name, widths={"hidden_size": hidden_size},
                    positive={"base_lr": base_lr, "log_lr_bound": log_lr_bound},
                    decays={"momentum": momentum, "loss_ema_decay": loss_ema_decay})
    self.hidden_size = hidden_size
    self.base_lr = base_lr
    self.momentum = momentum
    self.loss_ema_decay = loss_ema_decay
    self.log_lr_bound = log_lr_bound
    self.controller = recurrent.LSTMController(hidden_size, 1)
    self.num_features = NUM_LOSS_FEATURES + len(feat.TIMESCALES)

  def init(self, key):
    carry = recurrent.zero_carry(self.hidden_size)
    return {"controller": self.controller.init(key, carry, jnp.zeros([self.num_features])),
            "initial_carry": carry}

  def opt_fn(self, theta, is_training=False):
    return _HParamControllerOptimizer(self, theta)


class _HParamControllerOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: HParamController, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    size = sum(feat.layout_of(params).sizes)
    zero = jnp.zeros([], jnp.float32)
    return HParamControllerState(
        params=params, model_state=model_state, iteration=jnp.asarray(0, jnp.int32),
        momentum=jnp.zeros([size], jnp.float32),
        lstm_carry=jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                          self.theta["initial_carry"]),
        first_loss=zero, loss_ema=zero)

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    if loss is None:
      raise ValueError("HParamController needs the training loss: call "
                       "update(opt_state, grads, loss=loss, ...).")
    lopt = self.lopt
    loss = jnp.asarray(loss, jnp.float32)
    first = opt_state.iteration == 0
    first_loss = jnp.where(first, loss, opt_state.first_loss)
    loss_ema = jnp.where(first, loss, opt_state.loss_ema)
    inputs = loss_features(loss, first_loss, loss_ema, opt_state.iteration)
    carry, out = lopt.controller.apply(self.theta["controller"], opt_state.lstm_carry, inputs)
    lr = lopt.base_lr * jnp.exp(recurrent.soft_clip(out[0], lopt.log_lr_bound))

    layout = feat.layout_of(opt_state.params)
    momentum = lopt.momentum * opt_state.momentum + feat.flatten(grads)
    return HParamControllerState(
        params=feat.apply_step(opt_state.params, layout, lr * momentum),
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, momentum=momentum, lstm_carry=carry,
        first_loss=first_loss,
        loss_ema=lopt.loss_ema_decay * loss_ema + (1. - lopt.loss_ema_decay) * loss)

"""NNAdam: Adam whose per-tensor hyper-parameters a shared, per-tensor LSTM sets every step.

Each step, every tensor is summarized by a few scalars (gradient and parameter scale, the scale
of the update plain Adam would take, gradient/momentum alignment, time, rank). One LSTM with
shared weights runs on all tensors at once (carry [T, H]) and emits four numbers per tensor,
which move that tensor's learning rate, beta1, beta2 and epsilon around base values:

  lr   = lr0  * exp(soft_clip(s * o_lr,  log_bound))
  b1   = sigmoid(logit(b1_0) + s * o_b1)        (likewise b2; both stay in (0, 1))
  eps  = eps0 * exp(soft_clip(s * o_eps, log_bound))

Adam then runs with those values. Because the betas change over time, bias correction divides
by `1 - prod(betas used so far)` (tracked per tensor), which is exactly the total weight of the
moving average. The read-out starts small, so at theta-init NNAdam is Adam(lr0, b1_0, b2_0, eps0).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import per_tensor_adam
from lopt_tpu.learned_optimizers import recurrent
from lopt_tpu.optimizers import base as opt_base

NUM_TENSOR_FEATURES = 7  # see `NNAdam.tensor_features`
NUM_CONTROLS = 4  # lr, beta1, beta2, epsilon


@flax.struct.dataclass
class NNAdamState:
  params: object
  model_state: object
  iteration: jax.Array
  m: jax.Array  # [P] float32 first moment over the flat params
  v: jax.Array  # [P] float32 second moment
  b1_prod: jax.Array  # [T] float32 product of the beta1s used so far (bias correction)
  b2_prod: jax.Array  # [T] float32 product of the beta2s used so far
  lstm_carry: recurrent.Carry  # ([T, H], [T, H]) float32


class NNAdam(base.LearnedOptimizer):
  """Adam with per-tensor lr / beta1 / beta2 / epsilon set by a learned LSTM (see module doc).

  theta = {"controller": LSTM + read-out weights, "initial_carry": ([H], [H]) meta-learned
  initial LSTM state (zero at init), tiled over tensors by `init`}.

  Args:
    learning_rate, b1, b2, eps: base Adam hyper-parameters (what a zero controller output gives).
    hidden_size: LSTM width.
    output_scale: `s` above, the scale of the controller's outputs.
    log_bound: soft bound on the log multipliers of lr and epsilon.
  """

  name = "nn_adam"

  def __init__(self, learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, hidden_size: int = 32, output_scale: float = 1.,
               log_bound: float = 10.):
    base.check_args(self.name, widths={"hidden_size": hidden_size},
                    positive={"learning_rate": learning_rate, "eps": eps,
                              "output_scale": output_scale, "log_bound": log_bound},
                    decays={"b1": b1, "b2": b2})
    self.learning_rate = learning_rate
    self.b1 = b1
    self.b2 = b2
    self.eps = eps
    self.hidden_size = hidden_size
    self.output_scale = output_scale
    self.log_bound = log_bound
    self.controller = recurrent.LSTMController(hidden_size, NUM_CONTROLS)
    self.num_features = NUM_TENSOR_FEATURES + len(feat.TIMESCALES)

  def init(self, key):
    carry = recurrent.zero_carry(self.hidden_size)
    return {"controller": self.controller.init(key, carry, jnp.zeros([self.num_features])),
            "initial_carry": carry}

  def opt_fn(self, theta, is_training=False):
    return _NNAdamOptimizer(self, theta)

  def tensor_features(self, p, g, m, v, b1_prod, b2_prod, layout) -> jax.Array:
    """Per-tensor summaries fed to the LSTM (time is appended by the caller).

    Log mean-square of the gradient and of the params, log mean |g|, log mean-square of the
    step direction plain Adam (base hparams) would take now, the cosine between the gradient
    and the old momentum, and two static flags (scalar tensor, vector tensor).

    Args:
      p, g: flat params and gradient, [P].
      m, v, b1_prod, b2_prod: the state's moments ([P]) and beta products ([T]) before the step.
      layout: the params' `features.FlatLayout`.

    Returns:
      [T, NUM_TENSOR_FEATURES] float32.
    """
    mean = lambda x: feat.segment_mean(x, layout)
    m_new = self.b1 * m + (1. - self.b1) * g
    v_new = self.b2 * v + (1. - self.b2) * jnp.square(g)
    m_hat = m_new / feat.broadcast_segments(1. - b1_prod * self.b1, layout)
    v_hat = v_new / feat.broadcast_segments(1. - b2_prod * self.b2, layout)
    direction = m_hat / (jnp.sqrt(v_hat + 1e-30) + self.eps)
    ms_g = mean(jnp.square(g))
    cosine = feat.tensor_cosine(g, m, layout)  # 0 at step 0 (zero momentum), any scale
    rank = np.asarray([len(s) for s in layout.shapes])
    return jnp.stack([
        recurrent.log_feature(ms_g), recurrent.log_feature(jnp.square(mean(jnp.abs(g)))),
        recurrent.log_feature(mean(jnp.square(p))),
        recurrent.log_feature(mean(jnp.square(direction))), cosine,
        jnp.asarray(np.where(rank == 0, 1., -1.), jnp.float32),
        jnp.asarray(np.where(rank == 1, 1., -1.), jnp.float32)], axis=1)

  def hparams(self, out: jax.Array):
    """Maps controller outputs [T, 4] to per-tensor (lr, b1, b2, eps), each [T]."""
    out = out * self.output_scale
    lr = self.learning_rate * jnp.exp(recurrent.soft_clip(out[:, 0], self.log_bound))
    b1 = jax.nn.sigmoid(per_tensor_adam.logit(self.b1) + out[:, 1])
    b2 = jax.nn.sigmoid(per_tensor_adam.logit(self.b2) + out[:, 2])
    eps = self.eps * jnp.exp(recurrent.soft_clip(out[:, 3], self.log_bound))
    return lr, b1, b2, eps


class _NNAdamOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: NNAdam, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    layout = feat.layout_of(params)
    return NNAdamState(
        params=params, model_state=model_state, iteration=jnp.asarray(0, jnp.int32),
        lstm_carry=recurrent.tile_carry(self.theta["initial_carry"], layout.num_tensors),
        **per_tensor_adam.init_moments(layout))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt, s = self.lopt, opt_state
    layout = feat.layout_of(s.params)
    p, g = feat.flatten(s.params), feat.flatten(grads)
    summary = lopt.tensor_features(p, g, s.m, s.v, s.b1_prod, s.b2_prod, layout)
    time = feat.tanh_time_embedding(s.iteration)
    inputs = jnp.concatenate(
        [summary, jnp.broadcast_to(time, (layout.num_tensors, time.shape[0]))], axis=1)
    carry, out = lopt.controller.apply(self.theta["controller"], s.lstm_carry, inputs)
    lr, b1, b2, eps = lopt.hparams(out)

    step, moments = per_tensor_adam.step(g, s.m, s.v, s.b1_prod, s.b2_prod, lr, b1, b2,
                                         feat.broadcast_segments(eps, layout), layout,
                                         v_floor=1e-30)
    return NNAdamState(
        params=feat.apply_step(s.params, layout, step),
        model_state=s.model_state if model_state is None else model_state,
        iteration=s.iteration + 1, lstm_carry=carry, **moments)

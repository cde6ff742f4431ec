"""HypergradAdam: Adam whose per-tensor learning rates adapt online, plus learned control.

Two parts, the first hand-designed and the second learned:

1. A hypergradient rule (Baydin et al., 2018, in log space and normalized): each tensor k keeps
   a log learning-rate multiplier s_k that grows while successive steps agree and shrinks while
   they oscillate,

     s_k <- clip(s_k + hyper_lr * cos(g_k, u_k) + drift_scale * o_drift, s_min, s_max),

   where g_k is the new gradient and u_k the previous Adam direction m / sqrt(v) of that tensor.
   cos < 0 means the last step overshot (the loss would have gone down with a smaller rate).
   This lets one base rate suit tasks whose tuned Adam rates differ. The rule is greedy (it
   sees one step ahead), so it tends to shrink the rate too early; s_min is its floor.
2. A small MLP, shared by all tensors, reads per-tensor features every step and outputs
   o_drift (above), an instantaneous log-lr correction o_lr and shifts of beta1 / beta2:

     lr_k = lr0 * exp(s_k + o_lr),
     b1_k = sigmoid(logit(b1) + o_b1),  b2_k = sigmoid(logit(b2) + o_b2).

   Features: the tanh time embedding (so it can express warm-up and decay schedules) and rank
   flags; with `dynamic_features` also the cosine above, the log ratio of the gradient's mean
   square to its running average (positive on a gradient spike) and s_k itself. Without them
   the learned part is a per-tensor-kind schedule on top of the rule, which adapts to the task
   by itself; the schedule is what a greedy rule cannot know (it sees one step ahead).

The MLP's read-out starts at zero, so at theta-init HypergradAdam *is* the hand-designed rule;
everything it learns is a correction. Because betas change over time, bias correction divides
by `1 - prod(betas so far)` per tensor (the exact total weight of the moving average; the
Adam core is shared with `nn_adam`: `per_tensor_adam`). No recurrent network: the update costs
one tiny [T, F] MLP on top of Adam.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import per_tensor_adam
from lopt_tpu.learned_optimizers import recurrent
from lopt_tpu.optimizers import base as opt_base

NUM_STATIC_FEATURES = 3  # rank flags
NUM_DYNAMIC_FEATURES = 3  # cosine, gradient spike, log-lr state
NUM_CONTROLS = 4  # drift of the log-lr state, instantaneous log-lr, beta1 and beta2 shifts


@flax.struct.dataclass
class HypergradAdamState:
  params: object
  model_state: object
  iteration: jax.Array
  m: jax.Array  # [P] float32 first moment over the flat params
  v: jax.Array  # [P] float32 second moment
  b1_prod: jax.Array  # [T] float32 product of the beta1s used so far (bias correction)
  b2_prod: jax.Array  # [T] float32 product of the beta2s used so far
  log_lr: jax.Array  # [T] float32 the hypergradient state s


class ControlNet(nn.Module):
  """[T, F] features -> [T, NUM_CONTROLS]; the read-out starts at exactly zero."""
  hidden_sizes: tuple

  @nn.compact
  def __call__(self, x):
    for h in self.hidden_sizes:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(NUM_CONTROLS, kernel_init=nn.initializers.zeros, name="readout")(x)


def rank_flags(layout: feat.FlatLayout) -> np.ndarray:
  """[T, 3]: +-1 flags for scalar, vector and matrix (rank >= 2) tensors."""
  rank = np.asarray([len(s) for s in layout.shapes])
  flag = lambda b: np.where(b, 1., -1.)
  return np.stack([flag(rank == 0), flag(rank == 1), flag(rank >= 2)], 1).astype(np.float32)


class HypergradAdam(base.LearnedOptimizer):
  """Adam + per-tensor hypergradient learning rates + a learned controller (see module doc).

  Args:
    learning_rate: lr0, the rate at s = 0.
    b1, b2, eps: base Adam hyper-parameters.
    hyper_lr: step of the hypergradient rule on the log rate (0: no adaptation).
    log_lr_min, log_lr_max: bounds of the log multiplier s.
    drift_scale: scale of the learned drift of s (it accumulates over steps, so small).
    dynamic_features: also feed the controller the rule's signals (see module doc).
    control_bound: every learned output is soft-clipped to +-this: the controller corrects
      the rule within bounds (lr within e^+-bound of the rule's, betas within a logit shift of
      bound), so it cannot drive the inner run far from the hand-designed rule.
    hidden_sizes: the control MLP's hidden widths.
    absolute_signal_offsets: compute the rule's signals with fixed offsets of 1e-12 on the
      mean squares, as before session 9: the signals then fade towards 0 below gradient RMS
      ~1e-5, which freezes the rule late in training. The shipped `digits_mlp_v1` was
      meta-trained that way and keeps it (its sidecar sets True); the default is scale-free.
  """

  name = "hypergrad_adam"

  def __init__(self, learning_rate: float = 1e-2, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, hyper_lr: float = 0.5, log_lr_min: float = -0.5,
               log_lr_max: float = 1.5,
               drift_scale: float = 0., dynamic_features: bool = False,
               control_bound: float = 1., hidden_sizes=(32,),
               absolute_signal_offsets: bool = False):
    base.check_args(self.name, widths={f"hidden_sizes[{i}]": h for i, h in enumerate(hidden_sizes)},
                    positive={"learning_rate": learning_rate, "eps": eps,
                              "control_bound": control_bound},
                    non_negative={"hyper_lr": hyper_lr, "drift_scale": drift_scale},
                    decays={"b1": b1, "b2": b2})
    if not log_lr_min <= log_lr_max:
      raise ValueError(f"{self.name}: log_lr_min={log_lr_min!r} must be <= log_lr_max "
                       f"({log_lr_max!r})")
    self.learning_rate = learning_rate
    self.b1 = b1
    self.b2 = b2
    self.eps = eps
    self.hyper_lr = float(hyper_lr)
    self.log_lr_min = float(log_lr_min)
    self.log_lr_max = float(log_lr_max)
    self.drift_scale = float(drift_scale)
    self.dynamic_features = bool(dynamic_features)
    self.control_bound = float(control_bound)
    self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
    self.absolute_signal_offsets = bool(absolute_signal_offsets)
    self.net = ControlNet(self.hidden_sizes)
    self.num_features = (NUM_STATIC_FEATURES + len(feat.TIMESCALES) +
                         (NUM_DYNAMIC_FEATURES if self.dynamic_features else 0))

  def init(self, key):
    return self.net.init(key, jnp.zeros([1, self.num_features]))

  def opt_fn(self, theta, is_training=False):
    return _HypergradAdamOptimizer(self, theta)

  def signals(self, g, m, v, b2_prod, layout):
    """Per tensor, [T] each: cos(g, previous Adam direction m / sqrt(v)) and the clipped
    log(mean g^2 / mean bias-corrected v). Both are 0 at the first step (no history yet), and
    both are scale-free, so they are computed on g, m and sqrt(v) divided by one per-tensor
    scale (`features.tensor_scale`): the same at gradient RMS 1e-2 and 1e-8."""
    mean = lambda x: feat.segment_mean(x, layout)
    if not self.absolute_signal_offsets:
      scale = feat.tensor_scale(jnp.maximum(jnp.abs(g), jnp.sqrt(v)), layout)
      g, m, v = g / scale, m / scale, v / jnp.square(scale)
    # Offsets keep every derivative finite in float32 where a direction is exactly zero (the
    # first step): 1e-30 would give rsqrt' ~ 1e45 = inf, and 0 * inf = NaN meta-gradients.
    # After the scaling (the default) they are 1e-12 of the tensor's own second moment.
    u = m * jax.lax.rsqrt(v + 1e-12)
    if self.absolute_signal_offsets:
      cosine = mean(g * u) / (jnp.sqrt(mean(jnp.square(g)) + 1e-12) *
                              jnp.sqrt(mean(jnp.square(u)) + 1e-12))
    else:
      cosine = feat.tensor_cosine(g, u, layout)
    has_history = b2_prod < 1.
    v_hat = mean(v) / jnp.where(has_history, 1. - b2_prod, 1.)
    spike = jnp.clip(jnp.log((mean(jnp.square(g)) + 1e-12) / (v_hat + 1e-12)), -5., 5.)
    return cosine, jnp.where(has_history, spike, 0.)

  def step_hparams(self, theta, iteration, layout, cosine, spike, log_lr):
    """Next log-lr state and this step's per-tensor (lr, b1, b2), each [T]."""
    time = feat.tanh_time_embedding(iteration)
    parts = [jnp.asarray(rank_flags(layout)),
             jnp.broadcast_to(time, (layout.num_tensors, time.shape[0]))]
    if self.dynamic_features:
      parts.append(jnp.stack([cosine, 0.5 * spike, log_lr], axis=1))
    out = recurrent.soft_clip(self.net.apply(theta, jnp.concatenate(parts, axis=1)),
                              self.control_bound)
    log_lr = jnp.clip(log_lr + self.hyper_lr * cosine + self.drift_scale * out[:, 0],
                      self.log_lr_min, self.log_lr_max)
    lr = self.learning_rate * jnp.exp(log_lr + out[:, 1])
    b1 = jax.nn.sigmoid(per_tensor_adam.logit(self.b1) + out[:, 2])
    b2 = jax.nn.sigmoid(per_tensor_adam.logit(self.b2) + out[:, 3])
    return log_lr, lr, b1, b2


class _HypergradAdamOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: HypergradAdam, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    layout = feat.layout_of(params)
    return HypergradAdamState(
        params=params, model_state=model_state, iteration=jnp.asarray(0, jnp.int32),
        log_lr=jnp.zeros([layout.num_tensors], jnp.float32),
        **per_tensor_adam.init_moments(layout))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt, s = self.lopt, opt_state
    layout = feat.layout_of(s.params)
    p, g = feat.flatten(s.params), feat.flatten(grads)
    cosine, spike = lopt.signals(g, s.m, s.v, s.b2_prod, layout)
    log_lr, lr, b1, b2 = lopt.step_hparams(self.theta, s.iteration, layout, cosine, spike,
                                           s.log_lr)

    step, moments = per_tensor_adam.step(g, s.m, s.v, s.b1_prod, s.b2_prod, lr, b1, b2,
                                         lopt.eps, layout, v_floor=1e-16)
    return HypergradAdamState(
        params=feat.apply_step(s.params, layout, step),
        model_state=s.model_state if model_state is None else model_state,
        iteration=s.iteration + 1, log_lr=log_lr, **moments)

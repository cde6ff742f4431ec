"""RNNMLPLOpt: a hierarchical learned optimizer, a per-tensor LSTM steering a per-parameter MLP.

Each step the per-parameter features ([P, F], normalized per tensor) are summarized per tensor
(segment means of the normalized features, log mean-squares of the raw ones, time). One LSTM
with shared weights runs on all tensors at once (carry [T, H]); its read-out, a small context
vector per tensor, is broadcast to every parameter of that tensor and appended to the MLP's
input. The LSTM can thus track per-tensor training dynamics over time (e.g. a layer-wise step
schedule) that a memoryless per-parameter MLP cannot see.
"""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import networks
from lopt_tpu.learned_optimizers import recurrent
from lopt_tpu.optimizers import base as opt_base

MOMENTUM_DECAYS = (0.5, 0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
# Added to second moments inside (r)sqrt: finite values and meta-gradients for zero gradients.
EPS = 1e-18


@flax.struct.dataclass
class RNNMLPLOptState:
  params: object
  model_state: object
  iteration: jax.Array
  momenta: jax.Array  # [P, len(momentum_decays)] float32 over the flat params
  rms: jax.Array  # [P, len(rms_decays)] float32 running means of g^2
  lstm_carry: recurrent.Carry  # ([T, H], [T, H]) float32, one row per tensor


class RNNMLPLOpt(base.LearnedOptimizer):
  """Step = d * exp(m * exp_mult) * step_mult, where (d, m) = MLP(features, LSTM context).

  Per-parameter features (F = 2 + nm + nr + nm * nr; 11 with the defaults), each divided by its
  root-mean-square over the tensor: the parameter, its gradient, momenta m_i, sqrt of running
  means of g^2 v_j, and m_i * rsqrt(v_j). The MLP sees those, the tanh time embedding and the
  tensor's context vector. The LSTM sees, per tensor, the means of the normalized features,
  bounded logs of the raw features' mean-squares (the scale information that normalization
  removes) and the time embedding.

  theta = {"mlp": ..., "rnn": LSTM + read-out, "initial_carry": ([H], [H]) meta-learned initial
  LSTM state (zero at init), tiled over tensors by `init`}.

  Args:
    hidden_size: width of the MLP's hidden layers.
    hidden_layers: number of hidden layers of the MLP.
    lstm_hidden_size: width of the per-tensor LSTM.
    context_size: length of the per-tensor context vector.
    step_mult: scale of the step (the initial steps are about this size).
    exp_mult: scale of the log-magnitude output.
    momentum_decays, rms_decays: accumulator decays.
  """

  name = "rnn_mlp_lopt"

  def __init__(self, hidden_size: int = 32, hidden_layers: int = 2, lstm_hidden_size: int = 32,
               context_size: int = 8, step_mult: float = 1e-3, exp_mult: float = 1e-3,
               momentum_decays=MOMENTUM_DECAYS, rms_decays=RMS_DECAYS):
    base.check_args(self.name, widths={"hidden_size": hidden_size,
                                       "lstm_hidden_size": lstm_hidden_size,
                                       "context_size": context_size},
                    counts={"hidden_layers": hidden_layers}, positive={"step_mult": step_mult},
                    non_negative={"exp_mult": exp_mult},
                    decays={"momentum_decays": momentum_decays, "rms_decays": rms_decays})
    self.lstm_hidden_size = lstm_hidden_size
    self.step_mult = step_mult
    self.exp_mult = exp_mult
    self.momentum_decays = tuple(momentum_decays)
    self.rms_decays = tuple(rms_decays)
    nm, nr, nt = len(self.momentum_decays), len(self.rms_decays), len(feat.TIMESCALES)
    self.num_param_features = 2 + nm + nr + nm * nr
    self.mlp = networks.MLP([hidden_size] * hidden_layers, 2)
    # The context is an input feature, not a control: a unit-scale read-out is fine.
    self.rnn = recurrent.LSTMController(lstm_hidden_size, context_size, out_init_scale=1.)
    self.num_mlp_features = self.num_param_features + nt + context_size
    self.num_rnn_features = 2 * self.num_param_features + nt

  def init(self, key):
    k_mlp, k_rnn = jax.random.split(key)
    carry = recurrent.zero_carry(self.lstm_hidden_size)
    return {"mlp": self.mlp.init(k_mlp, jnp.zeros([1, self.num_mlp_features])),
            "rnn": self.rnn.init(k_rnn, carry, jnp.zeros([self.num_rnn_features])),
            "initial_carry": carry}

  def opt_fn(self, theta, is_training=False):
    return _RNNMLPLOptOptimizer(self, theta)


class _RNNMLPLOptOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: RNNMLPLOpt, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(params)
    size = sum(layout.sizes)
    return RNNMLPLOptState(
        params=params, model_state=model_state, iteration=jnp.asarray(0, jnp.int32),
        momenta=jnp.zeros([size, len(lopt.momentum_decays)], jnp.float32),
        rms=jnp.zeros([size, len(lopt.rms_decays)], jnp.float32),
        lstm_carry=recurrent.tile_carry(self.theta["initial_carry"], layout.num_tensors))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(opt_state.params)
    p, g = feat.flatten(opt_state.params), feat.flatten(grads)
    momenta = feat.ema(opt_state.momenta, g, jnp.asarray(lopt.momentum_decays, jnp.float32))
    rms = feat.ema(opt_state.rms, jnp.square(g), jnp.asarray(lopt.rms_decays, jnp.float32))
    adam_like = momenta[:, :, None] * jax.lax.rsqrt(rms + EPS)[:, None, :]
    raw = jnp.concatenate([p[:, None], g[:, None], momenta, jnp.sqrt(rms + EPS),
                           adam_like.reshape(p.shape[0], adam_like.shape[1] * adam_like.shape[2])],
                          axis=1)
    normed = feat.second_moment_normalize(raw, layout)
    time = feat.tanh_time_embedding(opt_state.iteration)

    rnn_in = jnp.concatenate([
        feat.segment_mean(normed, layout),
        recurrent.log_feature(feat.segment_mean(jnp.square(raw), layout)),
        jnp.broadcast_to(time, (layout.num_tensors, time.shape[0]))], axis=1)
    carry, context = lopt.rnn.apply(self.theta["rnn"], opt_state.lstm_carry, rnn_in)

    mlp_in = jnp.concatenate([normed, jnp.broadcast_to(time, (p.shape[0], time.shape[0])),
                              feat.broadcast_segments(context, layout)], axis=1)
    out = lopt.mlp.apply(self.theta["mlp"], mlp_in)
    step = networks.direction_magnitude_step(out, lopt.step_mult, lopt.exp_mult)
    return RNNMLPLOptState(
        params=feat.apply_step(opt_state.params, layout, step),
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, momenta=momenta, rms=rms, lstm_carry=carry)

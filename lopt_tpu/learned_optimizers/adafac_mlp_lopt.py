"""AdafacMLPLOpt: a per-parameter MLP fed momenta, rms and Adafactor-style factored statistics.

For a tensor of rank >= 2, Adafactor keeps running means of g^2 over its last axis (rows) and
over its second-to-last axis (columns) instead of a full second moment, and estimates
`v[i, j] ~= row[i] * col[j] / mean(row)`, which is exact when g^2 is a rank-one outer product.
Leading axes (e.g. the 3x3 window of a conv kernel [3, 3, Cin, Cout]) are kept as batch axes.
Tensors of rank < 2 keep the full, unfactored running mean. These accumulators have a different
shape per tensor, so they live in the state as a tuple (in leaf order) of per-tensor dicts;
everything else uses the flat [P, F] layout of `features`.
"""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import networks
from lopt_tpu.optimizers import base as opt_base

MOMENTUM_DECAYS = (0.5, 0.9, 0.99)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
# Added to second moments inside (r)sqrt and to denominators: keeps values and meta-gradients
# finite for all-zero gradients (EPS**-2 must still fit in float32), far below real g^2.
EPS = 1e-18


@flax.struct.dataclass
class AdafacMLPLOptState:
  params: object
  model_state: object
  iteration: jax.Array
  momenta: jax.Array  # [P, len(momentum_decays)] float32 over the flat params
  rms: jax.Array  # [P, len(rms_decays)] float32 running means of g^2
  factored: tuple  # per tensor: {"row": [..., R, K], "col": [..., C, K]} or {"v": [..., K]}


def init_factored(shape, num_decays: int) -> dict:
  """Zero accumulators for one tensor of `shape`, for `num_decays` decays (the trailing K)."""
  shape = tuple(shape)
  if len(shape) >= 2:
    return {"row": jnp.zeros(shape[:-1] + (num_decays,), jnp.float32),
            "col": jnp.zeros(shape[:-2] + shape[-1:] + (num_decays,), jnp.float32)}
  return {"v": jnp.zeros(shape + (num_decays,), jnp.float32)}


def update_factored(acc: dict, g: jax.Array, decays: jax.Array):
  """Advances one tensor's accumulators with gradient `g` (float32).

  Returns:
    (new accumulators, the (factored) second-moment estimate v as [g.size, K]).
  """
  if g.size == 0:  # an empty tensor: means over its axes would be 0/0
    return acc, jnp.zeros([0, decays.shape[0]], jnp.float32)
  g2 = jnp.square(g)
  if "v" in acc:
    v = feat.ema(acc["v"], g2, decays)
    return {"v": v}, v.reshape(-1, decays.shape[0])
  row = feat.ema(acc["row"], jnp.mean(g2, axis=-1), decays)  # [..., R, K]
  col = feat.ema(acc["col"], jnp.mean(g2, axis=-2), decays)  # [..., C, K]
  row_mean = jnp.mean(row, axis=-2, keepdims=True)  # [..., 1, K]
  # row[i] * col[j] / mean(row), arranged as [..., R, C, K].
  estimate = (row / (row_mean + EPS))[..., :, None, :] * col[..., None, :, :]
  return {"row": row, "col": col}, estimate.reshape(-1, decays.shape[0])


def per_param_features(p, g, momenta, rms, factored_v) -> jax.Array:
  """The [P, F] per-parameter features before normalization (see `AdafacMLPLOpt`).

  The factored statistics enter as the RMS estimate sqrt(v_k) and the bounded normalized
  momenta m_i / sqrt(v_k + m_i^2), in (-1, 1), never as rsqrt(v_k) or m_i * rsqrt(v_k): dividing
  by the tensor's RMS would let one huge value flatten every other row's to ~0. rsqrt(v_k) is
  ~1e9 on a row whose gradient is always zero (a never-lit pixel, as in the digits' corners);
  m_i * rsqrt(v_k) grows ~4% a step on a row that goes quiet, where m_0.99 decays slower than
  sqrt(v_0.9). Where m_i^2 << v_k the bounded form is m_i * rsqrt(v_k).
  """
  def pairs(a, b, fn):  # [P, A], [P, B] -> [P, A * B]: fn of every column pair
    return fn(a[:, :, None], b[:, None, :]).reshape(a.shape[0], a.shape[1] * b.shape[1])

  return jnp.concatenate([
      p[:, None], g[:, None], momenta, jnp.sqrt(rms + EPS),
      pairs(momenta, rms, lambda m, v: m * jax.lax.rsqrt(v + EPS)),
      jnp.sqrt(factored_v + EPS),
      pairs(momenta, factored_v, lambda m, v: m * jax.lax.rsqrt(v + jnp.square(m) + EPS))],
      axis=1)


class AdafacMLPLOpt(base.LearnedOptimizer):
  """Step = d * exp(m * exp_mult) * step_mult, where (d, m) = MLP(features).

  Per-parameter features, each divided by its root-mean-square over the tensor: the parameter,
  its gradient, momenta m_i (`momentum_decays`), sqrt of the running mean of g^2 v_j
  (`rms_decays`), m_i * rsqrt(v_j), sqrt of the factored estimates f_k (`adafactor_decays`)
  and m_i / sqrt(f_k + m_i^2) (see `per_param_features`); plus the tanh time embedding (shared
  by all parameters). With the defaults that is 2 + 3 + 1 + 3 + 3 + 9 = 21 normalized features
  and 11 time features.

  Args:
    hidden_size: width of the MLP's hidden layers.
    hidden_layers: number of hidden layers.
    step_mult: scale of the step (the initial steps are about this size).
    exp_mult: scale of the log-magnitude output.
    momentum_decays, rms_decays, adafactor_decays: accumulator decays.
  """

  name = "adafac_mlp_lopt"

  def __init__(self, hidden_size: int = 32, hidden_layers: int = 2, step_mult: float = 1e-3,
               exp_mult: float = 1e-3, momentum_decays=MOMENTUM_DECAYS, rms_decays=RMS_DECAYS,
               adafactor_decays=ADAFACTOR_DECAYS):
    base.check_args(self.name, widths={"hidden_size": hidden_size},
                    counts={"hidden_layers": hidden_layers}, positive={"step_mult": step_mult},
                    non_negative={"exp_mult": exp_mult},
                    decays={"momentum_decays": momentum_decays, "rms_decays": rms_decays,
                            "adafactor_decays": adafactor_decays})
    self.step_mult = step_mult
    self.exp_mult = exp_mult
    self.momentum_decays = tuple(momentum_decays)
    self.rms_decays = tuple(rms_decays)
    self.adafactor_decays = tuple(adafactor_decays)
    self.net = networks.MLP([hidden_size] * hidden_layers, 2)
    nm, nr, nf = len(self.momentum_decays), len(self.rms_decays), len(self.adafactor_decays)
    self.num_features = 2 + nm + nr + nm * nr + nf + nm * nf + len(feat.TIMESCALES)

  def init(self, key):
    return self.net.init(key, jnp.zeros([1, self.num_features]))

  def opt_fn(self, theta, is_training=False):
    return _AdafacMLPLOptOptimizer(self, theta)


class _AdafacMLPLOptOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: AdafacMLPLOpt, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(params)
    size = sum(layout.sizes)
    return AdafacMLPLOptState(
        params=params, model_state=model_state, iteration=jnp.asarray(0, jnp.int32),
        momenta=jnp.zeros([size, len(lopt.momentum_decays)], jnp.float32),
        rms=jnp.zeros([size, len(lopt.rms_decays)], jnp.float32),
        factored=tuple(init_factored(s, len(lopt.adafactor_decays)) for s in layout.shapes))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(opt_state.params)
    p, g = feat.flatten(opt_state.params), feat.flatten(grads)
    momenta = feat.ema(opt_state.momenta, g, jnp.asarray(lopt.momentum_decays, jnp.float32))
    rms = feat.ema(opt_state.rms, jnp.square(g), jnp.asarray(lopt.rms_decays, jnp.float32))
    fac_decays = jnp.asarray(lopt.adafactor_decays, jnp.float32)
    updated = [update_factored(acc, leaf.astype(jnp.float32), fac_decays)
               for acc, leaf in zip(opt_state.factored, jax.tree_util.tree_leaves(grads))]
    factored = [acc for acc, _ in updated]
    fac_v = jnp.concatenate([v for _, v in updated] or [jnp.zeros([0, len(fac_decays)])],
                            axis=0)  # [P, K]
    per_param = feat.second_moment_normalize(
        per_param_features(p, g, momenta, rms, fac_v), layout)
    time = feat.tanh_time_embedding(opt_state.iteration)
    time = jnp.broadcast_to(time, (p.shape[0], time.shape[0]))
    out = lopt.net.apply(self.theta, jnp.concatenate([per_param, time], axis=1))
    step = networks.direction_magnitude_step(out, lopt.step_mult, lopt.exp_mult)
    return AdafacMLPLOptState(
        params=feat.apply_step(opt_state.params, layout, step),
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, momenta=momenta, rms=rms, factored=tuple(factored))

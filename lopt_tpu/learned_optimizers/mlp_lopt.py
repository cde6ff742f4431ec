"""MLPLOpt: a per-parameter MLP on gradient, parameter and six momenta, plus a time embedding."""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import networks
from lopt_tpu.optimizers import base as opt_base

DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


@flax.struct.dataclass
class MLPLOptState:
  params: object
  model_state: object
  iteration: jax.Array
  momenta: jax.Array  # [len(DECAYS), P]: feature-major over the flat params


class MLPLOpt(base.LearnedOptimizer):
  """Step = d * exp(m * exp_mult) * step_mult, where (d, m) = MLP(features).

  Features per parameter: the parameter, its gradient and its momenta at decays 0.1 … 0.9999,
  each divided by its root-mean-square over the tensor; plus tanh(t / s - 1) for 11 time
  scales s, shared by all parameters (they enter the first layer as a bias). The MLP runs
  once over all parameters of the task, feature-major ([features, P]).
  """

  name = "mlp_lopt"

  def __init__(self, hidden_size: int = 32, hidden_layers: int = 2, step_mult: float = 1e-3,
               exp_mult: float = 1e-3, decays=DECAYS):
    base.check_args(self.name, widths={"hidden_size": hidden_size},
                    counts={"hidden_layers": hidden_layers}, positive={"step_mult": step_mult},
                    non_negative={"exp_mult": exp_mult}, decays={"decays": decays})
    self.step_mult = step_mult
    self.exp_mult = exp_mult
    self.decays = tuple(decays)
    self.net = networks.FeatureMajorMLP([hidden_size] * hidden_layers, 2)
    self.num_param_features = 2 + len(self.decays)

  def init(self, key):
    return self.net.init(key, jnp.zeros([self.num_param_features, 1]),
                         jnp.zeros([len(feat.TIMESCALES)]))

  def opt_fn(self, theta, is_training=False):
    return _MLPLOptOptimizer(self, theta)


class _MLPLOptOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: MLPLOpt, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    size = feat.flatten(params).shape[0]
    return MLPLOptState(params=params, model_state=model_state,
                        iteration=jnp.asarray(0, jnp.int32),
                        momenta=jnp.zeros([len(self.lopt.decays), size], jnp.float32))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(opt_state.params)
    p = feat.flatten(opt_state.params)
    g = feat.flatten(grads)
    decays = jnp.asarray(lopt.decays, jnp.float32)[:, None]
    momenta = decays * opt_state.momenta + (1.0 - decays) * g[None, :]
    per_param = jnp.concatenate([p[None, :], g[None, :], momenta], axis=0)
    per_param = feat.second_moment_normalize(per_param, layout, axis=-1)
    out = lopt.net.apply(self.theta, per_param, feat.tanh_time_embedding(opt_state.iteration))
    step = out[0] * jnp.exp(out[1] * lopt.exp_mult) * lopt.step_mult
    return MLPLOptState(
        params=feat.apply_step(opt_state.params, layout, step),
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, momenta=momenta)

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
  momenta: jax.Array  # [P, len(DECAYS)] over the flat params


class MLPLOpt(base.LearnedOptimizer):
  """Step = d * exp(m * exp_mult) * step_mult, where (d, m) = MLP(features).

  Features per parameter: the parameter, its gradient and its momenta at decays 0.1 … 0.9999,
  each divided by its root-mean-square over the tensor; plus tanh(t / s - 1) for 11 time
  scales s, shared by all parameters. The MLP runs once over all parameters of the task.
  """

  name = "mlp_lopt"

  def __init__(self, hidden_size: int = 32, hidden_layers: int = 2, step_mult: float = 1e-3,
               exp_mult: float = 1e-3, decays=DECAYS):
    self.step_mult = step_mult
    self.exp_mult = exp_mult
    self.decays = tuple(decays)
    self.net = networks.MLP([hidden_size] * hidden_layers, 2)
    self.num_features = 2 + len(self.decays) + len(feat.TIMESCALES)

  def init(self, key):
    return self.net.init(key, jnp.zeros([1, self.num_features]))

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
                        momenta=jnp.zeros([size, len(self.lopt.decays)], jnp.float32))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(opt_state.params)
    p = feat.flatten(opt_state.params)
    g = feat.flatten(grads)
    momenta = feat.ema(opt_state.momenta, g, jnp.asarray(lopt.decays, jnp.float32))
    per_param = jnp.concatenate([p[:, None], g[:, None], momenta], axis=1)
    per_param = feat.second_moment_normalize(per_param, layout)
    time = feat.tanh_time_embedding(opt_state.iteration)
    time = jnp.broadcast_to(time, (p.shape[0], time.shape[0]))
    out = lopt.net.apply(self.theta, jnp.concatenate([per_param, time], axis=1))
    step = networks.direction_magnitude_step(out, lopt.step_mult, lopt.exp_mult)
    return MLPLOptState(
        params=feat.unflatten(layout, p - step),
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, momenta=momenta)

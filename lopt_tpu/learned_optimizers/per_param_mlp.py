"""PerParamMLP: the simplest per-parameter learned optimizer, an MLP on (param, grad, momentum)."""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import networks
from lopt_tpu.optimizers import base as opt_base


@flax.struct.dataclass
class PerParamMLPState:
  params: object
  model_state: object
  iteration: jax.Array
  momentum: jax.Array  # [P] float32 over the flat params


class PerParamMLP(base.LearnedOptimizer):
  """Step = d * exp(m * exp_mult) * step_mult, where (d, m) = MLP(param, grad, momentum).

  The three features are each divided by their root-mean-square over the tensor they belong
  to (`features.second_moment_normalize`), so the step size does not grow with the scale of a
  tensor's params or gradients (the raw features of the textbook version make the initial
  step explode on large gradients); features of RMS below ~3e-3 are normalized only in part.
  One hidden layer; the MLP runs once over all parameters of the task as a [P, 3] matrix.

  Args:
    decay: momentum decay, `m <- decay * m + (1 - decay) * g`.
    hidden_size: width of the hidden layer.
    step_mult: scale of the step (the initial steps are about this size).
    exp_mult: scale of the log-magnitude output.
  """

  name = "per_param_mlp"
  num_features = 3

  def __init__(self, decay: float = 0.9, hidden_size: int = 64, step_mult: float = 1e-2,
               exp_mult: float = 1e-2):
    base.check_args(self.name, widths={"hidden_size": hidden_size},
                    positive={"step_mult": step_mult}, non_negative={"exp_mult": exp_mult},
                    decays={"decay": decay})
    self.decay = decay
    self.step_mult = step_mult
    self.exp_mult = exp_mult
    self.net = networks.MLP([hidden_size], 2)

  def init(self, key):
    return self.net.init(key, jnp.zeros([1, self.num_features]))

  def opt_fn(self, theta, is_training=False):
    return _PerParamMLPOptimizer(self, theta)


class _PerParamMLPOptimizer(opt_base.Optimizer):

  def __init__(self, lopt: PerParamMLP, theta):
    self.lopt = lopt
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    size = sum(feat.layout_of(params).sizes)
    return PerParamMLPState(params=params, model_state=model_state,
                            iteration=jnp.asarray(0, jnp.int32),
                            momentum=jnp.zeros([size], jnp.float32))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    lopt = self.lopt
    layout = feat.layout_of(opt_state.params)
    p = feat.flatten(opt_state.params)
    g = feat.flatten(grads)
    momentum = lopt.decay * opt_state.momentum + (1.0 - lopt.decay) * g
    inputs = feat.second_moment_normalize(jnp.stack([p, g, momentum], axis=1), layout)
    out = lopt.net.apply(self.theta, inputs)
    step = networks.direction_magnitude_step(out, lopt.step_mult, lopt.exp_mult)
    return PerParamMLPState(
        params=feat.apply_step(opt_state.params, layout, step),
        model_state=opt_state.model_state if model_state is None else model_state,
        iteration=opt_state.iteration + 1, momentum=momentum)

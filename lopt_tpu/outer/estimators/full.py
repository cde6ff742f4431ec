"""Full-episode estimators: every call trains fresh tasks from scratch for the whole horizon.

Unbiased for the episode's meta-loss but memory (FullGrad) or compute (both) grow with the
horizon; they are the reference the truncated estimators are checked against.
"""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base


@flax.struct.dataclass
class FullEpisodeState:
  task_index: jax.Array  # the task slots this worker holds


class _FullEpisode(base.GradientEstimator):

  def __init__(self, unroll: unroll_lib.TruncatedUnroll, num_steps: int = None,
               loss_type: str = "average"):
    if loss_type not in base.META_LOSS_TYPES:
      raise ValueError(f"loss_type must be one of {base.META_LOSS_TYPES}, got {loss_type!r}")
    self.unroll = unroll
    self.num_steps = int(num_steps or unroll.trunc_sched.max_length)
    if self.num_steps <= 0:
      raise ValueError(f"num_steps must be positive, got {self.num_steps}")
    self.loss_type = loss_type

  def init_worker_state(self, theta, key, task_index=None):
    del theta, key
    return FullEpisodeState(task_index=base.default_task_index(self.unroll, task_index))

  def _episode(self, thetas, key, task_index, thetas_batched):
    """Runs fresh episodes; `thetas` has [S, T] axes when batched. Returns per-task losses."""
    k_init, k_unroll = jax.random.split(key)
    if thetas_batched:
      init = jax.vmap(lambda th: self.unroll.init_states(th, k_init, task_index, offset=0,
                                                         theta_batched=True))
      states = init(thetas)
    else:
      states = base.add_sample_axis(
          self.unroll.init_states(thetas, k_init, task_index, offset=0))
    _, out = self.unroll.unroll(thetas, states, k_unroll, self.num_steps,
                                thetas_batched=thetas_batched, allow_restart=False)
    per_task = jax.vmap(base.per_task_meta_loss, in_axes=(1, 1, None), out_axes=0)(
        out.meta_loss, out.valid, self.loss_type)  # [S, T]
    return per_task, out


class FullGrad(_FullEpisode):
  """Backpropagation through the entire inner run (exact gradient; memory grows with it)."""

  name = "full_grad"

  @property
  def inner_steps_per_call(self):
    return self.num_steps * self.unroll.num_tasks

  def compute_gradient_estimate(self, theta, state, key):
    def loss_fn(theta):
      per_task, out = self._episode(theta, key, state.task_index, thetas_batched=False)
      return jnp.mean(per_task), out

    (loss, out), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta)
    return base.finish(grad, loss, out), state


class FullES(_FullEpisode):
  """Antithetic evolution strategies over the entire inner run.

  grad = mean_i eps_i * (L(theta + eps_i) - L(theta - eps_i)) / (2 std^2), eps_i ~ N(0, std^2):
  an unbiased estimate of the gradient of the Gaussian-smoothed meta-loss, which needs no
  backpropagation and tolerates chaotic or non-differentiable inner training.
  """

  name = "full_es"

  def __init__(self, unroll, num_steps=None, loss_type="average", std: float = 0.01):
    super().__init__(unroll, num_steps, loss_type)
    if std <= 0:
      raise ValueError(f"std must be positive, got {std}")
    self.std = float(std)

  @property
  def inner_steps_per_call(self):
    return 2 * self.num_steps * self.unroll.num_tasks

  def compute_gradient_estimate(self, theta, state, key):
    k_eps, k_run = jax.random.split(key)
    eps = base.sample_perturbations(theta, k_eps, state.task_index, self.std)
    per_task, out = self._episode(base.antithetic_thetas(theta, eps), k_run, state.task_index,
                                  thetas_batched=True)
    both = jnp.isfinite(per_task[0]) & jnp.isfinite(per_task[1])
    delta = jnp.where(both, per_task[0] - per_task[1], 0.0)
    grad = base.weighted_task_mean(delta / (2 * self.std ** 2), eps)
    mean_loss = base.masked_mean(jnp.mean(per_task, axis=0), both)
    return base.finish(grad, mean_loss, out), state

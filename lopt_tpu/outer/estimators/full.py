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
    """Runs fresh episodes; `thetas` has [S, T] axes when batched. Returns their StepOut.

    Runs never restart, so a run that diverges stays invalid to the end of the episode; their
    length (what `Optimizer.init` is told as `num_steps`) is the episode's."""
    k_init, k_unroll = jax.random.split(key)
    if thetas_batched:
      init = jax.vmap(lambda th: self.unroll.init_states(th, k_init, task_index, offset=0,
                                                         theta_batched=True,
                                                         length=self.num_steps))
      states = init(thetas)
    else:
      states = base.add_sample_axis(
          self.unroll.init_states(thetas, k_init, task_index, offset=0, length=self.num_steps))
    _, out = self.unroll.unroll(thetas, states, k_unroll, self.num_steps,
                                thetas_batched=thetas_batched, allow_restart=False)
    return out

  def _per_task_loss(self, out, valid):
    """[S, T] meta-losses of the episodes in `out`, over the [K, T] steps `valid` allows."""
    return jax.vmap(base.per_task_meta_loss, in_axes=(1, None, None))(out.meta_loss, valid,
                                                                      self.loss_type)


class FullGrad(_FullEpisode):
  """Backpropagation through the entire inner run (exact gradient; memory grows with it).

  The gradient is the mean over tasks of each task's own gradient (one copy of theta per
  task); a task whose run diverged (non-finite loss or gradient) counts as zero, so it cannot
  wipe out the others' gradients.
  """

  name = "full_grad"

  @property
  def inner_steps_per_call(self):
    return self.num_steps * self.unroll.num_tasks

  def compute_gradient_estimate(self, theta, state, key):
    def per_task_loss(thetas):  # thetas: [1, T] copies
      out = self._episode(thetas, key, state.task_index, thetas_batched=True)
      return self._per_task_loss(out, out.valid[:, 0])[0], out, None

    estimate, _ = base.per_task_backprop(per_task_loss, theta, state.task_index.shape[0])
    return estimate, state


class FullES(_FullEpisode):
  """Antithetic evolution strategies over the entire inner run.

  grad = mean_i eps_i * (L(theta + eps_i) - L(theta - eps_i)) / (2 std^2), eps_i ~ N(0, std^2):
  an unbiased estimate of the gradient of the Gaussian-smoothed meta-loss, which needs no
  backpropagation and tolerates chaotic or non-differentiable inner training.

  Both runs of a pair are scored on the same steps: those where neither has diverged (as in
  TruncatedPES). A pair with no such step ("average") or whose last step is invalid ("last")
  adds nothing to the gradient.
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
    out = self._episode(base.antithetic_thetas(theta, eps), k_run, state.task_index,
                        thetas_batched=True)
    per_task = self._per_task_loss(out, out.valid[:, 0] & out.valid[:, 1])  # [2, T]
    both = jnp.isfinite(per_task[0]) & jnp.isfinite(per_task[1])
    delta = jnp.where(both, per_task[0] - per_task[1], 0.0)
    grad, bad = base.es_task_mean([(delta / (2 * self.std ** 2), eps)])
    return base.finish(grad, jnp.mean(per_task, axis=0), both, out, nonfinite_frac=bad), state

"""Truncated estimators: each call advances long inner runs by `trunc_length` steps.

Cheap per call and able to cover long horizons, but *biased*: they only see how theta changes
the losses inside the current truncation, not how it shaped the state the truncation started
from. (TruncatedPES in `pes.py` removes that bias.)
"""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base


@flax.struct.dataclass
class TruncatedState:
  unroll_state: unroll_lib.UnrollState  # leaves have a leading [T] axis


class _Truncated(base.GradientEstimator):

  num_samples = 1

  def __init__(self, unroll: unroll_lib.TruncatedUnroll, trunc_length: int):
    if trunc_length <= 0:
      raise ValueError(f"trunc_length must be positive, got {trunc_length}")
    self.unroll = unroll
    self.trunc_length = int(trunc_length)

  @property
  def inner_steps_per_call(self):
    return self.num_samples * self.trunc_length * self.unroll.num_tasks

  def init_worker_state(self, theta, key, task_index=None):
    task_index = base.default_task_index(self.unroll, task_index)
    return TruncatedState(self.unroll.init_states(theta, key, task_index))


class TruncatedGrad(_Truncated):
  """Truncated backpropagation through time: the exact gradient of this truncation's meta-loss
  (each task's mean over its valid steps, averaged over tasks) with the starting state held
  fixed. Each task's gradient is its own (one copy of theta per task): a task with a
  non-finite loss or gradient counts as zero instead of poisoning the others, and the mean over
  tasks splits exactly over devices."""

  name = "truncated_grad"

  def compute_gradient_estimate(self, theta, state, key):
    start = base.add_sample_axis(jax.lax.stop_gradient(state.unroll_state))

    def per_task_loss(thetas):  # thetas: [1, T] copies
      states, out = self.unroll.unroll(thetas, start, key, self.trunc_length)
      per_task = base.per_task_meta_loss(out.meta_loss[:, 0], out.valid[:, 0], "average")
      return per_task, out, states

    estimate, states = base.per_task_backprop(per_task_loss, theta,
                                              state.unroll_state.task_index.shape[0])
    next_state = TruncatedState(jax.tree_util.tree_map(lambda x: x[0], states))
    return estimate, next_state


class TruncatedES(_Truncated):
  """Antithetic ES on one truncation: both signs start from the shared state; the positive
  branch's state is carried on (no third, unperturbed unroll is spent)."""

  name = "truncated_es"
  num_samples = 2

  def __init__(self, unroll, trunc_length, std: float = 0.01):
    super().__init__(unroll, trunc_length)
    if std <= 0:
      raise ValueError(f"std must be positive, got {std}")
    self.std = float(std)

  def compute_gradient_estimate(self, theta, state, key):
    k_eps, k_run = jax.random.split(key)
    task_index = state.unroll_state.task_index
    eps = base.sample_perturbations(theta, k_eps, task_index, self.std)
    states, out = self.unroll.unroll(base.antithetic_thetas(theta, eps),
                                     base.add_sample_axis(state.unroll_state, 2), k_run,
                                     self.trunc_length)
    valid = out.valid[:, 0] & out.valid[:, 1]  # [K, T]
    delta = base.masked_mean(out.meta_loss[:, 0] - out.meta_loss[:, 1], valid, axis=0)
    grad, bad = base.es_task_mean([(delta / (2 * self.std ** 2), eps)])
    next_state = TruncatedState(jax.tree_util.tree_map(lambda x: x[0], states))
    return base.finish(grad, jnp.mean(out.meta_loss, axis=1), valid, out,
                       nonfinite_frac=bad), next_state

"""Truncated Persistent Evolution Strategies (PES; Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each task i keeps a positive and a negative inner run, advanced with theta + eps_i and
theta - eps_i, and an accumulator xi_i = the sum of the perturbations applied since its run
began. For a truncation of K steps with fresh perturbation eps_i:

    g = 1 / (2 std^2) * mean_i [ (1/K) sum_t (L+_{i,t} - L-_{i,t}) * w_{i,t} ]
    w_{i,t} = xi_i + eps_i  for steps of the run that was going when the truncation began,
            = eps_i         for steps of a run that restarted inside this truncation,
    xi_i   <- eps_i if task i restarted in this truncation, else xi_i + eps_i.

Because w carries every perturbation that influenced the loss, summing g over the truncations
of a run estimates the gradient of the run's mean loss without truncation bias.
"""

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base


@flax.struct.dataclass
class PESState:
  pos_state: unroll_lib.UnrollState  # leaves [T, ...]
  neg_state: unroll_lib.UnrollState
  accumulator: object  # theta-like, leaves [T, ...]


class TruncatedPES(base.GradientEstimator):
  """Truncated PES with antithetic pairs evaluated as one stacked vmap.

  Args:
    unroll: the vectorized inner runs.
    trunc_length: inner steps per call (static).
    std: perturbation standard deviation.
    sign_delta_loss_scalar: if set, replace each loss difference by its sign times this
      value (robust to heavy-tailed losses, at the price of a biased scale).
  """

  name = "truncated_pes"

  def __init__(self, unroll: unroll_lib.TruncatedUnroll, trunc_length: int, std: float = 0.01,
               sign_delta_loss_scalar: float = None):
    if trunc_length <= 0:
      raise ValueError(f"trunc_length must be positive, got {trunc_length}")
    if std <= 0:
      raise ValueError(f"std must be positive, got {std}")
    self.unroll = unroll
    self.trunc_length = int(trunc_length)
    self.std = float(std)
    self.sign_delta_loss_scalar = sign_delta_loss_scalar

  @property
  def inner_steps_per_call(self):
    return 2 * self.trunc_length * self.unroll.num_tasks

  def init_worker_state(self, theta, key, task_index=None):
    task_index = base.default_task_index(self.unroll, task_index)
    states = self.unroll.init_states(theta, key, task_index)
    zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros((task_index.shape[0],) + jnp.shape(x), jnp.result_type(x)), theta)
    return PESState(pos_state=states, neg_state=states, accumulator=zeros)

  def compute_gradient_estimate(self, theta, state, key):
    k_eps, k_run = jax.random.split(key)
    eps = base.sample_perturbations(theta, k_eps, state.pos_state.task_index, self.std)
    pair = jax.tree_util.tree_map(lambda p, n: jnp.stack([p, n]), state.pos_state,
                                  state.neg_state)
    states, out = self.unroll.unroll(base.antithetic_thetas(theta, eps), pair, k_run,
                                     self.trunc_length)
    valid = out.valid[:, 0] & out.valid[:, 1]  # [K, T]
    delta = jnp.where(valid, out.meta_loss[:, 0] - out.meta_loss[:, 1], 0.0)
    if self.sign_delta_loss_scalar is not None:
      delta = jnp.sign(delta) * self.sign_delta_loss_scalar
    done = out.is_done[:, 0]  # [K, T], shared by the pair
    restarts_before = jnp.cumsum(done, axis=0) - done
    in_old_run = restarts_before == 0
    scale = 1.0 / (2 * self.std ** 2 * self.trunc_length)
    old_weight = jnp.sum(jnp.where(in_old_run, delta, 0.0), axis=0) * scale  # [T]
    new_weight = jnp.sum(jnp.where(in_old_run, 0.0, delta), axis=0) * scale
    xi = jax.tree_util.tree_map(jnp.add, state.accumulator, eps)
    grad = jax.tree_util.tree_map(jnp.add, base.weighted_task_mean(old_weight, xi),
                                  base.weighted_task_mean(new_weight, eps))
    restarted = jnp.any(done, axis=0)
    accumulator = jax.tree_util.tree_map(
        lambda e, x: jnp.where(jnp.reshape(restarted, (-1,) + (1,) * (e.ndim - 1)), e, x),
        eps, xi)
    mean_loss = base.masked_mean(jnp.mean(out.meta_loss, axis=1), valid)
    next_state = PESState(pos_state=jax.tree_util.tree_map(lambda x: x[0], states),
                          neg_state=jax.tree_util.tree_map(lambda x: x[1], states),
                          accumulator=accumulator)
    return base.finish(grad, mean_loss, out), next_state

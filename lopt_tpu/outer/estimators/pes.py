"""Truncated Persistent Evolution Strategies (PES; Vicol, Metz, Sohl-Dickstein, ICML 2021).

Each task i keeps a positive and a negative inner run, advanced with theta + eps_i and
theta - eps_i, and an accumulator xi_i = the sum of the perturbations applied since its run
began. For a truncation of K steps with fresh perturbation eps_i:

    g = 1 / (2 std^2) * mean_i [ (1/K) sum_t (L+_{i,t} - L-_{i,t}) * w_{i,t} ]
    w_{i,t} = xi_i + eps_i  for steps of the run that was going when the truncation began,
            = eps_i         for steps of a run that restarted inside this truncation,
    xi_i   <- eps_i if task i restarted in this truncation, else xi_i + eps_i.

The first runs start like restarted ones: built with theta +- eps_0 and xi_i = eps_0. Because
w carries every perturbation that influenced the loss, averaging g over the truncations of a
run estimates the gradient of the run's mean loss without truncation bias.
"""

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp

from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base


@flax.struct.dataclass
class PESState:
  pair: unroll_lib.UnrollState  # leaves [2, T, ...]: the positive runs, then the negative ones
  accumulator: jax.Array  # [T, P]: xi_i over theta flattened (`jax.flatten_util.ravel_pytree`)

  @property
  def pos_state(self) -> unroll_lib.UnrollState:
    return jax.tree_util.tree_map(lambda x: x[0], self.pair)

  @property
  def neg_state(self) -> unroll_lib.UnrollState:
    return jax.tree_util.tree_map(lambda x: x[1], self.pair)


class TruncatedPES(base.GradientEstimator):
  """Truncated PES with antithetic pairs evaluated as one stacked vmap.

  The pair of runs is stored stacked ([2, T, ...]) exactly as the unroll consumes and returns
  it, and the perturbation algebra (xi, weights, gradient) runs on theta flattened into one
  vector: per-leaf stacking, slicing and reductions would otherwise be hundreds of tiny
  kernels that XLA compiles one by one (BENCHMARKS.md, first-step compile time).

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
    """The first runs, built with theta +- eps_0 and xi = eps_0, exactly as a restart builds
    them: a learned optimizer whose theta enters its `init` (an RNN's initial carry) would
    otherwise get no PES signal for that part of theta until each task's first restart."""
    task_index = base.default_task_index(self.unroll, task_index)
    k_runs, k_eps = jax.random.split(key)
    flat, unravel = jax.flatten_util.ravel_pytree(theta)
    eps = base.sample_flat_perturbations(flat, k_eps, task_index, self.std)  # [T, P]
    thetas = jax.vmap(jax.vmap(unravel))(jnp.stack([flat + eps, flat - eps]))
    pair = jax.vmap(lambda th: self.unroll.init_states(th, k_runs, task_index,
                                                       theta_batched=True))(thetas)
    return PESState(pair=pair, accumulator=eps)

  def state_partition_specs(self, state):
    return PESState(pair=base.partition_specs(state.pair, task_axis=1),
                    accumulator=base.partition_specs(state.accumulator))

  def compute_gradient_estimate(self, theta, state, key):
    k_eps, k_run = jax.random.split(key)
    flat_theta, unravel = jax.flatten_util.ravel_pytree(theta)
    task_index = state.pair.task_index[0]
    eps = base.sample_flat_perturbations(flat_theta, k_eps, task_index, self.std)  # [T, P]
    thetas = jax.vmap(jax.vmap(unravel))(jnp.stack([flat_theta + eps, flat_theta - eps]))
    states, out = self.unroll.unroll(thetas, state.pair, k_run, self.trunc_length)
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
    xi = state.accumulator + eps
    grad, bad = base.es_task_mean([(old_weight, xi), (new_weight, eps)])
    restarted = jnp.any(done, axis=0)
    accumulator = jnp.where(restarted[:, None], eps, xi)
    estimate = base.finish(grad, jnp.mean(out.meta_loss, axis=1), valid, out,
                           nonfinite_frac=bad)
    return estimate.replace(grad=unravel(estimate.grad)), PESState(pair=states,
                                                                   accumulator=accumulator)

"""The gradient-estimator interface and the helpers its implementations share.

An estimator turns meta-parameters `theta` and its worker state (the inner runs it is
advancing) into an estimate of d(meta-loss)/d(theta). All of its outputs are *means over the
tasks it holds*, so that equal-sized shards combine exactly by averaging: the gradient and the
fractions are plain means, and each loss, a mean over the valid entries only, comes with its
weight (the fraction of entries that were valid) so that shards are averaged in proportion to
what they scored (`masked_mean` of the shards' values, see `GradientEstimate`).
"""

from typing import Any, Dict, Optional

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp

from lopt_tpu.outer import sharding
from lopt_tpu.outer import unroll as unroll_lib

META_LOSS_TYPES = ("average", "last")


@flax.struct.dataclass
class GradientEstimate:
  """An estimator's output over the tasks it holds.

  `mean_loss` and the metrics named in `metric_weights` are means over valid entries only;
  `loss_weight` / `metric_weights[name]` is the fraction of entries that were valid. Shards of
  the tasks combine exactly as sum(value * weight) / sum(weight) (plain averaging would let a
  shard whose runs all diverged, reporting 0, pull the mean down).
  """
  grad: Any  # same tree as theta
  mean_loss: jax.Array
  metrics: Dict[str, jax.Array]
  loss_weight: jax.Array
  metric_weights: Dict[str, jax.Array]


class GradientEstimator:
  """`init_worker_state(theta, key)` then repeatedly `compute_gradient_estimate`.

  `task_index` (default: all tasks) selects which global task slots this worker holds, so a
  shard of the tasks gets exactly the random numbers it would get unsharded.
  """

  name = "estimator"
  unroll: unroll_lib.TruncatedUnroll

  @property
  def inner_steps_per_call(self) -> int:
    """Inner-step evaluations (forward+backward of the task) per `compute_gradient_estimate`."""
    raise NotImplementedError

  def init_worker_state(self, theta, key: jax.Array, task_index=None):
    raise NotImplementedError

  def compute_gradient_estimate(self, theta, state, key: jax.Array):
    raise NotImplementedError

  def state_partition_specs(self, state):
    """Where each worker-state leaf keeps its task axis, as `PartitionSpec`s over `TASKS`
    (default: every leaf task-major). The sharded learner splits that axis over devices."""
    return partition_specs(state)


def partition_specs(tree, task_axis: int = 0):
  """`PartitionSpec`s splitting axis `task_axis` of every leaf of `tree` over `TASKS`."""
  spec = jax.sharding.PartitionSpec(*([None] * task_axis + [sharding.TASKS]))
  return jax.tree_util.tree_map(lambda _: spec, tree)


def default_task_index(unroll: unroll_lib.TruncatedUnroll, task_index=None) -> jax.Array:
  if task_index is None:
    return jnp.arange(unroll.num_tasks, dtype=jnp.int32)
  return jnp.asarray(task_index, jnp.int32)


def sample_flat_perturbations(flat_theta: jax.Array, key: jax.Array, task_index: jax.Array,
                              std: float) -> jax.Array:
  """[T, P] Gaussian perturbations of the flattened theta, task i's from `fold_in(key, i)`."""
  def one(i):
    return std * jax.random.normal(jax.random.fold_in(key, i), flat_theta.shape,
                                   flat_theta.dtype)

  return jax.vmap(one)(task_index)


def sample_perturbations(theta, key: jax.Array, task_index: jax.Array, std: float):
  """One Gaussian perturbation of `theta` per task: a tree with a leading [T] axis.

  One normal draw of theta's total size per task, cut into leaves: a single PRNG call per
  task instead of one per leaf, which on CPU is several seconds less to compile.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(theta)
  return jax.vmap(unravel)(sample_flat_perturbations(flat, key, task_index, std))


def antithetic_thetas(theta, eps):
  """Stacks theta + eps and theta - eps: leaves get leading [2, T] axes."""
  return jax.tree_util.tree_map(lambda t, e: jnp.stack([t + e, t - e]), theta, eps)


def add_sample_axis(tree, num_samples: int = 1):
  """Gives every leaf a leading sample axis (copies when num_samples > 1)."""
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(x, (num_samples,) + jnp.shape(x)), tree)


def es_task_mean(terms):
  """The ES / PES gradient: the mean over tasks of sum_j w_j[i] * e_j[i], for `terms` pairs of
  [T] weights w_j and perturbation trees e_j of [T, ...] leaves, a task any of whose entries is
  non-finite counted as zero (the denominator stays T, so equal shards still combine exactly).

  The weights are loss differences times 1 / (2 std^2): one task's finite but huge difference
  can overflow to inf, which in a plain mean over tasks would make every entry non-finite, and
  sanitizing would then zero the whole gradient, every other task's part with it.

  Returns (grad, fraction of the per-task entries that were non-finite).
  """
  def contribution(w, e):
    return jnp.reshape(w, w.shape + (1,) * (e.ndim - 1)).astype(e.dtype) * e

  per_task = None
  for w, e in terms:
    part = jax.tree_util.tree_map(lambda e, w=w: contribution(w, e), e)
    per_task = part if per_task is None else jax.tree_util.tree_map(jnp.add, per_task, part)
  grad, _, bad = _mean_of_finite_tasks(per_task)
  return grad, bad


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of `x` where `mask` is set, 0 where nothing is; divides before adding, so that large
  finite values (losses near float32's max) average to a finite mean instead of inf."""
  mask = mask.astype(x.dtype)
  count = jnp.maximum(jnp.sum(mask, axis=axis, keepdims=True), 1.0)
  return jnp.sum(jnp.where(mask > 0, x / count, 0.0), axis=axis)


def per_task_meta_loss(meta_loss: jax.Array, valid: jax.Array, loss_type: str) -> jax.Array:
  """Reduces [steps, T] losses to [T]: the average over the valid steps, or the last step's loss.

  NaN where there is nothing valid to reduce (no valid step; or, for "last", an invalid last
  step, as a diverged run's is), so that callers drop that task instead of scoring it 0.
  """
  if loss_type == "average":
    return jnp.where(jnp.any(valid, axis=0), masked_mean(meta_loss, valid, axis=0), jnp.nan)
  return jnp.where(valid[-1], meta_loss[-1], jnp.nan)


def per_task_backprop(per_task_loss_fn, theta, num_tasks: int):
  """The backpropagation estimate from per-task gradients, as FullGrad and TruncatedGrad use it.

  `per_task_loss_fn(thetas)` gets theta with leading [1, T] (sample, task) axes, one copy per
  task, and returns ([T] losses, their StepOut, anything else the caller needs back).
  Differentiating with respect to the copies gives every task its own gradient, which a
  diverged task cannot poison (its NaNs stay in its own copy, where 0 * NaN in a shared
  backward pass would spread them to all). Returns (GradientEstimate, the anything else).
  """
  thetas = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (1, num_tasks) + jnp.shape(x)),
                                  theta)

  def total_loss(thetas):
    per_task, out, extra = per_task_loss_fn(thetas)
    return jnp.sum(per_task), (per_task, out, extra)

  (_, (per_task, out, extra)), grads = jax.value_and_grad(total_loss, has_aux=True)(thetas)
  grad, ok, bad = _mean_of_finite_tasks(jax.tree_util.tree_map(lambda g: g[0], grads), per_task)
  return finish(grad, per_task, ok, out, nonfinite_frac=bad), extra


# Every estimate's entries are bounded to +-this: each task's part before the mean over tasks,
# and the estimate itself. The means over tasks, estimators, devices and hosts then cannot
# overflow (they add before they divide: two finite 2e38 parts made inf, and a clipped theta
# NaN for good), and Adam's second moment, g^2 in float32, stays finite (one entry above ~1.8e19
# made it inf, and every later update of that entry exactly 0). No useful meta-gradient entry
# comes near it. It does not make Adam recover quickly from such a spike (its second moment
# decays by b2 = 0.999 per step): `meta_grad_clip` does that.
MAX_GRAD_ENTRY = 1e18


def bound_entries(x: jax.Array) -> jax.Array:
  return jnp.clip(x, -MAX_GRAD_ENTRY, MAX_GRAD_ENTRY)


def _mean_of_finite_tasks(per_task_grads, per_task_loss: Optional[jax.Array] = None):
  """Mean over the T tasks of [T, ...] gradients, a task with a non-finite gradient (or loss,
  when given) counted as zero (the denominator stays T, so equal shards still combine exactly
  by `pmean`), each task's entries bounded to +-`MAX_GRAD_ENTRY`.

  Returns (grad, ok [T] bool, fraction of gradient entries that were non-finite).
  """
  leaves = jax.tree_util.tree_leaves(per_task_grads)
  finite = [jnp.all(jnp.isfinite(jnp.reshape(g, (g.shape[0], -1))), axis=1) for g in leaves]
  ok = jnp.all(jnp.stack(finite), axis=0)
  if per_task_loss is not None:
    ok = ok & jnp.isfinite(per_task_loss)
  bad = sum(jnp.sum(~jnp.isfinite(g)) for g in leaves) / max(sum(g.size for g in leaves), 1)

  def mean(g):
    keep = jnp.reshape(ok, ok.shape + (1,) * (g.ndim - 1))
    return jnp.mean(bound_entries(jnp.where(keep, g, 0.0)), axis=0)

  return jax.tree_util.tree_map(mean, per_task_grads), ok, bad


def sanitize_grad(grad):
  """Zeroes non-finite gradient entries so one bad inner run never poisons theta, and bounds
  the others to +-`MAX_GRAD_ENTRY`.

  Returns (grad, fraction of entries that were non-finite).
  """
  leaves = jax.tree_util.tree_leaves(grad)
  bad = sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)
  total = sum(x.size for x in leaves)
  clean = jax.tree_util.tree_map(lambda x: bound_entries(jnp.where(jnp.isfinite(x), x, 0.0)),
                                 grad)
  return clean, bad / max(total, 1)


def step_metrics(out: unroll_lib.StepOut):
  """Means over steps, samples and tasks: restarts, divergences, training loss (over its
  finite entries). Returns (metrics, weights of the masked ones)."""
  f32 = jnp.float32
  finite = jnp.isfinite(out.loss)
  metrics = {
      "restart_frac": jnp.mean(out.is_done.astype(f32)),
      "diverged_frac": jnp.mean(out.diverged.astype(f32)),
      "inner_train_loss": masked_mean(out.loss, finite),
  }
  return metrics, {"inner_train_loss": jnp.mean(finite.astype(f32))}


def finish(grad, losses: jax.Array, valid: jax.Array, out: unroll_lib.StepOut,
           nonfinite_frac=None) -> GradientEstimate:
  """The estimate: the sanitized gradient, the mean of `losses` over its `valid` entries (with
  their fraction as its weight) and the step metrics. `nonfinite_frac`: the fraction of
  non-finite gradient entries when the caller already removed them (default: `grad`'s)."""
  grad, bad = sanitize_grad(grad)
  metrics, metric_weights = step_metrics(out)
  metrics["nonfinite_grad_frac"] = jnp.asarray(bad if nonfinite_frac is None else nonfinite_frac,
                                               jnp.float32)
  return GradientEstimate(grad=grad, mean_loss=masked_mean(losses, valid), metrics=metrics,
                          loss_weight=jnp.mean(valid.astype(jnp.float32)),
                          metric_weights=metric_weights)

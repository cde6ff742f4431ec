"""Vectorized truncated unrolls: many inner training runs advanced together under one `lax.scan`.

One `TruncatedUnroll` describes *what* is trained (a task family), *with what* (a learned
optimizer) and *for how long* (a truncation schedule). Its state holds `num_tasks` inner runs,
each with its own task, params, optimizer state and step counter; a run that reaches its
sampled length (or diverges) is restarted in place with a fresh task and fresh params.

Estimators call `unroll` with a leading "sample" axis S (S=2 for an antithetic pair): the S
copies of each task share every random number (data, restarts) and restart together, and only
their meta-parameters differ. Randomness for task i is derived from `fold_in(key, task_index[i])`
so that a task sees the same keys whichever device it is sharded to.
"""

from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp

from lopt_tpu.learned_optimizers import base as lopt_base
from lopt_tpu.outer import truncation
from lopt_tpu.tasks import base as tasks_base

META_LOSS_SPLITS = ("train", "valid")
# "log" makes the meta-objective the mean log loss: every halving of the loss counts the same,
# early or late, so the end of a long run is not drowned out by its first steps.
META_LOSS_TRANSFORMS = ("none", "log")
LOG_LOSS_FLOOR = 1e-8  # log of losses below this (exact zeros) is clipped; no gradient there
# On CPU, runs are unrolled in chunks whose state (params, optimizer state; all S samples) fits
# in about this many bytes per device, so that a chunk's working set stays in cache (see
# `TruncatedUnroll.unroll`; measured in BENCHMARKS.md: digits-MLP runs with MLPLOpt are ~190 KB
# a task, so 4-5 tasks a chunk, while tiny tasks such as small quadratics are never chunked).
CPU_CHUNK_BYTES = 1 << 20


@flax.struct.dataclass
class UnrollState:
  """State of one inner run (batched: every leaf gets leading task / sample axes)."""
  opt_state: Any
  task_params: Any
  inner_step: jax.Array  # int32: steps taken in the current run
  length: jax.Array  # int32: the run restarts once inner_step reaches this
  task_index: jax.Array  # int32: global index of this task slot, for key derivation


class StepOut(NamedTuple):
  """What one inner step reports (leading axes added by vmap/scan)."""
  loss: jax.Array  # training loss at the params before the update
  meta_loss: jax.Array  # loss the meta-objective averages (train or validation split)
  is_done: jax.Array  # bool: the run ended at this step and restarted after it (never in
  # the full-episode unrolls, which do not restart)
  diverged: jax.Array  # bool: non-finite loss or params; the run was restarted
  valid: jax.Array  # bool: meta_loss is finite and may enter a gradient


def all_finite(tree) -> jax.Array:
  """Whether every entry of every floating leaf of `tree` is finite (checked per leaf: a norm
  of the whole tree could overflow first)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class TruncatedUnroll:
  """Inner training of `num_tasks` instances of `task_family` with a learned optimizer.

  Args:
    task_family: what to train.
    learned_opt: the learned optimizer whose `theta` is meta-trained.
    trunc_sched: samples each inner run's length.
    num_tasks: instances trained in parallel (the global count when sharded).
    random_initial_iteration_offset: initial step counters are drawn from
      [0, min(offset, the run's length)) so the instances restart at different times instead
      of in lock step.
    meta_loss_split: "train" (loss on the training batch, free) or "valid" (an extra loss
      evaluation on a validation batch after each update).
    meta_loss_transform: "none" (the loss itself) or "log" (its logarithm, floored at
      LOG_LOSS_FLOOR; for losses that are positive, like cross-entropy).
    tasks_per_chunk: unroll at most this many tasks (per device) at a time, in sequence (0: all
      at once; None: on CPU as many as fit in CPU_CHUNK_BYTES, on accelerators all at once).
  """

  def __init__(self, task_family: tasks_base.TaskFamily, learned_opt: lopt_base.LearnedOptimizer,
               trunc_sched: truncation.TruncationSchedule, num_tasks: int,
               random_initial_iteration_offset: int = 0, meta_loss_split: str = "train",
               meta_loss_transform: str = "none", tasks_per_chunk: Optional[int] = None):
    if num_tasks <= 0:
      raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    if meta_loss_split not in META_LOSS_SPLITS:
      raise ValueError(f"meta_loss_split must be one of {META_LOSS_SPLITS}, got "
                       f"{meta_loss_split!r}")
    if meta_loss_transform not in META_LOSS_TRANSFORMS:
      raise ValueError(f"meta_loss_transform must be one of {META_LOSS_TRANSFORMS}, got "
                       f"{meta_loss_transform!r}")
    self.task_family = task_family
    self.learned_opt = learned_opt
    self.trunc_sched = trunc_sched
    self.num_tasks = int(num_tasks)
    self.random_initial_iteration_offset = int(random_initial_iteration_offset)
    self.meta_loss_split = meta_loss_split
    self.meta_loss_transform = meta_loss_transform
    self.tasks_per_chunk = tasks_per_chunk

  # ---- one task ------------------------------------------------------------------------------

  def new_run(self, theta, key: jax.Array, task_index: jax.Array,
              length: Optional[int] = None) -> UnrollState:
    """A fresh inner run for one task slot: new task, new params, and a new length drawn from
    the truncation schedule unless `length` is given (a full episode's)."""
    k_task, k_params, k_len, k_opt = jax.random.split(key, 4)
    task_params = self.task_family.sample(k_task)
    task = self.task_family.task_fn(task_params)
    params, model_state = task.init_with_state(k_params)
    if length is None:
      length = self.trunc_sched.sample_length(k_len)
    length = jnp.asarray(length, jnp.int32)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    opt_state = opt.init(params, model_state=model_state, num_steps=length, key=k_opt)
    return UnrollState(opt_state=opt_state, task_params=task_params,
                       inner_step=jnp.asarray(0, jnp.int32), length=length,
                       task_index=jnp.asarray(task_index, jnp.int32))

  def advance(self, theta, state: UnrollState, key: jax.Array):
    """One inner step of one task (no restart). Returns (next_state, StepOut)."""
    k_batch, k_loss, k_opt, k_valid = jax.random.split(key, 4)
    task = self.task_family.task_fn(state.task_params)
    opt = self.learned_opt.opt_fn(theta, is_training=True)
    params = opt.get_params(state.opt_state)
    model_state = opt.get_state(state.opt_state)
    batch = task.sample_batch(k_batch, "train")
    (loss, model_state), grads = jax.value_and_grad(task.loss_with_state, has_aux=True)(
        params, model_state, k_loss, batch)
    opt_state = opt.update(state.opt_state, grads, loss=loss, model_state=model_state, key=k_opt)
    if self.meta_loss_split == "valid":
      k_vbatch, k_vloss = jax.random.split(k_valid)
      vbatch = task.sample_batch(k_vbatch, "valid")
      meta_loss, _ = task.loss_with_state(opt.get_params(opt_state), model_state, k_vloss,
                                          vbatch)
    else:
      meta_loss = loss
    if self.meta_loss_transform == "log":
      meta_loss = jnp.log(jnp.maximum(meta_loss, LOG_LOSS_FLOOR))
    finite = jnp.isfinite(loss) & jnp.isfinite(meta_loss)
    diverged = ~(finite & all_finite(opt.get_params(opt_state)))
    inner_step = state.inner_step + 1
    out = StepOut(loss=loss, meta_loss=meta_loss, is_done=(inner_step >= state.length) | diverged,
                  diverged=diverged, valid=finite)
    return state.replace(opt_state=opt_state, inner_step=inner_step), out

  # ---- many tasks ----------------------------------------------------------------------------

  def init_states(self, theta, key: jax.Array, task_index: Optional[jax.Array] = None,
                  offset: Optional[int] = None, theta_batched: bool = False,
                  length: Optional[int] = None) -> UnrollState:
    """Fresh runs for `task_index` (default: all `num_tasks`), step counters offset at random.

    With `theta_batched`, `theta` has a leading task axis (one perturbed theta per task).
    `length`: every run's length (default: drawn from the truncation schedule per run).
    """
    if task_index is None:
      task_index = jnp.arange(self.num_tasks, dtype=jnp.int32)
    offset = self.random_initial_iteration_offset if offset is None else offset

    def one(theta, i):
      # Separate children for the run and its offset: `new_run` splits its key, and
      # `split(k)[i]` is `fold_in(k, i)`, so a `fold_in(k, 1)` here would be its params key.
      k_run, k_offset = jax.random.split(jax.random.fold_in(key, i))
      state = self.new_run(theta, k_run, i, length)
      if offset > 0:
        # Within the run's own length: a start past it would end the run at its first step,
        # in lock step with every other run that drew one (39% of them for lengths 100-300
        # and offset 300).
        start = jax.random.randint(k_offset, [], 0, jnp.minimum(offset, state.length),
                                   jnp.int32)
        state = state.replace(inner_step=start)
      return state

    return jax.vmap(one, in_axes=(0 if theta_batched else None, 0))(theta, task_index)

  def tasks_per_chunk_for(self, num_tasks: int, bytes_per_task: Optional[int] = None) -> int:
    """How many of `num_tasks` (per device) runs are advanced together; see `unroll`.

    `bytes_per_task`: the state of one task's runs (all samples); needed for the CPU default.
    """
    limit = self.tasks_per_chunk
    if limit is None:
      on_cpu = jax.default_backend() == "cpu" and bytes_per_task is not None
      limit = max(1, CPU_CHUNK_BYTES // max(1, bytes_per_task)) if on_cpu else 0
    if limit <= 0 or limit >= num_tasks:
      return num_tasks
    return max(d for d in range(1, limit + 1) if num_tasks % d == 0)

  def tasks_per_chunk_of(self, states: UnrollState) -> int:
    """`tasks_per_chunk_for` the [S, T] states `unroll` is given."""
    num_tasks = states.task_index.shape[1]
    total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(states))
    return self.tasks_per_chunk_for(num_tasks, total // num_tasks)

  def unroll(self, thetas, states: UnrollState, key: jax.Array, num_steps: int,
             thetas_batched: bool = True, allow_restart: bool = True):
    """Advances S x T inner runs by `num_steps` steps in one `lax.scan`.

    On CPU the T runs are split into chunks of `tasks_per_chunk_of(states)` tasks that are
    unrolled one after another (`lax.map`): every chunk runs all `num_steps` while its working
    set stays in cache. Each run's arithmetic and random numbers do not depend on the chunking.

    Args:
      thetas: meta-parameters with leading [S, T] axes (per sample, per task) when
        `thetas_batched`, else one shared theta.
      states: UnrollState with leading [S, T] axes.
      key: the key of this truncation; task i uses `fold_in(key, task_index[i])`.
      num_steps: the truncation length (static).
      thetas_batched: whether `thetas` carries the [S, T] axes.
      allow_restart: False for full-episode estimators, whose runs must not restart.

    Returns:
      (next_states, StepOut with leading [num_steps, S, T] axes).
    """
    num_tasks = states.task_index.shape[1]
    chunk = self.tasks_per_chunk_of(states)
    if chunk == num_tasks:
      return self._unroll_chunk(thetas, states, key, num_steps, thetas_batched, allow_restart)
    num_chunks = num_tasks // chunk

    def split(x):  # [S, T, ...] -> [chunks, S, T / chunks, ...]
      return jnp.moveaxis(jnp.reshape(x, (x.shape[0], num_chunks, chunk) + x.shape[2:]), 1, 0)

    def one_chunk(args):
      chunk_thetas, chunk_states = args
      return self._unroll_chunk(chunk_thetas if thetas_batched else thetas, chunk_states, key,
                                num_steps, thetas_batched, allow_restart)

    chunk_thetas = jax.tree_util.tree_map(split, thetas) if thetas_batched else None
    states, out = jax.lax.map(one_chunk, (chunk_thetas, jax.tree_util.tree_map(split, states)))
    # states: [chunks, S, T/chunks, ...] -> [S, T, ...]; out: [chunks, steps, S, T/chunks].
    states = jax.tree_util.tree_map(
        lambda x: jnp.reshape(jnp.moveaxis(x, 0, 1), (x.shape[1], num_tasks) + x.shape[3:]),
        states)
    out = jax.tree_util.tree_map(
        lambda x: jnp.reshape(jnp.moveaxis(x, 0, 2), x.shape[1:3] + (num_tasks,)), out)
    return states, out

  def _unroll_chunk(self, thetas, states: UnrollState, key: jax.Array, num_steps: int,
                    thetas_batched: bool, allow_restart: bool):
    """`unroll` of all the runs in `states` in one `lax.scan` (no chunking)."""
    theta_axes = 0 if thetas_batched else None
    advance = jax.vmap(jax.vmap(self.advance, in_axes=(theta_axes, 0, 0)),
                       in_axes=(theta_axes, 0, None))
    num_samples = states.task_index.shape[0]
    restart = jax.vmap(jax.vmap(self.new_run, in_axes=(theta_axes, 0, 0)),
                       in_axes=(theta_axes, None, None), axis_size=num_samples)
    task_index = states.task_index[0]
    task_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(task_index)

    def body(states, t):
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(task_keys)
      k_step, k_new = jax.vmap(lambda k: jax.random.split(k))(step_keys).swapaxes(0, 1)
      states, out = advance(thetas, states, k_step)
      if allow_restart:
        # The S samples of a task restart together so they keep sharing random numbers.
        done = jnp.any(out.is_done, axis=0)

        def restart_done(states):
          fresh = restart(thetas, k_new, task_index)
          return jax.tree_util.tree_map(lambda f, s: jnp.where(_per_task(done, s), f, s),
                                        fresh, states)

        # Restarts are rare: a real branch skips building fresh runs on most steps.
        states = jax.lax.cond(jnp.any(done), restart_done, lambda s: s, states)
        out = out._replace(is_done=jnp.broadcast_to(done, out.is_done.shape))
      else:  # nothing restarts (a run past its length, or diverged, just goes on)
        out = out._replace(is_done=jnp.zeros_like(out.is_done))
      return states, out

    # Under shard_map, parts of a fresh state (e.g. zero momenta) are device-invariant while
    # the scan makes them per-device; the carry must have the per-task typing from the start.
    states = _vary_like(states, task_index)
    return jax.lax.scan(body, states, jnp.arange(num_steps, dtype=jnp.int32))


def _vary_like(tree, reference: jax.Array):
  """Marks every leaf as varying over the mesh axes `reference` varies over (no-op outside
  shard_map)."""
  axes = jax.typeof(reference).manual_axis_type.varying

  def one(x):
    missing = tuple(sorted(axes - jax.typeof(x).manual_axis_type.varying))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree_util.tree_map(one, tree)


def _per_task(done: jax.Array, leaf: jax.Array) -> jax.Array:
  """Reshapes a per-task [T] flag to broadcast against an [S, T, ...] leaf."""
  return jnp.reshape(done, (1, done.shape[0]) + (1,) * (leaf.ndim - 2))

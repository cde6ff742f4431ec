"""Inner problems: a `Task` is one loss to minimize, a `TaskFamily` a distribution of them.

Everything here must run inside `jit`/`vmap`: batches are drawn from a PRNG key (datasets are
small and live in device memory), and a family's sampled configuration is a pytree of arrays so
that many task instances can be vectorized and sharded along a task axis.
"""

from typing import Any, Optional, Tuple

import jax

Params = Any
ModelState = Any
Batch = Any
TaskParams = Any


class Task:
  """One inner problem.

  Subclasses implement `init`, `loss` and `sample_batch`. Tasks with non-gradient state
  (e.g. batch-norm statistics) override `init_with_state` and `loss_with_state` instead.
  """

  def init(self, key: jax.Array) -> Params:
    raise NotImplementedError

  def init_with_state(self, key: jax.Array) -> Tuple[Params, ModelState]:
    return self.init(key), None

  def loss(self, params: Params, key: jax.Array, batch: Batch) -> jax.Array:
    raise NotImplementedError

  def loss_with_state(self, params: Params, model_state: ModelState, key: jax.Array,
                      batch: Batch) -> Tuple[jax.Array, ModelState]:
    return self.loss(params, key, batch), model_state

  def sample_batch(self, key: jax.Array, split: str = "train") -> Batch:
    """Draws one batch of `split` ("train" or "valid") from `key`; jit-compatible."""
    raise NotImplementedError


class TaskFamily:
  """A distribution over tasks.

  `sample(key)` returns a pytree of arrays (so it can be vmapped); `task_fn(task_params)` builds
  the task those arrays describe, and may be called on traced arrays inside `jit`/`vmap`.
  """

  def sample(self, key: jax.Array) -> TaskParams:
    raise NotImplementedError

  def task_fn(self, task_params: TaskParams) -> Task:
    raise NotImplementedError


class SingleTaskFamily(TaskFamily):
  """A family with exactly one member; its task parameters are empty."""

  def __init__(self, task: Task, name: Optional[str] = None):
    self.task = task
    self.name = name or getattr(task, "name", type(task).__name__)

  def sample(self, key: jax.Array) -> TaskParams:
    del key
    return ()

  def task_fn(self, task_params: TaskParams) -> Task:
    del task_params
    return self.task


def single_task_to_family(task: Task, name: Optional[str] = None) -> TaskFamily:
  """Wraps a fixed task so it can be used wherever a family is expected."""
  return SingleTaskFamily(task, name)

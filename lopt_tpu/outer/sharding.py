"""Sharding the task axis of meta-training over every device of every host.

Meta-parameters and the outer optimizer state are replicated (`P()`); every estimator's worker
state (inner params, inner optimizer states, PES accumulators, step counters, task indices)
has the task axis first and is split over the mesh axis `TASKS`. Inside `jax.shard_map` each
device advances its own tasks, and meta-gradients, losses and metrics are `lax.pmean`-ed in the
same jitted program, so nothing per-task ever reaches the host.
"""

from typing import Any, Optional, Sequence

import jax
import jax.flatten_util
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

TASKS = "tasks"


def task_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named `TASKS` over `devices` (default: all global devices, all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (TASKS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def split_tasks(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(TASKS))


def tree_of(tree: Any, sharding: NamedSharding) -> Any:
  """The same sharding for every leaf of `tree` (a pytree prefix usable as in/out specs)."""
  return jax.tree_util.tree_map(lambda _: sharding, tree)


def check_divisible(num_tasks: int, mesh: Mesh, what: str = "num_tasks"):
  size = mesh.devices.size
  if num_tasks % size:
    raise ValueError(f"{what}={num_tasks} must be divisible by the number of devices ({size})")


def varying(tree: Any) -> Any:
  """Marks replicated values as per-device inside shard_map.

  Needed before differentiating w.r.t. a replicated input: otherwise `jax.grad` inside the
  per-shard function returns the gradient summed over devices, not the local one.
  """
  return jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, TASKS, to="varying"), tree)


def mean_over_devices(tree: Any) -> Any:
  """`pmean` over `TASKS` of every leaf, as one buffer: gradients, losses and a dozen scalar
  metrics are averaged by a single all-reduce and a single division (per-leaf `pmean`s would
  each add kernels to compile)."""
  flat, unravel = jax.flatten_util.ravel_pytree(tree)
  return unravel(jax.lax.pmean(flat, TASKS))

"""Features shared by per-parameter learned optimizers, computed on a flat view of the params.

Per-parameter networks are applied to *all* parameters of a task at once: the params tree is
raveled into one vector of length P, features are stacked into a [P, F] matrix and the network
runs as a few large matmuls instead of one small one per tensor. Per-tensor statistics (e.g.
second-moment normalization) use segment reductions over each tensor's slice of that vector.
"""

from typing import Any, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


class FlatLayout(NamedTuple):
  """How a params tree maps onto one flat vector (all static, known at trace time)."""
  treedef: Any
  shapes: tuple
  dtypes: tuple
  sizes: tuple
  segment_ids: np.ndarray  # [P] int32: which tensor each flat entry belongs to

  @property
  def num_tensors(self) -> int:
    return len(self.sizes)


def layout_of(tree) -> FlatLayout:
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
  sizes = tuple(int(np.prod(s)) for s in shapes)
  ids = np.concatenate([np.full([n], i, np.int32) for i, n in enumerate(sizes)]) if sizes else (
      np.zeros([0], np.int32))
  return FlatLayout(treedef, shapes, tuple(jnp.result_type(x) for x in leaves), sizes, ids)


def flatten(tree, dtype=jnp.float32) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros([0], dtype)
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def unflatten(layout: FlatLayout, flat: jax.Array):
  splits = np.cumsum(layout.sizes)[:-1]
  parts = jnp.split(flat, splits) if layout.sizes else []
  leaves = [p.reshape(s).astype(d) for p, s, d in zip(parts, layout.shapes, layout.dtypes)]
  return jax.tree_util.tree_unflatten(layout.treedef, leaves)


def segment_mean(x: jax.Array, layout: FlatLayout) -> jax.Array:
  """Mean of `x` ([P, ...]) over each tensor's entries: [num_tensors, ...]."""
  total = jax.ops.segment_sum(x, layout.segment_ids, num_segments=layout.num_tensors,
                              indices_are_sorted=True)
  # max(., 1): an empty tensor's mean is 0, not 0/0 (NaN would poison per-tensor networks).
  counts = jnp.asarray(np.maximum(layout.sizes, 1), x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return total / counts


def broadcast_segments(per_tensor: jax.Array, layout: FlatLayout) -> jax.Array:
  """Expands a [num_tensors, ...] array back to one row per flat entry: [P, ...]."""
  return per_tensor[layout.segment_ids]


def second_moment_normalize(x: jax.Array, layout: FlatLayout, eps: float = 1e-5) -> jax.Array:
  """Divides each feature column by its root-mean-square over the tensor it belongs to."""
  ms = segment_mean(jnp.square(x), layout)
  return x * broadcast_segments(jax.lax.rsqrt(ms + eps), layout)


def tanh_time_embedding(iteration: jax.Array,
                        timescales: Sequence[float] = TIMESCALES) -> jax.Array:
  """Tells the network where it is in training at several time scales: [len(timescales)]."""
  t = jnp.asarray(iteration, jnp.float32)
  return jnp.tanh(t / jnp.asarray(timescales, jnp.float32) - 1.0)


def ema(old: jax.Array, new: jax.Array, decays: jax.Array) -> jax.Array:
  """Exponential moving averages for several decays at once; `decays` broadcasts on the last axis."""
  return decays * old + (1.0 - decays) * new[..., None]


@flax.struct.dataclass
class FlatState:
  """Optimizer state shared by the flat per-parameter learned optimizers."""
  params: Any
  model_state: Any
  iteration: jax.Array
  accumulators: Any  # pytree of [P, ...] arrays (momenta, rms, ...) or per-tensor arrays

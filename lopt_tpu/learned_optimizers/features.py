"""Features shared by per-parameter learned optimizers, computed on a flat view of the params.

Per-parameter networks are applied to *all* parameters of a task at once: the params tree is
raveled into one vector of length P, features are stacked into a [P, F] (or feature-major
[F, P]) matrix and the network runs as a few large matmuls instead of one small one per
tensor. Per-tensor statistics (e.g. second-moment normalization) reduce over each tensor's
static slice of that vector.
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

  @property
  def num_tensors(self) -> int:
    return len(self.sizes)


def layout_of(tree) -> FlatLayout:
  """The static layout of `tree`. Like `flatten`, refuses complex leaves, whose imaginary part
  the real-valued features and steps would silently drop (so it would never be trained)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
  sizes = tuple(int(np.prod(s)) for s in shapes)
  _refuse_complex(tree)
  return FlatLayout(treedef, shapes, tuple(jnp.result_type(x) for x in leaves), sizes)


def _refuse_complex(tree):
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
      raise ValueError(
          f"parameter {jax.tree_util.keystr(path)} is {jnp.result_type(x)}: learned optimizers "
          "work on real parameters; train complex ones as real pairs, e.g. wrap the optimizer "
          "in optax.contrib.split_real_and_imaginary")


def flatten(tree, dtype=jnp.float32) -> jax.Array:
  _refuse_complex(tree)
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros([0], dtype)
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def apply_step(params, layout: FlatLayout, step: jax.Array):
  """`params - step` for the flat float32 [P] `step`, leaf by leaf in each leaf's own precision
  (at least float32), so that float64 params (jax_enable_x64) keep their precision: computed
  on the flat float32 copy they were rounded to float32 at every step, even a zero one.

  Integer and boolean leaves are left as they are (as optax leaves them): a float step cast
  back to int truncates toward zero, so a tiny step moved them by one every time.
  """
  leaves = jax.tree_util.tree_leaves(params)
  parts = jnp.split(step, np.cumsum(layout.sizes)[:-1]) if layout.sizes else []

  def leaf_step(x, d):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return x
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (wide - d.reshape(x.shape)).astype(x.dtype)

  new = [leaf_step(x, d) for x, d in zip(leaves, parts)]
  return jax.tree_util.tree_unflatten(layout.treedef, new)


def _offsets(layout: FlatLayout) -> np.ndarray:
  return np.cumsum((0,) + layout.sizes)


def _tensor_slices(x: jax.Array, layout: FlatLayout, axis: int):
  """Each tensor's static slice of `x` along `axis` (the flat-params axis, non-negative)."""
  offs = _offsets(layout)
  for a, b in zip(offs[:-1], offs[1:]):
    yield jax.lax.slice_in_dim(x, int(a), int(b), axis=axis)


def _segment_reduce(x: jax.Array, layout: FlatLayout, reduce, axis: int) -> jax.Array:
  """`reduce(part, axis=axis)` of each tensor's static slice of `x`; 0 for an empty tensor."""
  axis = axis % x.ndim
  out = []
  for part in _tensor_slices(x, layout, axis):
    if part.shape[axis]:
      out.append(reduce(part, axis=axis))
    else:
      out.append(jnp.zeros(part.shape[:axis] + part.shape[axis + 1:], x.dtype))
  if not out:  # no tensors at all (an empty params tree)
    return jnp.zeros(x.shape[:axis] + (0,) + x.shape[axis + 1:], x.dtype)
  return jnp.stack(out, axis=axis)


def segment_mean(x: jax.Array, layout: FlatLayout, axis: int = 0) -> jax.Array:
  """Mean of `x` over each tensor's entries along `axis` (the flat-params axis).

  Returns an array with `axis` replaced by one entry per tensor. Tensors are static slices, so
  this is a handful of fused reductions rather than a scatter (several times faster on CPU).
  An empty tensor's mean is 0, not 0/0 (NaN would poison per-tensor networks).
  """
  return _segment_reduce(x, layout, jnp.mean, axis)


def segment_max_abs(x: jax.Array, layout: FlatLayout) -> jax.Array:
  """max |x| over each tensor's entries of the flat [P] `x`: [T] (0 for an empty tensor)."""
  return _segment_reduce(jnp.abs(x), layout, jnp.max, 0)


# Below this a tensor counts as all zeros for `tensor_scale` (1 / scale must stay finite).
MIN_SCALE = 1e-20


def tensor_scale(x: jax.Array, layout: FlatLayout) -> jax.Array:
  """Per-tensor max |x| of the flat [P] `x`, broadcast to [P], as a constant to autodiff; 1
  where a tensor is (about) all zeros.

  Dividing by it makes scale-free quantities (cosines, log ratios of second moments) exact at
  any scale: the small offsets that keep their derivatives finite then act relative to the
  tensor's own size (gradients of RMS 1e-6 used to be swamped by absolute offsets of 1e-12 on
  their mean squares). A scale-free quantity has zero derivative along the scaling, so making
  the scale a constant leaves its meta-gradient unchanged.
  """
  top = segment_max_abs(x, layout)
  return broadcast_segments(jax.lax.stop_gradient(jnp.where(top > MIN_SCALE, top, 1.)), layout)


def tensor_cosine(a: jax.Array, b: jax.Array, layout: FlatLayout) -> jax.Array:
  """cos(a, b) over each tensor of the flat [P] `a`, `b`: [T]; 0 where either is all zeros,
  with finite derivatives there, and the same at every scale of `a` and of `b`."""
  mean = lambda x: segment_mean(x, layout)
  a, b = a / tensor_scale(a, layout), b / tensor_scale(b, layout)
  # Scaled to max |.| = 1, a non-zero tensor has mean square >= 1 / size >> 1e-12.
  return mean(a * b) / (jnp.sqrt(mean(jnp.square(a)) + 1e-12) *
                        jnp.sqrt(mean(jnp.square(b)) + 1e-12))


def broadcast_segments(per_tensor: jax.Array, layout: FlatLayout, axis: int = 0) -> jax.Array:
  """Expands one entry per tensor along `axis` back to one per flat parameter."""
  axis = axis % per_tensor.ndim
  parts = []
  for i, n in enumerate(layout.sizes):
    row = jax.lax.slice_in_dim(per_tensor, i, i + 1, axis=axis)
    shape = row.shape[:axis] + (n,) + row.shape[axis + 1:]
    parts.append(jnp.broadcast_to(row, shape))
  if not parts:  # no tensors at all
    return jnp.zeros(per_tensor.shape[:axis] + (0,) + per_tensor.shape[axis + 1:],
                     per_tensor.dtype)
  return jnp.concatenate(parts, axis=axis)


def second_moment_normalize(x: jax.Array, layout: FlatLayout, eps: float = 1e-5,
                            axis: int = 0) -> jax.Array:
  """Divides each feature by its root-mean-square over the tensor it belongs to.

  Exactly: by sqrt(mean square + eps), as learned_optimization does. With the default eps a
  feature of RMS 1e-2 comes out at RMS 0.95, one of 1e-3 at 0.30 and one of 1e-4 at 0.03: the
  offset damps the features of tiny tensors rather than blowing them up (thetas meta-trained
  with it rely on that), so the learned optimizers built on it are scale-free only for
  features of RMS above ~3e-3.

  `axis` is the flat-params axis: 0 for [P, F] (param-major), -1 for [F, P] (feature-major).
  """
  axis = axis % x.ndim
  parts = []
  for part in _tensor_slices(x, layout, axis):
    if part.shape[axis]:
      ms = jnp.mean(jnp.square(part), axis=axis, keepdims=True)
      part = part * jax.lax.rsqrt(ms + eps)
    parts.append(part)
  return jnp.concatenate(parts, axis=axis) if parts else x


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

"""Fast parameter initialization for tasks: one PRNG draw for the whole network.

Inner runs restart inside the jitted outer step, so a task's `init` is compiled into every
meta-training program. Flax's `module.init` makes one truncated-normal draw per kernel plus
its own key bookkeeping, which on CPU costs seconds of compile time per program. Here the
shapes come from `jax.eval_shape` of the module (once, at construction) and all kernels are
cut from a single normal draw: LeCun normal (std 1/sqrt(fan_in), untruncated), biases zero.
"""

import math

import jax
import jax.numpy as jnp


def param_shapes(module, *example_args):
  """The `params` collection of `module.init(key, *example_args)` as ShapeDtypeStructs."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))["params"]


def lecun_normal(shapes, key: jax.Array):
  """Params shaped like `shapes`: 'kernel' leaves ~ N(0, 1/fan_in), every other leaf zero.

  fan_in is the product of all but a kernel's last dimension (Dense and Conv alike).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  kernels = [(i, s) for i, (path, s) in enumerate(flat) if _name(path) == "kernel"]
  total = sum(math.prod(s.shape) for _, s in kernels)
  draw = jax.random.normal(key, (total,), jnp.float32)
  leaves = [jnp.zeros(s.shape, s.dtype) for _, s in flat]
  offset = 0
  for i, s in kernels:
    size = math.prod(s.shape)
    fan_in = math.prod(s.shape[:-1]) or 1
    leaves[i] = (draw[offset:offset + size].reshape(s.shape) / math.sqrt(fan_in)).astype(s.dtype)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))

"""Truncation schedules: how many inner steps an inner training run lasts before it restarts."""

import jax
import jax.numpy as jnp


class TruncationSchedule:
  """`sample_length(key)` draws the length of a new inner run (an int32 scalar, jit-safe)."""

  min_length: int
  max_length: int

  def sample_length(self, key: jax.Array) -> jax.Array:
    raise NotImplementedError


def _whole(name: str, value) -> int:
  """`value` as an int, refused unless it is a whole number: int(0.5) would be a length of 0."""
  if isinstance(value, bool) or not float(value).is_integer():
    raise ValueError(f"truncation schedule {name} must be a whole number of steps, got {value!r}")
  return int(value)


class ConstantTruncationSchedule(TruncationSchedule):

  def __init__(self, length: int):
    length = _whole("length", length)
    if length <= 0:
      raise ValueError(f"truncation schedule length must be positive, got {length}")
    self.min_length = self.max_length = length

  def sample_length(self, key):
    del key
    return jnp.asarray(self.max_length, jnp.int32)


class LogUniformLengthSchedule(TruncationSchedule):
  """Lengths with log(length) uniform in [log(min_length), log(max_length)]: many short runs
  for frequent restarts, some long ones so the optimizer sees late training too."""

  def __init__(self, min_length: int, max_length: int):
    min_length, max_length = _whole("min_length", min_length), _whole("max_length", max_length)
    if not 0 < min_length <= max_length:
      raise ValueError(
          f"need 0 < min_length <= max_length, got min_length={min_length}, "
          f"max_length={max_length}")
    self.min_length = min_length
    self.max_length = max_length

  def sample_length(self, key):
    u = jax.random.uniform(key, [], minval=jnp.log(self.min_length),
                           maxval=jnp.log(self.max_length))
    return jnp.clip(jnp.round(jnp.exp(u)), self.min_length, self.max_length).astype(jnp.int32)

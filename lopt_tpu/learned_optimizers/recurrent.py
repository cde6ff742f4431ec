"""A small LSTM controller and feature helpers shared by the recurrent learned optimizers.

`LSTMController` is one LSTM step plus a linear read-out. The same weights can run on one
carry (a global controller, carry [H]) or on a batch of carries (one per tensor, carry [T, H]):
the cell only acts on the trailing axis. Its carry is the pair `(c, h)` of flax's LSTM cells.
"""

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Carry = Tuple[jax.Array, jax.Array]


class LSTMController(nn.Module):
  """`(carry, x) -> (carry, out)`: an LSTM step, then `Dense(out_size)` on the new hidden state.

  Attributes:
    hidden_size: LSTM width.
    out_size: read-out width.
    out_init_scale: std of the read-out is about `out_init_scale * rms(h)`. A small value makes
      a fresh controller barely change what it controls, while (unlike a zero read-out) every
      weight still receives a meta-gradient from the first step.
  """
  hidden_size: int
  out_size: int
  out_init_scale: float = 1e-2

  @nn.compact
  def __call__(self, carry: Carry, x: jax.Array) -> Tuple[Carry, jax.Array]:
    carry, h = nn.OptimizedLSTMCell(self.hidden_size, name="lstm")(carry, x)
    init = nn.initializers.variance_scaling(self.out_init_scale ** 2, "fan_in", "normal")
    return carry, nn.Dense(self.out_size, kernel_init=init, name="readout")(h)


def zero_carry(hidden_size: int) -> Carry:
  """An all-zero `(c, h)` carry of shape [hidden_size] each (float32)."""
  return (jnp.zeros([hidden_size], jnp.float32), jnp.zeros([hidden_size], jnp.float32))


def tile_carry(carry: Carry, num: int) -> Carry:
  """Repeats a [H] carry into a [num, H] batch, one copy per tensor."""
  return jax.tree_util.tree_map(
      lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (num,) + jnp.shape(x)), carry)


def log_feature(mean_square: jax.Array, scale: float = 0.05, lo: float = -40.,
                hi: float = 20.) -> jax.Array:
  """Bounded network input for a magnitude given as a mean square (or any value >= 0).

  Taking the log of a *square* avoids sqrt's infinite derivative at zero; the tiny offset keeps
  the log finite, and the clip (whose gradient is zero outside [lo, hi]) keeps the feature in
  [scale * lo, scale * hi] for zero or huge inputs.
  """
  return scale * jnp.clip(jnp.log(mean_square + 1e-20), lo, hi)


def soft_clip(x: jax.Array, bound: float) -> jax.Array:
  """`bound * tanh(x / bound)`: identity near zero, smoothly saturating at +-bound."""
  return bound * jnp.tanh(x / bound)

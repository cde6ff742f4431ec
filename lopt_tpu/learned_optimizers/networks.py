"""Small Flax Linen networks used inside learned optimizers."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Plain ReLU MLP; the last layer is linear. Applied on the trailing feature axis."""
  hidden_sizes: Sequence[int]
  out_size: int
  last_init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    for h in self.hidden_sizes:
      x = nn.relu(nn.Dense(h)(x))
    init = nn.initializers.variance_scaling(self.last_init_scale, "fan_avg", "uniform")
    return nn.Dense(self.out_size, kernel_init=init)(x)


def direction_magnitude_step(out: jnp.ndarray, step_mult: float, exp_mult: float) -> jnp.ndarray:
  """Turns a [..., 2] network output into a step `d * exp(m * exp_mult) * step_mult`.

  Splitting direction and log-magnitude lets a small network express steps over many orders
  of magnitude while keeping the initial steps small.
  """
  return out[..., 0] * jnp.exp(out[..., 1] * exp_mult) * step_mult

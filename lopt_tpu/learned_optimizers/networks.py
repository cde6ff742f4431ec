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


class FeatureMajorMLP(nn.Module):
  """ReLU MLP applied to every column of x [in, P]: h = relu(W @ h + b) with W [out, in].

  Feature-major keeps the (long) parameter axis minor, which vectorizes the elementwise
  feature work, and contracts on W's minor axis, the fast matmul orientation on XLA:CPU.
  `shared` features, equal for every column (e.g. the time embedding), enter the first layer
  as a bias: mathematically the same as concatenating them to every column, without the
  [shared, P] block of work.
  """
  hidden_sizes: Sequence[int]
  out_size: int

  @nn.compact
  def __call__(self, x, shared=None):
    sizes = list(self.hidden_sizes) + [self.out_size]
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=0)
    for i, size in enumerate(sizes):
      kernel = self.param(f"kernel_{i}", init, (size, x.shape[0]))
      bias = self.param(f"bias_{i}", nn.initializers.zeros, (size,))
      if i == 0 and shared is not None:
        shared_kernel = self.param("kernel_shared", init, (size, shared.shape[0]))
        bias = bias + shared_kernel @ shared
      x = kernel @ x + bias[:, None]
      if i < len(sizes) - 1:
        x = nn.relu(x)
    return x


def direction_magnitude_step(out: jnp.ndarray, step_mult: float, exp_mult: float) -> jnp.ndarray:
  """Turns a [..., 2] network output into a step `d * exp(m * exp_mult) * step_mult`.

  Splitting direction and log-magnitude lets a small network express steps over many orders
  of magnitude while keeping the initial steps small.
  """
  return out[..., 0] * jnp.exp(out[..., 1] * exp_mult) * step_mult

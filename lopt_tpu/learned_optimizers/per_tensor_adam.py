"""Adam with per-tensor, per-step hyper-parameters over flat params: the shared core of the
learned optimizers that steer Adam (NNAdam, HypergradAdam).

Betas may change every step, so bias correction divides by `1 - prod(betas so far)` per
tensor (the exact total weight of the moving average) instead of `1 - beta ** t`.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from lopt_tpu.learned_optimizers import features as feat


def logit(x: float) -> float:
  """Inverse sigmoid of a constant (e.g. a default beta), for shifting it in logit space."""
  return float(np.log(x) - np.log1p(-x))


def init_moments(layout: feat.FlatLayout) -> Dict[str, jax.Array]:
  """Zero moments over the flat params and unit beta products per tensor."""
  size, num = sum(layout.sizes), layout.num_tensors
  return {"m": jnp.zeros([size], jnp.float32), "v": jnp.zeros([size], jnp.float32),
          "b1_prod": jnp.ones([num], jnp.float32), "b2_prod": jnp.ones([num], jnp.float32)}


# Betas are capped here: in float32 a controller's sigmoid(logit(0.999) + 10) is exactly 1.0,
# and then 1 - prod(betas) = 0 makes the bias correction 0 / 0 (NaN params on the first step).
# 1 - 2**-20 is a moving average over ~10^6 steps, beyond any run; smaller betas pass unchanged.
MAX_BETA = 1.0 - 2.0**-20


def step(g, m, v, b1_prod, b2_prod, lr, b1, b2, eps, layout: feat.FlatLayout, v_floor: float):
  """One Adam step with per-tensor lr / b1 / b2 ([T] each; betas capped at MAX_BETA).

  Args:
    g, m, v: [P] flat gradient and moments.
    b1_prod, b2_prod: [T] products of the betas used before this step.
    eps: a scalar or a [P] per-parameter epsilon.
    v_floor: added under the square root so its derivative stays finite at v = 0.

  Returns:
    (the [P] update to subtract from the params, new moments: a dict like `init_moments`).
  """
  b1, b2 = jnp.minimum(b1, MAX_BETA), jnp.minimum(b2, MAX_BETA)
  b1_prod, b2_prod = b1_prod * b1, b2_prod * b2
  per_param = lambda x: feat.broadcast_segments(x, layout)
  m = per_param(b1) * m + (1. - per_param(b1)) * g
  v = per_param(b2) * v + (1. - per_param(b2)) * jnp.square(g)
  v_hat = v / per_param(1. - b2_prod)
  update = per_param(lr / (1. - b1_prod)) * m / (jnp.sqrt(v_hat + v_floor) + eps)
  return update, {"m": m, "v": v, "b1_prod": b1_prod, "b2_prod": b2_prod}

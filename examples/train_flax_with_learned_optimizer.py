"""Train your own Flax model with a learned optimizer, in an ordinary optax loop.

  python examples/train_flax_with_learned_optimizer.py

The model is the user's (a small Flax linen CNN, not one of lopt_tpu's tasks), the data is
scikit-learn's 8x8 digits (offline; `lopt_tpu.tasks.datasets`), and the optimizer is a learned
optimizer turned into an `optax.GradientTransformation` by `optax_export.as_optax` and chained
after gradient clipping like any optax transformation.

Pass the `theta` you meta-trained (e.g. the theta in a meta-training checkpoint) together with
the learned optimizer it belongs to. Without one, the example uses NNAdam at its initial theta,
which starts out close to Adam(1e-2) (its read-out starts small), so it trains out of the box.
Expected (2 CPU cores, 500 steps, ~8 s): training loss 2.29 -> 0.06, validation accuracy 0.96.
"""

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt_tpu import optax_export
from lopt_tpu.learned_optimizers import base as lopt_base
from lopt_tpu.learned_optimizers import nn_adam
from lopt_tpu.tasks import datasets

BATCH_SIZE = 128


class CNN(nn.Module):
  """The user's model: two 3x3 convolutions, global average pooling, a linear classifier."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, images):
    x = nn.relu(nn.Conv(16, (3, 3))(images))
    x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _loss(model, params, batch):
  logits = model.apply(params, batch["image"])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))


def _accuracy(model, params, data):
  logits = model.apply(params, data.valid_images.astype(jnp.float32) / data.max_value)
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == data.valid_labels))


def main(num_steps: int = 500, learned_opt: Optional[lopt_base.LearnedOptimizer] = None,
         theta: Any = None, seed: int = 0, log_every: int = 100) -> Dict[str, Any]:
  """Trains `CNN` on digits with `learned_opt` at `theta` through optax.

  Args:
    num_steps: training steps (batches of 128).
    learned_opt: the learned optimizer; default NNAdam with base learning rate 1e-2.
    theta: its meta-parameters; default `learned_opt.init(key(seed))`.
    seed: seeds the model init and the batches.
    log_every: print the training loss every this many steps (0: never).

  Returns:
    dict(losses [num_steps] training losses, valid_accuracy after training).
  """
  learned_opt = learned_opt or nn_adam.NNAdam(learning_rate=1e-2)
  theta = learned_opt.init(jax.random.key(seed)) if theta is None else theta
  data = datasets.load_digits8()
  model = CNN(num_classes=data.num_classes)
  k_init, k_data = jax.random.split(jax.random.key(seed))
  params = model.init(k_init, jnp.zeros((1,) + data.image_shape))

  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax_export.as_optax(learned_opt, theta, num_steps=num_steps))
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, step):
    batch = datasets.sample_batch(data, jax.random.fold_in(k_data, step), BATCH_SIZE, "train")
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, batch))(params)
    # `value=loss` reaches loss-aware learned optimizers (e.g. hparam_controller).
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for step in range(num_steps):
    params, opt_state, loss = train_step(params, opt_state, step)
    losses.append(float(loss))
    if log_every and (step % log_every == 0 or step == num_steps - 1):
      print(f"step {step:5d}  train loss {losses[-1]:.4f}")
  valid_accuracy = _accuracy(model, params, data)
  print(f"validation accuracy {valid_accuracy:.3f}")
  return {"losses": np.asarray(losses), "valid_accuracy": valid_accuracy}


if __name__ == "__main__":
  main()

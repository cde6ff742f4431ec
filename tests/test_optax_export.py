"""as_optax: a learned optimizer driven by a standard optax loop on a user's Flax model."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_tpu import optax_export
from lopt_tpu import registry
from lopt_tpu.learned_optimizers import hparam_controller
from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.learned_optimizers import mlp_lopt


def _tree():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"w": jax.random.normal(k1, [3, 4]), "b": jax.random.normal(k2, [4]),
          "s": jax.random.normal(k3, [])}


def _sgd_theta(lr):
  # log_wd = -100: exp(-100) * p is far below float32 resolution of p, so the update is SGD.
  return {"log_lr": jnp.log(jnp.float32(lr)), "log_wd": jnp.float32(-100.)}


class _Net(nn.Module):
  """The user's model: a 2-layer MLP regressor."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.tanh(nn.Dense(32)(x)))[..., 0]


def _regression():
  kx, kw, kp = jax.random.split(jax.random.key(42), 3)
  x = jax.random.normal(kx, [256, 8])
  y = jnp.sin(x @ jax.random.normal(kw, [8]))
  net = _Net()
  loss_fn = lambda p: jnp.mean((net.apply(p, x) - y) ** 2)
  return net.init(kp, x), loss_fn


def _trainer(make_tx, loss_fn):
  """A standard optax loop with `make_tx(theta)`, compiled once for all thetas.

  Returns `train(theta, params, num_steps) -> (losses [num_steps], final params)`. `theta` is
  a jit argument, not a closed-over constant, so thetas of one structure share the program.
  """
  @jax.jit
  def step(theta, params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = make_tx(theta).update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  def train(theta, params, num_steps):
    opt_state = make_tx(theta).init(params)
    losses = []
    for _ in range(num_steps):
      params, opt_state, loss = step(theta, params, opt_state)
      losses.append(float(loss))
    return np.asarray(losses), params

  return train


def _normalized_gd_theta(lopt):
  """MLPLOpt weights that make it exactly per-tensor normalized gradient descent.

  Feature column 1 is g / rms(g) (rms over the tensor). Two ReLU paths carry +g and -g through
  the hidden layers, the direction output is their difference (= g), the magnitude output is
  0, so the step is `step_mult * g / rms(g)`.
  """
  theta = jax.tree_util.tree_map(jnp.zeros_like, lopt.init(jax.random.key(0)))
  p = theta["params"]
  # Kernels are [out, in] (MLPLOpt's network is feature-major).
  p["kernel_0"] = p["kernel_0"].at[0, 1].set(1.).at[1, 1].set(-1.)
  p["kernel_1"] = p["kernel_1"].at[0, 0].set(1.).at[1, 1].set(1.)
  p["kernel_2"] = p["kernel_2"].at[0, 0].set(1.).at[0, 1].set(-1.)
  return theta


def test_meta_sgd_equals_sgd_exactly_and_under_jit():
  params = _tree()
  grads = jax.tree_util.tree_map(lambda x: jnp.cos(3. * x), params)
  tx = optax_export.as_optax(meta_sgd.MetaSGDWD(), _sgd_theta(0.1))
  ref = optax.sgd(0.1)
  state, ref_state = tx.init(params), ref.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    ref_updates, ref_state = ref.update(grads, ref_state, params)
    for name in params:
      np.testing.assert_allclose(updates[name], ref_updates[name], rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, updates)
  assert int(state.inner.iteration) == 3
  assert state.inner.params is None  # no second copy of the model lives in the state


def test_update_requires_params():
  params = _tree()
  tx = optax_export.as_optax(meta_sgd.MetaSGDWD(), _sgd_theta(0.1))
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params))


def test_chain_with_clipping_equals_sgd_on_clipped_grads():
  params = _tree()
  grads = jax.tree_util.tree_map(lambda x: 10. * x, params)  # global norm >> 1
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax_export.as_optax(meta_sgd.MetaSGDWD(), _sgd_theta(0.1)))
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  norm = optax.tree.norm(grads)
  assert float(norm) > 10.
  for name in params:
    np.testing.assert_allclose(updates[name], -0.1 * grads[name] / norm, rtol=1e-5, atol=1e-7)
  assert float(optax.tree.norm(updates)) == pytest.approx(0.1, rel=1e-5)


def test_mlp_lopt_matches_its_inner_optimizer_and_trains_flax_model():
  params, loss_fn = _regression()
  lopt = mlp_lopt.MLPLOpt(step_mult=1e-2)
  make_tx = lambda theta: optax_export.as_optax(lopt, theta)
  train = _trainer(make_tx, loss_fn)

  # At a random init theta, the optax view takes the same 5 steps as the inner Optimizer.
  theta = lopt.init(jax.random.key(3))
  _, optax_params = train(theta, params, 5)
  opt = lopt.opt_fn(theta)
  inner_step = jax.jit(lambda s: opt.update(s, jax.grad(loss_fn)(opt.get_params(s))))
  state = opt.init(params)
  for _ in range(5):
    state = inner_step(state)
  for a, b in zip(jax.tree_util.tree_leaves(optax_params),
                  jax.tree_util.tree_leaves(opt.get_params(state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  # A random theta is a random optimizer (it need not descend), so training uses the
  # normalized-GD theta. Known answer for its first update: -step_mult * g / sqrt(mean(g^2) +
  # 1e-5) per tensor (atol: the update is new_params - params, rounded at params' precision).
  theta = _normalized_gd_theta(lopt)
  grads = jax.grad(loss_fn)(params)
  tx = make_tx(theta)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for u, g in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(u, -1e-2 * g / jnp.sqrt(jnp.mean(g ** 2) + 1e-5), rtol=1e-4,
                               atol=1e-7)
  losses, _ = train(theta, params, 150)
  assert np.all(np.isfinite(losses))
  # Measured: 0.872 -> 0.060 (14.5x) in 150 steps.
  assert losses[-1] < losses[0] / 10.


def test_loss_aware_hparam_controller_gets_value():
  params, loss_fn = _regression()
  lopt = hparam_controller.HParamController(base_lr=0.05)
  make_tx = lambda theta: optax_export.as_optax(lopt, theta)
  theta = lopt.init(jax.random.key(0))
  tx = make_tx(theta)
  with pytest.raises(ValueError, match="training loss"):
    tx.update(jax.grad(loss_fn)(params), tx.init(params), params)
  losses, _ = _trainer(make_tx, loss_fn)(theta, params, 150)
  # Measured: 0.872 -> 0.048 (18.1x) in 150 steps.
  assert losses[-1] < losses[0] / 10.


def test_example_trains_a_flax_cnn_on_digits():
  path = os.path.join(os.path.dirname(__file__), "..", "examples",
                      "train_flax_with_learned_optimizer.py")
  spec = importlib.util.spec_from_file_location("train_flax_example", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  out = example.main(num_steps=60, log_every=0)
  losses = out["losses"]
  assert losses.shape == (60,) and np.all(np.isfinite(losses))
  # Ten classes: starts near ln(10) = 2.30. Measured: 2.29 -> mean of the last 10 losses 1.23,
  # validation accuracy 0.64 after 60 steps.
  assert abs(losses[0] - np.log(10.)) < 0.3
  assert np.mean(losses[-10:]) < 0.7 * losses[0]
  assert out["valid_accuracy"] > 0.5


@pytest.mark.parametrize("name", ["mlp_lopt", "hypergrad_adam"])
def test_bfloat16_params_take_exactly_the_inner_optimizers_steps(name):
  # A bf16 update new - params would be rounded twice (once as the difference, once when
  # added): the export must reproduce the inner optimizer's bf16 params bit for bit.
  lopt = registry.get("learned optimizer", name)()
  theta = lopt.init(jax.random.key(0))
  params = {"w": (0.02 * jax.random.normal(jax.random.key(1), [4000])).astype(jnp.bfloat16)}
  grad_of = lambda p, t: {"w": jax.random.normal(jax.random.fold_in(jax.random.key(2), t),
                                                 [4000]).astype(jnp.bfloat16)}
  opt = lopt.opt_fn(theta, is_training=False)
  state = opt.init(params)
  tx = optax_export.as_optax(lopt, theta)
  tx_state, tx_params = tx.init(params), params
  for t in range(5):
    state = opt.update(state, grad_of(opt.get_params(state), t))
    updates, tx_state = tx.update(grad_of(tx_params, t), tx_state, tx_params)
    tx_params = optax.apply_updates(tx_params, updates)
    assert tx_params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(tx_params["w"], np.float32),
                                  np.asarray(opt.get_params(state)["w"], np.float32))


@pytest.mark.parametrize("name", ["mlp_lopt", "per_param_mlp", "hparam_controller", "nn_adam",
                                  "adafac_mlp_lopt", "rnn_mlp_lopt", "hypergrad_adam"])
def test_complex_params_are_refused_with_the_fix(name):
  # Before: the flat real features dropped the imaginary part of params and gradients, so it
  # was never trained, with no error.
  lopt = registry.get("learned optimizer", name)()
  tx = optax_export.as_optax(lopt, lopt.init(jax.random.key(0)))
  params = {"w": jnp.ones([3]), "z": jnp.asarray([1 + 1j, 2 - 1j], jnp.complex64)}
  with pytest.raises(ValueError, match=r"\['z'\].*split_real_and_imaginary"):
    tx.init(params)


def test_complex_params_train_as_real_pairs_with_the_documented_wrapper():
  lopt = registry.get("learned optimizer", "nn_adam")()
  tx = optax.contrib.split_real_and_imaginary(
      optax_export.as_optax(lopt, lopt.init(jax.random.key(0))))
  params = {"z": jnp.asarray([1 + 1j, 2 - 1j], jnp.complex64)}
  grads = {"z": jnp.asarray([0.5j, -0.5j], jnp.complex64)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.imag(np.asarray(updates["z"])) * np.array([1, -1]) < 0)
  np.testing.assert_array_equal(np.real(np.asarray(updates["z"])), 0.0)

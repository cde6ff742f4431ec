"""The shipped pretrained learned optimizer: it loads, it is usable through optax, and it still
beats tuned Adam — a regression guard for the optimizer code it depends on.

`short_horizon_check` in the sidecar was measured by bench/quality_eval.py with the same
evaluation code (lopt_tpu.evaluation) on the digits MLP: the best Adam of the half-decade sweep
and the learned optimizer, over SHORT steps and 2 held-out seeds. Re-running the learned
optimizer here must still beat that Adam mean-loss figure and reproduce its own recorded figures.
"""

import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lopt_tpu
from lopt_tpu import evaluation
from lopt_tpu import pretrained
from lopt_tpu.tasks import image_mlp

NAME = "digits_mlp_v1"


def test_list_and_sidecar():
  assert NAME in pretrained.list()
  meta = pretrained.metadata(NAME)
  assert meta["learned_optimizer"]["name"] in lopt_tpu.registry.LEARNED_OPTIMIZERS
  for key in ("config", "seed", "git_commit", "outer_steps", "wall_s"):
    assert key in meta["meta_training"], key
  tasks = meta["evaluation"]["tasks"]
  assert tasks["digits_mlp_32_relu"]["held_out"] is False
  assert sum(t["held_out"] for t in tasks.values()) >= 2


def test_unknown_name_lists_what_ships():
  with pytest.raises(pretrained.UnknownPretrainedError, match=NAME):
    pretrained.load("no_such_optimizer")


def test_unknown_name_in_a_directory_lists_that_directory(tmp_path):
  (tmp_path / "mine.json").write_text("{}")
  (tmp_path / "mine.msgpack").write_bytes(b"")
  assert pretrained.list(str(tmp_path)) == ["mine"]
  with pytest.raises(pretrained.UnknownPretrainedError, match=r"in '.*': mine\b"):
    pretrained.load("no_such_optimizer", directory=str(tmp_path))


def _copy_shipped(tmp_path):
  for ext in ("json", "msgpack"):
    (tmp_path / f"{NAME}.{ext}").write_bytes(
        (pathlib.Path(pretrained.DIRECTORY) / f"{NAME}.{ext}").read_bytes())
  return json.loads((tmp_path / f"{NAME}.json").read_text())


def test_the_shipped_theta_matches_its_recorded_fingerprint():
  _, theta = pretrained.load(NAME)
  assert pretrained.theta_fingerprint(theta) == pretrained.metadata(NAME)["theta_sha256"]


def test_a_theta_of_another_architecture_is_refused_at_load(tmp_path):
  # flax's from_bytes checks the keys only: a sidecar naming a different architecture with the
  # same keys used to load, and failed later inside jit (or not at all).
  meta = _copy_shipped(tmp_path)
  assert meta["learned_optimizer"]["kwargs"]["hidden_sizes"] == [32]
  meta["learned_optimizer"]["kwargs"]["hidden_sizes"] = [64]
  (tmp_path / f"{NAME}.json").write_text(json.dumps(meta))
  with pytest.raises(pretrained.CorruptPretrainedError, match="needs float32"):
    pretrained.load(NAME, directory=str(tmp_path))


def test_a_changed_theta_file_is_refused_at_load(tmp_path):
  _copy_shipped(tmp_path)
  _, theta = pretrained.load(NAME)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, theta)
  (tmp_path / f"{NAME}.msgpack").write_bytes(flax.serialization.to_bytes(zeros))
  with pytest.raises(pretrained.CorruptPretrainedError, match="fingerprint"):
    pretrained.load(NAME, directory=str(tmp_path))


def test_still_beats_tuned_adam_on_short_horizon():
  learned_opt, theta = pretrained.load(NAME)
  check = pretrained.metadata(NAME)["short_horizon_check"]
  curves = evaluation.train_curves(image_mlp.digits_mlp(), learned_opt.opt_fn(theta),
                                   check["num_steps"], evaluation.seed_keys(check["seeds"]))
  summary = evaluation.summarize(curves)
  assert summary["num_diverged"] == 0
  # It was meta-trained for the mean loss over 1000 steps; 300 steps in, it is mid-schedule, so
  # the check is the mean loss so far (its final loss at 1000 steps is in the README).
  assert summary["mean_loss_mean"] < check["best_adam_mean_loss"]
  # Same code, same seeds: the recorded figures come back (up to float reassociation).
  np.testing.assert_allclose(summary["mean_loss_mean"], check["learned_mean_loss"], rtol=0.02)
  np.testing.assert_allclose(summary["final_loss_mean"], check["learned_final_loss"], rtol=0.05)


def test_as_optax_takes_the_same_steps():
  learned_opt, theta = pretrained.load(NAME)
  task = image_mlp.digits_mlp()
  params = task.init(jax.random.key(0))
  batches = [task.sample_batch(jax.random.key(i)) for i in range(3)]
  tx = lopt_tpu.as_optax(learned_opt, theta)
  opt = learned_opt.opt_fn(theta)
  opt_state, tx_state, tx_params = opt.init(params), tx.init(params), params
  for batch in batches:
    loss, grads = jax.value_and_grad(task.loss)(opt.get_params(opt_state), None, batch)
    opt_state = opt.update(opt_state, grads, loss=loss)
    loss, grads = jax.value_and_grad(task.loss)(tx_params, None, batch)
    updates, tx_state = tx.update(grads, tx_state, tx_params, value=loss)
    tx_params = optax.apply_updates(tx_params, updates)
  chex_close = jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), tx_params,
      opt.get_params(opt_state))
  del chex_close
  assert float(task.loss(tx_params, None, batches[0])) < float(
      task.loss(params, None, batches[0]))
  assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tx_params))


# ---- the architecture it uses: HypergradAdam known answers -----------------------------------


def _run(opt, grad_fn, params, num_steps):
  state = opt.init(params)
  for _ in range(num_steps):
    state = opt.update(state, grad_fn(opt.get_params(state)))
  return state


def test_hypergrad_adam_without_the_rule_is_adam_at_theta_init():
  lopt = lopt_tpu.HypergradAdam(learning_rate=1e-2, hyper_lr=0.)
  theta = lopt.init(jax.random.key(0))
  params = {"w": jnp.linspace(-1., 1., 6).reshape(2, 3), "b": jnp.asarray([0.5, -2.])}
  grad_fn = jax.jit(jax.grad(lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(jnp.cos(p["b"]))))
  state = _run(lopt.opt_fn(theta), grad_fn, params, 20)
  tx = optax.adam(1e-2)
  tx_params, tx_state = params, tx.init(params)
  for _ in range(20):
    updates, tx_state = tx.update(grad_fn(tx_params), tx_state)
    tx_params = optax.apply_updates(tx_params, updates)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         state.params, tx_params)


def test_hypergrad_rule_grows_the_rate_on_a_slope_and_shrinks_it_when_steps_overshoot():
  lopt = lopt_tpu.HypergradAdam(learning_rate=1e-2, hyper_lr=0.5, log_lr_min=-1.5, log_lr_max=1.5)
  opt = lopt.opt_fn(lopt.init(jax.random.key(0)))
  params = {"slope": jnp.zeros([8]), "bowl": jnp.linspace(-1e-2, 1e-2, 8)}
  # slope: a constant gradient, so successive steps agree; bowl: a quadratic whose minimum is
  # closer than one step, so steps overshoot and the gradient turns against the last step.
  grad_fn = jax.jit(jax.grad(lambda p: jnp.sum(p["slope"]) + jnp.sum(
      jnp.linspace(1., 3., 8) * jnp.square(p["bowl"]))))
  state = _run(opt, grad_fn, params, 200)
  slope, bowl = (state.log_lr[i] for i in (1, 0))  # tensors in flattening (key) order
  assert float(slope) == pytest.approx(1.5)
  assert float(bowl) < -1.

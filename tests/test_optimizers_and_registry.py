"""Hand-designed optimizers are exactly their optax counterparts; registry names resolve."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_tpu import checkpointing
from lopt_tpu import registry
from lopt_tpu.optimizers import base as opt_base


@pytest.mark.parametrize("ours,theirs", [
    (opt_base.SGD(0.1), optax.sgd(0.1)),
    (opt_base.Momentum(0.1, 0.8), optax.sgd(0.1, momentum=0.8)),
    (opt_base.Adam(1e-2), optax.adam(1e-2)),
])
def test_hand_designed_optimizers_match_optax(ours, theirs):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones([3])}
  state, ref_state, ref = ours.init(params), theirs.init(params), params
  for t in range(4):
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p + t), ours.get_params(state))
    state = jax.jit(ours.update)(state, grads, loss=jnp.asarray(1.0))
    updates, ref_state = theirs.update(grads, ref_state, ref)
    ref = optax.apply_updates(ref, updates)
  for a, b in zip(jax.tree_util.tree_leaves(ours.get_params(state)), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(state.iteration) == 4


@pytest.mark.parametrize("kind,names", [
    ("task family", ["quadratic_family", "fmnist8_mlp", "digits_mlp", "image_mlp_family"]),
    ("learned optimizer", ["meta_sgd_wd", "per_param_mlp", "mlp_lopt", "hparam_controller",
                           "nn_adam", "adafac_mlp_lopt", "rnn_mlp_lopt"]),
    ("estimator", ["full_grad", "full_es", "truncated_grad", "truncated_es", "truncated_pes"]),
])
def test_registry_knows_every_component(kind, names):
  for name in names:
    assert callable(registry.get(kind, name))
  with pytest.raises(registry.UnknownNameError) as err:
    registry.get(kind, "no_such_thing")
  for name in names:  # the error lists what is known
    assert name in str(err.value)


def test_a_checkpoint_cut_off_mid_write_is_never_loaded(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  state = {"theta": jnp.arange(3.0)}
  ckpt.save(2, state)
  ckpt.close()
  # What a write killed half-way leaves: orbax's temporary directory, never renamed.
  partial = tmp_path / "4.orbax-checkpoint-tmp-1234567890"
  partial.mkdir()
  (partial / "garbage").write_text("half a checkpoint")
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
  restored, step = ckpt.restore_latest({"theta": jnp.zeros(3)})
  ckpt.close()
  assert step == 2
  np.testing.assert_array_equal(restored["theta"], [0.0, 1.0, 2.0])

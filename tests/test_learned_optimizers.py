"""Contract tests shared by every learned optimizer, plus a few known answers per design.

Each learned optimizer must: keep the params tree (structure, shapes, dtypes) and its own state
signature fixed across steps (the state is a `lax.scan` carry), trace `update` once, give
finite, non-zero meta-gradients through an unrolled inner run, and take small, sane steps at
theta-init.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_tpu.learned_optimizers import adafac_mlp_lopt
from lopt_tpu.learned_optimizers import hparam_controller
from lopt_tpu.learned_optimizers import features as feat
from lopt_tpu.learned_optimizers import hypergrad_adam
from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.learned_optimizers import mlp_lopt
from lopt_tpu.learned_optimizers import nn_adam
from lopt_tpu.learned_optimizers import per_param_mlp
from lopt_tpu.learned_optimizers import rnn_mlp_lopt
from lopt_tpu.tasks import quadratics

LOPTS = {
    "meta_sgd_wd": meta_sgd.MetaSGDWD,
    "mlp_lopt": mlp_lopt.MLPLOpt,
    "per_param_mlp": per_param_mlp.PerParamMLP,
    "hparam_controller": hparam_controller.HParamController,
    "nn_adam": nn_adam.NNAdam,
    "adafac_mlp_lopt": adafac_mlp_lopt.AdafacMLPLOpt,
    "rnn_mlp_lopt": rnn_mlp_lopt.RNNMLPLOpt,
    "hypergrad_adam": hypergrad_adam.HypergradAdam,
}
# These start out as a hand-designed optimizer (SGD, SGD + momentum, Adam), so must descend.
DESCENDS_AT_INIT = ("meta_sgd_wd", "hparam_controller", "nn_adam", "hypergrad_adam")
# This one starts as Adam at a tuned rate (2e-2) on purpose, so its first steps are not small.
STARTS_AT_TUNED_RATE = ("hypergrad_adam",)

all_lopts = pytest.mark.parametrize("name", list(LOPTS))


def _lopt_and_theta(name, seed=0):
  lopt = LOPTS[name]()
  return lopt, lopt.init(jax.random.PRNGKey(seed))


def _mixed_tree(seed):
  # numpy draws and numpy checks below: eager jax ops would compile per shape and slow the suite.
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {"scalar": normal(), "vector": normal(5), "matrix": normal(4, 3),
          "conv": normal(3, 3, 2, 4), "half": normal(3, 2).astype(jnp.bfloat16)}


def _signature(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def _numpy(tree):
  return [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(tree)]


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in _numpy(tree))


def _sum_of_squares(params, keys=None):
  """`0.5 * |params|^2` over all leaves, or only the top-level entries named in `keys`."""
  if keys is not None:
    params = {k: params[k] for k in keys}
  return sum(0.5 * jnp.sum(jnp.square(x.astype(jnp.float32)))
             for x in jax.tree_util.tree_leaves(params))


@all_lopts
def test_update_keeps_signature_and_traces_once(name):
  lopt, theta = _lopt_and_theta(name)
  assert lopt.name == name
  params = _mixed_tree(0)
  state = lopt.opt_fn(theta).init(params)
  chex.clear_trace_counter()  # the counter is keyed by code, shared by the parametrizations

  @jax.jit
  @chex.assert_max_traces(n=1)
  def update(theta, state, grads, loss):
    return lopt.opt_fn(theta).update(state, grads, loss=loss)

  # The second call feeds the first call's output (and a perturbed theta) back in: any dtype,
  # weak-type or shape drift in the state (a broken lax.scan carry) would trace a second time.
  new = update(theta, state, _mixed_tree(1), jnp.asarray(2.0))
  theta = jax.tree_util.tree_map(lambda x: x * 1.01, theta)
  new = update(theta, new, _mixed_tree(2), jnp.asarray(1.5))
  assert _signature(new.params) == _signature(params)
  assert _signature(new) == _signature(state)
  assert int(new.iteration) == 2
  assert _all_finite(new)
  assert any(np.any(a != b) for a, b in zip(_numpy(new.params), _numpy(params)))


@all_lopts
def test_params_with_no_entries_are_updated_without_error(name):
  # Concatenating no tensors, or reshape(0, -1), crashed several learned optimizers.
  lopt, theta = _lopt_and_theta(name)
  opt = lopt.opt_fn(theta)
  for params in ({}, {"empty": jnp.zeros([0, 3])}):
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    state = jax.jit(lambda s, g: opt.update(s, g, loss=jnp.asarray(1.0)))(opt.init(params), grads)
    assert _signature(opt.get_params(state)) == _signature(params)


@all_lopts
def test_integer_leaves_are_left_as_they_are(name):
  # A float step cast back to int truncates toward zero: tiny steps moved them by one each time.
  lopt, theta = _lopt_and_theta(name)
  params = {"w": jnp.asarray([0.5, -1., 2.]), "idx": jnp.asarray([3, -3, 7], jnp.int32)}
  grads = {"w": jnp.asarray([0.1, -0.2, 0.3]), "idx": jnp.zeros([3], jnp.int32)}
  opt = lopt.opt_fn(theta)
  update = jax.jit(lambda state: opt.update(state, grads, loss=jnp.asarray(1.0)))
  state = opt.init(params)
  for _ in range(3):
    state = update(state)
  np.testing.assert_array_equal(opt.get_params(state)["idx"], [3, -3, 7])
  assert np.any(np.asarray(opt.get_params(state)["w"]) != np.asarray(params["w"]))


def _unrolled_loss(lopt, theta, num_steps=10):
  """(Mean training loss, final state) of `num_steps` inner steps on a quadratic (FullGrad).

  Two tensors are trained; the others never get a gradient, like unused weights in a real
  model, or are empty: neither may turn the meta-gradient into NaN.
  """
  params = {"w": jnp.linspace(-1., 1., 6).reshape(2, 3), "b": jnp.asarray([0.5, -2., 1.]),
            "dead": jnp.zeros([2, 2]), "dead_scalar": jnp.zeros([]),
            "empty": jnp.zeros([0, 3])}
  opt = lopt.opt_fn(theta)

  def step(state, _):
    p = opt.get_params(state)
    loss, grads = jax.value_and_grad(_sum_of_squares)(p, keys=("w", "b"))
    return opt.update(state, grads, loss=loss), loss

  state, losses = jax.lax.scan(step, opt.init(params), None, length=num_steps)
  return jnp.mean(losses), state


@all_lopts
def test_meta_gradients_are_finite_and_nonzero(name):
  lopt, theta = _lopt_and_theta(name)
  # Two perturbed copies of theta under vmap, as evolution strategies evaluate them.
  thetas = jax.tree_util.tree_map(lambda x: jnp.stack([x, 1.05 * x + 0.01]), theta)
  meta_grad = jax.grad(lambda t: _unrolled_loss(lopt, t), has_aux=True)
  grads, final_state = jax.jit(jax.vmap(meta_grad))(thetas)
  assert _all_finite(final_state)
  assert _all_finite(grads)
  # A zero-initialized read-out passes no gradient to the layers below it at theta-init
  # exactly; once it moves (the perturbed copy) every meta-parameter must matter.
  for i in (1,) if name in STARTS_AT_TUNED_RATE else range(2):
    norms = {jax.tree_util.keystr(path): float(jnp.linalg.norm(jnp.ravel(g[i])))
             for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    # Every meta-parameter should influence the inner run from (near) theta-init.
    assert all(n > 0 for n in norms.values()), norms


@all_lopts
def test_update_of_a_tensor_ignores_other_tensors(name):
  # True for all designs here: per-tensor normalization and per-tensor controllers never mix
  # tensors, and the global controller only sees the (given) loss.
  lopt, theta = _lopt_and_theta(name)
  opt = lopt.opt_fn(theta)
  update = jax.jit(opt.update)
  a, b = _mixed_tree(0)["matrix"], _mixed_tree(0)["conv"]
  ga, gb = _mixed_tree(1)["matrix"], _mixed_tree(1)["conv"] * 100.
  alone, both = opt.init({"a": a}), opt.init({"a": a, "b": b})
  for _ in range(2):
    alone = update(alone, {"a": ga}, loss=jnp.asarray(1.0))
    both = update(both, {"a": ga, "b": gb}, loss=jnp.asarray(1.0))
  np.testing.assert_allclose(opt.get_params(alone)["a"], opt.get_params(both)["a"],
                             rtol=1e-5, atol=1e-7)


@all_lopts
def test_quadratic_at_theta_init_is_sane(name):
  lopt, theta = _lopt_and_theta(name)
  task = quadratics.QuadraticTask(dim=10)
  opt = lopt.opt_fn(theta)
  params = task.init(jax.random.PRNGKey(3))

  def step(state, _):
    loss, grads = jax.value_and_grad(task.loss)(opt.get_params(state), None, task.target)
    return opt.update(state, grads, loss=loss), loss

  state, losses = jax.jit(lambda s: jax.lax.scan(step, s, None, length=20))(opt.init(params))
  final = float(task.loss(opt.get_params(state), None, task.target))
  assert _all_finite(opt.get_params(state))
  assert final < 1.1 * float(losses[0])
  if name in DESCENDS_AT_INIT:
    assert final < float(losses[0])
  # Small steps: nothing moves by more than a few percent of the unit-scale params in 20 steps.
  if name not in STARTS_AT_TUNED_RATE:
    assert float(jnp.max(jnp.abs(opt.get_params(state) - params))) < 0.3


@all_lopts
def test_float64_params_keep_their_precision(name):
  # The networks work on a float32 copy of the params; the step used to be applied to that
  # copy, so with jax_enable_x64 float64 params were rounded to float32 at every step.
  lopt, theta = _lopt_and_theta(name)
  with jax.enable_x64(True):
    opt = lopt.opt_fn(theta)
    fine = np.asarray([1e-12, 3e-13, 0.0])  # below float32's resolution at 1 and 2
    coarse = jnp.asarray([1.0, -2.0, 0.5], jnp.float64)

    def two_steps(w):
      params = {"w": w, "h": jnp.ones([2], jnp.bfloat16)}
      state = opt.init(params)
      for i in range(2):
        grads = {"w": jnp.asarray([0.3, -0.1, 0.2], jnp.float64) * (i + 1),
                 "h": jnp.full([2], 0.5, jnp.bfloat16)}
        state = opt.update(state, grads, loss=jnp.asarray(1.0))
      return opt.get_params(state)

    new_fine, new_coarse = two_steps(coarse + fine), two_steps(coarse)
    assert new_fine["w"].dtype == jnp.float64 and new_fine["h"].dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(new_coarse["w"]), np.asarray(coarse))  # it moved
    # Both see the same float32 features, so take the same steps: the fine digits survive.
    np.testing.assert_allclose(np.asarray(new_fine["w"]) - np.asarray(new_coarse["w"]), fine,
                               rtol=1e-3, atol=1e-15)


def test_nn_adam_starts_as_adam():
  lopt, theta = _lopt_and_theta("nn_adam")
  opt = lopt.opt_fn(theta)
  adam = optax.adam(lopt.learning_rate, b1=lopt.b1, b2=lopt.b2, eps=lopt.eps)
  params = {"w": jnp.linspace(-1., 1., 6).reshape(2, 3), "b": jnp.asarray([0.5, -2., 1.])}
  state, adam_state = opt.init(params), adam.init(params)
  update, adam_update = jax.jit(opt.update), jax.jit(adam.update)
  for i in range(3):
    grads = {"w": _mixed_tree(i)["matrix"][:2], "b": _mixed_tree(i)["vector"][:3]}
    old = opt.get_params(state)
    state = update(state, grads)
    expected, adam_state = adam_update(grads, adam_state)
    for k in params:
      np.testing.assert_allclose(opt.get_params(state)[k] - old[k], expected[k], rtol=0.05,
                                 atol=1e-6)
  np.testing.assert_allclose(state.b1_prod, 0.9 ** 3, rtol=0.01)


def test_controller_signals_do_not_depend_on_the_gradient_scale():
  # The cosines and the spike ratio are scale-free; fixed offsets of 1e-12 on mean squares used
  # to swamp them at gradient RMS <= 1e-5 (hypergrad's cosine 0.80 -> 0.98 -> 0.09 -> 0.01).
  layout = feat.layout_of({"w": jnp.zeros([64]), "b": jnp.zeros([8])})
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=72), jnp.float32)
  m = g + jnp.asarray(rng.normal(size=72), jnp.float32)  # cos(g, m) ~ 0.7
  v = 0.3 + 0.1 * jnp.square(g)
  b2_prod = jnp.asarray([0.9, 0.9])
  hypergrad, nnadam = LOPTS["hypergrad_adam"](), LOPTS["nn_adam"]()
  signals = jax.jit(lambda g, m, v: hypergrad.signals(g, m, v, b2_prod, layout))
  cosine = jax.jit(lambda g, m: feat.tensor_cosine(g, m, layout))
  ref_signals, ref_cosine = signals(g, m, v), cosine(g, m)
  assert 0.3 < float(ref_signals[0][0]) < 0.99 and abs(float(ref_signals[1][0])) > 0.1
  for scale in (1e-5, 1e-7, 1e-9):
    for got, want in zip(signals(scale * g, scale * m, scale**2 * v), ref_signals):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cosine(scale * g, m), ref_cosine, rtol=1e-4, atol=1e-5)
  # NNAdam's cosine feature is column 4 of its per-tensor summaries.
  summaries = jax.jit(lambda g, m: nnadam.tensor_features(
      jnp.ones_like(g), g, m, v, b2_prod, b2_prod, layout)[:, 4])
  np.testing.assert_allclose(summaries(1e-7 * g, 1e-7 * m), summaries(g, m), rtol=1e-4,
                             atol=1e-5)
  # No history (zero momentum): 0, not NaN.
  assert np.all(np.asarray(cosine(g, jnp.zeros_like(m))) == 0)
  # The shipped digits_mlp_v1 keeps the signals it was meta-trained with, which fade there.
  legacy = LOPTS["hypergrad_adam"](absolute_signal_offsets=True)
  legacy_cosine = lambda k: legacy.signals(k * g, k * m, k**2 * v, b2_prod, layout)[0]
  np.testing.assert_allclose(legacy_cosine(1.0), ref_signals[0], rtol=1e-5)
  assert np.all(np.abs(np.asarray(legacy_cosine(1e-7))) < 0.5 * np.abs(ref_signals[0]))


@pytest.mark.parametrize("beta,shift", [(1, 17.), (2, 10.), (2, 40.)])
def test_nn_adam_betas_saturating_to_one_keep_params_finite(beta, shift):
  # float32 rounds sigmoid(logit(0.999) + 10) to exactly 1.0; the bias correction then divided
  # 0 by 0 and every param became NaN on the first step. Betas are capped just below 1.
  lopt, theta = _lopt_and_theta("nn_adam")
  readout = theta["controller"]["params"]["readout"]
  theta["controller"]["params"]["readout"] = {
      "kernel": jnp.zeros_like(readout["kernel"]),
      "bias": jnp.zeros_like(readout["bias"]).at[beta].set(shift)}
  opt = lopt.opt_fn(theta)
  params = {"w": jnp.linspace(-1., 1., 6).reshape(2, 3), "b": jnp.asarray([0.5, -2.])}
  state = opt.init(params)
  for i in range(3):
    state = opt.update(state, jax.tree_util.tree_map(lambda x, i=i: jnp.cos(x + i), params))
    for leaf in jax.tree_util.tree_leaves(opt.get_params(state)):
      assert np.all(np.isfinite(leaf)), (i, opt.get_params(state))


def test_hparam_controller_starts_at_base_lr_and_needs_loss():
  lopt, theta = _lopt_and_theta("hparam_controller")
  opt = lopt.opt_fn(theta)
  params = {"w": jnp.ones([3])}
  grads = {"w": jnp.asarray([1., -2., 3.])}
  state = opt.init(params)
  with pytest.raises(ValueError, match="needs the training loss"):
    opt.update(state, grads)
  state = opt.update(state, grads, loss=jnp.asarray(4.0))
  np.testing.assert_allclose(params["w"] - opt.get_params(state)["w"], lopt.base_lr * grads["w"],
                             rtol=0.05)
  # The initial LSTM state comes from theta.
  theta["initial_carry"] = jax.tree_util.tree_map(lambda x: x + 0.5, theta["initial_carry"])
  np.testing.assert_allclose(lopt.opt_fn(theta).init(params).lstm_carry[1], 0.5)


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 2, 4)])
def test_factored_estimate_is_exact_for_rank_one_squares(shape):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  rows = jax.random.normal(k1, shape[:-1])
  cols = jax.random.normal(k2, shape[:-2] + shape[-1:])
  g = rows[..., :, None] * cols[..., None, :]  # g^2 is rank one in the last two axes
  decays = jnp.asarray([0.9, 0.99])
  acc = adafac_mlp_lopt.init_factored(shape, 2)
  update = jax.jit(adafac_mlp_lopt.update_factored)
  for _ in range(2):
    acc, v = update(acc, g, decays)
  assert set(acc) == {"row", "col"}
  full = (1. - decays ** 2) * jnp.square(g).reshape(-1, 1)  # unfactored EMA after two steps
  np.testing.assert_allclose(v, full, rtol=1e-4)
  _, v_vector = adafac_mlp_lopt.update_factored(
      adafac_mlp_lopt.init_factored((5,), 2), jnp.arange(1., 6.), decays)
  np.testing.assert_allclose(v_vector, (1. - decays) * jnp.arange(1., 6.)[:, None] ** 2,
                             rtol=1e-5)


@pytest.mark.parametrize("quiet_from,floor", [(0, 0.5), (20, 0.1)])
def test_factored_features_survive_a_row_without_gradient(quiet_from, floor):
  # The first layer of a digits MLP: the kernel rows of never-lit pixels get no gradient
  # (quiet_from=0), those of rarely lit ones stop getting it (20). rsqrt(v) of the first came
  # out at ~1e9 and flattened the live rows' normalized values to ~1e-8; m_0.99 * rsqrt(v_0.9)
  # of the second grew ~4% a step and flattened them to 0.005 by step 200.
  shape = (8, 4)
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), shape)}
  lopt = adafac_mlp_lopt.AdafacMLPLOpt()
  opt = lopt.opt_fn(lopt.init(jax.random.PRNGKey(1)))
  layout = feat.layout_of(params)
  p = params["w"].reshape(-1)

  def step(carry, t):
    state, _ = carry
    g = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(2), t), shape)
    g = jnp.where((t >= quiet_from) & (jnp.arange(shape[0]) == 0)[:, None], 0., g)
    flat = g.reshape(-1)
    momenta = feat.ema(state.momenta, flat, jnp.asarray(lopt.momentum_decays))
    rms = feat.ema(state.rms, jnp.square(flat), jnp.asarray(lopt.rms_decays))
    acc, v = adafac_mlp_lopt.update_factored(state.factored[0], g,
                                             jnp.asarray(lopt.adafactor_decays))
    features = adafac_mlp_lopt.per_param_features(p, flat, momenta, rms, v)
    state = state.replace(momenta=momenta, rms=rms, factored=(acc,))
    return (state, feat.second_moment_normalize(features, layout)), None

  state = opt.init(params)
  init = (state, jnp.zeros([p.size, lopt.num_features - len(feat.TIMESCALES)]))
  (_, normalized), _ = jax.lax.scan(step, init, jnp.arange(200))
  live_rms = jnp.sqrt(jnp.mean(jnp.square(normalized[shape[1]:]), axis=0))
  # Every feature still tells the live rows apart.
  assert jnp.all(live_rms > floor), live_rms
  assert jnp.all(jnp.isfinite(normalized))

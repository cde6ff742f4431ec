"""The Part 5 tutorial flow through the public API (sizes reduced to keep CI fast)."""

import jax
import numpy as np
import optax

import lopt_tpu
from lopt_tpu.outer import gradient_learner


def _estimators(lopt, num_tasks=4, trunc_length=10):
  sched = lopt_tpu.LogUniformLengthSchedule(min_length=20, max_length=60)

  def grad_est(family):
    unroll = lopt_tpu.TruncatedUnroll(family, lopt, sched, num_tasks=num_tasks,
                                      random_initial_iteration_offset=60)
    return lopt_tpu.TruncatedPES(unroll, trunc_length=trunc_length)

  return [grad_est(lopt_tpu.FixedDimQuadraticFamily(10)),
          grad_est(lopt_tpu.single_task_to_family(lopt_tpu.digits_mlp()))]


def test_single_machine_gradient_learner_flow():
  lopt = lopt_tpu.MLPLOpt()
  trainer = lopt_tpu.SingleMachineGradientLearner(lopt, _estimators(lopt), optax.adam(1e-3))
  key = jax.random.key(0)
  state = trainer.init(key)
  losses = []
  for _ in range(5):
    state, loss, metrics = trainer.update(state, key)  # same key: fresh randomness per step
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert len(set(losses)) == len(losses)  # the key really is derived per step
  assert int(state.gradient_learner_state.step) == 5
  assert any(k.startswith("truncated_pes/quadratic_family/") for k in metrics)
  assert any(k.startswith("truncated_pes/digits8_mlp_32_relu/") for k in metrics)


def test_worker_and_central_learner_flow():
  lopt = lopt_tpu.MLPLOpt()
  learner = lopt_tpu.GradientLearner(lopt, optax.adam(1e-3))
  key = jax.random.key(0)
  central = learner.init(key)
  estimators = _estimators(lopt)
  weights = learner.get_state_for_worker(central)
  states = [e.init_worker_state(weights.theta, jax.random.fold_in(key, i))
            for i, e in enumerate(estimators)]
  compute = jax.jit(gradient_learner.gradient_worker_compute, static_argnums=(1,))
  theta0 = central.theta
  for step in range(3):
    weights = learner.get_state_for_worker(central)
    out = compute(weights, tuple(estimators), states, jax.random.fold_in(key, step))
    states = out.unroll_states
    # Only gradients, the estimators' losses and scalar metrics (with the weights that
    # combine them over workers) travel to the learner, no unroll state (the gradient as one
    # flat buffer of theta's size).
    to_put = out.to_put
    assert to_put.losses.shape == to_put.loss_weights.shape == (len(estimators),)
    assert set(to_put.metric_weights) <= set(to_put.metrics)
    assert len(jax.tree_util.tree_leaves(to_put)) == (
        3 + len(to_put.metrics) + len(to_put.metric_weights))
    assert all(np.ndim(x) == 0 for x in jax.tree_util.tree_leaves(to_put.metrics))
    assert out.to_put.theta_grads.shape == (
        sum(x.size for x in jax.tree_util.tree_leaves(theta0)),)
    central, metrics = learner.update(central, [out.to_put])
    assert np.isfinite(float(metrics["theta_grad_norm"]))
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), theta0, central.theta)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_init_and_update_with_the_same_key_draw_unrelated_numbers(monkeypatch):
  # The natural loop passes one key to init and to every update. JAX's split(k)[i] equals
  # fold_in(k, i), so deriving init's keys by split(key) and step s's by fold_in(key, s) once
  # made step 1's PES perturbations equal to the task draws of init (the quadratics' targets).
  from lopt_tpu.outer.estimators import base  # pylint: disable=g-import-not-at-top
  drawn = []
  sample = base.sample_flat_perturbations

  def spy(flat_theta, key, task_index, std):
    eps = sample(flat_theta, key, task_index, std)
    jax.debug.callback(lambda e: drawn.append(np.asarray(e) / std), eps)
    return eps

  monkeypatch.setattr(base, "sample_flat_perturbations", spy)
  lopt = lopt_tpu.MLPLOpt()
  trainer = lopt_tpu.SingleMachineGradientLearner(lopt, _estimators(lopt)[:1], optax.adam(1e-3))
  key = jax.random.key(0)
  state = trainer.init(key)
  targets = np.asarray(state.gradient_estimator_states[0].pair.task_params["target"][0])
  for _ in range(3):
    state, _, _ = trainer.update(state, key)
  assert len(drawn) == 4  # PES's first runs' eps_0 (in init), then one per update
  for eps in drawn:  # [T, P] standard normals vs [T, 10] standard-normal targets
    assert np.abs(eps[:, :10] - targets).min() > 1e-4

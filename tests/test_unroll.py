"""The vectorized truncated unroll: restarts, offsets, validation meta-loss, shared randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.outer import gradient_learner
from lopt_tpu.outer import truncation
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base as est_base
from lopt_tpu.outer.estimators import full
from lopt_tpu.outer.estimators import truncated
from lopt_tpu.tasks import quadratics

LOPT = meta_sgd.MetaSGDWD(initial_lr=0.1, initial_wd=1e-6)


def _unroll(num_tasks=4, length=7, offset=0, split="train"):
  return unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(5, noise=0.5), LOPT,
                                    truncation.ConstantTruncationSchedule(length), num_tasks,
                                    offset, meta_loss_split=split)


def test_runs_restart_exactly_at_their_length():
  u = _unroll(num_tasks=3, length=7)
  theta = LOPT.init(None)
  states = est_base.add_sample_axis(u.init_states(theta, jax.random.key(0)))
  states, out = jax.jit(lambda s: u.unroll(theta, s, jax.random.key(1), 16,
                                           thetas_batched=False))(states)
  done = np.asarray(out.is_done[:, 0, 0])
  assert list(np.nonzero(done)[0]) == [6, 13]  # steps 7 and 14 end their runs
  assert int(states.inner_step[0, 0]) == 2  # 2 steps into the third run
  # A restart draws a new task: the target changes at the restart, not before.
  assert not np.allclose(out.loss[6, 0, 0], out.loss[7, 0, 0])


def test_random_initial_offsets_desynchronize_tasks():
  u = _unroll(num_tasks=16, length=50, offset=50)
  states = u.init_states(LOPT.init(None), jax.random.key(0))
  steps = np.asarray(states.inner_step)
  assert steps.min() >= 0 and steps.max() < 50 and len(set(steps.tolist())) > 8


@pytest.mark.parametrize("make", [lambda: truncation.ConstantTruncationSchedule(0.5),
                                  lambda: truncation.LogUniformLengthSchedule(0.9, 4),
                                  lambda: truncation.LogUniformLengthSchedule(2, 7.5)])
def test_fractional_truncation_lengths_are_refused(make):
  # int() made them 0-length runs that restart after every step (log(0): all samples 0).
  with pytest.raises(ValueError, match="must be a whole number of steps"):
    make()
  assert truncation.LogUniformLengthSchedule(2.0, np.int64(7)).max_length == 7


def test_initial_offsets_stay_within_each_runs_length():
  # The default config's offset 300 with lengths 100-300: a start drawn past the run's length
  # ended 39% of the runs together at their first step.
  u = unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(5), LOPT,
                                 truncation.LogUniformLengthSchedule(100, 300), 512, 300)
  states = u.init_states(LOPT.init(None), jax.random.key(0))
  left = np.asarray(states.length - states.inner_step)  # steps to each run's first restart
  assert left.min() >= 1
  # Roughly uniform over the run: about a quarter of them restart in its first quarter.
  assert 0.15 < np.mean(left <= 0.25 * np.asarray(states.length)) < 0.35


def test_full_episodes_neither_restart_nor_report_restarts():
  u = unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(5), LOPT,
                                 truncation.LogUniformLengthSchedule(3, 12), 4)
  est = full.FullES(u, num_steps=12)
  theta = LOPT.init(None)
  out, _ = jax.jit(est.compute_gradient_estimate)(theta, est.init_worker_state(theta, None),
                                                  jax.random.key(0))
  assert float(out.metrics["restart_frac"]) == 0.0  # was the steps past a drawn length: 0.4
  states = u.init_states(theta, jax.random.key(0), offset=0, length=12)
  assert np.all(np.asarray(states.length) == 12)  # what Optimizer.init is told as num_steps


def test_validation_meta_loss_is_the_loss_after_the_update_on_a_valid_batch():
  u = _unroll(num_tasks=1, length=100, split="valid")
  theta = LOPT.init(None)
  state = jax.tree_util.tree_map(lambda x: x[0], u.init_states(theta, jax.random.key(0)))
  key = jax.random.key(3)
  new_state, out = u.advance(theta, state, key)
  k_batch, k_loss, k_opt, k_valid = jax.random.split(key, 4)
  k_vbatch, k_vloss = jax.random.split(k_valid)
  task = u.task_family.task_fn(state.task_params)
  expected = task.loss(new_state.opt_state.params, k_vloss, task.sample_batch(k_vbatch, "valid"))
  np.testing.assert_allclose(float(out.meta_loss), float(expected), rtol=1e-6)
  assert not np.isclose(float(out.meta_loss), float(out.loss))


def test_the_same_task_index_gets_the_same_randomness_anywhere():
  """Task 5 alone (as on another device) sees exactly what it sees among 8 tasks."""
  u = _unroll(num_tasks=8, length=9, offset=9)
  theta = LOPT.init(None)
  everyone = u.init_states(theta, jax.random.key(0))
  alone = u.init_states(theta, jax.random.key(0), task_index=jnp.array([5]))
  run = jax.jit(lambda s: u.unroll(theta, est_base.add_sample_axis(s), jax.random.key(1), 12,
                                   thetas_batched=False))
  (_, out_all), (_, out_one) = run(everyone), run(alone)
  np.testing.assert_array_equal(np.asarray(out_all.loss[:, 0, 5]), np.asarray(out_one.loss[:, 0, 0]))


def test_meta_gradient_clipping_bounds_the_update():
  u = _unroll(num_tasks=4, length=20)
  est = truncated.TruncatedGrad(u, trunc_length=5)
  sgd = optax.sgd(1.0)
  clipped = gradient_learner.SingleMachineGradientLearner(LOPT, [est], sgd, meta_grad_clip=1e-3)
  free = gradient_learner.SingleMachineGradientLearner(LOPT, [est], sgd)
  key = jax.random.key(0)
  s_c, s_f = clipped.init(key), free.init(key)
  theta0 = LOPT.init(None)
  s_c, _, m_c = clipped.update(s_c, key)
  s_f, _, m_f = free.update(s_f, key)
  norm = lambda s: float(optax.tree.norm(jax.tree_util.tree_map(
      jnp.subtract, s.gradient_learner_state.theta, theta0)))
  assert float(m_f["theta_grad_norm"]) > 1e-2
  np.testing.assert_allclose(norm(s_c), 1e-3, rtol=1e-4)  # sgd(1) step == clipped gradient
  np.testing.assert_allclose(norm(s_f), float(m_f["theta_grad_norm"]), rtol=1e-4)


class _FourZeros:
  """A stand-in learned optimizer whose theta is four zeros (only `init` is needed here)."""

  def init(self, key):
    del key
    return {"w": jnp.zeros(4)}


@pytest.mark.parametrize("entry", [1e10, 1e19, 1e30, 3e38])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_huge_finite_meta_gradient_is_clipped_not_zeroed(entry, num_workers):
  # Squares of float32 entries above ~1.8e19 overflow: the norm was inf, and the clip factor
  # clip / inf = 0 turned the step into no step at all. Two workers' 3e38 added up to inf,
  # and the clip made theta NaN.
  learner = gradient_learner.GradientLearner(_FourZeros(), optax.sgd(1.0), meta_grad_clip=0.5)
  grads = gradient_learner.AggregatedGradient(
      theta_grads=jnp.full([4], entry, jnp.float32), losses=jnp.zeros([1]),
      loss_weights=jnp.ones([1]), metrics={}, metric_weights={})
  state, metrics = jax.jit(learner.update)(learner.init(jax.random.key(0)),
                                           [grads] * num_workers)
  np.testing.assert_allclose(float(metrics["theta_update_norm"]), 0.5, rtol=1e-5)
  np.testing.assert_allclose(state.theta["w"], -0.25, rtol=1e-5)
  # Entries are bounded to MAX_GRAD_ENTRY (1e18) before the norm.
  np.testing.assert_allclose(float(metrics["theta_grad_norm"]), 2 * min(entry, 1e18), rtol=1e-5)


def test_an_estimator_with_nothing_valid_does_not_pull_the_meta_loss_down():
  # A family whose runs all diverged reports loss 0 with weight 0: averaged in, it halved the
  # meta-loss of the other family.
  grads = gradient_learner.AggregatedGradient(
      theta_grads=jnp.zeros([4]), losses=jnp.asarray([0.04, 0.0]),
      loss_weights=jnp.asarray([0.5, 0.0]), metrics={}, metric_weights={})
  np.testing.assert_allclose(float(grads.mean_loss), 0.04)
  none = grads.replace(loss_weights=jnp.zeros([2]))
  assert float(none.mean_loss) == 0.0
  # Two finite losses near float32's max: added before the division they made an inf
  # meta-loss, which stopped the run as non-finite.
  huge = grads.replace(losses=jnp.asarray([2e38, 2e38]), loss_weights=jnp.ones([2]))
  np.testing.assert_allclose(float(huge.mean_loss), 2e38, rtol=1e-6)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_huge_meta_gradient_entry_keeps_adam_finite_and_a_clip_keeps_it_moving(clip):
  # Without a clip, Adam's second moment of an entry above ~1.8e19 was inf from then on, and
  # every later update of that entry exactly 0. Bounded, it stays finite (and decays); with
  # meta_grad_clip the entry follows the next gradients at once.
  learner = gradient_learner.GradientLearner(_FourZeros(), optax.adam(1e-3), meta_grad_clip=clip)
  update = jax.jit(learner.update)
  state = learner.init(jax.random.key(0))
  for first in (1e20,) + (-1.0,) * 20:
    grads = gradient_learner.AggregatedGradient(
        theta_grads=jnp.asarray([first, 1., 1., 1.], jnp.float32), losses=jnp.zeros([1]),
        loss_weights=jnp.ones([1]), metrics={}, metric_weights={})
    before = state.theta["w"]
    state, metrics = update(state, [grads])
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state.theta_opt_state))
  assert np.all(np.isfinite(state.theta["w"]))
  if clip:  # g = -1 now: theta[0] goes up, at Adam's full rate
    assert float(state.theta["w"][0] - before[0]) > 5e-4


def _chunked(tasks_per_chunk, num_tasks=8):
  return unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(5, noise=0.5), LOPT,
                                    truncation.ConstantTruncationSchedule(6), num_tasks, 6,
                                    tasks_per_chunk=tasks_per_chunk)


def test_chunked_unroll_equals_unrolling_all_tasks_at_once():
  """Chunks of 2 or 3 tasks (lax.map over chunks) give every run exactly what it gets when all
  8 are unrolled together: per-task thetas, restarts mid-truncation and gradients included."""
  whole = _chunked(0)
  assert whole.tasks_per_chunk_for(8) == 8
  assert _chunked(3).tasks_per_chunk_for(8) == 2  # the largest divisor not above the limit
  theta = LOPT.init(None)
  thetas = jax.tree_util.tree_map(  # [S=2, T=8]: a different theta for every run
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(7), (2, 8) + x.shape), theta)
  states = est_base.add_sample_axis(whole.init_states(theta, jax.random.key(0)), 2)

  def meta_loss(thetas, u):
    new_states, out = u.unroll(thetas, states, jax.random.key(1), 10)
    return jnp.mean(out.meta_loss), (new_states, out)

  results = [jax.jit(jax.value_and_grad(meta_loss, has_aux=True), static_argnums=1)(thetas, u)
             for u in (whole, _chunked(2), _chunked(3))]
  (loss, (new_states, out)), grads = results[0]
  assert np.asarray(out.is_done).any()  # restarts happened inside the truncation
  for (c_loss, (c_states, c_out)), c_grads in results[1:]:
    for a, b in zip(jax.tree_util.tree_leaves((loss, new_states, out, grads)),
                    jax.tree_util.tree_leaves((c_loss, c_states, c_out, c_grads))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_cpu_default_chunks_by_the_size_of_the_runs_state():
  """Tiny runs stay vectorized across all tasks; runs whose state fills the cache budget are
  chunked (on CPU, where the tests run)."""
  u = _unroll(num_tasks=64)
  budget = unroll_lib.CPU_CHUNK_BYTES
  assert u.tasks_per_chunk_for(64, 100) == 64
  assert u.tasks_per_chunk_for(64, budget // 4) == 4
  assert u.tasks_per_chunk_for(64, budget // 5) == 4  # a divisor of 64: 5 -> 4
  assert u.tasks_per_chunk_for(64, 10 * budget) == 1
  assert u.tasks_per_chunk_for(64) == 64  # size unknown: no chunking


def test_log_meta_loss_is_the_log_of_the_loss():
  u = unroll_lib.TruncatedUnroll(quadratics.FixedDimQuadraticFamily(5, noise=0.5), LOPT,
                                 truncation.ConstantTruncationSchedule(20), 2,
                                 meta_loss_transform="log")
  theta = LOPT.init(None)
  states = est_base.add_sample_axis(u.init_states(theta, jax.random.key(0)))
  _, out = u.unroll(theta, states, jax.random.key(1), 5, thetas_batched=False)
  np.testing.assert_allclose(np.asarray(out.meta_loss),
                             np.log(np.maximum(np.asarray(out.loss), 1e-8)), rtol=1e-6)

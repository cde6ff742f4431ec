"""The vectorized truncated unroll: restarts, offsets, validation meta-loss, shared randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.outer import gradient_learner
from lopt_tpu.outer import truncation
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base as est_base
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

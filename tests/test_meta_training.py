"""Meta-training on the digits MLP actually learns (issue: core library, done-when 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.learned_optimizers import mlp_lopt
from lopt_tpu.optimizers import base as opt_base
from lopt_tpu.outer import gradient_learner
from lopt_tpu.outer import truncation
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import pes
from lopt_tpu.tasks import base as tasks_base
from lopt_tpu.tasks import image_mlp

pytestmark = pytest.mark.slow


def _meta_train(lopt, sched, num_tasks, trunc_length, outer_lr, steps, offset):
  family = tasks_base.single_task_to_family(image_mlp.digits_mlp())
  unroll = unroll_lib.TruncatedUnroll(family, lopt, sched, num_tasks, offset)
  trainer = gradient_learner.SingleMachineGradientLearner(
      lopt, [pes.TruncatedPES(unroll, trunc_length)], optax.adam(outer_lr))
  key = jax.random.key(0)
  state = jax.jit(trainer.init)(key)
  losses = []
  for _ in range(steps):
    state, loss, _ = trainer.update(state, key)
    losses.append(float(loss))
  return state.gradient_learner_state.theta, np.asarray(losses)


def test_pes_meta_training_of_mlp_lopt_lowers_meta_loss():
  _, losses = _meta_train(mlp_lopt.MLPLOpt(), truncation.LogUniformLengthSchedule(40, 100),
                          num_tasks=4, trunc_length=20, outer_lr=1e-2, steps=150, offset=100)
  assert np.all(np.isfinite(losses))
  first, last = losses[:50].mean(), losses[-50:].mean()
  assert last <= 0.8 * first, (first, last)


def _sgd_mean_losses(task, lrs, horizon, seeds):
  """Mean training loss over `horizon` SGD steps for each learning rate in `lrs`, averaged over
  8 seeds (the grid's objective); the whole grid in one compiled program."""

  def run(lr, key):
    opt = opt_base.SGD(lr)
    k_init, k_data = jax.random.split(key)
    state = opt.init(task.init(k_init))

    def step(state, t):
      batch = task.sample_batch(jax.random.fold_in(k_data, t))
      loss, grads = jax.value_and_grad(task.loss)(state.params, None, batch)
      return opt.update(state, grads, loss=loss), loss

    return jnp.mean(jax.lax.scan(step, state, jnp.arange(horizon))[1])

  keys = jax.random.split(jax.random.key(seeds), 8)
  per_lr = jax.vmap(lambda lr: jnp.mean(jax.vmap(run, in_axes=(None, 0))(lr, keys)))
  return np.asarray(jax.jit(per_lr)(jnp.asarray(lrs, jnp.float32)))


def test_meta_sgd_finds_the_grid_search_learning_rate():
  horizon = 100
  theta, _ = _meta_train(meta_sgd.MetaSGDWD(initial_lr=1e-2, initial_wd=1e-6),
                         truncation.ConstantTruncationSchedule(horizon), num_tasks=16,
                         trunc_length=20, outer_lr=5e-2, steps=150, offset=horizon)
  learned_lr = float(jnp.exp(theta["log_lr"]))
  task = image_mlp.digits_mlp()
  grid = 2.0 ** np.arange(-8, 4, 0.5)  # half-octave grid from 0.004 to 11
  means = _sgd_mean_losses(task, grid, horizon, seeds=123)
  best_lr = float(grid[int(np.nanargmin(means))])
  assert best_lr / 2 <= learned_lr <= best_lr * 2, (learned_lr, best_lr, dict(zip(grid, means)))

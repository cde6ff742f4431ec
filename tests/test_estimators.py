"""Known-answer checks of the gradient estimators on a deterministic quadratic.

Every task instance is the same deterministic problem (fixed init, fixed target, no data
noise), so the only randomness left is the estimators' own perturbations, and their
statistical error can be computed and turned into tolerances.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diverging_family
from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.optimizers import base as opt_base
from lopt_tpu.outer import truncation
from lopt_tpu.outer import unroll as unroll_lib
from lopt_tpu.outer.estimators import base
from lopt_tpu.outer.estimators import full
from lopt_tpu.outer.estimators import pes
from lopt_tpu.outer.estimators import truncated
from lopt_tpu.tasks import base as tasks_base
from lopt_tpu.tasks import quadratics

DIM = 8


class _FixedStartQuadratic(quadratics.QuadraticTask):
  """Ill-conditioned quadratic that always starts from the same point."""

  def __init__(self):
    super().__init__(DIM, target=jnp.linspace(-1.0, 1.0, DIM) + 0.5,
                     scale=jnp.logspace(-1.0, 0.0, DIM))

  def init(self, key):
    del key
    return jnp.zeros([DIM])


def _unroll(num_tasks, length, offset=0):
  return unroll_lib.TruncatedUnroll(
      tasks_base.single_task_to_family(_FixedStartQuadratic()),
      meta_sgd.MetaSGDWD(initial_lr=0.1, initial_wd=1e-3),
      truncation.ConstantTruncationSchedule(length), num_tasks,
      random_initial_iteration_offset=offset)


def _theta():
  return meta_sgd.MetaSGDWD(initial_lr=0.1, initial_wd=1e-3).init(jax.random.key(0))


def _vec(tree):
  return np.array([tree["log_lr"], tree["log_wd"]], np.float64)


def _full_grad(num_steps, loss_type="average"):
  est = full.FullGrad(_unroll(1, num_steps), num_steps, loss_type)
  state = est.init_worker_state(_theta(), jax.random.key(1))
  out, _ = jax.jit(est.compute_gradient_estimate)(_theta(), state, jax.random.key(2))
  return est, state, out


def test_full_grad_matches_finite_differences():
  est, state, out = _full_grad(30)
  loss_at = jax.jit(lambda th: est.compute_gradient_estimate(th, state, jax.random.key(2))[0]
                    .mean_loss)
  theta, h = _theta(), 1e-2
  for name in ("log_lr", "log_wd"):
    plus = dict(theta, **{name: theta[name] + h})
    minus = dict(theta, **{name: theta[name] - h})
    fd = (float(loss_at(plus)) - float(loss_at(minus))) / (2 * h)
    np.testing.assert_allclose(float(out.grad[name]), fd, rtol=2e-2, atol=1e-6)
  assert abs(float(out.grad["log_lr"])) > 1e-2  # the check is not vacuous


@pytest.mark.parametrize("loss_type", ["average", "last"])
def test_full_es_agrees_with_full_grad(loss_type):
  num_steps, num_tasks, std = 20, 4096, 0.01
  _, _, exact = _full_grad(num_steps, loss_type)
  g = _vec(exact.grad)
  est = full.FullES(_unroll(num_tasks, num_steps), num_steps, loss_type, std=std)
  state = est.init_worker_state(_theta(), jax.random.key(1))
  out, _ = jax.jit(est.compute_gradient_estimate)(_theta(), state, jax.random.key(3))
  # Antithetic ES on a locally linear loss: per-sample covariance |g|^2 I + g g^T.
  stderr = np.sqrt((g @ g + g ** 2) / num_tasks)
  np.testing.assert_array_less(np.abs(_vec(out.grad) - g), 4 * stderr + 1e-6)


def _average_over_episode(est, num_truncations, seed):
  """Mean of the per-truncation estimates over one synchronized episode."""
  state = est.init_worker_state(_theta(), jax.random.key(seed))
  step = jax.jit(est.compute_gradient_estimate)
  total = np.zeros(2)
  for k in range(num_truncations):
    out, state = step(_theta(), state, jax.random.fold_in(jax.random.key(seed + 1), k))
    total += _vec(out.grad)
  return total / num_truncations


def test_truncation_bias_and_pes_unbiased():
  """Short truncations of a long run: TBPTT/TES miss how lr shaped the starting state."""
  episode, trunc = 100, 10
  _, _, exact = _full_grad(episode)
  g = _vec(exact.grad)

  tbptt = _average_over_episode(truncated.TruncatedGrad(_unroll(1, episode), trunc),
                                episode // trunc, seed=10)
  tes = _average_over_episode(truncated.TruncatedES(_unroll(1024, episode), trunc, std=0.01),
                              episode // trunc, seed=20)
  # Independent PES runs give an empirical standard error of their mean.
  runs = np.stack([
      _average_over_episode(pes.TruncatedPES(_unroll(512, episode), trunc, std=0.01),
                            episode // trunc, seed=100 + 7 * r) for r in range(6)])
  pes_mean = runs.mean(0)
  pes_stderr = runs.std(0, ddof=1) / np.sqrt(len(runs))

  lr = 0  # the learning-rate component carries the truncation bias
  assert abs(tbptt[lr] - g[lr]) > 0.3 * abs(g[lr]), (tbptt, g)
  assert abs(tes[lr] - g[lr]) > 0.3 * abs(g[lr]), (tes, g)
  np.testing.assert_allclose(tes[lr], tbptt[lr], rtol=0.1)  # same biased target
  # PES: unbiased; agrees within 4 standard errors, and the error bar is tight enough that
  # the truncated estimators' bias would have been caught.
  assert abs(pes_mean[lr] - g[lr]) < 4 * pes_stderr[lr] + 1e-3 * abs(g[lr]), (pes_mean, g,
                                                                              pes_stderr)
  assert 4 * pes_stderr[lr] < 0.3 * abs(g[lr])


def test_pes_accumulator_resets_when_run_restarts():
  episode, trunc = 20, 10
  est = pes.TruncatedPES(_unroll(4, episode), trunc, std=0.01)
  state = est.init_worker_state(_theta(), jax.random.key(0))
  step = jax.jit(est.compute_gradient_estimate)
  _, s1 = step(_theta(), state, jax.random.key(1))  # steps 1..10: no restart
  _, s2 = step(_theta(), s1, jax.random.key(2))  # steps 11..20: restart at the last step
  # After the first truncation the accumulator is eps_0 + that truncation's eps; after the
  # restart it holds only the second truncation's eps, so it is not the sum of them.
  a1, a2 = np.asarray(s1.accumulator[0]), np.asarray(s2.accumulator[0])  # task 0, theta flat
  assert np.linalg.norm(a1) > 0 and np.linalg.norm(a2) > 0
  assert np.linalg.norm(a2 - a1) > 0.5 * np.linalg.norm(a2)
  assert int(s2.pos_state.inner_step[0]) == 0


@flax.struct.dataclass
class _InitLRState:
  params: jax.Array
  model_state: object
  lr: jax.Array


class _InitLRSGD(opt_base.Optimizer):
  """SGD whose rate is read from theta once, in `init`, as an RNN's initial carry is."""

  def __init__(self, theta):
    self.theta = theta

  def init(self, params, model_state=None, num_steps=None, key=None):
    return _InitLRState(params, model_state, jnp.exp(self.theta["log_lr"]))

  def update(self, opt_state, grads, loss=None, model_state=None, key=None):
    return opt_state.replace(params=opt_state.params - opt_state.lr * grads)


class _InitLR(meta_sgd.MetaSGDWD):
  name = "init_lr_sgd"

  def opt_fn(self, theta, is_training=False):
    return _InitLRSGD(theta)


def test_pes_first_runs_see_the_perturbation_of_what_theta_sets_at_init():
  # The first runs used to be built with the unperturbed theta: PES's estimate for a theta
  # that only acts through `init` was 0 (-1e-5 +- 4e-5) until each task's first restart.
  episode, trunc = 20, 10
  lopt = _InitLR(initial_lr=0.1)
  make = lambda n: unroll_lib.TruncatedUnroll(
      tasks_base.single_task_to_family(_FixedStartQuadratic()), lopt,
      truncation.ConstantTruncationSchedule(episode), n)
  theta = lopt.init(None)
  exact_est = full.FullGrad(make(1), episode)
  exact, _ = jax.jit(exact_est.compute_gradient_estimate)(
      theta, exact_est.init_worker_state(theta, None), jax.random.key(0))
  est = pes.TruncatedPES(make(256), trunc, std=0.01)
  step = jax.jit(est.compute_gradient_estimate)
  runs = []
  for r in range(4):  # the first episode (two truncations) of independent workers
    state = est.init_worker_state(theta, jax.random.key(10 + r))
    total = 0.0
    for k in range(episode // trunc):
      out, state = step(theta, state, jax.random.key(100 * r + k))
      total += float(out.grad["log_lr"])
    runs.append(total / (episode // trunc))
  g = float(exact.grad["log_lr"])
  mean, stderr = np.mean(runs), np.std(runs, ddof=1) / np.sqrt(len(runs))
  assert abs(mean - g) < 4 * stderr + 0.02 * abs(g), (mean, stderr, g)
  assert 4 * stderr < 0.5 * abs(g), (stderr, g)


def test_antithetic_pair_shares_randomness():
  """With std -> tiny, the pair is the same run: positive and negative states coincide."""
  est = pes.TruncatedPES(_unroll(3, 50, offset=50), 10, std=1e-12)
  state = est.init_worker_state(_theta(), jax.random.key(0))
  _, state = jax.jit(est.compute_gradient_estimate)(_theta(), state, jax.random.key(1))
  p = state.pos_state.opt_state.params
  n = state.neg_state.opt_state.params
  np.testing.assert_allclose(p, n, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda u: full.FullGrad(u, 10), lambda u: full.FullES(u, 10),
    lambda u: truncated.TruncatedGrad(u, 5), lambda u: truncated.TruncatedES(u, 5),
    lambda u: pes.TruncatedPES(u, 5)])
def test_diverging_inner_runs_never_reach_theta(make):
  """lr = e^5 makes SGD explode on this quadratic: grads stay finite and runs restart."""
  est = make(_unroll(4, 10, offset=10))
  theta = {"log_lr": jnp.asarray(5.0), "log_wd": jnp.asarray(-7.0)}
  state = est.init_worker_state(theta, jax.random.key(0))
  step = jax.jit(est.compute_gradient_estimate)
  diverged = 0.0
  for k in range(3):
    out, state = step(theta, state, jax.random.key(k))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(out.grad))
    assert np.isfinite(float(out.mean_loss))
    diverged += float(out.metrics["diverged_frac"])
  assert diverged > 0  # the inner runs really did blow up


def test_huge_finite_task_parts_cannot_overflow_the_means():
  # Each task's part is finite (2e38), but a mean adds before it divides: the sum was inf, the
  # entry was zeroed as "non-finite" (while nonfinite_grad_frac said 0), and the means over
  # estimators and devices of finite estimates could overflow the same way.
  w, e = jnp.asarray([2e19, 2e19, 1.0]), jnp.asarray([[10., -10.], [10., 10.], [1., 1.]])
  grad, bad = base.es_task_mean([(w, e)])
  np.testing.assert_allclose(grad, [2e18 / 3, 1 / 3], rtol=1e-6)  # parts bounded to 1e18
  assert float(bad) == 0.0
  clean, bad = base.sanitize_grad({"a": jnp.asarray([3e38, -jnp.inf, 0.5])})
  np.testing.assert_array_equal(clean["a"], np.float32([base.MAX_GRAD_ENTRY, 0.0, 0.5]))
  assert float(bad) == pytest.approx(1 / 3)
  # So the sum of a few bounded estimates stays finite.
  assert np.isfinite(np.float32(4) * np.float32(base.MAX_GRAD_ENTRY))


def test_per_task_meta_loss_is_nan_when_nothing_is_valid():
  loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, jnp.nan]])  # [steps, T]
  valid = jnp.array([[True, False, True], [True, False, False]])
  avg = base.per_task_meta_loss(loss, valid, "average")
  last = base.per_task_meta_loss(loss, valid, "last")
  np.testing.assert_allclose(avg[0], 2.5)
  assert np.isnan(avg[1]) and np.isnan(last[1]) and np.isnan(last[2])
  np.testing.assert_allclose([avg[2], last[0]], [3.0, 4.0])


def test_masked_mean_of_huge_finite_losses_is_finite():
  # Before: the sum of 50 losses of 1e37 overflowed float32 to inf before the division, so a
  # task whose losses were large but finite counted as diverged.
  loss = jnp.full((50, 3), 1e37, jnp.float32).at[:, 2].set(2.0)
  valid = jnp.ones((50, 3), bool).at[10:, 1].set(False)
  avg = base.per_task_meta_loss(loss, valid, "average")
  np.testing.assert_allclose(avg, [1e37, 1e37, 2.0], rtol=1e-5)
  np.testing.assert_allclose(base.masked_mean(loss[:, :2], valid[:, :2]), 1e37, rtol=1e-5)
  assert float(base.masked_mean(loss, jnp.zeros_like(valid))) == 0.0


@pytest.mark.parametrize("make,some_dropped", [
    (lambda u: full.FullGrad(u, 20), True),
    (lambda u: truncated.TruncatedGrad(u, 10), False),
    # ES-type: a finite but huge loss difference overflows delta / (2 std^2) for its task.
    (lambda u: full.FullES(u, 20, std=1e-3), True),
    (lambda u: truncated.TruncatedES(u, 20, std=1e-3), True),
    (lambda u: pes.TruncatedPES(u, 20, std=1e-6), True)],
    ids=["full_grad", "truncated_grad", "full_es", "truncated_es", "truncated_pes"])
def test_a_diverging_task_only_drops_its_own_gradient(make, some_dropped):
  # Before: one NaN task made every gradient entry NaN (0 * NaN in the shared backward pass),
  # and sanitizing then zeroed the whole gradient; for the ES-type estimators one task's
  # overflowing weight did the same through the mean over tasks. Now the gradient is the mean
  # over tasks of each task's own part, a non-finite one counting as zero: the same as running
  # every task alone (its randomness depends on its global index only) and averaging.
  # (TruncatedGrad's runs restart when they diverge, so its huge gradients here stay finite:
  # nothing dropped.)
  num_tasks = 6
  lopt = meta_sgd.MetaSGDWD(initial_lr=0.1, initial_wd=1e-3)
  family = diverging_family.SometimesDivergingFamily()
  unroll = lambda n: unroll_lib.TruncatedUnroll(family, lopt,
                                                truncation.ConstantTruncationSchedule(20), n)
  theta = lopt.init(jax.random.key(0))
  est = make(unroll(num_tasks))
  out, _ = jax.jit(est.compute_gradient_estimate)(
      theta, est.init_worker_state(theta, jax.random.key(1)), jax.random.key(2))
  one = make(unroll(1))
  one_step = jax.jit(one.compute_gradient_estimate)  # compiled once for all six tasks
  alone = []
  for i in range(num_tasks):
    state = one.init_worker_state(theta, jax.random.key(1), task_index=jnp.array([i]))
    alone.append(_vec(one_step(theta, state, jax.random.key(2))[0].grad))
  dropped = [not np.any(g) for g in alone]
  assert (0 < sum(dropped) < num_tasks) == some_dropped, alone
  assert float(out.metrics["diverged_frac"]) > 0
  np.testing.assert_allclose(_vec(out.grad), np.mean(alone, axis=0), rtol=1e-4)
  assert np.all(np.isfinite(_vec(out.grad))) and np.any(_vec(out.grad))

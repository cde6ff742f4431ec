"""Evaluation curves, summaries, the Adam sweep and the report writers, against known answers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lopt_tpu import evaluation
from lopt_tpu.learned_optimizers import meta_sgd
from lopt_tpu.optimizers import base as opt_base
from lopt_tpu.tasks import image_mlp
from lopt_tpu.tasks import quadratics

SCALE = np.array([1.0, 0.5, 2.0], np.float32)
TARGET = np.array([0.3, -1.0, 2.0], np.float32)


def _quadratic(noise=0.0):
  return quadratics.QuadraticTask(dim=3, target=TARGET, scale=SCALE, noise=noise)


def _init_params(key):
  return _quadratic().init(jax.random.split(key, 3)[0])  # documented: k_init is split[0]


def _sgd_theta(lr):
  return {"log_lr": jnp.log(jnp.float32(lr)), "log_wd": jnp.float32(-100.)}


def test_sgd_curve_matches_closed_form():
  # SGD on 0.5 * sum(s * (x - c)^2): x_t - c = (1 - lr * s)^t (x_0 - c), elementwise.
  lr, num_steps = 0.3, 12
  keys = evaluation.seed_keys((5, 6))
  curves = evaluation.train_curves(_quadratic(), opt_base.SGD(lr), num_steps, keys,
                                   eval_every=4)
  np.testing.assert_array_equal(curves["valid_steps"], [0, 4, 8, 12])
  for i in range(2):
    x0 = np.asarray(_init_params(keys[i]), np.float64)
    loss_at = lambda t: 0.5 * np.sum(SCALE * (1 - lr * SCALE) ** (2 * t) * (x0 - TARGET) ** 2)
    np.testing.assert_allclose(curves["train_loss"][i], [loss_at(t) for t in range(num_steps)],
                               rtol=1e-5)
    # noise=0: the validation batch is the target too, so valid loss follows the same formula.
    np.testing.assert_allclose(curves["valid_loss"][i], [loss_at(t) for t in (0, 4, 8, 12)],
                               rtol=1e-5)


def test_noisy_batches_follow_documented_keys_and_seeds_differ():
  noise = 0.5
  keys = evaluation.seed_keys((0, 1, 0))
  curves = evaluation.train_curves(_quadratic(noise), opt_base.SGD(0.1), 8, keys)
  train = curves["train_loss"]
  np.testing.assert_array_equal(train[0], train[2])  # same key, same run
  assert np.min(np.abs(train[0] - train[1])) > 1e-4  # different key: differs at every step
  # Step 0's batch is target + noise * normal(k_batch), k_batch = split(fold_in(k_data, 0))[0].
  _, _, k_data = jax.random.split(keys[1], 3)
  k_batch = jax.random.split(jax.random.fold_in(k_data, 0), 4)[0]
  batch = TARGET + noise * np.asarray(jax.random.normal(k_batch, [3]))
  expected = 0.5 * np.sum(SCALE * (np.asarray(_init_params(keys[1])) - batch) ** 2)
  assert train[1, 0] == pytest.approx(expected, rel=1e-5)


def test_divergence_is_recorded_and_scored_as_initial_loss():
  # lr * s = 3 * 2 = 6 on the last coordinate: |1 - 6| = 5x per step overflows float32.
  curves = evaluation.train_curves(_quadratic(), opt_base.SGD(3.0), 80,
                                   evaluation.seed_keys((0, 1)))
  train = curves["train_loss"]
  assert not np.all(np.isfinite(train[:, -1]))
  assert np.all(np.isfinite(train[:, :5]))
  stats = evaluation.summarize(curves)
  assert stats["num_diverged"] == 2
  filled = evaluation.fill_diverged(train)
  first_bad = np.argmax(~np.isfinite(train), axis=1)
  for i in range(2):
    np.testing.assert_array_equal(filled[i, first_bad[i]:], train[i, 0])
  assert stats["final_loss_mean"] == pytest.approx(np.mean(train[:, 0]), rel=1e-6)
  assert np.isfinite(stats["mean_loss_mean"])


def test_fill_diverged_and_summarize_by_hand():
  nan, inf = np.nan, np.inf
  filled = evaluation.fill_diverged([[1., .5, nan, .2], [2., 1., .5, .25], [nan, 1., 1., 1.]])
  np.testing.assert_array_equal(filled, [[1., .5, 1., 1.], [2., 1., .5, .25], [inf] * 4])
  steps = np.arange(40, dtype=np.float64)
  curves = {"train_loss": np.stack([steps, 2 * steps]), "valid_loss": np.array([[3., 1.],
                                                                                 [5., 2.]])}
  stats = evaluation.summarize(curves)
  assert evaluation.final_window(40) == 2  # 5% of 40 steps
  assert stats["mean_loss_mean"] == pytest.approx(29.25)  # seeds: 19.5 and 39
  assert stats["mean_loss_std"] == pytest.approx(9.75)
  assert stats["final_loss_mean"] == pytest.approx(57.75)  # seeds: mean(38, 39), mean(76, 78)
  assert stats["final_loss_std"] == pytest.approx(19.25)
  assert stats["final_valid_loss_mean"] == pytest.approx(1.5)
  assert (stats["num_diverged"], stats["num_seeds"]) == (0, 2)
  # A seed whose training loss stayed finite but whose validation loss did not has diverged too.
  curves["valid_loss"] = np.array([[3., inf], [5., 2.]])
  assert evaluation.summarize(curves)["num_diverged"] == 1


@pytest.mark.parametrize("lrs,match", [
    ((1e-3, 1.0000001e-3), r"share the name\(s\) \['adam@0.001'\]"),
    ((), "empty"), ((1e-3, float("nan")), "finite and > 0"), ((0.0,), "finite and > 0")])
def test_adam_sweeps_whose_results_would_be_lost_or_meaningless_are_refused(lrs, match):
  with pytest.raises(ValueError, match=match):
    evaluation.check_adam_sweep(lrs)
  with pytest.raises(ValueError, match=match):  # before anything is compiled
    evaluation.evaluate(meta_sgd.MetaSGDWD(), _sgd_theta(0.05), _quadratic(), 5, seeds=(0,),
                        adam_learning_rates=lrs)


@pytest.fixture(scope="module")
def quadratic_result():
  """MetaSGDWD (lr 0.05) vs the Adam sweep on a 10-d quadratic, 30 steps, 2 seeds."""
  task = quadratics.QuadraticTask(dim=10, noise=0.0)
  return task, evaluation.evaluate(meta_sgd.MetaSGDWD(), _sgd_theta(0.05), task, 30,
                                   seeds=(0, 1))


def test_evaluate_picks_the_obviously_best_adam_lr(quadratic_result):
  _, result = quadratic_result
  assert result.best_adam_lr == 0.1
  means = [result.summaries[evaluation.adam_name(lr)]["mean_loss_mean"]
           for lr in evaluation.ADAM_SWEEP]
  # 30 Adam steps move each coordinate by at most ~30 * lr, so larger lr is better throughout.
  assert np.all(np.diff(means) < 0)
  assert means[0] > 5 * means[-1]
  assert list(result.summaries) == ["learned"] + [evaluation.adam_name(lr)
                                                  for lr in evaluation.ADAM_SWEEP]


def test_tied_adam_rates_go_to_the_smaller_whatever_the_sweep_order():
  flat = quadratics.QuadraticTask(dim=3, target=TARGET, scale=np.zeros(3, np.float32))
  result = evaluation.evaluate(meta_sgd.MetaSGDWD(), _sgd_theta(0.05), flat, 5, seeds=(0,),
                               adam_learning_rates=(0.1, 0.03, 0.01, 0.3))
  assert len({s["mean_loss_mean"] for s in result.summaries.values()}) == 1  # all tied
  assert result.best_adam_lr == 0.01


def test_evaluate_runs_every_optimizer_on_the_same_seeds(quadratic_result):
  task, result = quadratic_result
  keys = evaluation.seed_keys((0, 1))
  learned = evaluation.train_curves(task, meta_sgd.MetaSGDWD().opt_fn(_sgd_theta(0.05)), 30,
                                    keys)
  np.testing.assert_allclose(result.curves["learned"]["train_loss"], learned["train_loss"],
                             rtol=1e-6)
  # Same initial params and first batch for every optimizer (equal up to XLA fusion order).
  first = {name: c["train_loss"][:, 0] for name, c in result.curves.items()}
  for name in first:
    np.testing.assert_allclose(first[name], first["learned"], rtol=1e-6)


def test_write_report_png_markdown_json(quadratic_result, tmp_path):
  _, result = quadratic_result
  paths = evaluation.write_report(result, str(tmp_path / "report"), prefix="quad")
  with open(paths["png"], "rb") as f:
    png = f.read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(png) > 20_000  # an 800x500 plot with eight curves and bands
  with open(paths["md"]) as f:
    rows = [line for line in f.read().splitlines()
            if line.startswith("| learned") or line.startswith("| adam")]
  assert len(rows) == 8
  assert rows[-1].startswith("| adam@0.1 (best) |")
  with open(paths["json"]) as f:
    record = json.load(f)
  assert record["best_adam_lr"] == 0.1
  assert record["summaries"]["adam@0.1"]["mean_loss_mean"] == pytest.approx(
      result.summaries["adam@0.1"]["mean_loss_mean"])
  assert sorted(os.listdir(tmp_path / "report")) == ["quad.json", "quad.md", "quad.png"]


class _RecordingWriter:
  """The two `clu.metric_writers.MetricWriter` methods `write_scalars` uses."""

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def write_images(self, step, images):
    self.images[step] = dict(images)


def test_write_scalars(quadratic_result):
  _, result = quadratic_result
  writer = _RecordingWriter()
  evaluation.write_scalars(result, writer, step=7, with_plot=True)
  written = writer.scalars[7]
  assert written["eval/best_adam_lr"] == 0.1
  assert written["eval/learned/mean_loss"] == result.summaries["learned"]["mean_loss_mean"]
  assert written["eval/adam_best/mean_loss"] == result.summaries["adam@0.1"]["mean_loss_mean"]
  assert written["eval/adam@0.0001/mean_loss"] > written["eval/adam_best/mean_loss"]
  image = writer.images[7]["eval/curves"]
  assert image.shape == (1, 500, 800, 3) and image.dtype == np.uint8
  assert image.std() > 10  # not a blank canvas


def test_digits_mlp_adam_learns():
  task = image_mlp.digits_mlp()
  curves = evaluation.train_curves(task, opt_base.Adam(1e-2), 60, evaluation.seed_keys((0,)),
                                   eval_every=30)
  # Ten classes: cross-entropy starts near ln(10) = 2.30.
  assert np.all(np.abs(curves["train_loss"][:, 0] - np.log(10.)) < 0.3)
  stats = evaluation.summarize(curves)
  # Measured: 2.47 -> final training loss 0.20, final validation loss 0.18.
  assert stats["final_loss_mean"] < 0.5
  assert stats["final_valid_loss_mean"] < 0.5

"""End-to-end tests of the application: main.py, metrics, checkpoints, exact resume, errors."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from configs import test as test_config
from lopt_tpu import train

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  # A user's plain run: main.py picks the CPU devices (one per core) and their threads.
  env.pop("XLA_FLAGS", None)
  env.pop("PJRT_NPROC", None)
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["PYTHONPATH"] = ROOT
  return env


def _main(workdir, *overrides, config="configs/test.py", cache=None):
  """main.py's command line; `cache`: a shared compilation cache instead of the workdir's."""
  cache_flag = [f"--config.compilation_cache={cache}"] if cache else []
  return [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}",
          f"--workdir={workdir}", *cache_flag, *overrides]


def _final_theta(workdir, config):
  state, step = train.load_checkpoint(config, workdir)
  return step, state.gradient_learner_state.theta


def _scalars(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  tags = set(acc.Tags().get("scalars", [])) | set(acc.Tags().get("tensors", []))
  return acc, tags


def test_train_and_evaluate_writes_metrics_checkpoints_and_report(tmp_path, compile_cache):
  workdir = str(tmp_path)
  config = test_config.get_config()
  state = train.train_and_evaluate(config, workdir)
  assert int(state.gradient_learner_state.step) == config.num_outer_steps
  _, tags = _scalars(workdir)
  for tag in ("meta/meta_loss", "meta/theta_grad_norm", "perf/outer_steps_per_s",
              "perf/inner_steps_per_s", "meta/truncated_pes/quadratic_family/mean_loss",
              "meta/truncated_pes/digits_mlp/restart_frac", "eval/learned/mean_loss",
              "eval/best_adam_lr"):
    assert tag in tags, (tag, sorted(tags))
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")
                 if os.path.basename(p).isdigit())
  assert steps == [2, 4, 6]  # every 2 steps, last 3 kept
  report = glob.glob(f"{workdir}/eval/step_*.png")
  assert report and os.path.getsize(report[0]) > 10_000
  table = open(glob.glob(f"{workdir}/eval/step_*.md")[0]).read()
  assert "learned" in table and "adam@0.1" in table
  # The evaluation mode re-evaluates the newest checkpoint and rewrites its report, also under
  # a config shorter than the run (a run extended past its config's length).
  for path in glob.glob(f"{workdir}/eval/*"):
    os.remove(path)
  result = subprocess.run(_main(workdir, "--mode=eval", "--config.num_outer_steps=4",
                                cache=compile_cache), env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # orbax's step-by-step INFO lines (dozens per save or restore) are filtered out.
  assert "checkpoint_manager.py" not in result.stderr, result.stderr[-3000:]
  assert os.path.getsize(f"{workdir}/eval/step_000006.png") > 10_000
  assert "adam@0.1" in open(f"{workdir}/eval/step_000006.md").read()


def test_a_resume_evaluates_the_saved_step_whose_evaluation_was_skipped(tmp_path):
  # A SIGTERM during an evaluation step saves that step and skips its evaluation (the grace
  # period is short); the resumed run must evaluate it, or that point of the schedule is lost.
  # Here the first run simply had no evaluations; the second evaluates every 2 steps.
  workdir = str(tmp_path)
  config = test_config.get_config()
  config.num_outer_steps, config.eval.every, config.eval.at_end = 2, 0, False
  config.eval.num_steps = 5
  train.train_and_evaluate(config, workdir)
  assert not os.path.exists(f"{workdir}/eval/step_000002.json")
  config.num_outer_steps, config.eval.every, config.eval.at_end = 3, 2, True
  train.train_and_evaluate(config, workdir)
  assert sorted(p for p in os.listdir(f"{workdir}/eval") if p.endswith(".json")) == [
      "step_000002.json", "step_000003.json"]
  # A finished run launched again evaluates nothing more (it used to redo the final one).
  written = os.path.getmtime(f"{workdir}/eval/step_000003.json")
  train.train_and_evaluate(config, workdir)
  assert os.path.getmtime(f"{workdir}/eval/step_000003.json") == written


def _logged(workdir, tag):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  acc, _ = _scalars(workdir)
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def test_the_first_point_logged_after_a_resume_averages_the_whole_window(tmp_path):
  # The metric sums since the last log step lived only in memory: a run resumed from a step
  # between log steps logged the mean of the steps after the resume alone (5.20 instead of
  # 5.26 in a review's SIGTERM run), so every preemption bent the curves.
  config = test_config.get_config()
  config.num_outer_steps, config.log_every, config.checkpoint_every = 6, 4, 3
  config.keep_checkpoints, config.eval.at_end = 5, False
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(config, str(straight))
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed after saving step 3
  for events in resumed.glob("events.out.tfevents.*"):
    events.unlink()
  train.train_and_evaluate(config, str(resumed))
  for tag in ("meta/meta_loss", "meta/theta_grad_norm",
              "meta/truncated_pes/digits_mlp/restart_frac"):
    expected = _logged(straight, tag)
    assert sorted(expected) == [4, 6]
    assert _logged(resumed, tag) == expected, tag


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, compile_cache):
  overrides = ["--config.num_outer_steps=14", "--config.eval.at_end=False",
               "--config.log_every=1"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  # The reference run may load programs other tests compiled; the killed run compiles its own.
  subprocess.run(_main(straight, *overrides, cache=compile_cache), env=_env(), check=True,
                 capture_output=True, timeout=300)
  proc = subprocess.Popen(_main(killed, *overrides), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.isdir(f"{killed}/checkpoints/4"):
    time.sleep(0.05)
  time.sleep(0.3)  # somewhere between checkpoints, maybe mid-write of the next one
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  config = test_config.get_config()
  config.num_outer_steps = 14
  step_at_kill, _ = _final_theta(killed, config)
  assert 4 <= step_at_kill < 14
  subprocess.run(_main(killed, *overrides), env=_env(), check=True, capture_output=True,
                 timeout=300)
  (s1, theta1), (s2, theta2) = _final_theta(straight, config), _final_theta(killed, config)
  assert s1 == s2 == 14
  # The resumed run loaded its programs from the persistent compilation cache the killed run
  # wrote (config.compilation_cache = "workdir"), and still matches bit for bit.
  assert len(os.listdir(f"{killed}/compilation_cache")) >= 2
  for a, b in zip(jax.tree_util.tree_leaves(theta1), jax.tree_util.tree_leaves(theta2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("override,field", [
    ("--config.learned_optimizer.name=adamw_lopt", "learned_optimizer.name"),
    ("--config.estimator.name=reinforce", "estimator.name"),
    ("--config.task_families.mlp.name=imagenet_mlp", "task_families.mlp.name"),
    ("--config.estimator.num_tasks=0", "estimator.num_tasks"),
    ("--config.estimator.trunc_length=-5", "estimator.trunc_length"),
    ("--config.estimator.trunc_length=400", "estimator.trunc_length"),
    ("--config.estimator.num_tasks=3", "estimator.num_tasks"),
    ("--config.outer_optimizer.learning_rate=-1.0", "outer_optimizer.learning_rate"),
    # Checked before JAX starts: JAX first created the 100,000 devices (minutes, then refused).
    ("--config.cpu_devices=100000", "cpu_devices"),
    # Refused by building a task (eager JAX work): once left <workdir>/compilation_cache behind.
    ("--config.task_families.quadratic.kwargs.dim=-3", "task_families.quadratic"),
])
def test_bad_config_fails_with_one_clear_line(tmp_path, override, field):
  env = _env()
  if "num_tasks=3" in override:
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "checkpoints").mkdir()
  marker = workdir / "checkpoints" / "keep_me"
  marker.write_text("x")
  result = subprocess.run(_main(str(workdir), override), env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert f"config.{field}=" in errors[0], errors[0]
  assert "Traceback" not in result.stderr
  assert marker.read_text() == "x" and sorted(os.listdir(workdir / "checkpoints")) == ["keep_me"]
  assert sorted(os.listdir(workdir)) == ["checkpoints"]  # nothing created


def test_a_config_error_is_reported_before_tensorflow_loads(tmp_path):
  # TensorFlow (clu's TensorBoard writer) takes ~3 s to import; a bad config must not wait.
  result = subprocess.run([sys.executable, "-X", "importtime",
                           *_main(str(tmp_path / "work"), "--config.estimator.num_tasks=0")[1:]],
                          env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  imported = [l.rsplit("|", 1)[-1].strip() for l in result.stderr.splitlines()
              if l.startswith("import time:")]
  assert "jax" in imported  # the import log is there at all
  assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "clu")]


def test_a_non_finite_theta_is_never_checkpointed(tmp_path, compile_cache):
  # lr 1e39 overflows float32, so the first Adam step makes theta inf; step 2 is a checkpoint
  # step but not a log step, where finiteness used to be checked only: the run must stop there
  # with one line, keeping nothing.
  workdir = tmp_path / "work"
  result = subprocess.run(_main(str(workdir), "--config.outer_optimizer.learning_rate=1e39",
                                "--config.log_every=4", "--config.checkpoint_every=2",
                                cache=compile_cache),
                          env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 3, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "non-finite theta at outer step 2" in errors[0], errors
  assert "no checkpoint was written before it" in errors[0], errors
  assert "Traceback" not in result.stderr
  assert not os.listdir(workdir / "checkpoints")


def test_unloadable_data_fails_with_one_clear_line(tmp_path):
  config_file = tmp_path / "fmnist_offline.py"
  config_file.write_text(
      "from configs import test\n"
      "def get_config():\n"
      "  config = test.get_config()\n"
      "  config.task_families.mlp.name = 'fmnist8_mlp'\n"
      f"  config.task_families.mlp.kwargs = {{'data_dir': {str(tmp_path / 'empty')!r},"
      " 'download': False}\n"
      "  return config\n")
  result = subprocess.run(_main(str(tmp_path / "work"), config=str(config_file)), env=_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert "config.task_families.mlp=" in errors[0] and "digits8" in errors[0], errors[0]
  assert "Traceback" not in result.stderr


def test_main_gives_each_core_a_device_when_the_tasks_divide_evenly():
  import main  # pylint: disable=g-import-not-at-top
  # (num_tasks, cores) -> devices: the most that divide num_tasks without exceeding the cores
  # (gcd gave 2, 2 and 4 for the first three).
  cases = {(4, 6): 4, (8, 6): 4, (8, 12): 8, (4, 2): 2, (3, 2): 1, (0, 2): 1, (16, 64): 16}
  assert {k: main.default_cpu_devices(*k) for k in cases} == cases


def test_unwritable_workdir_fails_with_one_clear_line(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = subprocess.run(_main(str(blocker / "sub")), env=_env(), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "--workdir=" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_a_misspelled_field_in_a_config_file_fails_before_anything_is_created(tmp_path):
  # Once silently ignored: the run went on without the intended setting (and saved the typo).
  config_file = tmp_path / "typo.py"
  config_file.write_text("from configs import test\n\n\ndef get_config():\n"
                         "  config = test.get_config()\n  config.estimator.trunc_lenght = 1\n"
                         "  return config\n")
  workdir = tmp_path / "work"
  result = subprocess.run(_main(str(workdir), config=str(config_file)), env=_env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert errors == ["error: config.estimator.trunc_lenght=1 is invalid: unknown field "
                    "(misspelled?); estimator has: " + ", ".join(sorted(
                        default.get_config().estimator.keys()))], result.stderr[-2000:]
  assert not workdir.exists()


def test_a_run_whose_inner_runs_all_diverge_stops_with_a_clear_error(tmp_path, monkeypatch):
  # Before: a perturbation this large (or an inf step size) made every inner run diverge, the
  # meta-gradient was 0 at every step, and the run exited 0 having learned nothing.
  monkeypatch.setattr(train, "MAX_ALL_DIVERGED_STEPS", 4)
  config = test_config.get_config()
  config.estimator.std = 1e30
  config.num_outer_steps, config.log_every, config.checkpoint_every = 20, 2, 2
  config.eval.at_end = False
  with pytest.raises(train.AllRunsDivergedError,
                     match=r"every inner run of every task family diverged in each of the last "
                           r"4 outer steps \(to step 4\): .*the last checkpoint \(outer step 2\) "
                           r"is kept\. Check .*estimator\.std"):
    train.train_and_evaluate(config, str(tmp_path))
  assert isinstance(train.AllRunsDivergedError("x"), train.NonFiniteError)  # main's exit 3


def test_all_diverged_steps_count_only_windows_where_every_family_diverged():
  both = {"a/diverged_frac": 1.0, "b/diverged_frac": 1.0, "meta_loss": 2.0}
  one = {"a/diverged_frac": 1.0, "b/diverged_frac": 0.5, "meta_loss": 2.0}
  assert train._all_diverged_steps(both, 10, 30, 40) == 40
  assert train._all_diverged_steps(one, 10, 30, 40) == 0
  assert train._all_diverged_steps({"meta_loss": 2.0}, 10, 30, 40) == 0

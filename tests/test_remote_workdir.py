"""A gs:// workdir (what launch/ tells pod users to pass) on a fake bucket.

`epath.testing.mock_epath` sends every gs:// file operation to a local directory, so these
tests see where each file of a remote run lands. `os.path` once made such paths local
./gs:/... ones: checkpoints crashed, reports went to the local disk.
"""

import os

from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest

from configs import test as test_config
from lopt_tpu import checkpointing
from lopt_tpu import config_checks
from lopt_tpu import eval_run
from lopt_tpu import evaluation
from lopt_tpu import pretrained
from lopt_tpu import train
from lopt_tpu.learned_optimizers import meta_sgd

WORKDIR = "gs://fake-bucket/run"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory that stands for gs://; the test runs in an empty current directory,
  where a mangled path would show up as ./gs:."""
  root = tmp_path / "bucket"
  local = lambda p: os.fspath(p).replace("gs://", f"{root}/", 1)

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  def glob(fn, pattern):
    return [p.replace(f"{root}/", "gs://", 1) for p in fn(local(pattern))]

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # With TensorFlow installed epath picks its gfile backend past the mock's table.
  monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
  mocks = {name: one for name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir",
                                  "remove", "rmtree", "stat", "walk")}
  with epath_testing.mock_epath(copy=two, rename=two, replace=two, glob=glob, **mocks):
    yield root
  assert not os.listdir(cwd), "something was written to a local ./gs: path"


def test_workdir_checks_and_the_run_config_go_to_the_bucket(bucket):
  config = test_config.get_config()
  config_checks.check_workdir(WORKDIR)
  assert (bucket / "fake-bucket" / "run").is_dir()
  config_checks.record_run_config(config, WORKDIR, device_count=1)
  assert (bucket / "fake-bucket" / "run" / config_checks.RUN_CONFIG_FILE).exists()
  (bucket / "fake-bucket" / "run" / "checkpoints" / "3").mkdir(parents=True)
  assert config_checks.latest_checkpoint_step(WORKDIR) == 3
  changed = test_config.get_config()
  changed.seed = 7
  with pytest.raises(config_checks.ConfigError, match=r"config\.seed=7 is invalid"):
    config_checks.check_resume(changed, WORKDIR, device_count=1)
  shorter = test_config.get_config()
  shorter.num_outer_steps = 2
  with pytest.raises(config_checks.ConfigError,
                     match=r"num_outer_steps=2 is invalid: .* already holds outer step 3"):
    config_checks.check_resume(shorter, WORKDIR, device_count=1)


def test_checkpointer_keeps_the_remote_path(bucket, monkeypatch):
  # orbax asks GCS (google-cloud-storage, in requirements.txt) how the bucket lists folders.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  ckpt = checkpointing.Checkpointer(f"{WORKDIR}/checkpoints")
  assert ckpt.directory == f"{WORKDIR}/checkpoints"  # abspath made it $PWD/gs:/fake-bucket/...
  assert str(ckpt.manager.directory) == f"{WORKDIR}/checkpoints"
  assert ckpt.latest_step() is None
  ckpt.close()


def _tiny_result(num_steps=4):
  rng = np.random.default_rng(0)
  curves = lambda: {"train_loss": rng.uniform(1, 2, [2, num_steps]),
                    "valid_loss": rng.uniform(1, 2, [2, 3]), "valid_steps": np.array([0, 2, 4])}
  names = [evaluation.LEARNED, evaluation.adam_name(1e-3)]
  all_curves = {name: curves() for name in names}
  return evaluation.EvalResult(
      task_name="t", learned_name="l", num_steps=num_steps, seeds=(0, 1),
      adam_learning_rates=(1e-3,), best_adam_lr=1e-3, curves=all_curves,
      summaries={name: evaluation.summarize(c) for name, c in all_curves.items()})


def test_eval_reports_and_pretrained_files_go_to_the_bucket(bucket):
  step = 6
  report = eval_run.report_path(WORKDIR, step)
  assert train._not_evaluated(WORKDIR, step)  # pylint: disable=protected-access
  paths = evaluation.write_report(_tiny_result(), os.path.dirname(report),
                                  prefix=os.path.basename(report)[:-len(".json")])
  assert paths["json"] == report and all(p.startswith("gs://") for p in paths.values())
  for path in paths.values():
    assert os.path.getsize(path.replace("gs://", f"{bucket}/")) > 0
  assert not train._not_evaluated(WORKDIR, step)  # pylint: disable=protected-access

  lopt = meta_sgd.MetaSGDWD()
  theta = lopt.init(None)
  meta = {"learned_optimizer": {"name": "meta_sgd_wd", "kwargs": {}},
          "theta_sha256": pretrained.theta_fingerprint(theta)}
  pretrained.save("mine", theta, meta, f"{WORKDIR}/pretrained")
  assert pretrained.list(f"{WORKDIR}/pretrained") == ["mine"]
  _, loaded = pretrained.load("mine", f"{WORKDIR}/pretrained")
  assert pretrained.theta_fingerprint(loaded) == meta["theta_sha256"]
  assert epath.Path(f"{WORKDIR}/pretrained/mine.json").exists()

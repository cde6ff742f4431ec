"""lopt_tpu entry point: meta-train (or evaluate) a learned optimizer as a config says.

  python main.py --config=configs/pes_digits.py --workdir=/tmp/lopt
  python main.py --config=configs/pes_digits.py --workdir=/tmp/lopt --mode=eval

Override any field with --config.some.field=value. Rerunning the same command resumes from the
newest checkpoint in --workdir.
"""

import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF (TensorBoard writer) start-up noise

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, reports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: meta-train (resuming if possible); eval: evaluate the newest "
                          "checkpoint against tuned Adam.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops INFO records from chatty libraries (orbax logs every save step by step)."""

  def filter(self, record):
    # A stdlib record's level (absl's logging.INFO is its verbosity 0, not the level 20).
    return record.levelno > std_logging.INFO or "/orbax/" not in record.pathname


def default_cpu_devices(num_tasks: int, cores: int) -> int:
  """The largest count that divides num_tasks and does not exceed the cores (gcd left cores
  idle: 6 cores and 4 tasks gave 2 devices, not 4)."""
  num_tasks = max(int(num_tasks), 1)
  return max(d for d in range(1, min(num_tasks, cores) + 1) if num_tasks % d == 0)


def _check_cpu_devices(cpu_devices, num_tasks):
  """Refuses a device count that cannot shard the tasks before JAX starts: JAX would first
  create that many devices (100,000 of them took minutes) only for the config checks to
  refuse it. (`config_checks.check_sizes` checks the same once JAX runs.)"""
  if cpu_devices < 0 or (cpu_devices and isinstance(num_tasks, int) and num_tasks > 0
                         and num_tasks % cpu_devices):
    print(f"error: config.cpu_devices={cpu_devices!r} is invalid: must be 0 (one per core, "
          f"dividing estimator.num_tasks) or divide estimator.num_tasks ({num_tasks})",
          file=sys.stderr)
    sys.exit(2)


def _one_cpu_device_per_core(config):
  """Gives XLA's CPU backend several devices, so the sharded step keeps every core busy.

  One XLA:CPU device runs a meta-training step on about one core; with N devices the task
  axis is sharded over N threads. N = config.cpu_devices, or by default the largest count
  that divides num_tasks and does not exceed the cores. Only the host platform is affected
  (on TPU/GPU the accelerators are still the devices), and an explicit
  --xla_force_host_platform_device_count in XLA_FLAGS wins. Must run before JAX starts.
  """
  flags_now = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags_now:
    return
  _check_cpu_devices(config.cpu_devices, config.estimator.num_tasks)
  count = config.cpu_devices or default_cpu_devices(config.estimator.num_tasks,
                                                   os.cpu_count() or 1)
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}"
    # One pool thread per core: more threads than cores oversubscribe them (Part 5 on 2 cores:
    # 48 ms a step with 4 threads, 34 ms with 2). With this few threads, two steps in flight
    # at once can deadlock (their all-reduces wait on each other), so the training loop waits
    # for each step (`train.one_step_in_flight`).
    os.environ.setdefault("PJRT_NPROC", str(max(count, os.cpu_count() or 1)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _one_cpu_device_per_core(_CONFIG.value)
  # Imported here so --help and flag errors stay fast (JAX and the library load in ~1 s; TF,
  # for the TensorBoard writer, only once training starts).
  import jax  # pylint: disable=g-import-not-at-top
  from lopt_tpu import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.maybe_initialize()  # before any other JAX call
  except distributed.LaunchEnvironmentError as e:  # one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from lopt_tpu import compile_cache  # pylint: disable=g-import-not-at-top
  # Enabled by train after the config checks (so that a config error creates no directory),
  # before the first compilation worth caching.
  cache_dir = compile_cache.directory_for(_CONFIG.value.compilation_cache, _WORKDIR.value)
  from lopt_tpu import config_checks  # pylint: disable=g-import-not-at-top
  from lopt_tpu import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  try:
    config_checks.check_known_fields(_CONFIG.value, default_config.get_config())
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, cache_dir=cache_dir)
    else:
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, cache_dir=cache_dir)
  except config_checks.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteError as e:  # the message says what was kept and what to change
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)

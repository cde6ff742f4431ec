"""Test setup: 8 fake CPU devices (so sharding is exercised) before any JAX backend starts."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With several fake devices the XLA CPU thread pool can deadlock unless it has >= 2x threads.
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # pylint: disable=g-import-not-at-top (after the environment above)

from lopt_tpu import compile_cache as compile_cache_lib  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent compilation cache per test worker (a directory path).

  Many tests compile the same programs (the test config's outer step, its evaluation, the
  same estimator on the same family); loading them from disk instead of compiling again cuts
  the suite's CPU time, which bounds its wall time on 2 cores. Tests that run main.py pass it
  as `--config.compilation_cache` unless the cache in the workdir is what they test; bench
  subprocesses never see it, so their cold first steps stay cold.
  """
  directory = str(tmp_path_factory.mktemp("compile_cache"))
  compile_cache_lib.enable(directory, min_compile_seconds=0.3)
  return directory

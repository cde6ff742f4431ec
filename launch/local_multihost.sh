#!/usr/bin/env bash
# Runs an N-process JAX job on this machine: the way to try multi-host code without a pod.
# Starts N copies of `python main.py ARGS`, process i with LOPT_COORDINATOR=127.0.0.1:PORT
# (a free port), LOPT_NUM_PROCESSES=N, LOPT_PROCESS_ID=i (main.py hands them to
# jax.distributed.initialize), DEVICES_PER_PROCESS fake CPU devices, PJRT_NPROC = 2 x those
# (fewer threads can deadlock XLA's CPU client), a 30 s collective timeout (a stuck peer
# raises instead of hanging), and no *_proxy variables (they make the coordinator hang).
# Other XLA_FLAGS of the caller's (e.g. --xla_dump_to=DIR) are passed on.
# Waits for all; if one fails, ends the others and fails; ends all after TIMEOUT seconds.
# If the port was taken meanwhile ("Failed to add port"), retries on a new one (3 tries).
#
# usage: launch/local_multihost.sh [--dry-run] [--help] N [--] ARGS...
#   e.g. launch/local_multihost.sh 2 --config=configs/test.py --workdir=/tmp/lopt_mh
#
# env (all optional): DEVICES_PER_PROCESS (default 2), TIMEOUT (default 3600 s), LOG_DIR
#      (default /tmp/lopt_multihost; process i writes LOG_DIR/process_i.log), PYTHON (default
#      python3), PORT (default: a free one), JAX_PLATFORMS (default cpu), MAIN (default the
#      repo's main.py).
# --dry-run prints the N commands (`+ env ... python main.py ...`, one a line) and runs none.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Own parsing: main.py's flags need no `--` here. Before a `--`, --dry-run/--help are ours and
# the first other word is N; everything else (and all after `--`) goes to main.py.
num_processes=""
args=()
while (($#)); do
  case $1 in
    -n | --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      args+=("$@")
      break
      ;;
    *)
      if [[ -z $num_processes ]]; then
        num_processes=$1
      else
        args+=("$1")
      fi
      ;;
  esac
  shift
done
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "first argument must be the number of processes N (see --help)"
devices="${DEVICES_PER_PROCESS:-2}"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive number"
timeout="${TIMEOUT:-3600}"
[[ $timeout =~ ^[1-9][0-9]*$ ]] || die "TIMEOUT must be a positive number of seconds"
log_dir="${LOG_DIR:-/tmp/lopt_multihost}"
python="${PYTHON:-python3}"
main="${MAIN:-$REPO_ROOT/main.py}"

free_port() {
  "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The caller's XLA_FLAGS (e.g. --xla_dump_to) without the two this script sets itself.
user_xla_flags() {
  local flag flags kept=()
  read -ra flags <<< "${XLA_FLAGS:-}"
  for flag in "${flags[@]}"; do
    case $flag in
      --xla_force_host_platform_device_count=* | --xla_cpu_collective_timeout_seconds=*) ;;
      *) kept+=("$flag") ;;
    esac
  done
  printf '%s' "${kept[*]}"
}

# The full command of process $1 on port $2, as `env -u ... VAR=... python main.py ...`.
process_command() {
  local i=$1 port=$2 name user
  local xla_flags="--xla_force_host_platform_device_count=$devices --xla_cpu_collective_timeout_seconds=30"
  user="$(user_xla_flags)"
  [[ -z $user ]] || xla_flags="$user $xla_flags"
  cmd=(env)
  while read -r name; do
    if [[ ${name,,} == *_proxy && ${name,,} != no_proxy ]]; then
      cmd+=(-u "$name")
    fi
  done < <(compgen -e)
  cmd+=("no_proxy=127.0.0.1,localhost" "NO_PROXY=127.0.0.1,localhost"
    JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    XLA_FLAGS="$xla_flags"
    PJRT_NPROC=$((2 * devices))
    LOPT_COORDINATOR="127.0.0.1:$port" LOPT_NUM_PROCESSES="$num_processes" LOPT_PROCESS_ID="$i"
    "$python" "$main" "${args[@]}")
}

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  pids=()
}
trap stop_all EXIT
trap 'note "interrupted; ending all processes"; exit 130' INT TERM

# Starts all N processes on port $1, waits, and returns 0, a failing process's status (setting
# port_taken=1 if the coordinator could not bind), or 124 on the deadline.
run_once() {
  local port=$1 i log
  pids=()
  for ((i = 0; i < num_processes; i++)); do
    log="$log_dir/process_$i.log"
    process_command "$i" "$port"
    if ((DRY_RUN)); then
      printf '+ %s > %s 2>&1\n' "$(shell_quote "${cmd[@]}")" "$(shell_quote "$log")"
    else
      printf '+ %s > %s 2>&1 &\n' "$(shell_quote "${cmd[@]}")" "$(shell_quote "$log")" >&2
      "${cmd[@]}" >"$log" 2>&1 </dev/null &
      pids+=("$!")
    fi
  done
  ((!DRY_RUN)) || return 0
  local running rc
  while :; do
    running=0
    for i in "${!pids[@]}"; do
      if kill -0 "${pids[i]}" 2>/dev/null; then
        running=1
        continue
      fi
      rc=0
      wait "${pids[i]}" || rc=$?
      unset 'pids[i]'
      if ((rc != 0)); then
        note "process $i exited with status $rc; ending the others. Its log's end:"
        tail -n 20 "$log_dir/process_$i.log" >&2 || true
        stop_all
        if grep -qs "Failed to add port" "$log_dir"/process_*.log; then port_taken=1; fi
        return "$rc"
      fi
    done
    ((running)) || return 0
    if ((SECONDS >= deadline)); then
      note "deadline of ${timeout}s reached; ending all processes"
      stop_all
      return 124
    fi
    sleep 0.5
  done
}

if ((!DRY_RUN)); then
  mkdir -p "$log_dir"
fi
deadline=$((SECONDS + timeout))  # one deadline over all attempts
for attempt in 1 2 3; do
  rc=0
  port_taken=0
  run_once "${PORT:-$(free_port)}" || rc=$?
  if ((port_taken && attempt < 3)) && [[ -z ${PORT:-} ]]; then
    note "coordinator port was taken; retrying on another one"
    continue
  fi
  break
done
if ((!DRY_RUN && rc == 0)); then
  note "all $num_processes processes finished; logs in $log_dir/process_*.log"
fi
exit "$rc"

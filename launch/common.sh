# Shared helpers for launch/*.sh: sourced by them, never run on its own.
#
# Gives every script the same options (--dry-run, --help, `--` before pass-through arguments),
# the same `run` wrapper (print the command; execute it unless --dry-run), the same gcloud
# flags from the environment, and the remote commands that more than one script needs.
# shellcheck shell=bash

# Globals below are read by the scripts that source this file.
# shellcheck disable=SC2034
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
DRY_RUN=0
TPU_STATE=""
POSITIONAL=()
# shellcheck disable=SC2034
PASSTHROUGH=()

# Paths on the workers. `~` is meant for the worker's shell, so it must not expand here.
# shellcheck disable=SC2088
REPO_DIR="${REPO_DIR:-~/lopt_tpu}"
# shellcheck disable=SC2088
VENV_DIR="${VENV_DIR:-~/lopt_venv}"
# shellcheck disable=SC2088
LOGS_DIR="${LOGS_DIR:-~/lopt_logs}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3.11}"

die() {
  echo "${0##*/}: error: $*" >&2
  exit 1
}

note() {
  echo "${0##*/}: $*" >&2
}

# Prints the calling script's header comment (the lines after the shebang up to the first
# non-comment line) as its --help.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# Splits "$@" into DRY_RUN, POSITIONAL (non-option words) and PASSTHROUGH (all after `--`).
parse_args() {
  while (($#)); do
    case $1 in
      -n | --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        # shellcheck disable=SC2034
        PASSTHROUGH=("$@")
        return 0
        ;;
      -*) die "unknown option '$1' (see --help; main.py arguments go after --)" ;;
      *) POSITIONAL+=("$1") ;;
    esac
    shift
  done
}

# Quotes each argument for a POSIX shell (like Python's shlex.quote) and joins them with spaces.
shell_quote() {
  local arg sq="'\\''"
  local -a out=()
  for arg in "$@"; do
    if [[ -n $arg && $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/$sq}'")
    fi
  done
  local IFS=' '
  printf '%s' "${out[*]}"
}

# The one place commands are run: `+ cmd` on stdout under --dry-run (and nothing runs),
# otherwise `+ cmd` on stderr and then the command itself.
run() {
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(shell_quote "$@")"
  else
    printf '+ %s\n' "$(shell_quote "$@")" >&2
    "$@"
  fi
}

# Refuses paths that would need quoting inside remote commands (they are spliced in unquoted
# so that a leading `~` expands on the worker).
check_remote_path() {
  local name=$1 value=$2
  [[ $value =~ ^[A-Za-z0-9_./~+-]+$ ]] || die "$name='$value' may only hold [A-Za-z0-9_./~+-]"
}

# Sets GCLOUD_FLAGS from ZONE and the optional PROJECT; needs TPU_NAME and ZONE.
need_tpu() {
  : "${TPU_NAME:?set TPU_NAME to the TPU VM (node) name}"
  : "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
  fi
  check_remote_path REPO_DIR "$REPO_DIR"
  check_remote_path VENV_DIR "$VENV_DIR"
  check_remote_path LOGS_DIR "$LOGS_DIR"
  check_remote_path REMOTE_PYTHON "$REMOTE_PYTHON"
}

# Runs a shell command on one worker (a number) or on all of them (`all`).
tpu_ssh() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
    --command="$command"
}

# Whether the TPU VM (or, with QUEUED=1, the queued resource) exists; sets TPU_STATE. Under
# --dry-run it prints the describe and answers "no", so the dry run shows every command the
# real run might need.
tpu_exists() {
  local -a cmd
  if [[ ${QUEUED:-0} == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$(queued_resource_id)" "${GCLOUD_FLAGS[@]}"
      --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
      --format='value(state)')
  fi
  if ((DRY_RUN)); then
    run "${cmd[@]}"
    return 1
  fi
  printf '+ %s\n' "$(shell_quote "${cmd[@]}")" >&2
  TPU_STATE="$("${cmd[@]}" 2>/dev/null)" || return 1
  note "${cmd[3]} '${cmd[5]}' exists (state: ${TPU_STATE:-unknown})"
}

queued_resource_id() {
  printf '%s' "${QUEUED_RESOURCE_ID:-$TPU_NAME}"
}

# Remote command that ends every process holding the TPU: training runs started by run.sh and
# anything with an accelerator device open (/dev/accel* on v4/v5p, /dev/vfio/* on v5e/v6e), then
# the libtpu lock file. "Nothing to kill" is success. The `[m]` keeps pkill from matching the
# shell that runs this very command. main.py gets SIGTERM and up to KILL_GRACE_S seconds
# (default 300) to finish its step and save a checkpoint before anything is killed: the process
# holding the TPU is main.py itself, and killing it at once lost every step since the last save.
kill_command() {
  local grace="${KILL_GRACE_S:-300}"
  [[ $grace =~ ^[0-9]+$ ]] || die "KILL_GRACE_S='$grace' is not a whole number of seconds"
  # shellcheck disable=SC2016  # $(hostname) is for the worker's shell.
  printf '%s' 'sudo pkill -f "[m]ain\.py" || true;' \
    " for _ in \$(seq $grace); do pgrep -f \"[m]ain\\.py\" > /dev/null || break; sleep 1; done;" \
    ' sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9 || true;' \
    ' sleep 1; sudo rm -f /tmp/libtpu_lockfile; echo "$(hostname): TPU free"'
}

#!/usr/bin/env bash
# Starts the same `python main.py ARGS` on every worker, in the background (nohup), after
# ending whatever still holds the TPU (launch/kill.sh's command). Each worker logs to
# LOGS_DIR/RUN_NAME-<its hostname>.log, with LOGS_DIR/latest.log pointing at it; watch with
# launch/logs.sh. ARGS are passed through quoted, so values with spaces survive.
#
# usage: launch/run.sh [--dry-run] [--help] -- ARGS...
#   e.g. launch/run.sh -- --config=configs/pes_digits.py --workdir=gs://BUCKET/pes_digits
#
# env: TPU_NAME, ZONE required; PROJECT, RUN_NAME (default: date-time), REPO_DIR (default
#      ~/lopt_tpu), VENV_DIR (default ~/lopt_venv), LOGS_DIR (default ~/lopt_logs) optional.
# On a pod every worker must see the same --workdir: use a gs:// bucket, not a local path.
# --dry-run prints the gcloud commands (`+ gcloud ...`, one a line) without running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#POSITIONAL[@]} == 0)) || die "main.py arguments go after -- (see --help)"
((${#PASSTHROUGH[@]} > 0)) || die "no main.py arguments; usage: launch/run.sh -- --config=... --workdir=..."
need_tpu
RUN_NAME="${RUN_NAME:-$(date +%Y%m%d-%H%M%S)}"
check_remote_path RUN_NAME "$RUN_NAME"

# Separate ssh calls: the launch command itself contains "main.py", which the kill would match.
kill_cmd="$(kill_command)"  # its own line: under set -e a failing substitution then stops here
tpu_ssh all "$kill_cmd"

log_name="$RUN_NAME-\$(hostname).log"
launch="mkdir -p $LOGS_DIR && cd $REPO_DIR"
launch+=" && ln -sfn \"$log_name\" $LOGS_DIR/latest.log"
# Only python goes to the background, its output already redirected, so ssh can return.
launch+=" && { PYTHONUNBUFFERED=1 setsid nohup $VENV_DIR/bin/python main.py $(shell_quote "${PASSTHROUGH[@]}")"
launch+=" > $LOGS_DIR/\"$log_name\" 2>&1 < /dev/null & }"
launch+=" && echo \"\$(hostname): started, pid \$!\""
tpu_ssh all "$launch"
note "started '$RUN_NAME'; follow with: launch/logs.sh 0"

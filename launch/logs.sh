#!/usr/bin/env bash
# Shows (and follows) one worker's log of the latest run started by launch/run.sh, or of
# RUN_NAME's run. Ctrl-C stops following; the run goes on.
#
# usage: launch/logs.sh [--dry-run] [--help] [WORKER]    (WORKER: 0, 1, ...; default 0)
#
# env: TPU_NAME, ZONE required; PROJECT, RUN_NAME (default: the latest run), LOGS_DIR (default
#      ~/lopt_logs), TAIL_LINES (default 100), FOLLOW (default 1; 0 prints and returns)
#      optional.
# --dry-run prints the gcloud command (`+ gcloud ...`) without running it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#POSITIONAL[@]} <= 1 && ${#PASSTHROUGH[@]} == 0)) || die "one optional WORKER argument (see --help)"
worker="${POSITIONAL[0]:-0}"
[[ $worker =~ ^[0-9]+$ ]] || die "WORKER must be a worker number (0, 1, ...), not '$worker'"
need_tpu
tail_lines="${TAIL_LINES:-100}"
[[ $tail_lines =~ ^[0-9]+$ ]] || die "TAIL_LINES must be a number, not '$tail_lines'"

if [[ -n ${RUN_NAME:-} ]]; then
  check_remote_path RUN_NAME "$RUN_NAME"
  log="$LOGS_DIR/$RUN_NAME-\$(hostname).log"
else
  log="$LOGS_DIR/latest.log"
fi
follow=" -F"
if [[ ${FOLLOW:-1} == 0 ]]; then
  follow=""
fi
tpu_ssh "$worker" "tail -n $tail_lines$follow $log"

#!/usr/bin/env bash
# Ends every process holding the TPU on all workers: runs of main.py (SIGTERM first: they save
# a checkpoint and exit, given up to KILL_GRACE_S seconds), anything with a TPU device open,
# and the stale libtpu lock file. Safe when there is nothing to kill.
#
# usage: launch/kill.sh [--dry-run] [--help]
#
# env: TPU_NAME, ZONE required; PROJECT optional; KILL_GRACE_S (default 300).
# --dry-run prints the gcloud commands (`+ gcloud ...`, one a line) without running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#POSITIONAL[@]} == 0 && ${#PASSTHROUGH[@]} == 0)) || die "no arguments expected (see --help)"
need_tpu

kill_cmd="$(kill_command)"  # its own line: under set -e a failing substitution then stops here
tpu_ssh all "$kill_cmd"

#!/usr/bin/env bash
# Deletes the Cloud TPU VM, or with QUEUED=1 the queued resource together with its TPU VM.
# Does nothing if it is already gone. Asks no question (--quiet).
#
# usage: launch/delete.sh [--dry-run] [--help]
#
# env: TPU_NAME, ZONE required; PROJECT, QUEUED=1 (with QUEUED_RESOURCE_ID, default TPU_NAME)
#      optional.
# --dry-run prints the gcloud commands (`+ gcloud ...`, one a line) without running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#POSITIONAL[@]} == 0 && ${#PASSTHROUGH[@]} == 0)) || die "no arguments expected (see --help)"
need_tpu

if ! tpu_exists && ((!DRY_RUN)); then
  note "'$TPU_NAME' does not exist; nothing to do"
  exit 0
fi

if [[ ${QUEUED:-0} == 1 ]]; then
  # --force also deletes the TPU VM the queued resource created.
  run gcloud compute tpus queued-resources delete "$(queued_resource_id)" "${GCLOUD_FLAGS[@]}" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --quiet
fi

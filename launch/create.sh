#!/usr/bin/env bash
# Creates the Cloud TPU VM, or with QUEUED=1 a queued resource that creates it when capacity
# frees up. Does nothing if it already exists.
#
# usage: launch/create.sh [--dry-run] [--help]
#
# env: TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-32), RUNTIME_VERSION (e.g.
#      tpu-ubuntu2204-base) required; PROJECT (default: gcloud's), SPOT=1 (spot capacity:
#      cheaper, can be preempted), QUEUED=1 (queued resource; its id is QUEUED_RESOURCE_ID,
#      default TPU_NAME) optional.
# --dry-run prints the gcloud commands (`+ gcloud ...`, one a line) without running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#POSITIONAL[@]} == 0 && ${#PASSTHROUGH[@]} == 0)) || die "no arguments expected (see --help)"
need_tpu
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v4-32}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION, e.g. tpu-ubuntu2204-base}"

if tpu_exists; then
  case $TPU_STATE in
    PREEMPTED | TERMINATED | FAILED | SUSPENDED | SUSPENDING)
      die "'$TPU_NAME' is $TPU_STATE; recreate it: launch/delete.sh && launch/create.sh" ;;
  esac
  note "nothing to do"
  exit 0
fi

capacity=()
if [[ ${SPOT:-0} == 1 ]]; then
  capacity=(--spot)
fi
if [[ ${QUEUED:-0} == 1 ]]; then
  run gcloud compute tpus queued-resources create "$(queued_resource_id)" \
    --node-id="$TPU_NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"
  note "queued; watch it with: gcloud compute tpus queued-resources describe" \
    "$(queued_resource_id) --zone=$ZONE  (setup.sh works once it is ACTIVE)"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${capacity[@]}"
fi

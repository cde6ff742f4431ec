#!/usr/bin/env bash
# Ships the committed code (git archive HEAD) to every worker and prepares it there: Python
# (REMOTE_PYTHON, default python3.11, apt-installed if missing), a venv at VENV_DIR made once,
# then requirements.txt together with the matching jax[tpu], and the package in editable mode.
# Rerunning replaces the code and updates the venv in place. Uncommitted changes are not shipped.
#
# usage: launch/setup.sh [--dry-run] [--help]
#
# env: TPU_NAME, ZONE required; PROJECT, REPO_DIR (default ~/lopt_tpu), VENV_DIR (default
#      ~/lopt_venv), REMOTE_PYTHON (default python3.11) optional.
# --dry-run prints the commands (`+ gcloud ...`, one a line) without running them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#POSITIONAL[@]} == 0 && ${#PASSTHROUGH[@]} == 0)) || die "no arguments expected (see --help)"
need_tpu

tarball_name=lopt_tpu_code.tar.gz
tarball="${TMPDIR:-/tmp}/$tarball_name"
if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
  note "warning: uncommitted changes are not shipped (the code is git archive HEAD)"
fi

case $REPO_DIR in
  \~ | \~/ | / | . | ..) die "REPO_DIR='$REPO_DIR' would be wiped on every setup; pick a subdirectory" ;;
esac

# Code: unpack into a fresh directory and swap it in, so files deleted upstream disappear.
# Python: the project needs >= 3.11; Ubuntu 22.04 runtimes ship 3.10 (3.11 is in apt).
# jax[tpu] is pinned to requirements.txt's jax so that pip picks the libtpu built for it.
# Kept on one line (statements joined by "; ") so that --dry-run prints one command a line.
steps=(
  "set -e"
  "rm -rf $REPO_DIR.new && mkdir -p $REPO_DIR.new && tar -xzf ~/$tarball_name -C $REPO_DIR.new"
  "rm -rf $REPO_DIR && mv $REPO_DIR.new $REPO_DIR"
  "if [ ! -x $VENV_DIR/bin/python ]; then { $REMOTE_PYTHON -c 'import ensurepip, venv' 2>/dev/null || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $REMOTE_PYTHON $REMOTE_PYTHON-venv; }; } && $REMOTE_PYTHON -m venv $VENV_DIR; fi"
  "jax_version=\$(sed -n 's/^jax==//p' $REPO_DIR/requirements.txt)"
  "$VENV_DIR/bin/pip install -q -U pip"
  "$VENV_DIR/bin/pip install -q -U -r $REPO_DIR/requirements.txt \"jax[tpu]\${jax_version:+==\$jax_version}\""
  "$VENV_DIR/bin/pip install -q -e $REPO_DIR"
  "echo \"\$(hostname): ready\""
)
remote_setup="$(printf '%s; ' "${steps[@]}")"
remote_setup="${remote_setup%; }"

run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$tarball_name" "${GCLOUD_FLAGS[@]}" \
  --worker=all
tpu_ssh all "$remote_setup"
note "done; next: launch/run.sh -- --config=configs/pes_digits.py --workdir=gs://BUCKET/RUN"

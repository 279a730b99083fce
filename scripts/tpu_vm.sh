#!/usr/bin/env bash
# Train copd_jax on a Cloud TPU VM slice (one or many hosts): create the TPU VM, copy this
# repository to every worker, install the pinned requirements with the TPU runtime, start
# `python -m copd_jax train` on all workers at once, then follow worker 0's log.
#
#   scripts/tpu_vm.sh --name copd --zone us-west4-a --accelerator-type v5litepod-16 \
#       --config configs/qwen3_0p6b_math_code.py --workdir gs://BUCKET/runs/0p6b \
#       [--project P] [--version RUNTIME] [--setup 'CMD'] [--skip-create] [--dry-run] \
#       [-- --config.a.b=value ...]
#
# --dry-run prints the commands instead of running them. --setup runs CMD in the repository
# copy on every worker after the install (e.g. fetch the model folder and data the config names:
# every worker needs them at the same relative path). On more than one worker the run starts
# with COPD_JAX_MULTIHOST=1 so copd_jax.distributed.maybe_initialize() joins the processes
# (JAX detects coordinator and process ids on Cloud TPU). See docs/scaling.md.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

NAME='' ZONE='' TYPE='' CONFIG='' WORKDIR='' PROJECT='' VERSION='' SETUP='' WORKERS=''
SKIP_CREATE=0 DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator-type) TYPE=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --setup) SETUP=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "error: unknown argument $1" >&2; usage ;;
  esac
done
for required in NAME ZONE TYPE CONFIG WORKDIR; do
  if [[ -z "${!required}" ]]; then
    echo "error: --$(echo "$required" | tr 'A-Z_' 'a-z-' | sed 's/^type$/accelerator-type/') is required" >&2
    usage
  fi
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -f "$REPO/$CONFIG" || -f "$CONFIG" ]] || { echo "error: --config $CONFIG: file not found" >&2; exit 2; }

# Hosts of a slice: v2/v3/v4/v5p names count TensorCores (2 per chip, 4 chips per host);
# v5e (v5litepod) and v6e names count chips (up to 8 on one host, else 4 per host).
family=${TYPE%-*}
size=${TYPE##*-}
[[ "$size" =~ ^[0-9]+$ ]] || { echo "error: --accelerator-type $TYPE: expected FAMILY-SIZE" >&2; exit 2; }
case "$family" in
  v2|v3|v4|v5p) chips=$((size / 2)); hosts=$(( size <= 8 ? 1 : size / 8 )) ;;
  v5litepod|v5e|v6e) chips=$size; hosts=$(( size <= 8 ? 1 : size / 4 )) ;;
  *) echo "error: --accelerator-type $TYPE: unknown TPU family $family (pass --workers N)" >&2
     [[ -n "$WORKERS" ]] || exit 2; chips='?'; hosts=$WORKERS ;;
esac
[[ -n "$WORKERS" ]] && hosts=$WORKERS
if [[ -z "$VERSION" ]]; then
  case "$family" in
    v5litepod|v5e) VERSION=v2-alpha-tpuv5-lite ;;
    v5p) VERSION=v2-alpha-tpuv5 ;;
    v6e) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO/requirements.txt")

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

# One shell word: quoted only when it has characters the shell would interpret.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    local out='' arg
    for arg in "$@"; do out+="$(quote "$arg") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

TRAIN="python3 -m copd_jax train --config $(quote "$CONFIG") --workdir $(quote "$WORKDIR")"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(quote "$arg")"; done
ENVS=''
(( hosts > 1 )) && ENVS='COPD_JAX_MULTIHOST=1 '
LOG='~/copd_jax_train.log'
TARBALL=/tmp/copd_jax-$NAME.tgz

echo "# $TYPE: $chips chips on $hosts worker(s); runtime $VERSION; jax[tpu]==$JAX_VERSION"
if (( hosts > 1 )) && [[ "$WORKDIR" != gs://* ]]; then
  echo "warning: --workdir $WORKDIR is not gs://; a multi-host run needs a directory every worker shares" >&2
fi
if [[ $SKIP_CREATE -eq 0 ]]; then
  run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION"
fi
run tar -czf "$TARBALL" --exclude=.git --exclude=.venv --exclude=runs --exclude=__pycache__ -C "$REPO" .
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/copd_jax.tgz" "${WHERE[@]}" --worker=all
INSTALL="mkdir -p ~/copd_jax && tar -xzf ~/copd_jax.tgz -C ~/copd_jax && cd ~/copd_jax && python3 -m pip install -q -r requirements.txt \"jax[tpu]==$JAX_VERSION\""
[[ -n "$SETUP" ]] && INSTALL+=" && $SETUP"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$INSTALL"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
  --command="cd ~/copd_jax && ${ENVS}nohup $TRAIN > $LOG 2>&1 < /dev/null &"
run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="tail -n +1 -f $LOG"

#!/usr/bin/env bash
# Runs a command in the background on every worker of a Cloud TPU VM, or of a
# TPU VM pod slice, where the workers form one jax.distributed job.
#
# On each worker: puts this repository in --repo_dir (a copy of the local
# working tree, or a clone of --repo_url), creates .venv there with
# requirements.lock and jax[tpu] at the locked jax version (once per lock
# file), then starts the command with nohup from the repository root, logging
# to --log. Commands queue on a lock, so a TPU VM trains one run at a time.
#
#   scripts/tpu_vm.sh --tpu_name=my-tpu --zone=us-central2-b -- \
#       python scripts/train.py --config=configs/unet.py:camvid \
#       --workdir=gs://my-bucket/unet_camvid --config.data.manual_dir=...
#
# scripts/sweep.py --tpu_name=... --zone=... prints one such line per run.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
Usage: scripts/tpu_vm.sh [--tpu_name=NAME] [--zone=ZONE] [--project=PROJECT]
                         [--repo_dir=DIR] [--repo_url=URL] [--log=FILE]
                         [--no_sync] -- COMMAND [ARG...]

  --tpu_name   TPU VM name (default: $TPU_NAME)
  --zone       its zone (default: $ZONE)
  --project    Google Cloud project (default: $PROJECT, else gcloud's own)
  --repo_dir   repository on the workers (default: ~/fcn-jax)
  --repo_url   clone or update this git URL there instead of copying the
               local working tree
  --log        log file on the workers, relative to --repo_dir unless absolute
               (default: logs/<date>-<time>.log)
  --no_sync    leave the workers' repository and .venv as they are
EOF
  exit 2
}

tpu_name="${TPU_NAME:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
repo_dir="~/fcn-jax"
repo_url=""
log="logs/$(date +%Y%m%d-%H%M%S).log"
sync=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu_name=*) tpu_name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --repo_url=*) repo_url="${1#*=}" ;;
    --log=*) log="${1#*=}" ;;
    --no_sync) sync=0 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "Unknown argument: $1" >&2; usage ;;
  esac
  shift
done
if [[ -z "$tpu_name" || -z "$zone" || $# -eq 0 ]]; then
  usage
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jax_version="$(sed -n 's/^jax==//p' "$repo_root/requirements.lock")"
if [[ -z "$jax_version" ]]; then
  echo "No jax==VERSION line in $repo_root/requirements.lock" >&2
  exit 1
fi
gcloud_args=(--zone="$zone" --worker=all)
if [[ -n "$project" ]]; then
  gcloud_args+=(--project="$project")
fi
archive=/tmp/fcn-jax-src.tar.gz

if [[ "$sync" == 1 && -z "$repo_url" ]]; then
  # Tracked and untracked files, not ignored ones (.venv, runs/).
  local_archive="$(mktemp -t fcn-jax-src.XXXXXX)"
  trap 'rm -f "$local_archive"' EXIT
  git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
    | tar -czf "$local_archive" -C "$repo_root" --null -T -
  gcloud compute tpus tpu-vm scp "$local_archive" "$tpu_name:$archive" \
    "${gcloud_args[@]}"
fi

# What each worker's shell (bash on TPU VM images) runs; the values it needs
# are prepended as %q-quoted assignments.
remote_body='
set -euo pipefail
repo_dir="${REPO_DIR/#\~/$HOME}"
if [[ "$SYNC" == 1 ]]; then
  if [[ -n "$REPO_URL" ]]; then
    if [[ -d "$repo_dir/.git" ]]; then
      git -C "$repo_dir" pull --ff-only
    else
      git clone "$REPO_URL" "$repo_dir"
    fi
  else
    mkdir -p "$repo_dir"
    tar -xzf "$ARCHIVE" -C "$repo_dir"
  fi
  cd "$repo_dir"
  stamp=.venv/.installed
  if [[ ! -f "$stamp" || requirements.lock -nt "$stamp" ]]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -r requirements.lock
    .venv/bin/pip install --quiet "jax[tpu]==$JAX_VERSION"
    .venv/bin/pip install --quiet --no-deps -e .
    touch "$stamp"
  fi
fi
cd "$repo_dir"
mkdir -p "$(dirname "$LOG")"
# Every worker runs the same command; jax.distributed joins them into one job
# (on a single-host VM, a job of one process).
export FCN_JAX_DISTRIBUTED=on
nohup flock /tmp/fcn-jax-tpu.lock \
  bash -c ". .venv/bin/activate && eval \"\$0\"" "$RUN" \
  >"$LOG" 2>&1 </dev/null &
echo "$(hostname): started in $repo_dir, logging to $LOG"
'
remote="$(printf 'REPO_DIR=%q REPO_URL=%q SYNC=%q ARCHIVE=%q JAX_VERSION=%q LOG=%q RUN=%q\n' \
  "$repo_dir" "$repo_url" "$sync" "$archive" "$jax_version" "$log" "$(printf '%q ' "$@")")"
gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_args[@]}" \
  --command="$remote"$'\n'"$remote_body"

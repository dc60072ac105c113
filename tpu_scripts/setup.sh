#!/usr/bin/env bash
# Install multitower_jax on every worker of a TPU VM / pod slice: copy the source (this checkout's
# committed tree, or a git clone on each worker), make a Python 3.11 virtualenv with uv, install
# the package with jax[tpu], and check that every worker sees the TPU.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N [options]

Install multitower_jax (with its [gcs] extra, for gs:// workdirs) and $JAX_TPU_SPEC on every
worker (rerun it after a code change).
The source goes to ~/multitower_jax on each worker, the virtualenv to ~/multitower-venv.

  --ref REF           copy this commit of the local checkout (git archive; default HEAD).
                      Uncommitted changes are not copied (a warning says so); untracked files
                      in the folders the commit holds (a new experiment file) stop the script
  --allow-untracked   ... unless given: copy the commit without them
  --git-url URL       instead, git clone URL on every worker ...
  --git-branch B      ... at this branch or tag (default main)
  --jax SPEC          the JAX requirement to install (default: $JAX_TPU_SPEC)
  --no-check          skip the final device check (it runs JAX on every worker at once)
$COMMON_HELP
USAGE
}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REF=HEAD
GIT_URL=""
GIT_BRANCH=main
CHECK=1
ALLOW_UNTRACKED=0

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --ref) REF=$(value_of "$@"); shift 2 ;;
    --git-url) GIT_URL=$(value_of "$@"); shift 2 ;;
    --git-branch) GIT_BRANCH=$(value_of "$@"); shift 2 ;;
    --jax) JAX_TPU_SPEC=$(value_of "$@"); shift 2 ;;
    --no-check) CHECK=0; shift ;;
    --allow-untracked) ALLOW_UNTRACKED=1; shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done
require_common

# 1. The source on every worker.
if [[ -n $GIT_URL ]]; then
  fetch_source="rm -rf $REMOTE_REPO && git clone --depth 1 --branch $(quote_cmd "$GIT_BRANCH") $(quote_cmd "$GIT_URL") $REMOTE_REPO"
else
  archive="${TMPDIR:-/tmp}/multitower_jax-$NAME.tar.gz"
  if ((!DRY_RUN)); then
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
      note "warning: $REPO_ROOT has uncommitted changes; only $REF is copied"
    fi
    # Untracked (not ignored) files in the folders the commit ships: git archive leaves them out,
    # and a worker then misses e.g. a new experiment file.
    mapfile -t shipped < <(git -C "$REPO_ROOT" ls-tree -d --name-only "$REF")
    untracked=""
    if ((${#shipped[@]})); then
      untracked=$(git -C "$REPO_ROOT" ls-files --others --exclude-standard -- "${shipped[@]}")
    fi
    if [[ -n $untracked ]]; then
      listed="  ${untracked//$'\n'/$'\n'  }"  # one file a line, indented
      if ((ALLOW_UNTRACKED)); then
        note "warning: untracked files are not copied to the workers (only $REF is):"$'\n'"$listed"
      else
        die "untracked files in $REPO_ROOT would not be copied to the workers (only $REF is):"$'\n'"$listed"$'\n'"commit them (git add, git commit), or pass --allow-untracked to copy $REF without them"
      fi
    fi
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$archive" "$REF"
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:$ARCHIVE_NAME" \
    --project="$PROJECT" --zone="$ZONE" --worker=all
  fetch_source="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf \$HOME/$ARCHIVE_NAME -C $REMOTE_REPO"
fi

# 2. Python $PYTHON_VERSION (the TPU images ship 3.10) and the package, editable so a rerun of this
#    script is enough after a code change.
uv="\$HOME/.local/bin/uv"
install="set -e; $fetch_source"
install+=" && python3 -m pip install --user --quiet $(quote_cmd "$UV_SPEC")"
install+=" && $uv venv --quiet --python $PYTHON_VERSION --allow-existing $REMOTE_VENV"
# [gcs]: gcsfs and google-cloud-storage, for the gs:// workdir.
install+=" && $uv pip install --quiet --python $REMOTE_VENV/bin/python -e \"${REMOTE_REPO}[gcs]\" $(quote_cmd "$JAX_TPU_SPEC")"
install+=" && $REMOTE_VENV/bin/multitower --help >/dev/null && echo \"\$(hostname): multitower_jax installed\""
on_workers all "$install"

# 3. Every worker sees every chip (all workers must run JAX at the same time on a pod slice).
if ((CHECK)); then
  on_workers all "$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'"
fi

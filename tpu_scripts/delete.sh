#!/usr/bin/env bash
# Clean up: stop training (a final checkpoint), optionally copy the workers' logs here, then
# delete the slice and its queued resource. Checkpoints and metrics stay in the gs:// workdir.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N [--fetch-logs DIR --type TYPE] [--direct] [--skip-stop]

  --fetch-logs DIR    first copy every worker's log to DIR/worker-<i>.log (needs --type)
  --type TYPE         the slice's accelerator type, for the number of workers [\$TPU_TYPE]
  --grace SECONDS     how long training may take to checkpoint and exit (default 300)
  --skip-stop         do not stop training first (e.g. the VMs are already gone)
  --direct            the slice was made with create.sh --direct (no queued resource)
$COMMON_HELP
USAGE
}

FETCH_DIR=""
TYPE="${TPU_TYPE:-}"
GRACE=300
STOP=1
DIRECT=0

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --fetch-logs) FETCH_DIR=$(value_of "$@"); shift 2 ;;
    --type) TYPE=$(value_of "$@"); shift 2 ;;
    --grace) GRACE=$(value_of "$@"); shift 2 ;;
    --skip-stop) STOP=0; shift ;;
    --direct) DIRECT=1; shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done
require_common
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace $GRACE: expected a number of seconds"
[[ -z $FETCH_DIR ]] || require_type "$TYPE"

# Order matters: the last checkpoint is written before the VMs go, and the logs copied while
# they still exist.
if ((STOP)); then
  on_workers all "$(stop_training_cmd "$GRACE")"
fi
if [[ -n $FETCH_DIR ]]; then
  fetch_logs "$TYPE" "$FETCH_DIR"
fi
if ((DIRECT)); then
  gcloud_tpu tpu-vm delete --quiet
else
  gcloud_tpu queued-resources delete --force --quiet  # --force deletes its TPU VMs too
fi

#!/usr/bin/env bash
# Stop training on every worker: SIGTERM, on which `multitower train` saves a checkpoint and
# exits; SIGKILL for a process still alive after the grace period. launch.sh resumes the run.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N [--grace SECONDS]

  --grace SECONDS     how long to wait for the final checkpoint before SIGKILL (default 300)
$COMMON_HELP
USAGE
}

GRACE=300

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --grace) GRACE=$(value_of "$@"); shift 2 ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done
require_common
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace $GRACE: expected a number of seconds"

on_workers all "$(stop_training_cmd "$GRACE")"

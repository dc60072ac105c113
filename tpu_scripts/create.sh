#!/usr/bin/env bash
# Create a TPU VM or pod slice (v5e, v5p, v6e): a queued resource by default, which waits for
# capacity and then creates the slice; --direct creates it at once or fails.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N --type TYPE [options]

Create a TPU VM or pod slice for multitower_jax, and wait until it is ready.

  --type TYPE             accelerator type: v5litepod-N (v5e), v5p-N (v5p, N TensorCores = 2 per
                          chip) or v6e-N (v6e), e.g. v5p-128 (64 chips, 16 VMs) [\$TPU_TYPE]
  --runtime-version V     TPU software version (default per generation: $RUNTIME_V5E,
                          $RUNTIME_V5P, $RUNTIME_V6E)
  --spot                  Spot capacity (cheaper, can be preempted; training resumes from the
                          last checkpoint when relaunched)
  --reserved              use the project's reservation
  --service-account SA    the workers' service account (default: Compute Engine default); it
                          needs write access to the gs:// workdir
  --direct                gcloud compute tpus tpu-vm create instead of a queued resource
  --no-wait               return once the request is queued
  --poll SECONDS          how often to check a queued request (default 60)
$COMMON_HELP
USAGE
}

TYPE="${TPU_TYPE:-}"
RUNTIME=""
CAPACITY=()
SERVICE_ACCOUNT=()
DIRECT=0
WAIT=1
POLL=60

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --type) TYPE=$(value_of "$@"); shift 2 ;;
    --runtime-version) RUNTIME=$(value_of "$@"); shift 2 ;;
    --spot) CAPACITY=(--spot); shift ;;
    --reserved) CAPACITY=(--reserved); shift ;;
    --service-account) SERVICE_ACCOUNT=("--service-account=$(value_of "$@")"); shift 2 ;;
    --direct) DIRECT=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    --poll) POLL=$(value_of "$@"); shift 2 ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done

require_common
require_type "$TYPE"
RUNTIME=${RUNTIME:-$(runtime_of "$TYPE")}
[[ $POLL =~ ^[1-9][0-9]*$ ]] || die "--poll $POLL: expected a positive number of seconds"
note "$TYPE: $(chips_of "$TYPE") chips on $(hosts_of "$TYPE") TPU VM(s), one JAX process each; runtime $RUNTIME"

if ((DIRECT)); then
  gcloud_tpu tpu-vm create --accelerator-type="$TYPE" --version="$RUNTIME" --scopes="$SCOPES" \
    "${CAPACITY[@]+"${CAPACITY[@]}"}" "${SERVICE_ACCOUNT[@]+"${SERVICE_ACCOUNT[@]}"}"
  exit 0
fi

gcloud_tpu queued-resources create --node-id="$NAME" --accelerator-type="$TYPE" \
  --runtime-version="$RUNTIME" --scopes="$SCOPES" \
  "${CAPACITY[@]+"${CAPACITY[@]}"}" "${SERVICE_ACCOUNT[@]+"${SERVICE_ACCOUNT[@]}"}"
((WAIT)) || exit 0

# Wait for the queued resource to become ACTIVE (its TPU VMs exist then).
if ((DRY_RUN)); then
  gcloud_tpu queued-resources describe --format="value(state.state)"
  exit 0
fi
while true; do
  state=$(gcloud_tpu queued-resources describe --format="value(state.state)")
  case "$state" in
    ACTIVE) note "queued resource $NAME is ACTIVE"; break ;;
    FAILED | SUSPENDING | SUSPENDED)
      die "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --project=$PROJECT --zone=$ZONE" ;;
    *) note "queued resource $NAME is ${state:-not visible yet}; checking again in ${POLL}s"; sleep "$POLL" ;;
  esac
done

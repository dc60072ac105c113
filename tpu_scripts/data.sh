#!/usr/bin/env bash
# Put the training data on every worker's local disk: either generate the synthetic world there
# (deterministic: every worker writes the same files) or copy a dataset from Cloud Storage.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N (--generate CONFIG [--config.KEY=VALUE ...] | --from gs://BUCKET/PATH)

Stage the TFDS ArrayRecord data in ~/multitower_data on every worker; launch.sh points
config.data.dir there. Each JAX process reads only its own shard, but the files are read with
local-disk random access, so every worker keeps a copy.

  --generate CONFIG   run \`multitower generate --config CONFIG\` on every worker (CONFIG is a path in
                      the repo, e.g. experiments/pod_v5p.py; overrides apply, as in launch.sh)
  --from URL          copy what \`multitower generate\` / \`multitower ingest\` wrote, from Cloud
                      Storage (gcloud storage rsync)
$COMMON_HELP
USAGE
}

CONFIG=""
SOURCE_URL=""
OVERRIDES=()

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --generate) CONFIG=$(value_of "$@"); shift 2 ;;
    --from) SOURCE_URL=$(value_of "$@"); shift 2 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done
require_common
[[ -n $CONFIG || -n $SOURCE_URL ]] || die "missing --generate CONFIG or --from gs://... (where the data comes from)"
[[ -z $CONFIG || -z $SOURCE_URL ]] || die "give one of --generate and --from, not both"

if [[ -n $CONFIG ]]; then
  # JAX_PLATFORMS=cpu: generating needs no TPU, and must not hold it.
  on_workers all "cd $REMOTE_REPO && JAX_PLATFORMS=cpu $REMOTE_VENV/bin/multitower generate $(quote_cmd --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}") --out $REMOTE_DATA"
else
  [[ $SOURCE_URL == gs://* ]] || die "--from $SOURCE_URL: expected a gs:// URL"
  ((${#OVERRIDES[@]} == 0)) || die "--config.* overrides only apply to --generate"
  on_workers all "mkdir -p $REMOTE_DATA && gcloud storage rsync --recursive $(quote_cmd "$SOURCE_URL") $REMOTE_DATA"
fi

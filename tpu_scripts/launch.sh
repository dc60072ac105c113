#!/usr/bin/env bash
# Start `multitower train --distributed` on every worker of the slice at once (one JAX process per
# TPU VM; jax.distributed.initialize() finds the coordinator, process count and id itself on
# Cloud TPU), detached with nohup, logging to ~/multitower_logs/train.log on each worker.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N --config CONFIG --workdir gs://BUCKET/RUN [--config.KEY=VALUE ...]

Launch training on every worker. Rerunning it after a stop or a preemption resumes from the
workdir's latest checkpoint.

  --config CONFIG     experiment file, a path in the repo (e.g. experiments/pod_v5p.py)
  --workdir URL       checkpoints, metrics and TensorBoard files; every worker writes to it, so it
                      must be shared: a gs:// path (or a shared file system with --shared-workdir)
  --shared-workdir    accept a workdir that is not gs:// (an NFS / Filestore mount on every worker,
                      or a single-VM slice)
  --data-dir DIR      config.data.dir on the workers (default ~/multitower_data, see data.sh);
                      "config" keeps the config's own value
  --env KEY=VALUE     extra environment for the training process (repeatable), e.g.
                      --env LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true
  --config.KEY=VALUE  config overrides, passed on to multitower train
$COMMON_HELP
USAGE
}

CONFIG=""
WORKDIR=""
SHARED=0
DATA_DIR=default
ENVS=(JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1)  # fail rather than fall back to CPU; logs unbuffered
OVERRIDES=()

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --config) CONFIG=$(value_of "$@"); shift 2 ;;
    --workdir) WORKDIR=$(value_of "$@"); shift 2 ;;
    --shared-workdir) SHARED=1; shift ;;
    --data-dir) DATA_DIR=$(value_of "$@"); shift 2 ;;
    --env)
      env_kv=$(value_of "$@")
      [[ $env_kv =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env $env_kv: expected KEY=VALUE"
      ENVS+=("$env_kv"); shift 2 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done
require_common
require "$CONFIG" --config "the experiment file, e.g. experiments/pod_v5p.py"
require "$WORKDIR" --workdir "a gs:// path shared by every worker"
if [[ $WORKDIR != gs://* ]] && ((!SHARED)); then
  die "--workdir $WORKDIR: every worker writes checkpoints there, so it must be shared: a gs:// path, or pass --shared-workdir for a shared mount or a single-VM slice"
fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -f $REPO_ROOT/$CONFIG ]] || die "--config $CONFIG: no such file in $REPO_ROOT (setup.sh copies this repository; give a path inside it)"

train=(train --config "$CONFIG" --workdir "$WORKDIR" --distributed)
for override in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  [[ $override != --config.data.dir=* ]] || DATA_DIR=config  # an explicit override wins
done
case "$DATA_DIR" in
  default) data_flag=" --config.data.dir=$REMOTE_DATA" ;;  # expanded on the worker
  config) data_flag="" ;;
  *) data_flag=" $(quote_cmd "--config.data.dir=$DATA_DIR")" ;;
esac
command="$(quote_cmd env "${ENVS[@]}") $REMOTE_VENV/bin/multitower $(quote_cmd "${train[@]}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")$data_flag"

# Refuse to start a second run next to a live one; append to the log so a resumed run keeps the
# history; detach (nohup, no terminal) so the ssh session can end.
on_workers all "cd $REMOTE_REPO && mkdir -p $REMOTE_LOGS && if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then echo \"\$(hostname): training is already running (pid \$(cat $REMOTE_PID)); stop.sh first\" >&2; exit 1; fi; echo \"=== \$(date -u +%FT%TZ) launch\" >> $REMOTE_LOG; nohup $command >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; echo \"\$(hostname): started pid \$(cat $REMOTE_PID), log $REMOTE_LOG\""
note "watch it: tpu_scripts/logs.sh --project $PROJECT --zone $ZONE --name $NAME --follow"

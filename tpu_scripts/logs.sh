#!/usr/bin/env bash
# Watch a run: tail a worker's train.log (process 0 writes the progress bar and metrics), show
# which workers are still training, or copy every worker's log here.
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
usage: $SCRIPT_NAME --project P --zone Z --name N [--worker W] [--lines K] [--follow | --status | --fetch DIR --type TYPE]

  --worker W          which worker's log: 0 (default; JAX process 0 logs the metrics), another
                      index, or all
  --lines K           how many last lines (default 100)
  --follow            keep printing new lines (Ctrl-C stops watching, not training)
  --status            one line per worker: training or not, and the last log line
  --fetch DIR         copy every worker's log to DIR/worker-<i>.log (needs --type)
  --type TYPE         the slice's accelerator type, for the number of workers [\$TPU_TYPE]
$COMMON_HELP
USAGE
}

WORKER=0
LINES=100
MODE="tail"
FETCH_DIR=""
TYPE="${TPU_TYPE:-}"

split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while (($#)); do
  case "$1" in
    --worker) WORKER=$(value_of "$@"); shift 2 ;;
    --lines) LINES=$(value_of "$@"); shift 2 ;;
    --follow) MODE=follow; shift ;;
    --status) MODE=status; shift ;;
    --fetch) FETCH_DIR=$(value_of "$@"); MODE=fetch; shift 2 ;;
    --type) TYPE=$(value_of "$@"); shift 2 ;;
    *)
      parse_common_flag "$@"
      ((SHIFT)) || die "unknown argument $1 (see --help)"
      shift "$SHIFT"
      ;;
  esac
done
require_common
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker $WORKER: expected a worker index or all"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines $LINES: expected a number of lines"

case "$MODE" in
  tail) on_workers "$WORKER" "tail -n $LINES $REMOTE_LOG" ;;
  follow) on_workers "$WORKER" "tail -n $LINES -F $REMOTE_LOG" ;;
  status)
    on_workers all "if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then state=training; else state=stopped; fi; echo \"\$(hostname): \$state | \$(tail -n 1 $REMOTE_LOG 2>/dev/null | tr '\\r' '\\n' | tail -n 1)\""
    ;;
  fetch)
    require_type "$TYPE"
    fetch_logs "$TYPE" "$FETCH_DIR"
    ;;
esac

# shellcheck shell=bash disable=SC2034  # the variables here are used by the scripts that source it
# Shared by every tpu_scripts/*.sh (sourced, never run): versions, flag parsing, dry-run, the
# gcloud calls and the remote command lines. Every gcloud command goes through `run`, so
# `--dry-run` prints exactly what a real run would execute, one command per line.

# --- versions and places: the one spot to change them ------------------------------------------
# TPU software ("runtime") versions for JAX, per generation:
# https://cloud.google.com/tpu/docs/runtimes  (Ubuntu 22.04 images with Python 3.10).
RUNTIME_V5E="v2-alpha-tpuv5-lite"
RUNTIME_V5P="v2-alpha-tpuv5"
RUNTIME_V6E="v2-alpha-tpuv6e"
# multitower_jax needs Python >= 3.11; uv installs it next to the image's 3.10.
PYTHON_VERSION="3.11"
UV_SPEC="uv>=0.5"
JAX_TPU_SPEC="jax[tpu]==0.10.2"  # the JAX version the test suite runs; brings the matching libtpu
# Service-account scopes of the workers: cloud-platform lets IAM decide, so the default service
# account can write checkpoints to a gs:// workdir when its role allows it.
SCOPES="https://www.googleapis.com/auth/cloud-platform"
# On every worker (expanded there, so they stay literal here):
REMOTE_REPO="\$HOME/multitower_jax"
REMOTE_VENV="\$HOME/multitower-venv"
REMOTE_LOGS="\$HOME/multitower_logs"
REMOTE_DATA="\$HOME/multitower_data"
REMOTE_LOG="$REMOTE_LOGS/train.log"
REMOTE_PID="$REMOTE_LOGS/train.pid"
ARCHIVE_NAME="multitower_jax.tar.gz"  # the source archive copied to every worker's home

# --- messages ------------------------------------------------------------------------------------
SCRIPT_NAME=$(basename "$0")

die() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

note() {  # progress for a human; stderr, so a dry run's stdout holds commands only
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
}

# --- common flags --------------------------------------------------------------------------------
# Defaults from the environment so a session need not repeat them.
PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-}"
NAME="${TPU_NAME:-}"
DRY_RUN=0

COMMON_HELP="common flags (the environment variable in brackets is the default):
  --project P        Google Cloud project [\$TPU_PROJECT]
  --zone Z           zone of the TPU, e.g. us-east5-a [\$TPU_ZONE]
  --name N           name of the TPU VM / pod slice (and of its queued resource) [\$TPU_NAME]
  --dry-run          print every command, one per line, and run nothing
  -h, --help         this help"

# ARGS: the script's arguments with --flag=value split into --flag value (config overrides such
# as --config.data.batch_size=4096 stay whole).
split_args() {
  ARGS=()
  local a
  for a in "$@"; do
    if [[ $a == --config.* || $a != --*=* ]]; then
      ARGS+=("$a")
    else
      ARGS+=("${a%%=*}" "${a#*=}")
    fi
  done
}

# value_of FLAG NEXT: the value following FLAG, or an error naming the flag.
value_of() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"
  printf '%s' "$2"
}

# parse_common_flag "$@": consume one common flag; sets SHIFT (0 when $1 is not a common flag).
parse_common_flag() {
  SHIFT=2
  case "$1" in
    --project) PROJECT=$(value_of "$@") ;;
    --zone) ZONE=$(value_of "$@") ;;
    --name) NAME=$(value_of "$@") ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) SHIFT=0 ;;
  esac
}

require() {  # require VALUE FLAG WHAT
  [[ -n $1 ]] || die "missing $2 ($3)"
}

require_common() {
  require "$PROJECT" --project "the Google Cloud project, or set \$TPU_PROJECT"
  require "$ZONE" --zone "the zone of the TPU, or set \$TPU_ZONE"
  require "$NAME" --name "the name of the TPU VM, or set \$TPU_NAME"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name $NAME: expected lower-case letters, digits and dashes, starting with a letter"
}

# --- TPU generations -----------------------------------------------------------------------------
# generation_of TYPE: v5e | v5p | v6e, or an error listing what is accepted.
generation_of() {
  local type=$1 n
  n=${type##*-}
  case "$type" in
    v5litepod-*) [[ " 1 4 8 16 32 64 128 256 " == *" $n "* ]] && { echo v5e; return; } ;;
    v6e-*) [[ " 1 4 8 16 32 64 128 256 " == *" $n "* ]] && { echo v6e; return; } ;;
    v5p-*) [[ $n =~ ^[0-9]+$ ]] && ((n >= 8 && n % 8 == 0)) && { echo v5p; return; } ;;
  esac
  die "--type $type: expected v5litepod-N (v5e) or v6e-N (N in 1 4 8 16 32 64 128 256), or v5p-N (N TensorCores, a multiple of 8)"
}

require_type() {  # require_type TYPE: an error (in this shell, not a subshell) unless TYPE is valid
  require "$1" --type "the accelerator type, e.g. v5litepod-16, v5p-128 or v6e-64"
  generation_of "$1" >/dev/null
}

runtime_of() {  # the TPU software version for an accelerator type
  case "$(generation_of "$1")" in
    v5e) echo "$RUNTIME_V5E" ;;
    v5p) echo "$RUNTIME_V5P" ;;
    v6e) echo "$RUNTIME_V6E" ;;
  esac
}

chips_of() {  # v5p counts TensorCores (2 per chip); v5e and v6e count chips
  local n=${1##*-}
  if [[ $(generation_of "$1") == v5p ]]; then echo $((n / 2)); else echo "$n"; fi
}

hosts_of() {  # TPU VMs (= JAX processes) in a slice: 4 chips per VM, or one VM for up to 8 chips
  local chips
  chips=$(chips_of "$1")
  if [[ $(generation_of "$1") == v5p ]]; then
    echo $(((chips + 3) / 4))
  elif ((chips <= 8)); then
    echo 1
  else
    echo $((chips / 4))
  fi
}

# --- running commands ----------------------------------------------------------------------------
SAFE_WORD='^[A-Za-z0-9_./:=@,+%^-]+$'
FLAG_EQUALS='^(--[A-Za-z0-9-]+=)(.*)$'

quote_word() {  # a word as the shell reads it back: bare when safe, else in single quotes
  local q="'"
  if [[ $1 =~ $SAFE_WORD ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ $FLAG_EQUALS ]]; then  # --flag='value', easier to read than '--flag=value'
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote_word "${BASH_REMATCH[2]}")"
  else
    printf '%s' "'${1//$q/$q\\$q$q}'"
  fi
}

quote_cmd() {  # one shell line that runs "$@"
  local out=() a
  for a in "$@"; do
    out+=("$(quote_word "$a")")
  done
  printf '%s' "${out[*]}"
}

run() {  # print the command; run it unless --dry-run
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
    return 0
  fi
  printf '+ %s\n' "$(quote_cmd "$@")" >&2
  "$@"
}

gcloud_tpu() {  # gcloud compute tpus GROUP VERB NAME ... with the project and zone
  local group=$1 verb=$2
  shift 2
  run gcloud compute tpus "$group" "$verb" "$NAME" --project="$PROJECT" --zone="$ZONE" "$@"
}

on_workers() {  # on_workers WORKERS COMMAND: run a shell command on TPU workers ("all", "0", "0-3")
  gcloud_tpu tpu-vm ssh --worker="$1" --command="$2"
}

# --- remote command lines (shared by several scripts) --------------------------------------------
# Stop the training process on a worker: SIGTERM makes `multitower train` checkpoint and exit at
# the next step; after GRACE seconds a process still alive gets SIGKILL.
stop_training_cmd() {
  local grace=$1
  printf '%s' "if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then" \
    " pid=\$(cat $REMOTE_PID); kill -TERM \$pid; echo \"\$(hostname): sent SIGTERM to \$pid\";" \
    " for _ in \$(seq $grace); do kill -0 \$pid 2>/dev/null || break; sleep 1; done;" \
    " if kill -0 \$pid 2>/dev/null; then kill -KILL \$pid; echo \"\$(hostname): killed \$pid after ${grace}s\"; fi;" \
    " else echo \"\$(hostname): no training process\"; fi; rm -f $REMOTE_PID"
}

# fetch_logs TYPE DIR: copy every worker's train.log to DIR/worker-<i>.log (one scp per worker,
# since a copy from --worker=all would write every file to the same local name).
fetch_logs() {
  local hosts i
  hosts=$(hosts_of "$1")
  run mkdir -p "$2"
  for ((i = 0; i < hosts; i++)); do
    run gcloud compute tpus tpu-vm scp "$NAME:multitower_logs/train.log" "$2/worker-$i.log" \
      --project="$PROJECT" --zone="$ZONE" --worker="$i"
  done
}

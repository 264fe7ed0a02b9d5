#!/bin/sh
# Dynamic-graph training on every node's GPUs, or on N CPU processes: PLSC v2.2's train_dynamic.sh for plsc.
#
#   sh scripts/train_dynamic.sh [--nproc N] [CONFIG] [plsc train options ...]
#
# Environment (as in PLSC v2.2):
#   TRAINER_IP_LIST       comma-separated IPs of all nodes (default 127.0.0.1); run the same command on each
#   CUDA_VISIBLE_DEVICES  GPUs to train on, one process each, e.g. 0,1,2,3,4,5,6,7 (default: all GPUs)
#   PLSC_DATA_ROOT        folder holding MS1M_v3/, for the published configs (default CONFIG among them);
#                         or pass --set data.root=/path/to/MS1M_v3 instead
# and, for CPU machines or a chosen process count:
#   NPROC                 processes per node (or --nproc N); without GPUs the default is 1
#   PYTHON                interpreter with plsc and paddlepaddle installed (default: see scripts/_python.sh)
#
# Examples:
#   export PLSC_DATA_ROOT=/path/to/datasets
#   CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 sh scripts/train_dynamic.sh configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml
#   TRAINER_IP_LIST=10.0.0.1,10.0.0.2 sh scripts/train_dynamic.sh configs/ms1mv3_r100_dynamic_fp16_nhwc_r0.1.yaml
#   sh scripts/train_dynamic.sh --nproc 2 configs/cpu/mini.yaml --output output/mini-2proc
# The launcher writes one log per process to log/workerlog.<n>.
set -eu
. "$(dirname "$0")/_python.sh"

if [ "${1:-}" = "--nproc" ]; then
  NPROC=${2:?--nproc needs a number}
  shift 2
fi
CONFIG=${1:-configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml}
if [ $# -gt 0 ]; then shift; fi
TRAINER_IP_LIST=${TRAINER_IP_LIST:-127.0.0.1}
PYTHON=$(command -v "$PYTHON")  # absolute: the launcher runs its first word as given

gpu_count() {  # the last line: importing paddle may print warnings first
  { "$PYTHON" -c 'import paddle; print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)' \
    2>/dev/null || echo 0; } | tail -n 1
}

# The launcher's options go in front of the plsc command line kept in "$@".
set -- "$PYTHON" -m plsc.cli train --config "$CONFIG" "$@"
if [ "$(gpu_count)" -eq 0 ]; then
  # A CPU build: the launcher would take CUDA_VISIBLE_DEVICES for GPUs and never start the gloo group.
  unset CUDA_VISIBLE_DEVICES
  set -- --nproc_per_node "${NPROC:-1}" "$@"
elif [ -n "${NPROC:-}" ]; then
  set -- --nproc_per_node "$NPROC" "$@"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  set -- --gpus "$CUDA_VISIBLE_DEVICES" "$@"
fi  # else: one process per GPU the launcher sees
# Several nodes: fixed endpoints (ip:6070+i) every node derives from the same list. One node: the launcher
# picks free ports itself, so two jobs on one machine do not collide.
case $TRAINER_IP_LIST in
  *,*) set -- --ips "$TRAINER_IP_LIST" "$@" ;;
esac

exec "$PYTHON" -m paddle.distributed.launch "$@"

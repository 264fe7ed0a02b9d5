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
# Through `plsc train --nproc N [--nodes IPS]`: the console shows plsc's own lines (rank 0's log and errors,
# once); the launcher's output and one log per process go to <output>/log/, nothing into the current folder.
set -eu
. "$(dirname "$0")/_python.sh"

if [ "${1:-}" = "--nproc" ]; then
  NPROC=${2:?--nproc needs a number}
  shift 2
fi
CONFIG=${1:-configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml}
if [ $# -gt 0 ]; then shift; fi
TRAINER_IP_LIST=${TRAINER_IP_LIST:-127.0.0.1}

gpu_count() {  # the last line: importing paddle may print warnings first
  { "$PYTHON" -c 'import paddle; print(paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0)' \
    2>/dev/null || echo 0; } | tail -n 1
}

if [ -z "${NPROC:-}" ]; then
  NPROC=$(gpu_count)  # one process per GPU the launcher sees (CUDA_VISIBLE_DEVICES chooses them)
  if [ "$NPROC" -eq 0 ]; then NPROC=1; fi
fi
# Several nodes: fixed endpoints (ip:6070+i) every node derives from the same list; plsc has the nodes meet
# first and names any that does not come within train.node_wait_s. One node: the launcher picks free ports.
case $TRAINER_IP_LIST in
  *,*) set -- --nodes "$TRAINER_IP_LIST" "$@" ;;
esac

exec "$PYTHON" -m plsc.cli train --config "$CONFIG" --nproc "$NPROC" "$@"

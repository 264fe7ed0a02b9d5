#!/bin/sh
# Static-graph training: PLSC v2.2's train_static.sh for plsc. The same arguments and environment as
# scripts/train_dynamic.sh (see there), plus --set train.mode=static: the backbone and the loss run as
# paddle.jit.to_static programs (the published *_static_* configs say so themselves; this makes any config
# static). A later --set train.mode=... among the options still wins.
#
#   sh scripts/train_static.sh [--nproc N] [CONFIG] [plsc train options ...]
#
# Examples:
#   PLSC_DATA_ROOT=/path/to/datasets CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
#     sh scripts/train_static.sh configs/ms1mv3_r50_static_fp16_nhwc_r0.1.yaml
#   sh scripts/train_static.sh --nproc 2 configs/cpu/mini.yaml --output output/mini-static
set -eu

if [ "${1:-}" = "--nproc" ]; then
  NPROC=${2:?--nproc needs a number}
  export NPROC
  shift 2
fi
CONFIG=${1:-configs/ms1mv3_r50_static_fp16_nhwc_r0.1.yaml}
if [ $# -gt 0 ]; then shift; fi

exec sh "$(dirname "$0")/train_dynamic.sh" "$CONFIG" --set train.mode=static "$@"

#!/bin/sh
# Export a static-mode checkpoint for deployment: PLSC v2.2's scripts/export_static.sh, run by `plsc export`.
# plsc reads static- and dynamic-mode checkpoints alike, so this is export_dynamic.sh with the static run's
# default output folder; every setting documented there can be set from the environment, e.g.
#   CHECKPOINT_DIR=MS1M_v3_arcface_Res50_static_0.1_NHWC_FP16_v2.2/FresResNet50/best_model/cfp_fp
set -eu
OUTPUT=${OUTPUT:-output/ms1mv3_r50_static_fp16_nhwc_r0.1}
export OUTPUT
exec sh "$(dirname "$0")/export_dynamic.sh" "$@"

#!/bin/sh
# Export a dynamic-mode checkpoint for deployment: PLSC v2.2's scripts/export_dynamic.sh, run by `plsc export`.
# Writes <backbone>.pdmodel/.pdiparams (Paddle 2.6), <backbone>.json/.pdiparams (Paddle 3) or <backbone>.onnx,
# plus export.json, into OUTPUT_DIR; the input is [N, 3, 112, 112] float32 NCHW whatever the training layout.
# Every value below can be set from the environment. CHECKPOINT_DIR may be plsc's own or a PLSC v2.2 download,
# e.g. CHECKPOINT_DIR=MS1M_v3_arcface_Res50_dynamic_0.1_NHWC_FP16_v2.2/FresResNet50/best_model/cfp_fp
# plsc reads static- and dynamic-mode checkpoints alike: the _static/_dynamic scripts differ in default paths.
# PYTHON is the interpreter with plsc and paddlepaddle installed (default: see scripts/_python.sh).
set -eu
. "$(dirname "$0")/_python.sh"

EXPORT_TYPE=${EXPORT_TYPE:-paddle}  # paddle | onnx (onnx needs: pip install 'plsc[export]')
OUTPUT=${OUTPUT:-output/ms1mv3_r50_dynamic_fp16_nhwc_r0.1}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$OUTPUT/best_model/cfp_fp}
OUTPUT_DIR=${OUTPUT_DIR:-$OUTPUT/exported_model}
BACKBONE=${BACKBONE:-}              # e.g. FresResNet50; empty: detected from the checkpoint
EMBEDDING_SIZE=${EMBEDDING_SIZE:-}  # e.g. 512; empty: detected

set -- export --checkpoint "$CHECKPOINT_DIR" --format "$EXPORT_TYPE" --output "$OUTPUT_DIR"
if [ -n "$BACKBONE" ]; then set -- "$@" --backbone "$BACKBONE"; fi
if [ -n "$EMBEDDING_SIZE" ]; then set -- "$@" --embedding-size "$EMBEDDING_SIZE"; fi

exec "$PYTHON" -m plsc.cli "$@"

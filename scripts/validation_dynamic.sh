#!/bin/sh
# Verification accuracy of a dynamic-mode checkpoint: PLSC v2.2's scripts/validation_dynamic.sh, run by `plsc eval`.
# Every value below can be set from the environment. CHECKPOINT_DIR may be plsc's own (<output>/best_model/<set>
# or <output>/checkpoints/<step>) or a PLSC v2.2 download, e.g.
#   CHECKPOINT_DIR=MS1M_v3_arcface_Res50_dynamic_0.1_NHWC_FP16_v2.2/FresResNet50/best_model/cfp_fp
# plsc reads static- and dynamic-mode checkpoints alike: the _static/_dynamic scripts differ in default paths.
# PYTHON is the interpreter with plsc and paddlepaddle installed (default: see scripts/_python.sh).
set -eu
. "$(dirname "$0")/_python.sh"

OUTPUT=${OUTPUT:-output/ms1mv3_r50_dynamic_fp16_nhwc_r0.1}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$OUTPUT/best_model/cfp_fp}
DATA_DIR=${DATA_DIR:-${PLSC_DATA_ROOT:+$PLSC_DATA_ROOT/}MS1M_v3}  # the .bin files: under PLSC_DATA_ROOT when set
VAL_TARGETS=${VAL_TARGETS:-lfw,cfp_fp,agedb_30}
BATCH_SIZE=${BATCH_SIZE:-128}
BACKBONE=${BACKBONE:-}              # e.g. FresResNet50; empty: detected from the checkpoint
EMBEDDING_SIZE=${EMBEDDING_SIZE:-}  # e.g. 512; empty: detected

set -- eval --checkpoint "$CHECKPOINT_DIR" --batch-size "$BATCH_SIZE"
old_ifs=$IFS
IFS=,
for target in $VAL_TARGETS; do
  set -- "$@" --bin "$DATA_DIR/$target.bin"
done
IFS=$old_ifs
if [ -n "$BACKBONE" ]; then set -- "$@" --backbone "$BACKBONE"; fi
if [ -n "$EMBEDDING_SIZE" ]; then set -- "$@" --embedding-size "$EMBEDDING_SIZE"; fi

exec "$PYTHON" -m plsc.cli "$@"

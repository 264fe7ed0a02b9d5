#!/bin/sh
# Embed images with an exported model: PLSC v2.2's scripts/inference.sh, run by `plsc infer`.
# MODEL is an export folder (holding export.json) or one model file (.pdmodel, .json, .onnx); IMAGE_PATH an image
# or a folder of images. With EMBEDDINGS (an .npy) the embeddings go there and the image list beside it (.txt);
# without, they are printed. Every value below can be set from the environment.
# PYTHON is the interpreter with plsc and paddlepaddle installed (default: see scripts/_python.sh).
set -eu
. "$(dirname "$0")/_python.sh"

EXPORT_TYPE=${EXPORT_TYPE:-paddle}  # paddle (Paddle Inference) | onnx (onnxruntime)
MODEL=${MODEL:-output/ms1mv3_r50_static_fp16_nhwc_r0.1/exported_model}
IMAGE_PATH=${IMAGE_PATH:-data/tiny/images/00000001.jpg}
EMBEDDINGS=${EMBEDDINGS:-}
BATCH_SIZE=${BATCH_SIZE:-32}

set -- infer --model "$MODEL" --images "$IMAGE_PATH" --engine "$EXPORT_TYPE" --batch-size "$BATCH_SIZE"
if [ -n "$EMBEDDINGS" ]; then set -- "$@" --output "$EMBEDDINGS"; fi

exec "$PYTHON" -m plsc.cli "$@"

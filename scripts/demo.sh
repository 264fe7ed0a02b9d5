#!/bin/sh
# Face recognition demo (PLSC v2.2 README section 10), run by `plsc demo`: index a gallery, then detect and name
# the faces of a query image. MODEL is an export folder / model file (Paddle Inference, ONNX) or a plsc or
# PLSC v2.2 checkpoint folder; the index must be built and queried with the same model.
# Faces are found by DETECTOR (plsc demo --detector; default haar: OpenCV's bundled cascade, centre crops, as
# the default model's training faces were cut; mtcnn aligns them on five landmarks, for models trained on
# aligned faces such as plsc prepare's) unless DET_MODEL names a PaddleDetection inference model
# (PLSC's BlazeFace: models/blazeface_fpn_ssh_1000e_v1.0_infer/inference.pdmodel). With EXPECTED (a JSON of
# cells and names, as ../shared/data/demo/query/expected.json) the answers are scored against it.
# Every value below can be set from the environment; PYTHON is the interpreter with plsc installed
# (default: see scripts/_python.sh).
#
#   MODEL=output/faces_mini/best_model/lfw_disjoint sh scripts/demo.sh
set -eu
. "$(dirname "$0")/_python.sh"

DEMO=${DEMO:-../shared/data/demo}
MODEL=${MODEL:-output/faces_mini/best_model/lfw_disjoint}
GALLERY=${GALLERY:-$DEMO/gallery}
LABEL=${LABEL:-$GALLERY/label.txt}
INDEX=${INDEX:-output/demo/index.npz}
INPUT=${INPUT:-$DEMO/query/group1.jpg}
OUTPUT=${OUTPUT:-output/demo/result}
CDD_NUM=${CDD_NUM:-10}
THRESHOLD=${THRESHOLD:-}  # empty: the model's verification threshold, else 0.45
FONT=${FONT:-}            # a .ttf/.otf for non-ASCII names (needs Pillow)
DETECTOR=${DETECTOR:-haar}
DET_MODEL=${DET_MODEL:-}
DET_PARAMS=${DET_PARAMS:-}
EXPECTED=${EXPECTED:-}

# with_detector COMMAND...: runs the plsc command with the detector flags, when set, appended.
with_detector() {
  if [ -n "$DET_MODEL" ]; then set -- "$@" --det-model-file-path "$DET_MODEL"; fi
  if [ -n "$DET_PARAMS" ]; then set -- "$@" --det-params-file-path "$DET_PARAMS"; fi
  "$PYTHON" -m plsc.cli "$@" --detector "$DETECTOR"
}

with_detector demo index --gallery "$GALLERY" --label "$LABEL" --model "$MODEL" --index "$INDEX"

set -- demo recognize --index "$INDEX" --model "$MODEL" --input "$INPUT" --output "$OUTPUT" --cdd-num "$CDD_NUM"
if [ -n "$THRESHOLD" ]; then set -- "$@" --threshold "$THRESHOLD"; fi
if [ -n "$FONT" ]; then set -- "$@" --font "$FONT"; fi
with_detector "$@"

if [ -n "$EXPECTED" ]; then
  stem=$(basename "$INPUT")
  result="$OUTPUT/${stem%.*}.json"
  "$PYTHON" "$(dirname "$0")/demo_score.py" --result "$result" --expected "$EXPECTED"
fi

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
# With no settings it needs two things the repository does not bundle, and says so when one is missing:
# - the demo photos in DEMO (default ../shared/data/demo: gallery/ with label.txt, query/group1.jpg and
#   query/expected.json, which then scores the answers);
# - the faces_mini model, trained on the faces-mini data set (about 40 min on 2 CPU cores):
#     PLSC_DATA_ROOT=../shared/data plsc train --config configs/cpu/faces_mini.yaml
#   MODEL=output/mini/best_model/lfw_disjoint_100 runs it with `make mini`'s model instead (which names few
#   of the faces: it scores about 0.6 on its verification pairs).
#
#   sh scripts/demo.sh
set -eu
. "$(dirname "$0")/_python.sh"

DEMO=${DEMO:-../shared/data/demo}
if [ -z "${GALLERY:-}${INPUT:-}" ] && [ ! -d "$DEMO/gallery" ]; then
  echo "demo.sh: $DEMO/gallery not found: the demo photos are not in the repository; set DEMO to the folder" \
    "holding gallery/ and query/group1.jpg (or GALLERY and INPUT)" >&2
  exit 2
fi
if [ -z "${MODEL:-}" ]; then
  MODEL=output/faces_mini/best_model/lfw_disjoint
  if [ ! -e "$MODEL" ]; then
    echo "demo.sh: $MODEL not found: train it with 'PLSC_DATA_ROOT=../shared/data plsc train --config" \
      "configs/cpu/faces_mini.yaml' (the faces-mini data set, about 40 min), or set MODEL (e.g." \
      "output/mini/best_model/lfw_disjoint_100, make mini's, which names few faces)" >&2
    exit 2
  fi
fi
if [ -z "${EXPECTED:-}${INPUT:-}" ] && [ -f "$DEMO/query/expected.json" ]; then
  EXPECTED=$DEMO/query/expected.json  # the default query's answers: score them
fi
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
SCORE=${SCORE:-}          # with EXPECTED: also write the score as JSON to this file

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
  set -- --result "$result" --expected "$EXPECTED"
  if [ -n "$SCORE" ]; then set -- "$@" --json "$SCORE"; fi
  "$PYTHON" "$(dirname "$0")/demo_score.py" "$@"
fi

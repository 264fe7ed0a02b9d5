#!/bin/sh
# The largest class count that trains on this machine's GPUs in static mode, found by bisection over short
# training runs: PLSC v2.2's scripts/find_maximum_classes_static.sh (seed README 9.2). Each trial is a fresh
# `plsc train` on every visible GPU (CUDA_VISIBLE_DEVICES chooses them) with synthetic data, batch 64 per GPU,
# FP16 class centers; the bracket starts around plsc's memory-model prediction. Options (see --help):
#   --config C  --set SECTION.KEY=VALUE  --nproc N  --batch-size B  --steps S  --bisections K  --low L --high H
#   --output DIR (trial logs and result.json; default output/find_maximum_classes_static)
# Without a GPU the trials run on the CPU, each under a cap on its peak resident memory that must be given:
#   sh scripts/find_maximum_classes_static.sh --config repro/capacity/cpu_capacity.yaml --memory-cap-mib 1280
# PYTHON is the interpreter with plsc installed (default: see scripts/_python.sh).
set -eu
. "$(dirname "$0")/_python.sh"

PYTHONPATH="$PLSC_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the trial code lives in repro/, beside plsc
export PYTHONPATH
exec "$PYTHON" -m repro.capacity.find_maximum --mode static "$@"

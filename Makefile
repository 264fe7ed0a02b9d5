# Two commands set everything up on a fresh machine with Python 3.10+ and pip:
#   make mini   train a tiny model on the bundled faces (data/tiny) and evaluate it
#   make test   the fast CPU unit tier
# Both create (or reuse) the virtual environment $(VENV) and install plsc into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plsc-installed
PYTEST_WORKERS ?= 2

.PHONY: venv mini test lint tox clean repro-cpu repro-accuracy repro-capacity repro-throughput repro-plan report report-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "plsc needs Python 3.10 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# A rerun replaces output/mini: --overwrite moves the previous run aside into output/mini/old-<time> (and says
# so) instead of refusing; a mini still running holds the folder's lock, and a second one stops at once.
mini: venv
	$(BIN)/plsc train --config configs/cpu/mini.yaml --output output/mini --overwrite

# worksteal: a worker that runs out of tests takes some of the other's, so a few long tests at the end of one
# worker's share do not leave the other core idle. Tests that take minutes are in the cpu_slow tier (--run-slow).
test: venv
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q

lint: venv
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check plsc tests repro scripts benchmarks devtools tools conftest.py

tox: venv
	$(BIN)/python -m pip install --quiet tox
	$(BIN)/tox

# Reproduction of PLSC v2.2's published claims (docs/reproduction.md). Optional variables:
#   DATA_DIR=MS1M_v3 (agedb_30.bin, cfp_fp.bin, lfw.bin)  CHECKPOINT_DIR=dir  DOWNLOAD=1  GPUS=n
#   RUN_SLOW=1 (the cpu_slow tier: faces-mini accuracy, static-mode CPU throughput)
#   RESULTS_DIR=dir  where the results go (default output/repro/results/, not tracked)
#   UPDATE_RESULTS=1 write the committed results in repro/results/ instead (what `make report` renders)
# Cases whose data, checkpoints or hardware are missing are skipped with the reason (-rs prints it).
REPRO_OPTS = $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(CHECKPOINT_DIR),--checkpoint-dir $(CHECKPOINT_DIR)) \
	$(if $(DOWNLOAD),--download) $(if $(GPUS),--gpus $(GPUS)) $(if $(RESULTS_DIR),--results-dir $(RESULTS_DIR)) \
	$(if $(UPDATE_RESULTS),--update-results) $(if $(RUN_SLOW),--run-slow)
REPRO_PYTEST = $(BIN)/python -m pytest -rs

repro-cpu: venv
	$(REPRO_PYTEST) -q repro -m "cpu or cpu_slow" $(REPRO_OPTS)

repro-accuracy: venv
	$(REPRO_PYTEST) repro/accuracy $(REPRO_OPTS)

repro-capacity: venv
	$(REPRO_PYTEST) repro/capacity $(REPRO_OPTS)

repro-throughput: venv
	$(REPRO_PYTEST) repro/throughput $(REPRO_OPTS)

repro-plan: venv
	$(REPRO_PYTEST) repro/plan $(REPRO_OPTS)

report: venv
	$(BIN)/python -m repro.report

report-check: venv
	$(BIN)/python -m repro.report --check

# The classifier head against its matmul floor (pytest-benchmark; JSON in benchmarks/results/). Optional:
#   BENCH_ARGS="--head-shapes target" (the issue's 1M and 4M shapes: ~17 GB RAM, tens of minutes)
.PHONY: bench
bench: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(BIN)/python -m pytest benchmarks -p no:xdist -q -s \
		--benchmark-json=benchmarks/results/pytest-benchmark.json $(BENCH_ARGS)

# docs/performance.md's tables and benchmarks/figures/performance.png from benchmarks/results/*.json
.PHONY: bench-report bench-report-check
bench-report: venv
	$(BIN)/python -m benchmarks.report

bench-report-check: venv
	$(BIN)/python -m benchmarks.report --check

clean:
	rm -rf $(VENV) .tox output .pytest_cache

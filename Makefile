# Two commands set everything up on a fresh machine with Python 3.10+ and pip:
#   make mini   train a tiny model on the bundled faces (data/tiny) and evaluate it
#   make test   the fast CPU unit tier
# Both create (or reuse) the virtual environment $(VENV) and install plsc into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.plsc-installed
PYTEST_WORKERS ?= 2

.PHONY: venv mini test lint tox clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "plsc needs Python 3.10 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

mini: venv
	$(BIN)/plsc train --config configs/cpu/mini.yaml --output output/mini

test: venv
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

lint: venv
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check plsc tests repro scripts conftest.py

tox: venv
	$(BIN)/python -m pip install --quiet tox
	$(BIN)/tox

clean:
	rm -rf $(VENV) .tox output .pytest_cache

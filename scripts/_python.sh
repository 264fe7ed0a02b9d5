# Sourced by the scripts (POSIX sh): sets PLSC_ROOT, the repository, and PYTHON, the interpreter with plsc
# installed, unless PYTHON is set already: an activated virtual environment's python, else the repository's
# .venv (made by `make venv`) when present, else python3.
PLSC_ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON=python
  elif [ -x "$PLSC_ROOT/.venv/bin/python" ]; then
    PYTHON=$PLSC_ROOT/.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
  else
    PYTHON=python
  fi
fi

#!/usr/bin/env python3
"""PLSC v2.2's tools/test_recognition.py (--build_index / --index, ...), run by `plsc demo`.

The flags and how they map: plsc/seed_tools.py. Runs this checkout's plsc (the repository root goes first on
sys.path), with the interpreter that runs this file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plsc.seed_tools import run  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    sys.exit(run("test_recognition"))

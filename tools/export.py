#!/usr/bin/env python3
"""PLSC v2.2's tools/export.py (--checkpoint_dir, --output_dir, --export_type, ...), run by `plsc export`.

The flags and how they map: plsc/seed_tools.py. Runs this checkout's plsc (the repository root goes first on
sys.path), with the interpreter that runs this file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plsc.seed_tools import run  # noqa: E402  (after the path is set)

if __name__ == "__main__":
    sys.exit(run("export"))

"""Process-level helpers every layer may use: the CPU thread count and one-line error reasons.

This module imports nothing from plsc or Paddle, so that anything (including ``plsc/__init__.py``) can use it.
"""

from __future__ import annotations

import os


def set_thread_default() -> None:
    """Paddle forces ``OMP_NUM_THREADS=1`` at import when the variable is unset, which silently makes every
    CPU run single-threaded. We choose deliberately instead: the environment wins, otherwise all cores."""
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


def default_threads() -> int:
    """Threads for an inference engine when the caller names none: OMP_NUM_THREADS, else all cores."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def first_line(exc: Exception) -> str:
    """The first non-blank line of an exception's message (C++ errors carry pages of stack), else its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import contextlib

from plsc.runtime import first_line


class PlscError(Exception):
    """Bad input or an impossible request; ``str(error)`` is a complete one-line explanation."""


@contextlib.contextmanager
def memory_hint(doing: str, settings: str):
    """A MemoryError inside the block (numpy's, or Paddle's ResourceExhausted, which subclasses it) becomes
    one PlscError line saying what ran out (``doing``: "building the backbone", or "") and which
    ``settings`` size it."""
    try:
        yield
    except MemoryError as exc:
        reason = first_line(exc).removeprefix("(ResourceExhausted) ")
        reason = reason if len(reason) <= 100 else reason[:97] + "..."
        what = f"out of memory {doing}" if doing else "out of memory"
        raise PlscError(f"{what} ({reason}); lower {settings}") from None

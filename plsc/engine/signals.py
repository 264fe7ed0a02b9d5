"""SIGINT and SIGTERM during training: noted when they arrive, acted on between steps (every rank agrees
first, then a checkpoint is saved and the run stops with :class:`TrainingInterrupted`)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised after a SIGINT/SIGTERM checkpoint was written; carries the signal number."""

    def __init__(self, signum: int, checkpoint_dir: Path):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {checkpoint_dir}")
        self.signum = signum
        self.checkpoint_dir = checkpoint_dir


class StopSignals:
    """``received``: the last stop signal's number since :meth:`caught` began, or None."""

    def __init__(self):
        self.received: int | None = None

    def _note(self, signum, frame) -> None:
        self.received = signum

    @contextlib.contextmanager
    def caught(self):
        """Note stop signals instead of dying of them, for the block; the previous handlers afterwards."""
        previous = {}
        for signum in STOP_SIGNALS:
            try:
                previous[signum] = signal.signal(signum, self._note)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

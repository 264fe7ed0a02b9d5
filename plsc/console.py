"""What plsc shows on the console: framework noise kept off it, and the progress of long phases.

:func:`quiet_framework` is for the ``plsc`` command only (it changes process-wide settings: environment,
warning filters); importing plsc as a library changes none of them. :func:`progress` is used by library code:
a tqdm bar when stderr is a terminal, otherwise (logs, CI, a launcher's log file) a log line every few seconds
with the count, the rate and the time left, so that a long phase is never silent and never floods a file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator

log = logging.getLogger("plsc")

# Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL_S = 15.0

# Paddle prints this at import whenever OMP_NUM_THREADS > 1, which plsc sets deliberately (plsc/runtime.py).
_THREAD_WARNING_STARTS = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")


def quiet_framework() -> None:
    """Keep Paddle's own chatter off the console of a ``plsc`` command; call before Paddle is imported.

    Off: glog's INFO and WARNING lines from Paddle's C++ (PIR's "TuplePop ..." per compiled loop, the
    executor's notes, "static graph(PIR) not support input out tensor!!!!!"), UserWarnings raised inside
    Paddle (PIR's "Tensor do not have 'place' interface"), and the OMP_NUM_THREADS warning Paddle prints at
    import. Errors still show. ``PLSC_DEBUG=1`` leaves everything on; an explicit GLOG_minloglevel wins.
    """
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
    if os.environ.get("PLSC_DEBUG"):
        return
    os.environ.setdefault("GLOG_minloglevel", "2")  # read by glog when Paddle's C++ library loads
    warnings.filterwarnings("ignore", category=UserWarning, module=r"paddle(\.|$)")
    import_paddle_without_thread_warning()


def import_paddle_without_thread_warning() -> None:
    """``import paddle`` with its OMP_NUM_THREADS warning dropped and anything else it prints passed on.

    The variable stays set before the import (plsc/runtime.py) rather than leaving it unset and calling
    ``set_num_threads`` after: OpenMP sizes its pools at start-up, and a 3x3 convolution measured 0.41 s that
    way against 0.52 s (Paddle 3.3.1, 2 cores). The warning is about data-parallel jobs, not plsc's runs.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            import paddle  # noqa: F401
    finally:
        for line in captured.getvalue().splitlines(keepends=True):
            if not line.startswith(_THREAD_WARNING_STARTS):
                sys.stderr.write(line)


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Everything written to file descriptors 1 and 2 inside the block (C++ libraries print there directly),
    kept out of the console and available afterwards as the yielded buffer's text (also after an error)."""
    text = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            text.write(sink.read().decode("utf-8", errors="replace"))


class Progress:
    """Counts work done towards ``total``: a tqdm bar on a terminal, else a log line every LOG_INTERVAL_S.

    Use as a context manager; ``update(n)`` after each piece of work. ``enabled=False`` shows nothing.
    """

    def __init__(
        self, total: int, desc: str, unit: str, enabled: bool = True, interval_s: float | None = None
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.interval_s = LOG_INTERVAL_S if interval_s is None else interval_s
        self.done = 0
        self._bar = None
        self._enabled = enabled
        self._start = self._last_line = time.monotonic()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # only needed on a terminal

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if self._enabled and now - self._last_line >= self.interval_s and self.done < self.total:
            self._last_line = now
            log.info("%s", self.line(now - self._start))

    def line(self, elapsed_s: float) -> str:
        """``desc: done/total unit (pct%), rate unit/s, eta H:MM:SS``."""
        rate = self.done / max(elapsed_s, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        percent = 100.0 * self.done / max(self.total, 1)
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
                f"{rate:.1f} {self.unit}/s, eta {format_duration(left)}")


def progress(items: Iterable, total: int, desc: str, unit: str, enabled: bool = True) -> Iterator:
    """``items`` unchanged, with a :class:`Progress` advanced by one after each."""
    with Progress(total, desc, unit, enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

"""Steady-state training throughput from plsc's own log, and the peak GPU memory of a run.

``plsc train`` appends one record per log interval to ``<output>/train_log.jsonl`` (rank 0): ``ips`` is the
global batch times the steps of that window over its wall time, evaluation excluded. Each step ends with the
loss read back to the host (``float(loss)``), which waits for the device, and with the collectives every rank
joins, so a window's time is synchronised across ranks: per-rank throughput is rank 0's, and the spread left
to report is the one between windows.
"""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from repro.plsc_runs import read_train_log


class RunFailed(RuntimeError):
    """The training run exited with an error or its loss was not finite; the message says which."""


@dataclass(frozen=True)
class Throughput:
    images_per_s: float  # median over the steady-state windows
    low: float  # slowest steady-state window
    high: float  # fastest
    windows: int  # steady-state windows
    warmup_windows: int  # left out

    def to_dict(self) -> dict:
        return {
            "images_per_s": self.images_per_s,
            "window_min": self.low,
            "window_max": self.high,
            "windows": self.windows,
            "warmup_windows": self.warmup_windows,
        }


def steady_state(records: list[dict], warmup_windows: int) -> Throughput:
    """Median ``ips`` over the windows after ``warmup_windows`` (compilation, allocator and cache warm-up)."""
    rates = [record["ips"] for record in records[warmup_windows:]]
    if not rates:
        raise RunFailed(f"no window after the {warmup_windows} warm-up window(s): {len(records)} logged")
    return Throughput(statistics.median(rates), min(rates), max(rates), len(rates), warmup_windows)


def check_finite_loss(records: list[dict]) -> None:
    bad = [record["step"] for record in records if not math.isfinite(record["loss"])]
    if bad:
        raise RunFailed(f"loss not finite at logged steps {bad}")


def run_training(
    command: list[str], output: Path, log_path: Path, env: dict, timeout_s: float = 3600
) -> list[dict]:
    """Run ``command`` to the end; its train_log records, or RunFailed with the tail of its output."""
    with open(log_path, "wb") as log:
        try:
            completed = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise RunFailed(f"did not finish within {timeout_s:.0f} s") from None
    if completed.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise RunFailed(f"exit {completed.returncode}: {' | '.join(tail)}")
    records = read_train_log(output)
    check_finite_loss(records)
    return records


class GpuMemoryPeak:
    """Peak of ``nvidia-smi``'s memory.used on one GPU during the block, minus its value at entry (MiB)."""

    QUERY = ["--query-gpu=memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, index: int = 0, interval_s: float = 0.2):
        self.index, self.interval_s = index, interval_s
        self.peak_mib = 0
        self._stop = threading.Event()

    def _used(self) -> int:
        command = [shutil.which("nvidia-smi") or "nvidia-smi", "-i", str(self.index), *self.QUERY]
        return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[0])

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self._used() - self._idle)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._idle = self._used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

"""What a run reports as it trains: the console line and ``train_log.jsonl``'s record of the steps since the
previous line. :meth:`TrainLog.write` hands every record rank 0 writes to the run's
:class:`~plsc.engine.curves.CurveWriter` (the log file, and VisualDL scalars when installed)."""

from __future__ import annotations

import logging
import resource
import time

import numpy as np

from plsc.console import format_duration

log = logging.getLogger("plsc.train")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LogWindow:
    """Losses and time since the last log line, with evaluation time taken out of the throughput. The loop
    appends each step's loss to ``losses`` and adds what it spent evaluating to ``excluded``."""

    def __init__(self, start: float, first_step: int):
        self.start = start
        self.first_step = first_step
        self.losses: list[float] = []
        self.excluded = 0.0

    def elapsed(self, now: float) -> float:
        return now - self.start - self.excluded

    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


class TrainLog:
    """Rank 0's console lines and its records, written through ``curves``; other ranks write nothing."""

    def __init__(self, curves, rank: int, global_batch: int, total_steps: int):
        self.curves, self.rank = curves, rank
        self.global_batch, self.total_steps = global_batch, total_steps

    def record(self, window: LogWindow, step: int, epoch: int, lr: float, scaler, skipped_steps: int) -> dict:
        """The record of the steps since ``window`` began, up to ``step``."""
        elapsed = max(window.elapsed(time.time()), 1e-9)
        steps = step - window.first_step
        record = {
            "step": step,
            "epoch": epoch,
            "loss": window.mean_loss(),
            "lr": lr,
            "ips": steps * self.global_batch / elapsed,
            "eta_s": (self.total_steps - step) * elapsed / max(steps, 1),
            "mem_mb": peak_rss_mb(),
        }
        if scaler.enabled:
            record.update(loss_scale=scaler.scale, skipped_steps=skipped_steps)
        return record

    def write(self, record: dict, to_file: bool = True) -> None:
        """The console line of ``record`` and (``to_file``) its line in train_log.jsonl, on rank 0."""
        if self.rank != 0:
            return
        if to_file:
            self.curves.training(record)
        log.info("step %d/%d epoch %d loss %.4f lr %.5f %.1f img/s eta %s mem %.0f MB", record["step"],
                 self.total_steps, record["epoch"], record["loss"], record["lr"], record["ips"],
                 format_duration(record["eta_s"]), record["mem_mb"])

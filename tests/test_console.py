"""plsc.console: Paddle's noise kept off, and progress reports (whole commands: tests/test_readme.py)."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest

from plsc import console
from plsc.data.verification_bin import VerificationSet
from plsc.eval.verification import _pairs_completed, embed_verification_set


def test_import_keeps_other_output_of_paddle(monkeypatch, capsys):
    """Only the thread warning is dropped: whatever else the import prints still reaches stderr."""
    import builtins

    real_import = builtins.__import__
    printed = []

    def chatty_import(name, *args, **kwargs):
        if name == "paddle" and not printed:  # as Paddle: once, from its first import
            printed.append(name)
            print("WARNING: OMP_NUM_THREADS set to 2, not 1. The computation ...", file=sys.stderr)
            print("PLEASE USE OMP_NUM_THREADS WISELY.", file=sys.stderr)
            print("something else", file=sys.stderr)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", chatty_import)
    console.import_paddle_without_thread_warning()
    assert capsys.readouterr().err == "something else\n"


def test_captured_output_takes_what_cpp_code_prints(capfd):
    with console.captured_output() as said:
        os.write(1, b"to stdout\n")
        os.write(2, b"to stderr\n")
    assert said.getvalue() == "to stdout\nto stderr\n"
    assert capfd.readouterr() == ("", "")
    os.write(1, b"after\n")  # the descriptors are back
    assert capfd.readouterr().out == "after\n"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_logs_count_rate_and_eta(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="plsc")
    with console.Progress(10, "verify lfw", "pairs", interval_s=5.0) as bar:
        clock.now += 2.0
        bar.update(4)  # 2 s after the start: before the first interval, nothing
        clock.now += 6.0
        bar.update(2)  # 6 pairs in 8 s: 0.75 pairs/s, 4 left -> 5.33 s
        clock.now += 1.0
        bar.update(1)  # 1 s after the last line: nothing
        clock.now += 5.0
        bar.update(3)  # done: no line, the caller prints the result
    assert [record.getMessage() for record in caplog.records] == [
        "verify lfw: 6/10 pairs (60%), 0.8 pairs/s, eta 0:00:05"
    ]


def test_progress_disabled_says_nothing(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="plsc")
    for _ in console.progress(range(5), total=5, desc="x", unit="items", enabled=False):
        clock.now += 100.0
    assert caplog.records == []


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64, 500])
def test_pairs_completed_counts_each_pair_once_when_both_images_are_done(batch_size):
    images = 2 * 37
    done = 0
    for start in range(0, images, batch_size):
        count = min(batch_size, images - start)
        done += _pairs_completed(start, count)
        # Independent count: pairs (2i, 2i+1) with both images below the batch's end.
        assert done == sum(1 for pair in range(37) if 2 * pair + 1 < start + count)
    assert done == 37


def test_verification_reports_progress_in_pairs(monkeypatch, caplog):
    clock = FakeClock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    monkeypatch.setattr(console, "LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="plsc")
    vset = VerificationSet(np.zeros((20, 4, 4, 3), np.uint8), np.ones(10, bool), "tiny")

    def model(batch):
        clock.now += 1.0
        return np.ones((len(batch), 2), np.float32)

    embed_verification_set(model, vset, batch_size=6, data_format="NHWC", progress=True)
    # Batches end at images 6, 12, 18, 20 (two forward passes, 2 s, each): 3, 6, 9 pairs, then done.
    assert [record.getMessage().split(",")[0] for record in caplog.records] == [
        "verify tiny: 3/10 pairs (30%)", "verify tiny: 6/10 pairs (60%)", "verify tiny: 9/10 pairs (90%)"
    ]

"""What plsc prints: only its own lines on every command (Paddle's noise kept off), and progress reports."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plsc import console
from plsc.data.verification_bin import VerificationSet
from plsc.eval.verification import _pairs_completed, embed_verification_set

# plsc's own stderr lines: its log format (cli._setup_console) and its one-line errors.
OWN_STDERR_LINE = re.compile(r"^(\d\d:\d\d:\d\d (INFO|WARNING|ERROR) |plsc: )")
NOISE = ("OMP_NUM_THREADS", "TuplePop", "!!!", "UserWarning", "warnings.warn", "Paddle2ONNX", "[INFO]",
         "W1", "I1")
TINY = [  # a tiny backbone on the bundled faces: 240 images, 7 steps of 32
    "model.width=0.0625",
    "model.embedding_size=16",
    "data.image_size=32",
    "data.num_workers=0",
    "train.epochs=1",
    "train.log_interval=5",
    "train.eval_interval=0",
]


def run_plsc(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    # OMP_NUM_THREADS=2 is what plsc sets itself on this machine; Paddle warns at import whenever it is > 1.
    env = {key: value for key, value in os.environ.items() if key not in ("PLSC_DEBUG", "GLOG_minloglevel")}
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.run([sys.executable, "-m", "plsc.cli", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_only_plsc_lines(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    foreign = [line for line in result.stderr.splitlines() if not OWN_STDERR_LINE.match(line)]
    assert foreign == [], "\n".join(foreign)
    noisy = [line for line in result.stdout.splitlines() if any(word in line for word in NOISE)]
    assert noisy == [], "\n".join(noisy)


def test_every_command_prints_only_plsc_lines(tmp_path, project_root, tiny_dir):
    output = tmp_path / "run"
    overrides = [f"--set={item}" for item in [*TINY, "train.mode=static"]]
    train = run_plsc("train", "--config", "configs/cpu/mini.yaml", "--output", str(output), *overrides,
                     cwd=project_root)
    assert_only_plsc_lines(train)
    # The first line comes after step 1, not after a whole log interval; the file keeps one per interval.
    assert re.search(r"INFO step 1/7 .* img/s eta", train.stderr)
    logged = [line for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [int(re.search(r'"step": (\d+)', line).group(1)) for line in logged] == [5, 7]

    checkpoint = output / "checkpoints" / "7"
    bin_file = str(tiny_dir / "lfw_disjoint_100.bin")
    assert_only_plsc_lines(run_plsc("eval", "--checkpoint", str(checkpoint), "--bin", bin_file,
                                    cwd=project_root))
    for engine in ("paddle", "onnx"):
        exported = tmp_path / f"export-{engine}"
        assert_only_plsc_lines(run_plsc("export", "--checkpoint", str(checkpoint), "--format", engine,
                                        "--output", str(exported), cwd=project_root))
    embeddings = tmp_path / "embeddings.npy"
    assert_only_plsc_lines(run_plsc("infer", "--model", str(tmp_path / "export-paddle"), "--images",
                                    str(tiny_dir / "images"), "--output", str(embeddings), cwd=project_root))
    assert np.load(embeddings).shape == (240, 16)


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

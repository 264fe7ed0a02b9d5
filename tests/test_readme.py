"""The README's commands run as written after `make mini`, and every plsc command prints only plsc's lines.

The ``plsc`` commands of the README's ```bash blocks are extracted and run from a folder laid out like the
repository (configs/ and data/ linked), with ``plsc`` and ``.venv/bin/plsc`` on PATH meaning this Python's
plsc. The unit tier runs those that need only bundled data against a tiny stand-in for ``output/mini`` (the
README's quick start trains it in 71 s; here a narrow model, one epoch, in static mode, whose compilation is
where Paddle's noisiest output came from); training commands as written run in the cpu_slow tier.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# plsc's own stderr lines: its log format (cli._setup_console) and its one-line errors.
OWN_STDERR_LINE = re.compile(r"^(\d\d:\d\d:\d\d (INFO|WARNING|ERROR) |plsc: )")
NOISE = ("OMP_NUM_THREADS", "TuplePop", "!!!", "UserWarning", "warnings.warn", "Paddle2ONNX", "[INFO]")
# Why a README command is not run here (first match wins); training is the cpu_slow test's.
NOT_HERE = (
    ("../shared", "needs the shared material outside the repository"),
    ("MS1M_v3", "needs MS1M"),
    ("ms1m-retinaface", "needs MS1M"),
    (" bench ", "a benchmark: minutes, and it rewrites the committed bench/results"),
    ("my_faces", "needs a folder of one's own photos (tests/test_prepare.py runs these on pasted faces)"),
    (" train ", "training: the cpu_slow test runs it"),
)
TINY_RUN = ["model.width=0.0625", "model.embedding_size=16", "data.num_workers=0", "train.epochs=1",
            "train.log_interval=5", "train.mode=static"]


def readme_commands() -> list[str]:
    """Every plsc command of the README's bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("plsc", ".venv/bin/plsc"):
                commands.append(shlex.join(["plsc", *words[1:]]))
    return commands


def why_not_here(command: str) -> str | None:
    return next((reason for word, reason in NOT_HERE if word in f" {command} "), None)


def repository_like(folder: Path) -> dict[str, str]:
    """``folder`` with the repository's configs/ and data/, and the environment that puts plsc on PATH."""
    for name in ("configs", "data"):
        (folder / name).symlink_to(ROOT / name)
    for bin_dir in (folder / "bin", folder / ".venv" / "bin"):
        bin_dir.mkdir(parents=True)
        shim = bin_dir / "plsc"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m plsc.cli "$@"\n')
        shim.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key not in ("PLSC_DEBUG", "GLOG_minloglevel")}
    # What plsc sets itself on this machine (plsc/__init__.py); Paddle warns at import whenever it is > 1.
    env["OMP_NUM_THREADS"] = "2"
    env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def run_quietly(command: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    """Run ``command`` in ``folder``; it must succeed and print nothing but plsc's own lines."""
    result = subprocess.run(["sh", "-c", command], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    foreign = [line for line in result.stderr.splitlines() if not OWN_STDERR_LINE.match(line)]
    assert foreign == [], f"{command}\n" + "\n".join(foreign)
    noisy = [line for line in result.stdout.splitlines() if any(word in line for word in NOISE)]
    assert noisy == [], f"{command}\n" + "\n".join(noisy)
    return result


@pytest.fixture(scope="module")
def after_make_mini(tmp_path_factory):
    """A repository-like folder holding a tiny ``output/mini`` (static mode), and its environment."""
    folder = tmp_path_factory.mktemp("readme")
    env = repository_like(folder)
    overrides = " ".join(f"--set {item}" for item in TINY_RUN)
    command = f"plsc train --config configs/cpu/mini.yaml --output output/mini {overrides}"
    train = run_quietly(command, folder, env)
    # The first line comes after step 1, not after a whole log interval; the file keeps one per interval.
    assert re.search(r"INFO step 1/7 .* img/s eta", train.stderr)
    log = (folder / "output" / "mini" / "train_log.jsonl").read_text().splitlines()
    assert [record["step"] for record in map(json.loads, log) if "loss" in record] == [5, 7]
    return folder, env


def test_readme_commands_after_the_quick_start_use_bundled_data():
    """What the unit tier below runs is the README's sequence after the quick start, not an empty list."""
    runnable = [command for command in readme_commands() if why_not_here(command) is None]
    subcommands = [shlex.split(command)[1] for command in runnable]
    assert {"eval", "export", "infer", "convert", "capacity"} <= set(subcommands)
    assert all("output/faces_mini" not in command for command in readme_commands())


@pytest.mark.cpu_slow(reason="every README command in fresh processes (~80 s); the slow tier's run "
                              "of them with training covers it too")
def test_readme_commands_run_as_written_after_make_mini(after_make_mini):
    folder, env = after_make_mini
    for command in readme_commands():
        if why_not_here(command) is None:
            run_quietly(command, folder, env)
    # What the README says these commands leave behind.
    graph = "iresnet18.json" if paddle.__version__.startswith("3") else "iresnet18.pdmodel"
    exported = {path.name for path in (folder / "exported").iterdir()}
    assert {graph, "iresnet18.pdiparams", "export.json"} <= exported
    assert np.load(folder / "embeddings.npy").shape == (240, 16)
    assert len((folder / "embeddings.txt").read_text().splitlines()) == 240
    assert json.loads((folder / "eval.json").read_text())["lfw_disjoint_100"]["pairs"] == 100
    run_eval = json.loads((folder / "run_eval.json").read_text())["lfw_disjoint_100"]
    assert Path(run_eval["model"]) == Path("output/mini/best_model/lfw_disjoint_100")
    assert (folder / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "unpacked" / "label.txt").read_bytes().count(b"\n") == 240


@pytest.mark.cpu_slow(reason="needs make mini's trained run in a fresh copy of the repository (~35 s)")
def test_onnx_export_is_quiet(after_make_mini):
    """The README's ``# or --format onnx``: paddle2onnx's own prints stay off the console."""
    folder, env = after_make_mini
    checkpoint = "output/mini/best_model/lfw_disjoint_100"
    run_quietly(f"plsc export --checkpoint {checkpoint} --format onnx --output onnx/", folder, env)
    assert (folder / "onnx" / "iresnet18.onnx").is_file()


@pytest.mark.cpu_slow
def test_readme_commands_including_training_run_as_written(tmp_path):
    """Slow tier: `make mini`'s training, then every README command that needs only bundled data, training
    included, exactly as written (several minutes of training on 2 cores)."""
    env = repository_like(tmp_path)
    run_quietly("plsc train --config configs/cpu/mini.yaml --output output/mini", tmp_path, env)
    commands = [command for command in readme_commands()
                if why_not_here(command) in (None, "training: the cpu_slow test runs it")]
    for command in sorted(commands, key=lambda command: " train " not in command):  # training first
        run_quietly(command, tmp_path, env)


def make_mini_command() -> str:
    """The command `make mini` runs (make -n; the install step taken as done)."""
    proc = subprocess.run(["make", "-s", "-n", "-o", ".venv/.plsc-installed", "mini", "VENV=.venv"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    (command,) = proc.stdout.splitlines()
    return command


@pytest.mark.cpu_slow(reason="make mini twice in fresh processes (~30 s)")
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_mini_runs_again_replacing_its_output_but_not_a_running_one(tmp_path):
    from plsc import run_lock

    env = repository_like(tmp_path)
    tiny = " ".join(f"--set {item}" for item in [*TINY_RUN, "train.mode=dynamic", "train.max_steps=1",
                                                 "data.val_bins=[]"])
    command = f"{make_mini_command()} {tiny}"
    mini = tmp_path / "output" / "mini"
    run_quietly(command, tmp_path, env)
    first = (mini / "train_log.jsonl").read_text()
    again = run_quietly(command, tmp_path, env)
    (aside,) = mini.glob("old-*")
    moved = f"moved the previous run's checkpoints, train_log.jsonl to {aside.relative_to(tmp_path)}"
    assert moved in again.stderr
    assert (aside / "train_log.jsonl").read_text() == first
    assert (aside / "checkpoints" / "1").is_dir() and (mini / "checkpoints" / "1").is_dir()
    with run_lock.acquire(mini):  # a mini still running: the next one stops without touching it
        refused = subprocess.run(["sh", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert list(mini.glob("old-*")) == [aside]

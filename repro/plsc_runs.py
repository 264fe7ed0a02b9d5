"""Driving plsc from the harness: the ``plsc train`` command line, the environment its runs get, its log."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_command(
    config: str | Path, output: Path, overrides: dict[str, object], nproc: int | None = None
) -> list[str]:
    """``python -m plsc.cli train --config C --set k=v ... --output O [--nproc N]``: ``plsc train``."""
    command = [sys.executable, "-m", "plsc.cli", "train", "--config", str(config)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={_yaml(value)}"]
    command += ["--output", str(output)]
    return command + (["--nproc", str(nproc)] if nproc else [])


def _yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def run_environment(**extra: str) -> dict[str, str]:
    """The harness's environment for a plsc run: every core for Paddle (the test process may use one), plus
    ``extra`` (e.g. Paddle's FLAGS_*)."""
    return {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), **extra}


def read_train_log(output: Path) -> list[dict]:
    """The training records of ``<output>/train_log.jsonl`` (one per log interval, rank 0; the evaluation
    records, ``{"step", "eval"}``, are left out), [] before the first."""
    path = Path(output) / "train_log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written right now
            break
    return [record for record in records if "loss" in record]


def last_step_logged(output: Path, steps: int) -> bool:
    return any(record.get("step") == steps for record in read_train_log(output))

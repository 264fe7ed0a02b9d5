"""plsc's own accuracy claim: configs/cpu/faces_mini.yaml, trained from scratch on the CPU, reaches the
claimed verification accuracy on lfw_disjoint.bin (people who are not in the training set).

Tier cpu_slow (about 40 minutes on 2 cores); skipped when ../shared (the faces-mini data) is absent. The run
is ``plsc train`` in a subprocess; its last checkpoint is then scored by ``plsc eval --json``. The result also
keeps the run's verification curve (its log's evaluation records) and, when ../shared holds the demo photos,
how many faces of the demo's group photo ``sh scripts/demo.sh`` names right with the run's best model (the
README's demo sentence is rendered from it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plsc.checkpoint import CheckpointDir
from repro.claims import PASS, OwnAccuracyClaim, load_claims
from repro.plsc_runs import ROOT, run_environment, train_command

OWN = load_claims().own_accuracy
TRAIN_TIMEOUT_S = 4 * 3600

pytestmark = getattr(pytest.mark, OWN.tier)


@pytest.fixture
def faces_data(claim: OwnAccuracyClaim, shared_dir):
    """The claim's data folder under ../shared and its verification file, or a skip naming what is missing."""
    folder = shared_dir / claim.data
    missing = [path for path in (folder / "label.txt", folder / claim.bin) if not path.is_file()]
    if missing:
        pytest.skip(f"needs {', '.join(map(str, missing))}")
    return folder, folder / claim.bin


def run_plsc(arguments: list[str], log_path, timeout_s: float, **environment: str) -> None:
    with open(log_path, "wb") as log:
        completed = subprocess.run(
            arguments,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_environment(**environment),
            cwd=ROOT,
            timeout=timeout_s,
        )
    if completed.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        pytest.fail(f"{' '.join(arguments[:4])} ... exited {completed.returncode}: " + " | ".join(tail))


@pytest.mark.parametrize("claim", OWN.rows, ids=lambda claim: claim.id)
def test_faces_mini_reaches_the_claimed_accuracy(
    claim: OwnAccuracyClaim, faces_data, shared_dir, tmp_path, record_result
):
    folder, verification = faces_data
    output = tmp_path / "run"
    overrides = {"data.root": folder, "data.val_bins": [verification]}
    run_plsc(train_command(ROOT / claim.config, output, overrides), tmp_path / "train.log", TRAIN_TIMEOUT_S)
    checkpoint = CheckpointDir(output / "checkpoints").latest()
    scores = tmp_path / "eval.json"
    run_plsc(
        [
            sys.executable,
            "-m",
            "plsc.cli",
            "eval",
            "--checkpoint",
            str(checkpoint),
            "--bin",
            str(verification),
            "--json",
            str(scores),
        ],
        tmp_path / "eval.log",
        3600,
    )
    metrics = json.loads(scores.read_text())[verification.stem]
    details = {"checkpoint_step": int(checkpoint.name), "metrics": metrics, "data": str(folder),
               "curve": verification_curve(output, verification.stem),
               "demo": demo_score(output / "best_model" / verification.stem, shared_dir / "data" / "demo",
                                  tmp_path)}
    result = record_result(claim, {"accuracy": metrics["accuracy"]}, config=claim.config, details=details)
    assert result.verdict == PASS, result.explain()


def verification_curve(output: Path, set_name: str) -> list[list[float]]:
    """``[[step, accuracy], ...]`` of one verification set, from the run's log (its evaluation records)."""
    curve = []
    for line in (output / "train_log.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if set_name in record.get("eval", {}):
            curve.append([record["step"], record["eval"][set_name]])
    return curve


def demo_score(model: Path, demo: Path, tmp_path: Path) -> dict | None:
    """``sh scripts/demo.sh`` (its defaults: the Haar detector, the expected answers of ``query/group1.jpg``)
    with ``model``, scored: ``{"right", "faces", "threshold"}``; None without the demo photos."""
    if not (demo / "query" / "expected.json").is_file():
        return None
    score = tmp_path / "demo_score.json"
    environment = {"MODEL": str(model), "DEMO": str(demo), "INDEX": str(tmp_path / "demo_index.npz"),
                   "OUTPUT": str(tmp_path / "demo"), "SCORE": str(score), "PYTHON": sys.executable}
    run_plsc(["sh", str(ROOT / "scripts" / "demo.sh")], tmp_path / "demo.log", 1800, **environment)
    return json.loads(score.read_text())

"""int8 velocity against float16 velocity on real faces: ``configs/cpu/faces_mini.yaml`` with float16 class
centers, trained once with each velocity storage (``loss.velocity_dtype``), both final checkpoints scored on
lfw_disjoint.bin (people not in the training set). The two runs go side by side, one thread each.

    PLSC_DATA_ROOT=../shared/data .venv/bin/python benchmarks/velocity_accuracy.py \
        --json benchmarks/results/velocity_accuracy_faces_mini.json

About an hour on 2 cores. The claim (issue: int8 velocity within 0.01 of float16 velocity) is read from the
JSON: ``accuracy_difference``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/cpu/faces_mini.yaml"
RUNS = {"float16": ["loss.center_dtype=float16"],
        "int8": ["loss.center_dtype=float16", "loss.velocity_dtype=int8"]}


def plsc(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "plsc.cli", *arguments]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "output/velocity_accuracy",
                        help="folder of the two runs (each run's output and log)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--seed", type=int, default=42, help="train.seed of both runs")
    args = parser.parse_args()
    data_root = os.environ.get("PLSC_DATA_ROOT")
    if not data_root:
        sys.exit("velocity_accuracy: set PLSC_DATA_ROOT to the folder holding faces-mini")
    verification = Path(data_root) / "faces-mini/lfw_disjoint.bin"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started, processes = time.time(), {}
    for name, overrides in RUNS.items():
        output = args.work / name
        sets = [item for text in [*overrides, f"train.seed={args.seed}"] for item in ("--set", text)]
        command = plsc("train", "--config", str(CONFIG), *sets, "--output", str(output), "--overwrite")
        args.work.mkdir(parents=True, exist_ok=True)
        log = open(args.work / f"{name}.train.log", "wb")  # noqa: SIM115 (closed with the process)
        processes[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                           log, command)
    runs = {}
    for name, (process, log, command) in processes.items():
        code = process.wait()
        log.close()
        if code:
            sys.exit(f"velocity_accuracy: the {name} run exited {code}: see {args.work / name}.train.log")
        scores = args.work / f"{name}.eval.json"
        checkpoint = args.work / name / "checkpoints"
        checkpoint = checkpoint / (checkpoint / "latest").read_text().strip()
        subprocess.run(plsc("eval", "--checkpoint", str(checkpoint), "--bin", str(verification), "--json",
                            str(scores)), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        metrics = json.loads(scores.read_text())[verification.stem]
        runs[name] = {"overrides": RUNS[name], "checkpoint_step": int(checkpoint.name), "metrics": metrics,
                      "command": " ".join(command[1:])}
    import paddle

    result = {
        "config": str(CONFIG.relative_to(ROOT)), "seed": args.seed, "verification": verification.name,
        "runs": runs,
        "accuracy_difference": runs["int8"]["metrics"]["accuracy"] - runs["float16"]["metrics"]["accuracy"],
        "wall_s": time.time() - started, "threads_per_run": 1, "paddle_version": paddle.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

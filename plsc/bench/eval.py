"""``plsc bench eval``: wall time of ``plsc eval`` end to end, per embedding engine, in the same run.

Each engine's run is the whole command, ``python -m plsc.cli eval --checkpoint C --bin B --engine E``, in a
fresh process with the same OMP_NUM_THREADS: start-up, restoring the backbone, reading the .bin, building the
embedder (for Paddle Inference: ``paddle.jit.save`` of the weights and the predictor) and the flip-test
verification. The engines take turns, ``repeats`` rounds; the median per engine is reported, with the metrics
each wrote (they must agree: same weights, same function).

Without ``--checkpoint`` an untrained checkpoint of the given backbone is written to a temporary folder, with
random weights: the time does not depend on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plsc.errors import PlscError

BUNDLED_BIN = Path(__file__).resolve().parents[2] / "data" / "tiny" / "lfw_disjoint_100.bin"
ENGINES = ("dygraph", "paddle")


@dataclass(frozen=True)
class EvalBenchSpec:
    checkpoint: str | None = None
    model: str = "iresnet50"
    width: float = 1.0
    embedding_size: int = 512
    image_size: int = 112
    bin: str = str(BUNDLED_BIN)
    batch_size: int = 32
    engines: tuple[str, ...] = ENGINES
    repeats: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def check_spec(spec: EvalBenchSpec) -> None:
    unknown = [engine for engine in spec.engines if engine not in ENGINES]
    if unknown or not spec.engines:
        raise PlscError(f"--engines must name some of {', '.join(ENGINES)}, got {','.join(spec.engines)}")
    if spec.repeats < 1 or spec.threads < 1 or spec.batch_size < 1:
        raise PlscError("--repeats, --threads and --batch-size must be >= 1")
    if not Path(spec.bin).is_file():
        raise PlscError(f"verification file not found: {spec.bin}")


def write_untrained_checkpoint(directory: Path, spec: EvalBenchSpec) -> Path:
    """A plsc checkpoint of the spec's backbone with its initial (random) weights."""
    import paddle

    from plsc import checkpoint as ckpt
    from plsc.config import load_config
    from plsc.distributed import LocalComm
    from plsc.loss.margin import ARCFACE
    from plsc.loss.partial_fc import PartialFC
    from plsc.models import build_model

    config = load_config(overrides=[
        f"model.name={spec.model}", f"model.width={spec.width}",
        f"model.embedding_size={spec.embedding_size}", f"data.image_size={spec.image_size}",
    ])
    paddle.seed(0)
    model = build_model(config.model, image_size=spec.image_size)
    return ckpt.save_checkpoint(
        directory, comm=LocalComm(), state=ckpt.TrainingState(), config=config.to_dict(), model=model,
        optimizer=None, head=PartialFC(num_classes=1, embedding_size=spec.embedding_size, margin=ARCFACE),
    )


def time_eval(checkpoint: Path, spec: EvalBenchSpec, engine: str, json_out: Path) -> tuple[float, dict]:
    """(wall seconds, metrics) of one ``plsc eval`` process."""
    command = [sys.executable, "-m", "plsc.cli", "eval", "--checkpoint", str(checkpoint), "--bin", spec.bin,
               "--batch-size", str(spec.batch_size), "--engine", engine, "--json", str(json_out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise PlscError(f"plsc eval --engine {engine} failed ({proc.returncode}): "
                        f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return seconds, next(iter(json.loads(json_out.read_text()).values()))


def time_engine_build(checkpoint: Path, spec: EvalBenchSpec) -> dict:
    """Seconds to build the Paddle Inference embedder from a restored model, as the trainer does at each
    evaluation: the twin (a model built and given the weights), then jit.save + predictor; a fresh process."""
    from plsc.bench import measure_in_fresh_process

    return measure_in_fresh_process("plsc.bench.eval", {"checkpoint": str(checkpoint)}, spec.threads)


def measure_engine_build(spec_json: str) -> dict:
    import paddle  # noqa: F401  (imported before the clock starts)

    from plsc.checkpoint.restore import restore_backbone
    from plsc.eval.embedders import InferenceEmbedder, snapshot_twin

    model, config = restore_backbone(json.loads(spec_json)["checkpoint"])
    started = time.perf_counter()
    snapshot_twin(model, config.model, config.data.image_size)
    twin_s = time.perf_counter() - started
    started = time.perf_counter()
    InferenceEmbedder(model, config.model, config.data.image_size)
    total_s = time.perf_counter() - started
    return {"twin_s": twin_s, "twin_save_and_predictor_s": total_s,
            "save_and_predictor_s": max(0.0, total_s - twin_s)}


def bench_eval(spec: EvalBenchSpec) -> dict:
    check_spec(spec)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {engine: [] for engine in spec.engines}
    metrics: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="plsc-bench-eval-") as scratch:
        scratch = Path(scratch)
        checkpoint = Path(spec.checkpoint or write_untrained_checkpoint(scratch / "ck", spec))
        for _ in range(spec.repeats):
            for engine in spec.engines:
                seconds, metrics[engine] = time_eval(checkpoint, spec, engine, scratch / f"{engine}.json")
                times[engine].append(seconds)
        rebuild = time_engine_build(checkpoint, spec) if "paddle" in spec.engines else None
    medians = {engine: float(np.median(values)) for engine, values in times.items()}
    result = {
        "setting": {
            "checkpoint": spec.checkpoint or f"untrained {spec.model} x{spec.width:g}",
            "model": spec.model, "width": spec.width, "embedding_size": spec.embedding_size,
            "image_size": spec.image_size, "bin": Path(spec.bin).name,
            "pairs": metrics[spec.engines[0]]["pairs"],
            "batch_size": spec.batch_size, "threads": spec.threads, "repeats": spec.repeats,
        },
        "wall_s": medians, "wall_s_all": times, "metrics": metrics,
        "method": "wall time of `python -m plsc.cli eval ... --engine E` per engine, fresh processes taking "
                  f"turns, OMP_NUM_THREADS={spec.threads}, median of {spec.repeats}",
        "paddle_version": _paddle_version(), "python": sys.version.split()[0],
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
    }
    if rebuild is not None:
        result["engine_build_s"] = rebuild  # what training pays at each evaluation on the CPU
    if set(ENGINES) <= set(medians):
        result["speedup"] = medians["dygraph"] / medians["paddle"]
        result["accuracy_difference"] = abs(metrics["dygraph"]["accuracy"] - metrics["paddle"]["accuracy"])
    return result


def _paddle_version() -> str:
    import paddle

    return paddle.__version__


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m plsc.bench.eval SPEC_JSON``; prints one JSON line."""
    from plsc.bench import child_main

    return child_main(measure_engine_build, argv)


def table(result: dict) -> str:
    from tabulate import tabulate

    setting = result["setting"]
    rows = [["setting", f"{setting['checkpoint']}, {setting['image_size']} px, {setting['bin']} "
                        f"({setting['pairs']} pairs), batch {setting['batch_size']}, "
                        f"{setting['threads']} threads"]]
    for engine, seconds in result["wall_s"].items():
        rows.append([f"plsc eval --engine {engine}",
                     f"{seconds:.1f} s (accuracy {result['metrics'][engine]['accuracy']:.4f})"])
    if "speedup" in result:
        rows.append(["speed-up", f"{result['speedup']:.2f}x"])
    if "engine_build_s" in result:
        build = result["engine_build_s"]
        rows.append(["engine build (each evaluation in training)",
                     f"{build['twin_save_and_predictor_s']:.1f} s (twin {build['twin_s']:.1f} s)"])
    return tabulate(rows, tablefmt="simple")


if __name__ == "__main__":
    sys.exit(main())

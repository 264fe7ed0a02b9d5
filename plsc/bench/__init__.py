"""Performance benchmarks (``plsc bench head|data|train|verify|eval``), one module each.

head, data and train measure in fresh subprocesses (``measure_in_fresh_process``: the thread count is set
before Paddle is imported); verify is numpy only and runs in this process; eval times whole ``plsc eval``
processes. ``python -m benchmarks.report`` (repository tooling, outside the package) renders their JSON into
docs/performance.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from plsc import strict_json
from plsc.atomic import write_atomic, writing
from plsc.config import finite_float
from plsc.errors import PlscError


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="performance benchmarks")
    kinds = p.add_subparsers(dest="bench", required=True)
    head = kinds.add_parser(
        "head", help="the classifier head's step against the bare matmul floor, plus memory per class",
        description="Times the whole PartialFC step of one rank and the three matmuls it cannot avoid, "
                    "on the same shapes in the same process; measures class-center bytes and peak RSS "
                    "per class.",
    )
    head.add_argument("--classes", type=int, required=True, help="global class count C")
    head.add_argument("--ratio", type=finite_float, default=0.1, help="sample ratio (of the rank's classes)")
    head.add_argument("--batch", type=int, default=128, help="batch per rank; a rank sees world-size x batch")
    head.add_argument("--emb", type=int, default=512, help="embedding size")
    head.add_argument("--world-size", type=int, default=1,
                      help="simulate rank 0 of this many ranks: C / n classes, global batch n x batch, "
                           "collectives not timed")
    head.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="class-center storage")
    head.add_argument("--momentum-mode", choices=["lazy", "dense"], default="lazy")
    head.add_argument("--chunk-size", type=int, default=0, metavar="N",
                      help="the streaming head, N sampled centers per chunk (loss.chunk_size); 0: none")
    head.add_argument("--velocity-dtype", choices=["same", "int8"], default="same",
                      help="velocity storage (loss.velocity_dtype): as the centers, or int8 codes with a "
                           "scale per row")
    head.add_argument("--separate-update", action="store_true",
                      help="the center update after the backward, as training with loss scaling")
    head.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    head.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    head.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the run")
    head.add_argument("--malloc", choices=["hugepages", "default", "keep"], default="hugepages",
                      help="glibc malloc settings of the measuring processes: hugepages is the plsc "
                           "command's own (see plsc.malloc and plsc.bench.head)")
    head.add_argument("--rss-classes", default=None, metavar="LOW,HIGH",
                      help="class counts of the two peak-RSS probes (default: C/2,C)")
    head.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes")
    head.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    head.set_defaults(run=run_head_command)
    _add_data(kinds)
    _add_train(kinds)
    _add_verify(kinds)
    _add_eval(kinds)


def _add_data(kinds) -> None:
    data = kinds.add_parser(
        "data", help="images/s of the training loader (decode, augment, batching) beside raw decoding",
        description="Times plsc's training loader (build_dataset + build_train_loader) with k workers "
                    "and, in the same run, cv2.imdecode of the same encoded images in one process; "
                    "reports pipeline / (raw x workers).",
    )
    data.add_argument("--source", required=True, metavar="{folder,rec}",
                      help="folder: label.txt + images/; rec: train.rec/.idx (a folder root is converted "
                           "first)")
    data.add_argument("--workers", type=int, required=True,
                      help="loader worker processes (0: the main process decodes)")
    data.add_argument("--root", default=None, help="data folder (default: the bundled data/tiny)")
    data.add_argument("--batches", type=int, default=None, help="timed batches (default 150)")
    data.add_argument("--warmup", type=int, default=3, help="untimed batches first, in each round")
    data.add_argument("--rounds", type=int, default=3, help="raw decode + pipeline measurements (median)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--image-size", type=int, default=112,
                      help="training image size (images are resized when it differs)")
    data.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the run")
    data.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    data.set_defaults(run=run_data_command)


def _add_train(kinds) -> None:
    train = kinds.add_parser(
        "train", help="steady-state images/s of the Trainer and its step time per phase",
        description="Runs the Trainer's step on the config's data and model (no evaluation, no checkpoints) "
                    "and splits each step into data wait, backbone, head and optimizer time.",
    )
    train.add_argument("--config", required=True, help="YAML config file (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value; repeatable")
    train.add_argument("--steps", type=int, default=20, help="timed steps")
    train.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    train.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP_NUM_THREADS of the run")
    train.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    train.set_defaults(run=run_train_command)


def _add_verify(kinds) -> None:
    verify = kinds.add_parser(
        "verify", help="time of the 10-fold verification protocol on random pairs",
        description="Times plsc.eval.verification.evaluate (10 folds, 400 thresholds) on random pairs of "
                    "unit embeddings; the median of several repeats.",
    )
    verify.add_argument("--pairs", type=int, default=6000)
    verify.add_argument("--dim", type=int, default=512, help="embedding size")
    verify.add_argument("--repeats", type=int, default=7, help="timed repeats (the median is reported)")
    verify.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    verify.set_defaults(run=run_verify_command)


def _add_eval(kinds) -> None:
    evaluate = kinds.add_parser(
        "eval", help="wall time of plsc eval end to end, Paddle Inference against dygraph",
        description="Runs plsc eval (a fresh process each) once per engine and repeat on the same checkpoint "
                    "and .bin; reports the median wall time per engine and the metrics each wrote.",
    )
    evaluate.add_argument("--checkpoint", default=None,
                          help="a checkpoint to evaluate (default: an untrained one of --model, --width)")
    evaluate.add_argument("--model", default="iresnet50", help="backbone of the untrained checkpoint")
    evaluate.add_argument("--width", type=finite_float, default=1.0, help="its width multiplier")
    evaluate.add_argument("--image-size", type=int, default=112, help="its input size")
    evaluate.add_argument("--bin", default=None,
                          help="verification .bin (default: data/tiny/lfw_disjoint_100.bin)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--engines", default="dygraph,paddle", help="comma-separated: dygraph, paddle")
    evaluate.add_argument("--repeats", type=int, default=1, help="rounds (the median is reported)")
    evaluate.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                          help="OMP_NUM_THREADS of the runs")
    evaluate.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    evaluate.set_defaults(run=run_eval_command)


def rss_classes_of(args) -> tuple[int, int] | None:
    if args.no_rss:
        return None
    if args.rss_classes is None:
        return args.classes // 2, args.classes
    try:
        low, high = (int(v) for v in args.rss_classes.split(","))
    except ValueError:
        raise PlscError(f"--rss-classes wants two integers LOW,HIGH, got {args.rss_classes!r}") from None
    if not 0 < low < high:
        raise PlscError(f"--rss-classes needs 0 < LOW < HIGH, got {low},{high}")
    return low, high


def spec_from_args(args):
    from plsc.bench.head import HeadBenchSpec

    if args.classes < args.world_size or args.world_size < 1:
        raise PlscError(f"--classes {args.classes} cannot be sharded over --world-size {args.world_size}")
    if not 0 < args.ratio <= 1:
        raise PlscError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.chunk_size < 0:
        raise PlscError(f"--chunk-size must be >= 0 (0: the whole-matrix head), got {args.chunk_size}")
    return HeadBenchSpec(
        classes=args.classes, ratio=args.ratio, batch=args.batch, emb=args.emb, world_size=args.world_size,
        precision=args.precision, steps=args.steps, warmup=args.warmup, threads=args.threads,
        momentum_mode=args.momentum_mode, malloc=args.malloc, chunk_size=args.chunk_size,
        velocity_dtype=args.velocity_dtype, update_in_backward=not args.separate_update,
    )


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, strict_json.dumps(result, indent=1) + "\n")
    print(f"results: {path}")


def show(result: dict, table, json_path: str | None) -> int:
    """Print ``table(result)``, write the JSON when asked; the exit code of a bench command."""
    print(table(result))
    if json_path:
        write_json(json_path, result)
    return 0


def run_head_command(args) -> int:
    from plsc.bench.head import bench_head, table

    return show(bench_head(spec_from_args(args), rss_classes_of(args)), table, args.json)


def run_data_command(args) -> int:
    from plsc.bench.data import BUNDLED_ROOT, DataBenchSpec, bench_data, table

    spec = DataBenchSpec(
        source=args.source, root=args.root or str(BUNDLED_ROOT), workers=args.workers,
        batches=DataBenchSpec.batches if args.batches is None else args.batches,
        warmup=args.warmup, rounds=args.rounds, batch_size=args.batch_size, image_size=args.image_size,
        threads=args.threads,
    )
    return show(bench_data(spec), table, args.json)


def run_train_command(args) -> int:
    from plsc.bench.train import TrainBenchSpec, bench_train, table

    spec = TrainBenchSpec(config=args.config, overrides=tuple(args.overrides), steps=args.steps,
                          warmup=args.warmup, threads=args.threads)
    return show(bench_train(spec), table, args.json)


def run_verify_command(args) -> int:
    from plsc.bench.verify import VerifyBenchSpec, bench_verify, table

    spec = VerifyBenchSpec(pairs=args.pairs, dim=args.dim, repeats=args.repeats)
    return show(bench_verify(spec), table, args.json)


def run_eval_command(args) -> int:
    from plsc.bench.eval import BUNDLED_BIN, EvalBenchSpec, bench_eval, table

    spec = EvalBenchSpec(
        checkpoint=args.checkpoint, model=args.model, width=args.width, image_size=args.image_size,
        bin=args.bin or str(BUNDLED_BIN), batch_size=args.batch_size,
        engines=tuple(engine.strip() for engine in args.engines.split(",") if engine.strip()),
        repeats=args.repeats, threads=args.threads,
    )
    return show(bench_eval(spec), table, args.json)


# --- fresh measuring processes (plsc.bench.data and plsc.bench.train) ---------------------------------------

ERROR_PREFIX = "plsc: error: "


def measure_in_fresh_process(module: str, spec: dict, threads: int) -> dict:
    """``python -m module SPEC_JSON`` with OMP_NUM_THREADS=threads set before Paddle is imported, and the
    malloc settings the ``plsc`` command runs with (plsc.malloc) unless GLIBC_TUNABLES is set already; its
    last stdout line is the result. A PlscError in the child comes back as one (its one line)."""
    from plsc.malloc import MALLOC_SETTINGS

    env = {"GLIBC_TUNABLES": MALLOC_SETTINGS, **os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", module, strict_json.dumps(spec)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == 2 and lines and lines[-1].startswith(ERROR_PREFIX):
        raise PlscError(lines[-1][len(ERROR_PREFIX):])
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(measure, argv: list[str] | None = None) -> int:
    """Entry of a measuring process: ``measure(SPEC_JSON)`` printed as one JSON line; a PlscError as one
    ``plsc: error:`` line on stderr and exit code 2 (measure_in_fresh_process turns it back into one)."""
    import warnings

    import plsc  # noqa: F401  (sets OMP_NUM_THREADS before Paddle is imported, should it be unset)

    warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"{ERROR_PREFIX}expected one argument, the spec as JSON", file=sys.stderr)
        return 2
    try:
        result = measure(argv[0])
    except PlscError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return 2
    print(strict_json.dumps(result))
    return 0

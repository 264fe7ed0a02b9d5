"""Performance benchmarks (``plsc bench ...``); each measures in fresh subprocesses, see its module."""

from __future__ import annotations

import os
from pathlib import Path

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
    head.add_argument("--ratio", type=float, default=0.1, help="sample ratio (of the rank's classes)")
    head.add_argument("--batch", type=int, default=128, help="batch per rank; a rank sees world-size x batch")
    head.add_argument("--emb", type=int, default=512, help="embedding size")
    head.add_argument("--world-size", type=int, default=1,
                      help="simulate rank 0 of this many ranks: C / n classes, global batch n x batch, "
                           "collectives not timed")
    head.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="class-center storage")
    head.add_argument("--momentum-mode", choices=["lazy", "dense"], default="lazy")
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
    return HeadBenchSpec(
        classes=args.classes, ratio=args.ratio, batch=args.batch, emb=args.emb, world_size=args.world_size,
        precision=args.precision, steps=args.steps, warmup=args.warmup, threads=args.threads,
        momentum_mode=args.momentum_mode, malloc=args.malloc,
    )


def write_json(path: str | Path, result: dict) -> None:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {path}")


def run_head_command(args) -> int:
    from plsc.bench.head import bench_head, table

    result = bench_head(spec_from_args(args), rss_classes_of(args))
    print(table(result))
    if args.json:
        write_json(args.json, result)
    return 0

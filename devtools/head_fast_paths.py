"""The whole-matrix head's step with the CPU fast paths of :mod:`plsc.loss.row_backend` against their
references, side by side.

Alternates, step by step in one process, the step as plsc runs it (row norms and the margin softmax's
[batch, k] passes by numpy, the centers' gradient by a matmul into a kept buffer and a compiled pass, the
sparse momentum compiled in place) and the same step on the references (Paddle's ops; the update's walk of
gathers, Paddle's momentum kernel and scatters); each step is followed by its matmul floor, as ``plsc bench
head`` times it, with plsc's malloc settings (:mod:`plsc.malloc`). Prints one JSON line: per variant the
median step, floor, step / floor and the median of the paired ratios, and the phases. A measurement aid,
never part of the product. Run it through ``devtools/mkl_avx512.py`` to measure MKL's AVX-512 kernels on a
non-Intel CPU.

    OMP_NUM_THREADS=2 python -m devtools.head_fast_paths [--pairs 30] [--classes 1000000] [--ratio 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str]) -> int:
    from plsc.malloc import reexec_with_huge_pages

    reexec_with_huge_pages("devtools.head_fast_paths", argv)  # returns once GLIBC_TUNABLES is set
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--ratio", type=float, default=0.1)
    args = parser.parse_args(argv)

    import contextlib

    import paddle

    from plsc.bench.head import HeadBenchSpec, PhaseClock, build_head, head_step, make_batch, matmul_floor
    from plsc.loss import margin, row_backend

    def plain_matmul(out, x, y, transpose_x=False):
        return paddle.matmul(x, y, transpose_x=transpose_x)

    # (the code paths numpy and numba take or leave, the matmul of the centers' gradient: not guarded by them)
    variants = {"fast": (contextlib.nullcontext, row_backend.matmul_into),
                "reference": (row_backend.device_code_paths, plain_matmul)}
    spec = HeadBenchSpec(classes=args.classes, ratio=args.ratio, batch=128, emb=512)
    head = build_head(spec)
    rng = np.random.default_rng(spec.seed)
    timings: dict[str, list] = {name: [] for name in variants}
    warmup = 2
    for step in range(warmup + 2 * args.pairs):
        name = list(variants)[step % 2]
        code_paths, margin.matmul_into = variants[name]
        embeddings, labels = make_batch(spec, rng)
        clock = PhaseClock()
        with code_paths():
            rows = head_step(head, embeddings, labels, step, clock)
        grad_logits = paddle.randn([spec.global_batch, rows.shape[0]])
        floor, _ = matmul_floor(embeddings.detach(), rows.detach(), grad_logits)
        if step >= warmup:
            timings[name].append((sum(clock.wall.values()), floor, clock.wall))
    print(json.dumps({name: summary(runs) for name, runs in timings.items()}))
    return 0


def summary(runs: list) -> dict:
    steps, floors = [run[0] for run in runs], [run[1] for run in runs]
    return {"step_ms": round(float(np.median(steps)) * 1000, 1),
            "floor_ms": round(float(np.median(floors)) * 1000, 1),
            "ratio": round(float(np.median(steps) / np.median(floors)), 3),
            "ratio_paired": round(float(np.median([s / f for s, f in zip(steps, floors, strict=True)])), 3),
            "phases_ms": {phase: round(float(np.median([run[2][phase] for run in runs])) * 1000, 1)
                          for phase in runs[0][2]}}


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

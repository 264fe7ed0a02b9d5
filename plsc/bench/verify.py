"""``plsc bench verify``: time of the 10-fold verification protocol (plsc.eval.verification.evaluate).

The input is ``pairs`` random pairs of unit ``dim``-d embeddings, half of them "same" pairs whose second
embedding is the first plus noise, so the threshold search has a real optimum. ``evaluate`` (10 folds, 400
thresholds, plus TAR@FAR) is timed ``repeats`` times on the same input; the median is reported. It is numpy
only (no Paddle), so it runs in this process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from plsc.errors import PlscError

TARGET_S = 2.0
SAME_PAIR_NOISE = 16.0  # noise norm per unit of signal: same-pair cosine ~0.06 against ~0 +- 0.04 (512-d)


@dataclass(frozen=True)
class VerifyBenchSpec:
    pairs: int = 6000
    dim: int = 512
    repeats: int = 7
    seed: int = 0


def check_spec(spec: VerifyBenchSpec) -> None:
    if spec.pairs < 10:
        raise PlscError(f"--pairs must be >= 10 (one pair per fold at least), got {spec.pairs}")
    if spec.dim < 1 or spec.repeats < 1:
        raise PlscError(f"--dim and --repeats must be >= 1, got {spec.dim} and {spec.repeats}")


def random_pairs(pairs: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 unit embeddings [2 x pairs, dim], bool issame [pairs]); rows 2i and 2i+1 form pair i."""
    from plsc.eval.verification import l2_normalize

    rng = np.random.default_rng(seed)
    issame = rng.random(pairs) < 0.5
    first = l2_normalize(rng.standard_normal((pairs, dim), dtype=np.float32))
    noise = l2_normalize(rng.standard_normal((pairs, dim), dtype=np.float32)) * np.float32(SAME_PAIR_NOISE)
    unrelated = l2_normalize(rng.standard_normal((pairs, dim), dtype=np.float32))
    second = np.where(issame[:, None], l2_normalize(first + noise), unrelated)
    embeddings = np.empty((2 * pairs, dim), dtype=np.float32)
    embeddings[0::2], embeddings[1::2] = first, second
    return embeddings, issame


def bench_verify(spec: VerifyBenchSpec) -> dict:
    from plsc.eval.verification import THRESHOLDS, evaluate

    check_spec(spec)
    embeddings, issame = random_pairs(spec.pairs, spec.dim, spec.seed)
    times = []
    for _ in range(spec.repeats):
        started = time.perf_counter()
        metrics = evaluate(embeddings, issame)
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return {
        "pairs": spec.pairs, "dim": spec.dim, "folds": 10, "thresholds": len(THRESHOLDS),
        "repeats": spec.repeats, "seed": spec.seed,
        "evaluate_s": median, "evaluate_s_all": times,
        "target_s": TARGET_S, "meets_target": median < TARGET_S,
        "metrics": metrics,
        "method": f"median wall time of plsc.eval.verification.evaluate over {spec.repeats} calls on the "
                  f"same {spec.pairs} random pairs of unit {spec.dim}-d float32 embeddings, in-process "
                  "(numpy only)",
        "numpy_version": np.__version__, "python": sys.version.split()[0],
    }


def table(result: dict) -> str:
    from tabulate import tabulate

    rows = [
        ["input", f"{result['pairs']:,} pairs of {result['dim']}-d embeddings, {result['folds']} folds, "
                  f"{result['thresholds']} thresholds"],
        ["evaluate (median)", f"{result['evaluate_s']:.4f} s (target < {result['target_s']:g} s)"],
        ["accuracy on the random pairs", f"{result['metrics']['accuracy']:.4f}"],
    ]
    return tabulate(rows, tablefmt="simple")

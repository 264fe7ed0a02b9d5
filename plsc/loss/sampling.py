"""Which class centers a rank uses in a step: every positive class of the global batch that it owns, plus
uniformly random negatives (without replacement) up to :func:`num_sampled`; deterministic given
(seed, step, rank). :class:`plsc.loss.partial_fc.PartialFC` gathers the chosen rows.
"""

from __future__ import annotations

import math

import numpy as np


def num_sampled(num_local: int, ratio: float) -> int:
    """Centers a rank samples (more when its positives outnumber them: all of those are kept, as Paddle's
    class_center_sample does). ``ratio * num_local`` rounded down, as PLSC v2.2
    (dynamic/classifiers/lsc.py:56, static/classifiers/lsc.py:56) and arcface_torch (partial_fc_v2.py:66)
    round it; at least 1, since
    Paddle's sparse_momentum refuses an empty index (sparse_momentum_op.h) and a rank without a center
    would add nothing to the softmax."""
    return max(1, min(num_local, math.floor(ratio * num_local)))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of integers by sort and compare: numpy 2's hash-based unique is ~5x slower here."""
    values = np.sort(values)
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def distinct_uniform(rng: np.random.Generator, population: int, count: int) -> np.ndarray:
    """``count`` distinct integers drawn uniformly from ``[0, population)``, sorted, in O(count log count).

    numpy's ``Generator.choice(replace=False)`` allocates and shuffles ``arange(population)`` whenever
    ``count > population / 50``: O(num_classes) per step. Here: i.i.d. draws until at least ``count``
    distinct values exist, then a uniformly chosen few of them dropped to leave ``count``. Why this is
    uniform over all ``count``-subsets: how many values are drawn depends only on how many distinct ones came
    up, so the distinct set's law is unchanged by any relabelling of the population; dropping a uniform
    subset of it keeps that symmetry, and a symmetric law on ``count``-subsets is the uniform one.
    When ``count`` is a large share of the population, repeats pile up and a permutation is cheaper.
    """
    if 2 * count > population:
        return np.sort(rng.permutation(population)[:count])
    # Draws that give ``count`` distinct values on average, -N log(1 - count/N), plus a few standard
    # deviations, so that one round nearly always suffices and few values are dropped.
    expected = -population * math.log1p(-count / population)
    values = sorted_unique(rng.integers(0, population, size=int(expected + 4 * math.sqrt(count) + 16)))
    while len(values) < count:
        more = rng.integers(0, population, size=2 * (count - len(values)) + 16)
        values = sorted_unique(np.concatenate([values, more]))
    # The drop is O(len(values)) = O(count) at worst (numpy may permute them), never O(population).
    return np.delete(values, rng.choice(len(values), size=len(values) - count, replace=False))


def sample_centers(
    local_labels: np.ndarray, num_local: int, ratio: float, seed: int, step: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Choose this step's class centers on one rank.

    ``local_labels``: [batch] label minus the shard start, any value outside ``[0, num_local)`` meaning "not
    mine". Returns ``(index, remapped)``: the sorted local row ids to use, and each sample's column in that
    index (-1 when the class is not on this rank). Deterministic given (seed, step, rank).
    """
    mine = (local_labels >= 0) & (local_labels < num_local)
    positives = sorted_unique(local_labels[mine])
    wanted = num_sampled(num_local, ratio)
    if wanted >= num_local:
        index = np.arange(num_local, dtype=np.int64)
    elif len(positives) >= wanted:
        index = positives.astype(np.int64)
    else:
        rng = np.random.default_rng([seed, step, rank])
        # Draw from the num_local - P non-positive ids, numbered 0..; map the k-th of them to its class id by
        # skipping the positives below it (positives[i] - i counts the non-positives before positive i).
        drawn = distinct_uniform(rng, num_local - len(positives), wanted - len(positives))
        negatives = drawn + np.searchsorted(positives - np.arange(len(positives)), drawn, side="right")
        # Two disjoint sorted runs: a stable sort (timsort for integers) merges them in one pass.
        index = np.sort(np.concatenate([positives, negatives]).astype(np.int64), kind="stable")
    remapped = np.full(local_labels.shape, -1, dtype=np.int64)
    remapped[mine] = np.searchsorted(index, local_labels[mine])
    return index, remapped

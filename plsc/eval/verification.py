"""Face verification accuracy with insightface's 10-fold protocol (the lfw / cfp_fp / agedb_30 numbers).

Protocol (as insightface's ``verification.py``, so numbers are comparable with published tables):

- each image is embedded twice, as is and mirrored; the two raw embeddings are summed and L2-normalised
  (:func:`combine_flip`);
- a pair's distance is the squared L2 distance of its two normalised embeddings (0..4);
- the pairs are cut into ``nfolds`` contiguous folds (sklearn ``KFold(shuffle=False)``: the first
  ``P % nfolds`` folds get one extra pair); for each fold the threshold from ``np.arange(0, 4, 0.01)`` with
  the best accuracy on the other folds (first maximum) is applied to the held-out fold, predicting "same" when
  ``distance < threshold`` (strictly: a distance equal to the threshold counts as "different");
- accuracy is the mean of the held-out accuracies, std their population std.

TAR@FAR (``tar_at_far_1e-3``), defined here exactly (no threshold grid, no interpolation): for each fold,
the threshold is the largest ``t`` whose false accept rate on the training folds, ``#{different pairs with
distance < t} / #{different pairs}``, is <= the target. With ``N`` different training pairs sorted by
distance ``d(0) <= d(1) <= ...`` that is ``t = d(k)`` with ``k = floor(target * N)`` (``t = inf`` when
``k >= N``). The result is the mean over folds of the true accept rate ``#{same pairs with distance < t} /
#{same pairs}`` on the held-out fold (folds without same pairs are skipped). insightface's ``val@far``
follows the same per-fold scheme but scans a 0.001 grid and interpolates the threshold, so its figure can
differ slightly from ours. On a 6000-pair set (5400 training different pairs) FAR 1e-3 allows 5 false accepts.

Paddle is deliberately absent: the model arrives as a plain callable on numpy batches.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from plsc.console import Progress
from plsc.data.verification_bin import VerificationSet
from plsc.errors import PlscError
from plsc.finite import non_finite_count

THRESHOLDS = np.arange(0, 4, 0.01)
FAR_TARGET = 1e-3
DATA_FORMATS = ("NCHW", "NHWC")

ModelFn = Callable[[np.ndarray], np.ndarray]


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32 stays float32); all-zero rows stay zero instead of becoming NaN."""
    embeddings = _as_float(embeddings)
    return embeddings / np.maximum(_row_norms(embeddings), 1e-12)[:, None].astype(embeddings.dtype)


def combine_flip(emb: np.ndarray, emb_flipped: np.ndarray) -> np.ndarray:
    """Sum the raw embeddings of each image and its mirror, then L2-normalise (insightface's flip test)."""
    emb, emb_flipped = _as_float(emb), _as_float(emb_flipped)
    if emb.shape != emb_flipped.shape:
        raise PlscError(f"embedding shapes differ: {emb.shape} vs flipped {emb_flipped.shape}")
    return l2_normalize(emb + emb_flipped)


def xnorm(raw_embeddings: np.ndarray) -> float:
    """Mean L2 norm of the raw (unnormalised) embeddings: a health signal for margin-softmax training."""
    return float(_row_norms(_as_float(raw_embeddings)).mean())


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance between rows 2i and 2i+1, accumulated in float64."""
    embeddings = _as_float(embeddings)
    diff = embeddings[0::2] - embeddings[1::2]
    return np.einsum("ij,ij->i", diff, diff, dtype=np.float64)


def _as_float(array) -> np.ndarray:
    # Keep float32 as float32: wide embeddings (raw pixels are 37,632-d) would double in memory as float64.
    array = np.asarray(array)
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float64)


def _row_norms(array: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", array, array, dtype=np.float64))


def fold_bounds(count: int, nfolds: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) folds as sklearn KFold(shuffle=False): the first ``count % nfolds`` get +1."""
    sizes = np.full(nfolds, count // nfolds)
    sizes[: count % nfolds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops, strict=True)]


def evaluate(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> dict:
    """insightface 10-fold verification on combined, L2-normalised embeddings [2P, d] (see the module doc)."""
    issame = _check_inputs(embeddings, issame, nfolds)
    dist = pair_distances(embeddings)
    folds = fold_bounds(len(issame), nfolds)
    accuracies, thresholds = _kfold_accuracy(dist, issame, folds)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "threshold": float(np.mean(thresholds)),
        "tar_at_far_1e-3": tar_at_far(dist, issame, folds, FAR_TARGET),
        "pairs": int(len(issame)),
    }


def _check_inputs(embeddings: np.ndarray, issame: np.ndarray, nfolds: int) -> np.ndarray:
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    shape = np.shape(embeddings)
    if len(shape) != 2 or shape[0] != 2 * len(issame):
        raise PlscError(f"embeddings must be [2 x {len(issame)} pairs, dim], got shape {shape}")
    if nfolds < 2 or len(issame) < nfolds:
        raise PlscError(f"cannot split {len(issame)} pairs into {nfolds} folds (need 2 <= folds <= pairs)")
    bad = non_finite_count(embeddings)
    if bad:  # nan distances compare false with every threshold: accuracy 0.5, not an error, without this
        raise PlscError(f"the model gives nan or inf embeddings ({bad} values of {np.size(embeddings)}): its "
                        "weights or inputs hold non-finite numbers")
    return issame


def _counts_below(dist: np.ndarray, issame: np.ndarray, folds, thresholds: np.ndarray):
    """Per fold and threshold: how many same / different pairs have ``distance < threshold`` ([folds, T])."""
    same_below = np.empty((len(folds), len(thresholds)), dtype=np.int64)
    diff_below = np.empty_like(same_below)
    for index, (start, stop) in enumerate(folds):
        fold_dist, fold_same = dist[start:stop], issame[start:stop]
        # searchsorted(side='left') counts values strictly below each threshold: the protocol's strict '<'.
        same_below[index] = np.searchsorted(np.sort(fold_dist[fold_same]), thresholds, side="left")
        diff_below[index] = np.searchsorted(np.sort(fold_dist[~fold_same]), thresholds, side="left")
    return same_below, diff_below


def _kfold_accuracy(dist: np.ndarray, issame: np.ndarray, folds) -> tuple[np.ndarray, np.ndarray]:
    same_below, diff_below = _counts_below(dist, issame, folds, THRESHOLDS)
    same_total = np.array([issame[start:stop].sum() for start, stop in folds])
    diff_total = np.array([stop - start for start, stop in folds]) - same_total
    # Correct = same pairs accepted + different pairs rejected; training counts are everything minus the fold.
    correct_in_fold = same_below + (diff_total[:, None] - diff_below)
    correct_in_train = correct_in_fold.sum(axis=0, keepdims=True) - correct_in_fold
    # Integer counts over a fixed training size rank thresholds exactly as accuracies do; argmax takes the
    # first maximum, as insightface does.
    best = np.argmax(correct_in_train, axis=1)
    fold_sizes = same_total + diff_total
    accuracies = correct_in_fold[np.arange(len(folds)), best] / fold_sizes
    return accuracies, THRESHOLDS[best]


def tar_at_far(dist: np.ndarray, issame: np.ndarray, folds, far_target: float = FAR_TARGET) -> float:
    """Mean held-out TAR at the largest training threshold with FAR <= ``far_target`` (see the module doc).

    ``dist``: pair distances [P]; ``folds``: [start, stop) pairs as from :func:`fold_bounds`.
    """
    rates = []
    for start, stop in folds:
        in_train = np.ones(len(dist), dtype=bool)
        in_train[start:stop] = False
        threshold = _largest_threshold_within_far(dist[in_train & ~issame], far_target)
        held_out_same = dist[start:stop][issame[start:stop]]
        if held_out_same.size:
            rates.append(np.count_nonzero(held_out_same < threshold) / held_out_same.size)
    return float(np.mean(rates)) if rates else float("nan")


def _largest_threshold_within_far(different_dist: np.ndarray, far_target: float) -> float:
    # At t = d(k) exactly k different pairs lie strictly below (fewer with ties), and any larger t admits
    # d(k): so d(k) is the largest threshold allowing floor(target * N) false accepts. The epsilon absorbs
    # products like 0.29 * 100 = 28.999999999999996.
    allowed = int(np.floor(far_target * different_dist.size + 1e-9))
    if allowed >= different_dist.size:
        return float("inf")
    return float(np.partition(different_dist, allowed)[allowed])


def embedded_images(images: int) -> int:
    """How many images :func:`embed_verification_set` embeds for a set of ``images``: each, and its mirror."""
    return 2 * images


def embed_verification_set(
    model_fn: ModelFn, vset: VerificationSet, batch_size: int, data_format: str, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of every image and of its mirror image, float32 [2P, d] each.

    ``model_fn`` receives float32 batches in ``data_format`` (NCHW or NHWC), RGB, scaled to [-1, 1] by
    ``(x / 255 - 0.5) / 0.5``, and returns [batch, d] embeddings (anything ``np.asarray`` accepts).
    ``progress``: report pairs done (plsc.console.Progress: a bar on a terminal, else periodic log lines).
    """
    if data_format not in DATA_FORMATS:
        raise PlscError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if batch_size < 1:
        raise PlscError(f"batch_size must be >= 1, got {batch_size}")
    plain, flipped = [], []
    with Progress(vset.pairs, f"verify {vset.name}", "pairs", enabled=progress) as bar:
        for start in range(0, len(vset.images), batch_size):
            batch = vset.images[start : start + batch_size]
            plain.append(embed_batch(model_fn, batch, data_format))
            mirrored = batch[:, :, ::-1, :]  # along the width
            flipped.append(embed_batch(model_fn, mirrored, data_format))
            bar.update(_pairs_completed(start, len(batch)))
    return np.concatenate(plain), np.concatenate(flipped)


def _pairs_completed(start: int, count: int) -> int:
    """Pairs whose second image is among images [start, start + count): done once both are embedded."""
    return (start + count) // 2 - start // 2


def embed_batch(model_fn: ModelFn, images_uint8: np.ndarray, data_format: str) -> np.ndarray:
    # x / 127.5 - 1 is (x / 255 - 0.5) / 0.5 in one pass over the batch.
    batch = images_uint8.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    if data_format == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    embeddings = np.asarray(model_fn(np.ascontiguousarray(batch)), dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(images_uint8):
        shape, count = embeddings.shape, len(images_uint8)
        raise PlscError(f"model returned embeddings of shape {shape} for {count} images, not [{count}, dim]")
    return embeddings


def verify(
    model_fn: ModelFn,
    vset: VerificationSet,
    batch_size: int = 64,
    data_format: str = "NCHW",
    progress: bool = False,
) -> dict:
    """Embed (with flips), evaluate with the 10-fold protocol, and add ``xnorm`` over all raw embeddings."""
    raw, raw_flipped = embed_verification_set(model_fn, vset, batch_size, data_format, progress=progress)
    result = evaluate(combine_flip(raw, raw_flipped), vset.issame)
    # insightface averages the norm over plain and mirrored embeddings; both halves have 2P rows.
    result["xnorm"] = (xnorm(raw) + xnorm(raw_flipped)) / 2
    return result


def verify_across_ranks(
    model_fn, vset, batch_size: int, data_format: str, embedding_size: int, comm, progress: bool = False
) -> dict:
    """:func:`verify` with the embedding work split: each rank embeds a contiguous
    share of the pairs, and every rank scores the gathered embeddings, so all ranks get identical results."""
    from plsc.distributed import shard_classes  # imported here: it imports Paddle, which this module avoids

    share = shard_classes(vset.pairs, comm.rank, comm.world_size)  # the same balanced split, over pairs
    if share.count:
        images = vset.images[2 * share.start : 2 * share.stop]
        part = VerificationSet(images, vset.issame[share.start : share.stop], vset.name)
        raw, raw_flipped = embed_verification_set(model_fn, part, batch_size, data_format, progress)
    else:
        raw = raw_flipped = np.zeros((0, embedding_size), dtype=np.float32)
    raw, raw_flipped = comm.gather_rows(raw), comm.gather_rows(raw_flipped)
    result = evaluate(combine_flip(raw, raw_flipped), vset.issame)
    result["xnorm"] = (xnorm(raw) + xnorm(raw_flipped)) / 2  # as verify(): over plain and mirrored halves
    return result

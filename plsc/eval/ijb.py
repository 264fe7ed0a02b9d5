"""IJB-B / IJB-C 1:1 verification (template to template) on insightface's IJB layout: ``plsc eval --ijb``.

Layout (as insightface distributes it): ``ROOT/loose_crop/`` holds the face images; ``ROOT/meta/`` holds, for
target ``IJBC`` (``IJBB`` likewise, in lower case):

- ``ijbc_name_5pts_score.txt``: one face per line, ``image x1 y1 ... x5 y5 detector_score``;
- ``ijbc_face_tid_mid.txt``: the same faces in the same order, ``image template_id media_id``;
- ``ijbc_template_pair_label.txt``: ``template_id template_id label`` (1 same subject, 0 different).

Protocol (the behaviour of insightface's recognition/arcface_torch/eval_ijbc.py with its defaults
``use_norm_score``, ``use_detector_score`` and ``use_flip_test`` all true, lines 47-49):

- each face is aligned on its five landmarks to the ArcFace template (:func:`plsc.faces.align.align_face`);
  the model embeds it and its mirror image (RGB, ``(x / 255 - 0.5) / 0.5``) and the two raw embeddings are
  summed (eval_ijbc.py:75-110, 387-394);
- the sum keeps its norm (``use_norm_score``: no normalisation per face) and is multiplied by the face's
  detector score (eval_ijbc.py:396-407);
- a template's feature is the sum over its media of the mean of the media's faces, L2-normalised
  (eval_ijbc.py:212-246); a pair's score is the cosine of its two templates (eval_ijbc.py:252-278);
- the ROC is sklearn's ``roc_curve(label, score)`` (default ``drop_intermediate=True``), and TAR at a FAR is
  the TPR of the ROC point whose FPR is nearest to the FAR, the largest TPR among equally near points
  (eval_ijbc.py:451-470). :func:`roc_curve` computes the same points with numpy.

Faces are read, aligned and embedded in batches (memory: one batch of images plus the [faces, d] features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from plsc.console import Progress
from plsc.data.folder import read_image
from plsc.errors import PlscError
from plsc.eval.verification import embed_batch
from plsc.faces.align import align_face

TARGETS = ("IJBC", "IJBB")
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the columns of insightface's table (eval_ijbc.py:451)
PAIR_CHUNK = 20_000  # pairs scored at once: two [chunk, d] float64 gathers (160 MB at d = 512)
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz (numpy < 2 with Paddle 2.6)


@dataclass(frozen=True)
class IjbMeta:
    """One target's faces, templates and pairs (row i of every face array is the same face)."""

    names: list[str]  # image file names under loose_crop/
    landmarks: np.ndarray  # float32 [faces, 5, 2]
    scores: np.ndarray  # float32 [faces], the detector's
    templates: np.ndarray  # int64 [faces]
    medias: np.ndarray  # int64 [faces]
    pair_templates: np.ndarray  # int64 [pairs, 2]
    labels: np.ndarray  # int64 [pairs], 1 same, 0 different


def meta_file(root: Path, target: str, suffix: str) -> Path:
    return Path(root) / "meta" / f"{target.lower()}_{suffix}.txt"


def read_meta(root: str | Path, target: str) -> IjbMeta:
    """The three meta files of ``target``; a one-line error for a missing file or a malformed line."""
    if target not in TARGETS:
        raise PlscError(f"IJB target must be one of {', '.join(TARGETS)}, got {target!r}")
    root = Path(root)
    faces = _read_rows(meta_file(root, target, "name_5pts_score"), 12)
    names = [row[0] for row in faces]
    numbers = _numbers([row[1:] for row in faces], np.float32, meta_file(root, target, "name_5pts_score"))
    tid_mid = _read_rows(meta_file(root, target, "face_tid_mid"), 3)
    if [row[0] for row in tid_mid] != names:
        raise PlscError(f"{meta_file(root, target, 'face_tid_mid')} does not list the faces of "
                        f"{meta_file(root, target, 'name_5pts_score').name} in the same order")
    ids = _numbers([row[1:] for row in tid_mid], np.int64, meta_file(root, target, "face_tid_mid"))
    pairs_file = meta_file(root, target, "template_pair_label")
    pairs = _numbers(_read_rows(pairs_file, 3), np.int64, pairs_file)
    meta = IjbMeta(names, numbers[:, :10].reshape(-1, 5, 2), numbers[:, 10], ids[:, 0], ids[:, 1],
                   pairs[:, :2], pairs[:, 2])
    _check_pairs(meta, pairs_file)
    return meta


def _read_rows(path: Path, fields: int) -> list[list[str]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PlscError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = [line.split() for line in lines if line.strip()]
    for number, row in enumerate(rows, 1):
        if len(row) != fields:
            raise PlscError(f"{path}: line {number} has {len(row)} fields, expected {fields}")
    if not rows:
        raise PlscError(f"{path} is empty")
    return rows


def _numbers(rows: list[list[str]], dtype, path: Path) -> np.ndarray:
    # Decimal text -> float64 -> float32 for landmarks and scores, as eval_ijbc.py:171 and 203 round them
    # (Python floats first), rather than straight to float32.
    parse = np.float64 if dtype == np.float32 else dtype
    try:
        return np.array(rows, dtype=parse).astype(dtype)
    except ValueError:
        raise PlscError(f"{path}: a field that should be a number is not") from None


def _check_pairs(meta: IjbMeta, pairs_file: Path) -> None:
    unknown = np.setdiff1d(meta.pair_templates, meta.templates)
    if unknown.size:
        raise PlscError(f"{pairs_file}: {unknown.size} templates have no face (first: {unknown[0]})")
    if not np.isin(meta.labels, (0, 1)).all():
        raise PlscError(f"{pairs_file}: labels must be 0 or 1")
    if meta.labels.min() == meta.labels.max():
        raise PlscError(f"{pairs_file}: a ROC needs both same (1) and different (0) pairs")


def embed_faces(embed, image_size: int, root: str | Path, meta: IjbMeta, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """float32 [faces, d]: each face's raw embedding plus its mirror image's (the flip test)."""
    if batch_size < 1:
        raise PlscError(f"batch_size must be >= 1, got {batch_size}")
    folder = Path(root) / "loose_crop"
    features = None
    with Progress(len(meta.names), "embed IJB faces", "faces", enabled=progress) as bar:
        for start in range(0, len(meta.names), batch_size):
            stop = min(start + batch_size, len(meta.names))
            crops = np.stack([_aligned_rgb(folder / meta.names[i], meta.landmarks[i], image_size)
                              for i in range(start, stop)])
            summed = (embed_batch(embed, crops, embed.data_format)
                      + embed_batch(embed, crops[:, :, ::-1, :], embed.data_format))
            if features is None:
                features = np.empty((len(meta.names), summed.shape[1]), np.float32)
            features[start:stop] = summed
            bar.update(stop - start)
    return features


def _aligned_rgb(path: Path, landmarks: np.ndarray, image_size: int) -> np.ndarray:
    return cv2.cvtColor(align_face(read_image(path), landmarks, image_size), cv2.COLOR_BGR2RGB)


def face_inputs(features: np.ndarray, scores: np.ndarray, use_norm_score: bool = True,
                use_detector_score: bool = True) -> np.ndarray:
    """What is pooled per face: the flip-summed feature, unit length unless ``use_norm_score``, times the
    detector score when ``use_detector_score``."""
    features = np.asarray(features, np.float32)
    if not use_norm_score:
        features = features / np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    if use_detector_score:
        features = features * np.asarray(scores, np.float32)[:, None]
    return features


def template_features(face_features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(unit-length template features float64 [T, d], their sorted template ids [T]): per template, the sum
    over its media of the mean of each media's faces; a zero feature stays zero."""
    keys = np.stack([templates, medias], axis=1)
    groups, group_of_face = np.unique(keys, axis=0, return_inverse=True)  # sorted by template, then media
    group_of_face = group_of_face.reshape(-1)
    order = np.argsort(group_of_face, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group_of_face[order]) != 0])
    media_sums = np.add.reduceat(face_features[order], starts, axis=0, dtype=np.float64)
    media_means = media_sums / np.bincount(group_of_face)[:, None]
    template_ids, template_starts = np.unique(groups[:, 0], return_index=True)
    pooled = np.add.reduceat(media_means, template_starts, axis=0)
    norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
    return pooled / np.where(norms > 0, norms, 1.0)[:, None], template_ids


def pair_scores(features: np.ndarray, template_ids: np.ndarray, pair_templates: np.ndarray) -> np.ndarray:
    """float64 [pairs]: the cosine of each pair's two (unit-length) template features, in chunks."""
    rows = np.searchsorted(template_ids, pair_templates)
    scores = np.empty(len(pair_templates))
    for start in range(0, len(rows), PAIR_CHUNK):
        chunk = rows[start : start + PAIR_CHUNK]
        first, second = features[chunk[:, 0]], features[chunk[:, 1]]
        scores[start : start + len(chunk)] = np.einsum("ij,ij->i", first, second)
    return scores


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn's ``roc_curve(labels, scores)`` with its defaults: one point per
    distinct score (descending), the collinear points between others dropped, and a first point (0, 0) at
    threshold +inf."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores, sorted_labels = np.asarray(scores)[order], labels[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tps = np.cumsum(sorted_labels)[last_of_value]
    fps = last_of_value + 1 - tps
    thresholds = sorted_scores[last_of_value]
    if len(fps) > 2:  # sklearn's drop_intermediate: keep the corners of the staircase
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps, thresholds = np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict[str, float]:
    """``{"1e-06": TAR, ...}``: the TPR of the ROC point nearest each FAR, the largest TPR on a tie."""
    fpr, tpr = fpr[::-1], tpr[::-1]  # ties go to the first: from this end, the point with the largest TPR
    return {f"{far:.0e}": float(tpr[np.argmin(np.abs(fpr - far))]) for far in fars}


def evaluate_ijb(embed, image_size: int, root: str | Path, target: str = "IJBC", batch_size: int = 64,
                 progress: bool = False, roc_output: str | Path | None = None) -> dict[str, dict]:
    """``{target: {"tar_at_far": {...}, "auc", "faces", "templates", "pairs"}}`` of ``embed`` (an embedder
    for input size ``image_size``); the ROC drawn to ``roc_output`` when given."""
    meta = read_meta(root, target)
    features = embed_faces(embed, image_size, root, meta, batch_size, progress)
    pooled, template_ids = template_features(face_inputs(features, meta.scores), meta.templates, meta.medias)
    fpr, tpr, _ = roc_curve(meta.labels, pair_scores(pooled, template_ids, meta.pair_templates))
    if roc_output is not None:
        draw_roc(fpr, tpr, target, Path(roc_output))
    return {target: {"tar_at_far": tar_at_far(fpr, tpr), "auc": float(_trapezoid(tpr, fpr)),
                     "faces": len(meta.names), "templates": len(template_ids), "pairs": len(meta.labels)}}


def draw_roc(fpr: np.ndarray, tpr: np.ndarray, target: str, output: Path) -> None:
    """The ROC on a log FAR axis from 1e-6 (insightface's plot range) to 1, written to ``output``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlscError("plsc eval --roc needs matplotlib: pip install 'plsc[plot]'") from None
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(fpr, tpr, lw=1, label=target)
    ax.set_xscale("log")
    ax.set_xlim(FARS[0], 1.0)
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_title(f"ROC on {target}")
    ax.grid(linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output)
    except (OSError, ValueError) as exc:  # ValueError: a suffix matplotlib has no writer for
        raise PlscError(f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}") from None

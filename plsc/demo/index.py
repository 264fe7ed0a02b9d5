"""The gallery index file, and the search and vote that name a query face.

Index file: an ``.npz`` (any file name; read without pickle) holding

* ``embeddings`` float32 [N, E], L2-normalised; ``names`` [N] and ``paths`` [N] (as listed in the label file);
* ``boxes`` int [N, 4], the box each embedding was cropped around, and ``detected`` bool [N] (False: no face
  was found and the whole image was used);
* ``probe`` float32 [E], the model's embedding of a fixed image (see :class:`plsc.demo.embed.FaceEmbedder`):
  an index only answers queries embedded by the model that built it, and this is how that is checked;
* ``meta``: JSON with the model description, detector and crop margin.

Naming a face: its ``cdd_num`` most similar gallery embeddings (cosine) are the candidates; those at or above
the threshold vote for their names; most votes wins, ties going to the larger summed similarity. No candidate
at the threshold means ``unknown``. A negative cosine is a dissimilarity, never a match.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plsc import strict_json
from plsc.atomic import atomic_file
from plsc.errors import PlscError

INDEX_FORMAT = "plsc-demo-index"
INDEX_VERSION = 1
UNKNOWN = "unknown"
SAME_MODEL_COSINE = 0.999  # probe embeddings of one model through different engines agree far closer
FAISS_MIN_GALLERY = 10_000  # below this numpy's matrix product is as fast as faiss


@dataclass
class GalleryIndex:
    embeddings: np.ndarray
    names: list[str]
    paths: list[str]
    boxes: np.ndarray
    detected: np.ndarray
    probe: np.ndarray
    meta: dict


# ----------------------------------------------------------------------------------------------------
# File


def save_index(path: str | Path, index: GalleryIndex) -> Path:
    """Write the index atomically (:mod:`plsc.atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "embeddings": index.embeddings.astype(np.float32),
        "names": np.array(index.names, dtype=str),
        "paths": np.array(index.paths, dtype=str),
        "boxes": index.boxes.astype(np.int32).reshape(-1, 4),
        "detected": index.detected.astype(bool),
        "probe": index.probe.astype(np.float32),
        "meta": np.array(strict_json.dumps({"format": INDEX_FORMAT, "version": INDEX_VERSION, **index.meta})),
    }
    with atomic_file(path) as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)
    return path


def load_index(path: str | Path) -> GalleryIndex:
    path = Path(path)
    if not path.is_file():
        raise PlscError(f"index not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = strict_json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        raise PlscError(f"{path} is not a plsc demo index (build one with plsc demo index)") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise PlscError(f"{path} is not a plsc demo index (build one with plsc demo index)")
    index = GalleryIndex(
        arrays["embeddings"], arrays["names"].tolist(), arrays["paths"].tolist(),
        arrays["boxes"], arrays["detected"], arrays["probe"], meta,
    )
    _check_shapes(path, index)
    return index


def _check_shapes(path: Path, index: GalleryIndex) -> None:
    count = len(index.names)
    consistent = (
        index.embeddings.ndim == 2 and index.embeddings.shape[0] == count > 0
        and len(index.paths) == count and index.boxes.shape == (count, 4) and index.detected.shape == (count,)
        and index.probe.shape == index.embeddings.shape[1:]
    )
    if not consistent:
        raise PlscError(f"{path}: corrupt index (its arrays disagree in size)")


def check_same_model(index: GalleryIndex, probe: np.ndarray, index_path: str | Path) -> None:
    """Refuse to compare query embeddings with gallery embeddings of another model."""
    built_with = index.meta.get("model", {})
    rebuild = f"rebuild it with this model (plsc demo index); it was built with {built_with.get('path', '?')}"
    if probe.shape != index.probe.shape:
        raise PlscError(
            f"{index_path} holds embeddings of size {index.probe.shape[0]}, this model's are of size "
            f"{probe.shape[0]}: {rebuild}"
        )
    if float(probe @ index.probe) < SAME_MODEL_COSINE:
        raise PlscError(f"{index_path} was built with a different model: {rebuild}")


# ----------------------------------------------------------------------------------------------------
# Search and vote


@dataclass(frozen=True)
class Decision:
    """``score``: the winner's best similarity; for ``unknown``, the best similarity of any candidate."""

    name: str
    score: float
    votes: int


def top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines), each [M, min(k, N)], most similar first; rows must be L2-normalised."""
    k = min(k, len(gallery))
    faiss = _faiss() if len(gallery) >= FAISS_MIN_GALLERY else None
    if faiss is not None:
        search = faiss.IndexFlatIP(gallery.shape[1])
        search.add(np.ascontiguousarray(gallery, np.float32))
        similarities, indices = search.search(np.ascontiguousarray(queries, np.float32), k)
        return indices, similarities
    similarities = queries @ gallery.T
    indices = np.argsort(-similarities, axis=1, kind="stable")[:, :k]  # ties: gallery order
    return indices, np.take_along_axis(similarities, indices, axis=1)


def _faiss():
    try:
        import faiss
    except ImportError:  # optional: only worth it for large galleries
        return None
    return faiss


def vote(names: list[str], similarities: list[float], threshold: float) -> Decision:
    """Majority name of the candidates at or above ``threshold``; ties go to the larger summed similarity."""
    tally: dict[str, list[float]] = {}
    for name, similarity in zip(names, similarities, strict=True):
        if similarity >= threshold:
            tally.setdefault(name, []).append(float(similarity))
    if not tally:
        return Decision(UNKNOWN, max(map(float, similarities), default=float("nan")), 0)
    winner = max(tally, key=lambda name: (len(tally[name]), sum(tally[name])))
    return Decision(winner, max(tally[winner]), len(tally[winner]))

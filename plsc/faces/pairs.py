"""Verification pairs: a pairs file (``a b 1|0`` per line) -> an insightface ``.bin``, and random
same/different pairs drawn from labelled images.

A ``.bin`` is what insightface's recognition/arcface_mxnet/common/build_eval_pack.py:104-136 writes: a
pickle of (list of 2P encoded images, list of P bools), pair ``i`` being images ``2i`` and ``2i+1``, from a
``path1 path2 label`` file whose label ``0`` means "different people". The images of a pairs file are taken
as they are (encoded bytes copied, nothing re-encoded): they are expected to be aligned crops already, such
as ``plsc prepare`` writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from plsc.console import progress as console_progress
from plsc.data.folder import decode_image_bytes
from plsc.data.verification_bin import save_bin
from plsc.errors import PlscError
from plsc.faces.align import TEMPLATE_SIZE, encode_jpeg, face_crop
from plsc.faces.detect import Face, largest_face, open_face_detector

log = logging.getLogger("plsc.faces")

SAME, DIFFERENT = "1", "0"


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    same: bool


def read_pairs_file(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a ``first second 1|0`` file (tab- or space-separated; blank and ``#`` lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise PlscError(f"pairs file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise PlscError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PlscError(f"cannot read pairs file {path}: {exc.strerror or exc}") from None
    pairs = [_parse_pair(path, number, line.strip()) for number, line in enumerate(lines, 1)
             if line.strip() and not line.strip().startswith("#")]
    if not pairs:
        raise PlscError(f"{path}: no pairs")
    return pairs


def _parse_pair(path: Path, number: int, line: str) -> Pair:
    # A tab separates the fields when there is one, so that paths holding spaces still work.
    fields = [field.strip() for field in line.split("\t")] if "\t" in line else line.split()
    if len(fields) != 3 or fields[2] not in (SAME, DIFFERENT):
        raise PlscError(f"{path} line {number}: expected 'IMAGE1 IMAGE2 1|0' (1: same person), got {line!r}")
    return Pair(fields[0], fields[1], fields[2] == SAME)


def image_under(root: Path, relative: str, where: str) -> Path:
    """``root/relative``, refused when it leaves ``root`` (an absolute path, ``..``) or is not a file."""
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root.resolve()):
        raise PlscError(f"{where}: {relative!r} is not a path inside {root}")
    if not path.is_file():
        raise PlscError(f"{where}: image not found: {root / relative}")
    return path


def read_encoded_image(path: Path, where: str) -> bytes:
    """The file's bytes, checked to decode as an image (a .bin with a broken image fails only when read)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PlscError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    if decode_image_bytes(data) is None:
        raise PlscError(f"{where}: {path} is not a complete image")
    return data


def pairs_to_bin(pairs_file: str | os.PathLike, root: str | os.PathLike, output: str | os.PathLike,
                 progress: bool = True, align: str | None = None) -> int:
    """Write the ``.bin`` of the pairs listed in ``pairs_file`` (paths relative to ``root``); returns the
    number of pairs. Every image is read and checked before the file is written (atomically).

    ``align`` None stores each file's bytes as they are (aligned crops already); a detector name
    (:data:`plsc.faces.DETECTOR_NAMES`) cuts each photo's largest face first, as ``plsc prepare`` does, and
    stores it as JPEG (insightface's build_eval_pack.py:72-116 does the same with its detector)."""
    pairs_file, root = Path(pairs_file), Path(root)
    if not root.is_dir():
        raise PlscError(f"--root is not a folder: {root}")
    pairs = read_pairs_file(pairs_file)
    cut = None if align is None else FaceCutter(align)
    encoded, cache = [], {}
    for number, pair in enumerate(console_progress(pairs, len(pairs), "pairs -> .bin", "pairs", progress), 1):
        for relative in (pair.first, pair.second):
            if relative not in cache:  # an image in several pairs is read once
                where = f"{pairs_file} pair {number}"
                data = read_encoded_image(image_under(root, relative, where), where)
                cache[relative] = data if cut is None else cut(data, relative)
            encoded.append(cache[relative])
    if cut is not None and cut.without_face:
        log.warning("%d of %d images had no face found; their centre square was used instead (first: %s)",
                    len(cut.without_face), len(cache), cut.without_face[0])
    save_bin(output, encoded, [pair.same for pair in pairs])
    return len(pairs)


class FaceCutter:
    """Encoded photo -> JPEG of its largest face, aligned when the detector finds landmarks. A photo with no
    face found gives its centre square (verification photos such as LFW's are centred on the face): a pair
    list cannot drop an image, and one missed face should not stop the whole file."""

    def __init__(self, detector: str):
        self.detect = open_face_detector(detector)
        self.without_face: list[str] = []

    def __call__(self, data: bytes, name: str) -> bytes:
        image = decode_image_bytes(data)
        face = largest_face(self.detect(image))
        if face is None:
            self.without_face.append(name)
            height, width = image.shape[:2]
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            face = Face((left, top, left + side, top + side), 0.0)
            return encode_jpeg(face_crop(image, face, TEMPLATE_SIZE, margin=0.0))
        return encode_jpeg(face_crop(image, face, TEMPLATE_SIZE))


def draw_pairs(labels: Sequence[int], count: int, seed: int = 0) -> list[tuple[int, int, bool]]:
    """``count`` distinct pairs of indices into ``labels``: ``ceil(count / 2)`` of one label, the rest of two
    labels, in random order (plsc's verification cuts the pairs into contiguous folds, so the two kinds must
    be mixed). Refused when there are not that many distinct pairs of a kind."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    want_same, want_different = (count + 1) // 2, count // 2
    same = _same_label_pairs(labels)
    if len(same) < want_same:
        raise PlscError(f"{want_same} same-person pairs requested, but the held-out images make only "
                        f"{len(same)}: ask for fewer --pairs or hold out more identities")
    chosen_same = [same[i] for i in rng.choice(len(same), want_same, replace=False)]
    chosen_different = _different_label_pairs(labels, want_different, rng)
    pairs = [(i, j, True) for i, j in chosen_same] + [(i, j, False) for i, j in chosen_different]
    return [pairs[i] for i in rng.permutation(len(pairs))]


def _same_label_pairs(labels: np.ndarray) -> list[tuple[int, int]]:
    pairs = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label).tolist()
        pairs.extend((a, b) for n, a in enumerate(members) for b in members[n + 1:])
    return pairs


def _different_label_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``count`` distinct unordered pairs of images of two labels, drawn uniformly by rejection."""
    sizes = np.unique(labels, return_counts=True)[1]
    available = (int(sizes.sum()) ** 2 - int((sizes ** 2).sum())) // 2
    if available < count:
        raise PlscError(f"{count} different-person pairs requested, but the held-out images make only "
                        f"{available}: ask for fewer --pairs or hold out more identities")
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < count:
        a, b = (int(v) for v in rng.integers(0, len(labels), 2))
        if labels[a] != labels[b]:
            chosen.add((min(a, b), max(a, b)))
    return sorted(chosen)

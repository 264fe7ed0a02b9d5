"""Face verification sets in insightface's ``.bin`` format (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

The format is a pickle of ``(images, issame)``: ``images`` is a list of 2P encoded images (JPEG bytes; some
files hold them as uint8 numpy arrays) and ``issame`` a list of P booleans; pair ``i`` is images ``2i`` and
``2i+1``. Files written by Python 2 need ``encoding='bytes'`` to unpickle, so we always pass it.

Decoded images are kept as uint8 **RGB** (the channel order the models are trained on), never as floats: a
full lfw.bin is 12,000 images, 0.45 GB as uint8 but 3.6 GB as float64.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from plsc import safe_pickle
from plsc.atomic import write_atomic
from plsc.errors import PlscError
from plsc.names import distinct_names, path_component


@dataclass(eq=False)
class VerificationSet:
    """A decoded verification set.

    ``images``: uint8 [2P, H, W, 3] in RGB order; pair ``i`` is ``images[2*i]`` and ``images[2*i+1]``.
    ``issame``: bool [P], True when the two images of a pair show the same person.
    ``name``: the file stem (``lfw`` for ``lfw.bin``), used to label logged results.
    """

    images: np.ndarray
    issame: np.ndarray
    name: str

    @property
    def pairs(self) -> int:
        return int(self.issame.shape[0])


@dataclass(eq=False)
class EncodedSet:
    """A ``.bin`` read and checked, its images still encoded (what :func:`read_bin` returns): a caller can
    count the images before it decides how to embed them, and decode them afterwards, reading the file
    once."""

    path: Path
    encoded: list
    issame: np.ndarray

    @property
    def images(self) -> int:
        """How many images the set holds (two per pair)."""
        return len(self.encoded)

    def decode(self, image_size: int | tuple[int, int] = 112) -> VerificationSet:
        """The decoded set; images not of ``image_size`` (int or (h, w)) are resized."""
        height, width = _size_pair(image_size)
        images = np.empty((len(self.encoded), height, width, 3), dtype=np.uint8)
        for index, item in enumerate(self.encoded):
            images[index] = _decode_rgb(self.path, index, item, height, width)
        return VerificationSet(images=images, issame=self.issame, name=bin_name(self.path))


def read_bin(path: str | os.PathLike) -> EncodedSet:
    """Read and check an insightface ``.bin`` without decoding its images."""
    path = Path(path)
    encoded, issame = _read_pickle(path)
    return EncodedSet(path, encoded, issame)


def load_bin(path: str | os.PathLike, image_size: int | tuple[int, int] = 112) -> VerificationSet:
    """Read and decode an insightface ``.bin``; images not of ``image_size`` (int or (h, w)) are resized."""
    return read_bin(path).decode(image_size)


def bin_name(path: str | os.PathLike) -> str:
    """A verification set's name, its file stem (``lfw`` for ``lfw.bin``): its results and its best model
    (``best_model/<name>``) are filed under it, so it must be one ordinary path component."""
    return path_component(Path(path).stem, str(path))


def verification_names(paths: Sequence[str | os.PathLike], key: str) -> list[str]:
    """The names of the sets ``paths`` (``key``: the setting or option that lists them); two files of one name
    (``a/lfw.bin`` and ``b/lfw.bin``, or one file given twice) are refused."""
    return distinct_names(((str(path), bin_name(path)) for path in paths), key)


def save_bin(path: str | os.PathLike, jpeg_bytes_list: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write ``(jpeg_bytes_list, issame)`` as a ``.bin``, atomically (:mod:`plsc.atomic`)."""
    path = Path(path)
    encoded = [bytes(item) for item in jpeg_bytes_list]
    labels = [bool(flag) for flag in issame]
    if len(encoded) != 2 * len(labels):
        raise PlscError(f"{path}: {len(encoded)} images for {len(labels)} pairs (need exactly 2 per pair)")
    payload = pickle.dumps((encoded, labels), protocol=4)
    write_atomic(path, payload)


def _read_pickle(path: Path) -> tuple[list, np.ndarray]:
    if not path.is_file():
        raise PlscError(f"cannot read verification file {path}: not found")
    content = safe_pickle.load(path, "insightface verification .bin", encoding="bytes")
    return _check_structure(path, content)


def _check_structure(path: Path, content) -> tuple[list, np.ndarray]:
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise PlscError(f"{path}: expected a pickled (images, issame) pair, found {type(content).__name__}")
    encoded, flags = content
    if not isinstance(encoded, (list, tuple)) or not isinstance(flags, (list, tuple, np.ndarray)):
        raise PlscError(
            f"{path}: expected (list of encoded images, list of bools), found "
            f"({type(encoded).__name__}, {type(flags).__name__})"
        )
    issame = _as_bool_array(path, flags)
    if len(issame) == 0:
        raise PlscError(f"{path}: the verification set has no pairs")
    if len(encoded) != 2 * len(issame):
        raise PlscError(f"{path}: {len(encoded)} images for {len(issame)} pairs (need exactly 2 per pair)")
    # Type errors are checked up front so a malformed file fails before minutes of decoding, not after.
    for index, item in enumerate(encoded):
        if not _is_encoded_image(item):
            raise PlscError(f"{path}: image {index} has type {type(item).__name__}, not encoded image bytes")
    _refuse_repeated_images(path, encoded)
    return list(encoded), issame


def _refuse_repeated_images(path: Path, encoded) -> None:
    """Each image is stored once in a real ``.bin``, so together they are smaller than the file. A pickle can
    instead list one stored image many times (two bytes per reference), and every reference is decoded into
    H x W x 3 bytes: a small file would fill the memory."""
    stored = sum(len(item) for item in encoded)
    size = path.stat().st_size
    if stored > size:
        raise PlscError(f"{path}: its {len(encoded)} images add up to {stored} bytes, more than the file's "
                        f"{size}: images are listed more than once (a crafted file)")


def _is_encoded_image(item) -> bool:
    if isinstance(item, (bytes, bytearray)):
        return True
    return isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1


def _as_bool_array(path: Path, flags) -> np.ndarray:
    values = np.asarray(flags)
    if values.ndim != 1:
        raise PlscError(f"{path}: issame must be a flat list of bools")
    if values.dtype == np.bool_ or values.size == 0:
        return values.astype(bool)
    # Some writers stored 0/1 integers; anything else is not a same/different label.
    if values.dtype.kind in "iu" and np.isin(values, (0, 1)).all():
        return values.astype(bool)
    raise PlscError(f"{path}: issame must hold booleans, found dtype {values.dtype}")


def _decode_rgb(path: Path, index: int, item, height: int, width: int) -> np.ndarray:
    buffer = item if isinstance(item, np.ndarray) else np.frombuffer(item, dtype=np.uint8)
    image = None
    if buffer.size:
        try:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
    if image is None:
        raise PlscError(f"{path}: image {index} cannot be decoded (corrupt or not an image)")
    if image.shape[:2] != (height, width):
        shrinking = image.shape[0] > height or image.shape[1] > width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR  # area averaging avoids aliasing
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _size_pair(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    height, width = (int(side) for side in image_size)
    if height <= 0 or width <= 0:
        raise PlscError(f"image_size must be positive, got {image_size}")
    return height, width

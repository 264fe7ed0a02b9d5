"""PLSC's folder layout: ``root/label.txt`` lists ``images/NNNNNNNN.jpg<TAB>label``, relative to ``root``.

Strict mode (``skip_bad=False``, the default) stops at the first problem with a one-line PlscError: a
malformed line or a missing image is reported with the label file and line number while the data set is
built (every image's existence is checked up front, by listing each image directory once); an unreadable
image is reported with its path when it is read.

Skip mode (``skip_bad=True``) never stops a run for a bad sample:

- malformed lines and missing images are dropped while the data set is built and counted in ``skipped``,
  with the first few explanations in ``skipped_reasons``;
- an image that exists but cannot be decoded is found when it is read, usually inside a loader worker.
  It cannot be dropped there: every rank must produce full, equally sized batches, and a worker has no way
  to tell the sampler. So it is *substituted* by the next readable sample in index order (image and label
  together), logged once per file and process, and remembered in ``unreadable_indices`` (per process). The
  substitution depends only on the index, so batches stay identical whatever the number of workers.
  For exact counts before training instead, pass ``verify_images=True`` (or call
  :meth:`FolderDataset.verify_images`): every image is decoded once up front, with a progress bar, and
  undecodable ones are dropped like missing files. That costs a full decoding pass over the data set,
  which is why it is not the default.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from plsc.config import MAX_CLASSES
from plsc.errors import PlscError

log = logging.getLogger(__name__)

REASONS_KEPT = 10  # skipped_reasons keeps this many examples; `skipped` has the full count
MAX_CONSECUTIVE_UNREADABLE = 64  # more than this in a row means broken storage, not a few bad files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what OpenCV decodes
_JPEG_SOI = b"\xff\xd8"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"


# --- decoding ---


def _is_truncated_jpeg(raw) -> bool:
    """A JPEG (any bytes-like object) whose last scan has no end-of-image marker after it was cut short.

    Some OpenCV builds decode such files "successfully" with grey rows (printing only a libjpeg warning), so
    we check ourselves. Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so the
    bytes FF DA (start of scan) and FF D9 (end of image) can only be real markers.
    """
    if bytes(raw[:2]) != _JPEG_SOI:
        return False
    if bytes(raw[-2:]) == _JPEG_EOI:  # the usual case, decided without searching the scan data (~2 us)
        return False
    raw = bytes(raw)
    return raw.rfind(_JPEG_EOI) < raw.rfind(_JPEG_SOS)


def decode_image_bytes(data) -> np.ndarray | None:
    """Encoded bytes (any bytes-like object) -> BGR uint8 HxWx3, or None when they are not a complete
    image."""
    if not len(data) or _is_truncated_jpeg(data):
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


# Each thread's reusable read buffer (see read_into_thread_buffer); grown when a file does not fit.
_read_buffers = threading.local()
_FIRST_READ_BUFFER = 1 << 16


def read_into_thread_buffer(path: str | os.PathLike) -> memoryview:
    """The whole file, in this thread's reusable buffer: valid until the thread's next read. No buffered
    file object and no allocation per image: 5 us per small file, against 11-12 us for open().read()."""
    buffer = getattr(_read_buffers, "buffer", None) or bytearray(_FIRST_READ_BUFFER)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        length = os.readv(descriptor, [buffer])
        while length == len(buffer):  # it may not have fitted: a larger buffer, and read on
            larger = bytearray(2 * len(buffer))
            larger[:length] = buffer
            buffer = larger
            length += os.readv(descriptor, [memoryview(buffer)[length:]])
    finally:
        os.close(descriptor)
    _read_buffers.buffer = buffer
    return memoryview(buffer)[:length]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read and decode one image file (read + imdecode, which unlike cv2.imread takes any path)."""
    try:
        data = read_into_thread_buffer(path)
    except OSError as exc:
        raise PlscError(f"cannot read image {path}: {exc.strerror or exc}") from None
    image = decode_image_bytes(data)
    if image is None:
        raise PlscError(f"cannot decode image {path}: corrupt, truncated or not an image")
    return image


# --- label file ---


def _split_fields(line: str) -> list[str]:
    # PLSC writes a tab; when there is one, split on it only, so that paths containing spaces still work
    if "\t" in line:
        return [field.strip() for field in line.split("\t") if field.strip()]
    return line.split()


def _parse_line(line: str) -> tuple[str, int] | str:
    """(relative path, label) for a good line, otherwise a short explanation of what is wrong."""
    fields = _split_fields(line)
    if len(fields) != 2:
        shown = line if len(line) <= 60 else line[:57] + "..."
        return f"expected '<image path> <label>', got {len(fields)} fields: {shown!r}"
    path, label_text = fields
    # ASCII digits only: int() also takes "+3", "3_000" and other scripts' digits ("\u0663" is 3); and
    # few of them: int() of thousands of digits is an error of its own.
    is_number = label_text.isascii() and label_text.isdigit() and len(label_text) <= len(str(MAX_CLASSES))
    if not is_number or int(label_text) >= MAX_CLASSES:
        shown = label_text if len(label_text) <= 24 else label_text[:21] + "..."
        return f"label {shown!r} is not a non-negative integer below {MAX_CLASSES}"
    return path, int(label_text)


def _is_sample_line(stripped: str) -> bool:
    """A label-file line that describes a sample (not blank, not a ``#`` comment), after ``strip()``."""
    return bool(stripped) and not stripped.startswith("#")


def count_label_lines(root: str | os.PathLike, label_file: str = "label.txt") -> int:
    """The samples ``root/label_file`` lists, without parsing them or looking for the images: the size of
    the :class:`FolderDataset` that strict mode builds (it stops at a bad line or a missing image)."""
    return sum(_is_sample_line(line.strip()) for line in _read_label_lines(Path(root) / label_file))


def _read_label_lines(label_path: Path) -> list[str]:
    if not label_path.is_file():
        raise PlscError(f"label file not found: {label_path}{_photo_folder_hint(label_path.parent)}")
    try:
        return label_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise PlscError(f"{label_path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PlscError(f"cannot read label file {label_path}: {exc.strerror or exc}") from None


def _photo_folder_hint(root: Path) -> str:
    """What to do when ``root`` looks like photos in one folder per person rather than a prepared set."""
    try:
        folders = [entry for entry in root.iterdir() if entry.is_dir() and entry.name != "images"]
    except OSError:
        return ""
    if not folders:
        return ""
    return (f" ({root} holds {len(folders)} sub-folders: if they are one folder of photos per person, "
            f"make a training set of them with: plsc prepare --input {root} --output NEW_FOLDER)")


def _list_files(directory: str) -> frozenset[str]:
    try:
        with os.scandir(directory) as entries:
            return frozenset(entry.name for entry in entries)
    except OSError:
        return frozenset()


def _missing_images(root: Path, rel_paths: list[str]) -> list[int]:
    """Positions of rel_paths whose file does not exist.

    One directory listing per folder instead of a stat per image: that matters for millions of images on
    network storage.
    """
    listings: dict[str, frozenset[str]] = {}
    missing = []
    for position, rel_path in enumerate(rel_paths):
        folder, _, name = rel_path.rpartition("/")
        if folder not in listings:
            listings[folder] = _list_files(os.path.join(root, folder))
        # the stat confirms absences only: "a/../b.jpg", case-insensitive file systems, ...
        if name not in listings[folder] and not os.path.isfile(os.path.join(root, rel_path)):
            missing.append(position)
    return missing


# --- storage ---


class _PackedStrings:
    """Many strings held in two numpy arrays.

    Millions of Python str objects would each get their reference count touched when read, which copies their
    memory pages into every forked loader worker; two arrays stay shared.
    """

    def __init__(self, strings: list[str]):
        encoded = [text.encode("utf-8") for text in strings]
        lengths = np.fromiter((len(item) for item in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, position: int) -> str:
        start, end = self._offsets[position], self._offsets[position + 1]
        return self._blob[start:end].tobytes().decode("utf-8")

    def select(self, keep: np.ndarray) -> _PackedStrings:
        return _PackedStrings([self[int(i)] for i in np.flatnonzero(keep)])


# --- the data set ---


class FolderDataset:
    """Images listed in ``root/label_file``; items are (BGR uint8 HxWx3 image, int label); see the module."""

    def __init__(
        self,
        root: str | os.PathLike,
        label_file: str = "label.txt",
        skip_bad: bool = False,
        verify_images: bool = False,
    ):
        self.root = Path(root)
        self._root_text = str(self.root)
        self.label_path = self.root / label_file
        self.skip_bad = bool(skip_bad)
        self.skipped = 0
        self.skipped_reasons: list[str] = []
        self.unreadable_indices: set[int] = set()
        if not self.root.is_dir():
            raise PlscError(f"data root is not a directory: {self.root}")
        rel_paths, labels, line_numbers = self._parse_label_file()
        # the label file defines the class space, even for lines whose image is missing
        self.num_classes = max(labels) + 1 if labels else 0
        rel_paths, labels = self._drop_missing_images(rel_paths, labels, line_numbers)
        if not rel_paths:
            raise PlscError(f"{self.label_path}: no usable samples ({self.skipped} skipped)")
        self._paths = _PackedStrings(rel_paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._log_skipped()
        if verify_images:
            self.verify_images()

    # --- construction ---

    def _problem(self, line_number: int, message: str) -> None:
        """Raise in strict mode; count and remember the explanation in skip mode."""
        where = f"{self.label_path} line {line_number}: {message}"
        if not self.skip_bad:
            raise PlscError(where)
        self.skipped += 1
        if len(self.skipped_reasons) < REASONS_KEPT:
            self.skipped_reasons.append(f"{self.label_path.name}:{line_number}: {message}")

    def _parse_label_file(self) -> tuple[list[str], list[int], list[int]]:
        rel_paths, labels, line_numbers = [], [], []
        for line_number, line in enumerate(_read_label_lines(self.label_path), start=1):
            stripped = line.strip()
            if not _is_sample_line(stripped):
                continue
            parsed = _parse_line(stripped)
            if isinstance(parsed, str):
                self._problem(line_number, parsed)
                continue
            rel_paths.append(parsed[0])
            labels.append(parsed[1])
            line_numbers.append(line_number)
        return rel_paths, labels, line_numbers

    def _drop_missing_images(self, rel_paths, labels, line_numbers) -> tuple[list[str], list[int]]:
        missing = _missing_images(self.root, rel_paths)
        if missing and not self.skip_bad:
            first = missing[0]
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise PlscError(
                f"{self.label_path} line {line_numbers[first]}: image not found: "
                f"{self.root / rel_paths[first]}{more}"
            )
        for position in missing:
            self._problem(line_numbers[position], f"image not found: {rel_paths[position]}")
        missing_set = set(missing)
        kept = [i for i in range(len(rel_paths)) if i not in missing_set]
        return [rel_paths[i] for i in kept], [labels[i] for i in kept]

    def _log_skipped(self) -> None:
        if self.skipped:
            first = self.skipped_reasons[0]
            log.warning("%s: skipped %d bad entries (first: %s)", self.label_path, self.skipped, first)

    # --- optional up-front verification ---

    def verify_images(self, num_threads: int | None = None, progress: bool = True) -> int:
        """Decode every image once; drop undecodable ones (skip mode) or raise naming the first (strict mode).

        Returns how many were dropped. Decoding releases the GIL, so threads use all cores.
        """
        from plsc.console import Progress

        readable = np.ones(len(self), dtype=bool)
        threads = num_threads or os.cpu_count() or 1
        chunk = 1024  # bounded number of pending futures, even for millions of images
        with (
            ThreadPoolExecutor(threads) as pool,
            Progress(len(self), "verifying images", "images", enabled=progress) as bar,
        ):
            for start in range(0, len(self), chunk):
                positions = range(start, min(start + chunk, len(self)))
                readable[start : positions.stop] = list(pool.map(self._is_readable, positions))
                bar.update(len(positions))
        return self._drop_unreadable(readable)

    def _is_readable(self, index: int) -> bool:
        try:
            read_image(self.image_path(index))
        except PlscError:
            return False
        return True

    def _drop_unreadable(self, readable: np.ndarray) -> int:
        bad = np.flatnonzero(~readable)
        if bad.size == 0:
            return 0
        if not self.skip_bad:
            first = self.image_path(int(bad[0]))
            raise PlscError(f"cannot decode image {first}: corrupt, truncated or not an image")
        for index in bad[: max(0, REASONS_KEPT - len(self.skipped_reasons))]:
            self.skipped_reasons.append(f"cannot decode image {self.relative_path(int(index))}")
        self.skipped += int(bad.size)
        if bad.size == len(self):
            raise PlscError(f"{self.label_path}: none of the {len(self)} images can be decoded")
        self._paths = self._paths.select(readable)
        self.labels = self.labels[readable]
        self.unreadable_indices.clear()  # indices moved; the bad files are gone anyway
        log.warning("%s: dropped %d undecodable images", self.label_path, bad.size)
        return int(bad.size)

    # --- access ---

    def __len__(self) -> int:
        return len(self.labels)

    def relative_path(self, index: int) -> str:
        return self._paths[self._check_index(index)]

    def image_path(self, index: int) -> Path:
        return self.root / self.relative_path(index)

    def _check_index(self, index: int) -> int:
        index = int(index)
        size = len(self.labels)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for {size} samples")
        return index % size

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = self._check_index(index)
        if self.skip_bad:
            return self._read_or_substitute(index)
        # the path as a string, without building a Path (a few us per sample)
        return read_image(os.path.join(self._root_text, self._paths[index])), int(self.labels[index])

    def _read_or_substitute(self, index: int) -> tuple[np.ndarray, int]:
        """The sample itself, or the next readable one in index order (deterministic, see the module doc)."""
        attempts = min(MAX_CONSECUTIVE_UNREADABLE, len(self))
        for step in range(attempts):
            candidate = (index + step) % len(self)
            if candidate in self.unreadable_indices:
                continue
            try:
                image = read_image(os.path.join(self._root_text, self._paths[candidate]))
                return image, int(self.labels[candidate])
            except PlscError as exc:
                self.unreadable_indices.add(candidate)
                log.warning("skip_bad_samples: %s; using the next sample instead", exc)
        raise PlscError(
            f"{attempts} consecutive images from {self.image_path(index)} on are unreadable; "
            "the data set looks broken"
        )

"""The label index of a ``.rec``: what opening a RecordDataset needs (where each image's bytes lie, its label,
its key), kept in a file so that opening does not read the record headers through the ``.rec``.

Building the index reads every image record's header once: for a 200 GB WebFace42M ``.rec`` that is the whole
file (minutes). It is then written as ``<stem>.plsc-index`` beside the ``.rec`` (``train.rec`` ->
``train.plsc-index``) and later opens map it (16 bytes per image, shared by every process of the node through
the page cache). Where the ``.rec``'s folder cannot be written, the index goes to the cache folder
(``$PLSC_CACHE_DIR``, else ``$XDG_CACHE_HOME/plsc``, else ``~/.cache/plsc``) under a name made of the stem and
a hash of the ``.rec``'s absolute path; a line in the log says so. Where neither can be written, the index is
built in memory at every open, also said in one line.

The index records the size and modification time (ns) of the ``.rec`` and of the ``.idx`` it was built from;
when either differs (or the file is damaged, or of another format version) it is rebuilt, with one log line
saying why. Processes that start together (8 ranks of a node) take an exclusive ``flock`` on a hidden lock
file beside the index: one builds, the others wait and then map what it wrote.

File format (version 1, little-endian), plain binary, never pickle:

- bytes 0-7: the magic ``PLSCRIX\\0``; bytes 8-11: uint32 length L of the metadata; then L bytes of strict
  JSON metadata: ``format`` (1), ``layout`` ("insightface" or "flat"), ``images`` (N > 0), ``num_classes``,
  ``first_key``, ``rec`` and ``idx`` (``{"name", "size", "mtime_ns"}``, ``idx`` null without an ``.idx``),
  ``rec_path`` (absolute, when written), ``columns`` (``{name: byte offset}``).
- the columns, each N values at a multiple of 64 bytes, the file ending with the last one. Their types are
  fixed by the format, not read from the file: ``payload_starts`` int64 (>= 0: the file offset of the image's
  encoded bytes; < 0: ``-(record offset) - 1``, a record split by the writer, read whole), ``payload_lengths``
  uint32, ``labels`` int32 and, only when the image keys are not ``first_key + position``, ``keys`` int64.

Reading treats the file as untrusted: sizes and offsets are checked before anything is mapped, every label is
checked to lie in [0, label limit) and every payload span inside the ``.rec`` (a pass of bounded memory).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from plsc import strict_json
from plsc.atomic import PendingFile
from plsc.errors import PlscError

log = logging.getLogger("plsc.data")

SUFFIX = ".plsc-index"
CACHE_DIR_ENV = "PLSC_CACHE_DIR"
MAGIC = b"PLSCRIX\0"
FORMAT = 1
LAYOUTS = ("insightface", "flat")
_PREFIX = struct.Struct("<8sI")  # magic, metadata length
_MAX_METADATA_BYTES = 1 << 16
_ALIGN = 64
_ANNOUNCED_BUILD_BYTES = 1 << 30  # a build reading a .rec this large is said in the log
_CHECK_ROWS = 1 << 18  # rows per pass of the content checks: temporaries stay at a few MB
# The smallest payload offset a whole record can have: its part header (8 bytes) and IRHeader (24).
MIN_PAYLOAD_START = 32
COLUMNS = {"payload_starts": np.dtype("<i8"), "payload_lengths": np.dtype("<u4"), "labels": np.dtype("<i4"),
           "keys": np.dtype("<i8")}
OPTIONAL_COLUMNS = ("keys",)


class IndexFileError(PlscError):
    """A label index file that cannot be used: damaged, truncated, of another format, or not one at all."""


# ----------------------------------------------------------------------------------------------------------
# What an index was built from


@dataclass(frozen=True)
class FileStamp:
    name: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        try:
            stat = path.stat()
        except OSError as error:
            raise PlscError(f"{path}: cannot read ({error.strerror})") from None
        return cls(path.name, stat.st_size, stat.st_mtime_ns)

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_json(cls, value, where: str) -> FileStamp:
        if not isinstance(value, dict) or set(value) != {"name", "size", "mtime_ns"}:
            raise IndexFileError(f"{where}: metadata field is not a file stamp")
        name, size, mtime_ns = value["name"], value["size"], value["mtime_ns"]
        if not isinstance(name, str) or not _is_int(size) or not _is_int(mtime_ns) or size < 0:
            raise IndexFileError(f"{where}: metadata field is not a file stamp")
        return cls(name, size, mtime_ns)

    def change_from(self, built: FileStamp) -> str | None:
        """How this file differs from the one an index was built from, or None."""
        if self.name != built.name:
            return f"built from {built.name}, not {self.name}"
        if self.size != built.size:
            return f"{self.name} changed size ({built.size} -> {self.size} bytes)"
        if self.mtime_ns != built.mtime_ns:
            return f"{self.name} was modified since"
        return None


@dataclass(frozen=True)
class SourceStamp:
    """Sizes and modification times of the ``.rec`` and ``.idx`` an index describes."""

    rec: FileStamp
    idx: FileStamp | None

    @classmethod
    def of(cls, rec_path: Path, idx_path: Path | None) -> SourceStamp:
        return cls(FileStamp.of(rec_path), FileStamp.of(idx_path) if idx_path is not None else None)

    def change_from(self, built: SourceStamp) -> str | None:
        """Why an index built from ``built`` does not describe these files, or None when it does."""
        if (self.idx is None) != (built.idx is None):
            return "built without an .idx" if built.idx is None else "built with an .idx"
        return self.rec.change_from(built.rec) or (self.idx.change_from(built.idx) if self.idx else None)


# ----------------------------------------------------------------------------------------------------------
# The index


@dataclass
class ImageIndex:
    """Per image, in data set order: where its encoded bytes are, its length, its label, its key."""

    layout: str
    first_key: int
    payload_starts: np.ndarray  # int64; < 0: -(record offset) - 1, read the record whole
    payload_lengths: np.ndarray  # uint32
    labels: np.ndarray  # int32
    keys: np.ndarray | None  # int64; None: keys are first_key + position
    num_classes: int
    path: Path | None = None  # the index file the columns are mapped from; None: built in memory

    def __len__(self) -> int:
        return len(self.labels)

    def image_keys(self) -> np.ndarray:
        if self.keys is not None:
            return self.keys
        return np.arange(self.first_key, self.first_key + len(self), dtype=np.int64)

    def key(self, position: int) -> int:
        if self.keys is not None:
            return int(self.keys[position])
        position = int(position)
        if not -len(self) <= position < len(self):
            raise IndexError(f"index {position} is out of bounds for {len(self)} images")
        return self.first_key + position % len(self)

    def __getstate__(self) -> dict:
        # A mapped index travels as its file's name (a spawned worker maps it again), not as its columns.
        state = self.__dict__.copy()
        if self.path is not None:
            state.update(payload_starts=None, payload_lengths=None, labels=None, keys=None)
            state["_file_identity"] = _file_identity(self.path)
        return state

    def __setstate__(self, state: dict) -> None:
        identity = state.pop("_file_identity", None)
        self.__dict__.update(state)
        if self.path is not None:
            if _file_identity(self.path) != identity:
                raise PlscError(f"{self.path}: the label index changed since the data set was opened")
            mapped = _map_index_file(self.path)[0]
            self.payload_starts, self.payload_lengths = mapped.payload_starts, mapped.payload_lengths
            self.labels, self.keys = mapped.labels, mapped.keys


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, 0, 0, 0)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_index_file(path: Path, index: ImageIndex, stamp: SourceStamp, rec_path: Path) -> None:
    """Write ``index`` to ``path`` atomically (temporary file, fsync, rename)."""
    columns = {"payload_starts": index.payload_starts, "payload_lengths": index.payload_lengths,
               "labels": index.labels}
    if index.keys is not None:
        columns["keys"] = index.keys
    metadata = {"format": FORMAT, "layout": index.layout, "images": len(index),
                "num_classes": index.num_classes, "first_key": index.first_key, "rec": stamp.rec.to_json(),
                "idx": stamp.idx.to_json() if stamp.idx else None, "rec_path": str(rec_path.resolve()),
                "columns": {}}
    # The metadata holds the column offsets, which depend on its own length: lay out with room for the
    # longest offsets, then pad the metadata text with spaces to exactly that room.
    metadata["columns"] = {name: 10**19 for name in columns}
    room = len(strict_json.dumps(metadata).encode())
    offset = _aligned(_PREFIX.size + room)
    for name, values in columns.items():
        metadata["columns"][name] = offset
        offset = _aligned(offset + len(values) * COLUMNS[name].itemsize)
    text = strict_json.dumps(metadata).encode().ljust(room)
    pending = PendingFile(path)
    try:
        handle = pending.file
        handle.write(_PREFIX.pack(MAGIC, len(text)) + text)
        for name, values in columns.items():
            handle.write(bytes(metadata["columns"][name] - handle.tell()))
            _write_column(handle, np.asarray(values), COLUMNS[name])
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def _write_column(handle, values: np.ndarray, dtype: np.dtype) -> None:
    for start in range(0, len(values), _CHECK_ROWS):
        handle.write(values[start:start + _CHECK_ROWS].astype(dtype, copy=False).tobytes())


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_index_file(path: Path, rec_size: int, label_limit: int
                    ) -> tuple[ImageIndex, SourceStamp, str | None]:
    """Map the index file ``path`` and check it against a ``.rec`` of ``rec_size`` bytes: (index, what it was
    built from, the absolute ``.rec`` path it was written for). IndexFileError (one line) when unusable."""
    index, metadata = _map_index_file(path)
    built_from, written_for = _source_of(metadata, str(path))
    _check_content(index, rec_size, label_limit, str(path))
    return index, built_from, written_for


def _source_of(metadata: dict, where: str) -> tuple[SourceStamp, str | None]:
    """(what the index was built from, the absolute ``.rec`` path it was written for)."""
    stamp = SourceStamp(FileStamp.from_json(metadata["rec"], where),
                        None if metadata["idx"] is None else FileStamp.from_json(metadata["idx"], where))
    rec_path = metadata.get("rec_path")
    return stamp, rec_path if isinstance(rec_path, str) else None


def _map_index_file(path: Path) -> tuple[ImageIndex, dict]:
    """The index's columns mapped read-only, after checking its layout (not yet its values)."""
    where = str(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            metadata, metadata_end = _read_metadata(handle, size, where)
            columns = _column_spans(metadata, metadata_end, size, where)
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise IndexFileError(f"{where}: cannot read ({error.strerror or error})") from None
    images = metadata["images"]
    arrays = {name: np.frombuffer(mapped, COLUMNS[name], count=images, offset=offset)
              for name, offset in columns.items()}
    index = ImageIndex(metadata["layout"], metadata["first_key"], arrays["payload_starts"],
                       arrays["payload_lengths"], arrays["labels"], arrays.get("keys"),
                       metadata["num_classes"], path)
    return index, metadata


def _read_metadata(handle, size: int, where: str) -> tuple[dict, int]:
    """(the metadata, the offset just past it)."""
    prefix = handle.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
        raise IndexFileError(f"{where}: not a plsc label index (bad magic)")
    length = _PREFIX.unpack(prefix)[1]
    if length > _MAX_METADATA_BYTES or _PREFIX.size + length > size:
        raise IndexFileError(f"{where}: metadata length {length} does not fit the file ({size} bytes); "
                             "truncated or damaged")
    try:
        metadata = strict_json.loads(handle.read(length).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IndexFileError(f"{where}: metadata is not JSON; damaged") from None
    if not isinstance(metadata, dict):
        raise IndexFileError(f"{where}: metadata is not a JSON object; damaged")
    if metadata.get("format") != FORMAT:
        raise IndexFileError(f"{where}: index format {metadata.get('format')!r}, this plsc reads {FORMAT}")
    _check_fields(metadata, where)
    return metadata, _PREFIX.size + length


def _check_fields(metadata: dict, where: str) -> None:
    checks = {
        "layout": lambda value: value in LAYOUTS,
        "images": lambda value: _is_int(value) and value > 0,
        "num_classes": lambda value: _is_int(value) and value > 0,
        "first_key": lambda value: _is_int(value) and 0 <= value < 2**62,
        "columns": lambda value: isinstance(value, dict) and all(map(_is_int, value.values())),
        "rec": lambda value: isinstance(value, dict),
        "idx": lambda value: value is None or isinstance(value, dict),
    }
    for name, check in checks.items():
        if name not in metadata or not check(metadata[name]):
            raise IndexFileError(f"{where}: metadata field {name!r} is missing or invalid; damaged")


def _column_spans(metadata: dict, metadata_end: int, size: int, where: str) -> dict[str, int]:
    """{column: offset}, after checking each lies aligned in the file, apart, and that the file ends with
    the last one (a truncated or extended file is refused)."""
    columns, images = metadata["columns"], metadata["images"]
    required = [name for name in COLUMNS if name not in OPTIONAL_COLUMNS]
    unknown = set(columns) - set(COLUMNS)
    if unknown or any(name not in columns for name in required):
        raise IndexFileError(f"{where}: columns {sorted(columns)} are not those of the format; damaged")
    spans = sorted((offset, offset + images * COLUMNS[name].itemsize, name)
                   for name, offset in columns.items())
    position = metadata_end
    for start, end, name in spans:
        if start % _ALIGN or start < position:
            raise IndexFileError(f"{where}: column {name} at offset {start} overlaps or is misaligned; "
                                 "damaged")
        position = end
    if position != size:
        raise IndexFileError(f"{where}: columns end at byte {position} but the file has {size}; "
                             "truncated or damaged")
    return dict(columns)


def _check_content(index: ImageIndex, rec_size: int, label_limit: int, where: str) -> None:
    """Every label in [0, label_limit) with the largest being num_classes - 1; every payload span inside the
    ``.rec``; in passes of bounded size over the mapped columns."""
    largest = -1
    for start in range(0, len(index), _CHECK_ROWS):
        rows = slice(start, start + _CHECK_ROWS)
        labels = index.labels[rows]
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= label_limit:
            raise IndexFileError(f"{where}: label {low if low < 0 else high} out of range; damaged")
        largest = max(largest, high)
        bad = _bad_spans(index.payload_starts[rows], index.payload_lengths[rows], rec_size)
        if len(bad):
            raise IndexFileError(f"{where}: image {start + int(bad[0])}'s bytes lie outside the .rec "
                                 f"({rec_size} bytes); stale or damaged")
    if largest + 1 != index.num_classes:
        raise IndexFileError(f"{where}: says {index.num_classes} classes, its labels {largest + 1}; damaged")


def _bad_spans(starts: np.ndarray, lengths: np.ndarray, rec_size: int) -> np.ndarray:
    # Starts are bounded before their ends are summed (int64 + uint32 is int64): near 2**63 the sum wraps.
    direct_in_file = starts.min() >= MIN_PAYLOAD_START and starts.max() <= rec_size
    if direct_in_file and (starts + lengths).max() <= rec_size:
        return np.empty(0, np.intp)  # no record read whole: a few reductions check the slice (every open)
    ends = np.minimum(starts, rec_size + 1) + lengths
    direct = starts >= 0
    record_offsets = -(starts + 1)  # meaningful where starts < 0; -(INT64_MIN + 1) is INT64_MAX, refused
    bad = np.where(direct, (starts < MIN_PAYLOAD_START) | (ends > rec_size),
                   (record_offsets >= rec_size) | (record_offsets % 4 != 0))
    return np.flatnonzero(bad)


def _is_int(value) -> bool:
    return type(value) is int  # JSON true/false are bool, an int subclass: refused


# ----------------------------------------------------------------------------------------------------------
# Where the index lives, and opening with it


def cache_dir() -> Path:
    """The folder for indexes that cannot sit beside their ``.rec``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "plsc"


def index_locations(rec_path: Path) -> list[Path]:
    """Where the index of ``rec_path`` is looked for and written, in order: beside it, then the cache
    folder."""
    beside = rec_path.with_name(rec_path.stem + SUFFIX)
    digest = hashlib.sha256(str(rec_path.resolve()).encode()).hexdigest()[:16]
    return [beside, cache_dir() / f"{rec_path.stem}-{digest}{SUFFIX}"]


CACHE_MODES = ("write", "read", "off")


def open_image_index(rec_path: Path, idx_path: Path | None, build: Callable[[], ImageIndex], label_limit: int,
                     cache: str = "write") -> ImageIndex:
    """The image index of ``rec_path``: mapped from its index file when that is current, else built by
    ``build()`` (reads every record header). ``cache``: "write" writes what it built for the next open,
    "read" only uses an index file already there (a one-off pass, as a conversion, leaves no file behind),
    "off" always builds."""
    if cache not in CACHE_MODES:
        raise PlscError(f"index cache mode must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if cache == "off":
        return build()
    stamp = SourceStamp.of(rec_path, idx_path)
    locations = index_locations(rec_path)
    index, reasons = _first_current(locations, rec_path, stamp, label_limit)
    if index is not None or cache == "read":
        return index if index is not None else build()
    problems = []
    for path in locations:
        try:
            with _build_lock(path):
                return _build_at(path, rec_path, idx_path, stamp, build, label_limit, reasons,
                                 beside=path == locations[0])
        except _CannotWrite as error:
            problems.append(str(error))
    log.warning("%s: label index not cached (%s); every open reads all record headers", rec_path,
                "; ".join(problems))
    return build()


def load_current_index(rec_path: Path, idx_path: Path | None, label_limit: int) -> ImageIndex | None:
    """The index of ``rec_path`` when a current one exists, else None (never builds)."""
    stamp = SourceStamp.of(rec_path, idx_path)
    return _first_current(index_locations(rec_path), rec_path, stamp, label_limit)[0]


def _first_current(locations: list[Path], rec_path: Path, stamp: SourceStamp, label_limit: int
                   ) -> tuple[ImageIndex | None, list[str]]:
    """(the first current index of ``locations`` or None, why each existing one was not)."""
    reasons = []
    for path in locations:
        index, reason = _load_current(path, rec_path, stamp, label_limit, beside=path == locations[0])
        if index is not None:
            return index, reasons
        if reason:
            reasons.append(reason)
    return None, reasons


class _CannotWrite(Exception):
    """The index file cannot be written at one location (read-only folder, no space, ...)."""


def _load_current(path: Path, rec_path: Path, stamp: SourceStamp, label_limit: int, beside: bool
                  ) -> tuple[ImageIndex | None, str | None]:
    """(the index at ``path`` when it describes the files as they are now, else None with why)."""
    if not path.is_file():
        return None, None
    try:
        index, metadata = _map_index_file(path)
        built_from, written_for = _source_of(metadata, str(path))
        if not beside and written_for != str(rec_path.resolve()):
            return None, f"{path}: written for {written_for}"
        change = stamp.change_from(built_from)
        if change:
            return None, f"{path}: stale ({change})"
        _check_content(index, stamp.rec.size, label_limit, str(path))  # after the cheap checks
    except IndexFileError as error:
        return None, str(error)
    return index, None


def _build_at(path: Path, rec_path: Path, idx_path: Path | None, stamp: SourceStamp,
              build: Callable[[], ImageIndex], label_limit: int, reasons: list[str], beside: bool
              ) -> ImageIndex:
    """Under the lock: map what another process wrote meanwhile, else build, write and map."""
    index, _ = _load_current(path, rec_path, stamp, label_limit, beside)
    if index is not None:
        return index
    for reason in reasons:
        log.warning("%s; rebuilding", reason)
    large = stamp.rec.size >= _ANNOUNCED_BUILD_BYTES
    if large:  # the wait to explain: minutes for a 200 GB file
        log.info("%s: building its label index at %s (reads every record header once)", rec_path, path)
    started = time.monotonic()
    index = build()
    if large:
        log.info("%s: label index of %d images built in %.0f s", rec_path, len(index),
                 time.monotonic() - started)
    if SourceStamp.of(rec_path, idx_path) != stamp:
        log.warning("%s: changed while it was indexed; index not cached", rec_path)
        return index
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_index_file(path, index, stamp, rec_path)
    except (OSError, PlscError) as error:
        raise _CannotWrite(f"{path}: {error}") from None
    if not beside:
        log.warning("%s: folder not writable; label index cached at %s (set %s to choose)", rec_path, path,
                    CACHE_DIR_ENV)
    return read_index_file(path, stamp.rec.size, label_limit)[0]


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on a hidden file beside ``path`` while the index is built there; _CannotWrite when
    the folder cannot be written. A file system without ``flock`` builds without it (the rename is atomic)."""
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.stat().st_mode & 0o222:
            # Root may write anywhere; a folder nobody may write to is still taken as meant to stay as it is.
            raise _CannotWrite(f"{path.parent}: read-only folder")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise _CannotWrite(f"{path.parent}: {error.strerror or error}") from None
    try:
        _lock(fd, path)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        log.info("%s: another process is building this label index; waiting for it", path)
    except OSError:  # no flock here (some network file systems): build unlocked, the rename is atomic
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)

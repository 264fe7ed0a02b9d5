"""MXNet RecordIO (``.rec`` + ``.idx``) read and write, without mxnet.

Format (checked against files written by MXNet 1.9.1, see tests/test_recordio.py):

- A ``.rec`` is a sequence of parts. Each part is the magic word 0xced7230a (uint32 little-endian), a
  uint32 ``lrecord`` whose top 3 bits are a continuation flag (0 whole record, 1 first part, 2 middle
  part, 3 last part) and whose low 29 bits are the part's length, then the part's bytes. The last part of a
  record is zero-padded to a multiple of 4 bytes, so every part starts 4-byte aligned.
- The writer splits a record wherever the magic word occurs at a 4-byte-aligned position of the record,
  dropping that word; the reader rejoins the parts with the magic word re-inserted between them. This keeps
  a reader that resynchronises on the magic word from mistaking record content for a record boundary.
- A ``.idx`` is text, one ``key<TAB>offset`` line per record; the offset is where its first part starts.
- A record made by ``mx.recordio.pack`` starts with the IRHeader ``<IfQQ`` (flag, label, id, id2). When
  flag > 0, ``flag`` float32 labels follow the header and the header's own label is 0.

InsightFace's layout (MS1M, Glint360k, ...): record 0 is a header with flag 2 and label ``[first identity
key, end]``; images are keys ``1..label[0]-1`` with scalar labels; then one record per identity with label
``[first image key, end key)``. A ``property`` file beside the ``.rec`` holds ``num_classes,height,width``.
im2rec's layout has no header records: every key is an image.

Nothing here imports paddle, so the module also works where only mxnet is installed (the compat tests).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from plsc.atomic import PendingFile, write_atomic
from plsc.config import MAX_CLASSES
from plsc.data.folder import decode_image_bytes
from plsc.errors import PlscError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")  # magic, lrecord
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_BYTES = 1 << _LENGTH_BITS  # a record (before splitting) must be shorter than this

WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

_IR_HEADER = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEADER.size  # 24

# float32 holds every integer up to 2**24 exactly; InsightFace stores record keys in float labels.
_FLOAT32_EXACT_LIMIT = 1 << 24
# Class labels of image records: integers below both 2**24 (above it, float32 labels are rounded: 16777217
# reads as 16777216) and MAX_CLASSES.
LABEL_LIMIT = min(_FLOAT32_EXACT_LIMIT, MAX_CLASSES)


class IRHeader(NamedTuple):
    """The header MXNet's ``recordio.pack`` puts before a payload.

    ``label`` is a float when ``flag`` is 0, otherwise a tuple of ``flag`` floats.
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


# ----------------------------------------------------------------------------------------------------
# IRHeader packing


def pack(header: IRHeader, payload: bytes) -> bytes:
    """IRHeader + payload -> record bytes; ``flag`` follows ``label`` (scalar: 0, sequence: its length)."""
    if np.ndim(header.label) == 0:
        prefix = _IR_HEADER.pack(0, float(header.label), header.id, header.id2)
        return prefix + bytes(payload)
    labels = np.asarray(header.label, dtype="<f4").ravel()
    if labels.size == 0:
        raise PlscError("IRHeader label sequence is empty; use a scalar label for flag 0")
    prefix = _IR_HEADER.pack(labels.size, 0.0, header.id, header.id2)
    return prefix + labels.tobytes() + bytes(payload)


def unpack(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Record bytes -> (IRHeader, payload). ``where`` names the record in error messages (file and key)."""
    header = unpack_header(record, where)
    start = IR_HEADER_SIZE + 4 * header.flag
    return header, bytes(record[start:])


def unpack_header(record: bytes, where: str = "record") -> IRHeader:
    """The IRHeader at the start of ``record`` (which may be just a prefix of the full record)."""
    if len(record) < IR_HEADER_SIZE:
        raise PlscError(f"{where}: {len(record)} bytes is shorter than the {IR_HEADER_SIZE}-byte IRHeader")
    flag, label, record_id, record_id2 = _IR_HEADER.unpack_from(record, 0)
    if flag == 0:
        return IRHeader(0, label, record_id, record_id2)
    end = IR_HEADER_SIZE + 4 * flag
    if len(record) < end:
        raise PlscError(
            f"{where}: IRHeader flag {flag} needs {end} bytes of header, record has {len(record)}"
        )
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_HEADER_SIZE)
    return IRHeader(flag, tuple(float(x) for x in labels), record_id, record_id2)


def is_class_label(values: np.ndarray) -> np.ndarray:
    """Which float labels are classes: integers in [0, LABEL_LIMIT) (nan and inf are not)."""
    with np.errstate(invalid="ignore"):
        return (values >= 0) & (values < LABEL_LIMIT) & (values == np.floor(values))


def first_label(header: IRHeader) -> float:
    """The class label of an image record: the scalar label, or the first of several (multi-label records)."""
    return header.label if header.flag == 0 else header.label[0]


# ----------------------------------------------------------------------------------------------------
# Reading


def _padded(length: int) -> int:
    return (length + 3) & ~3


class RecordReader:
    """Random and sequential access to a ``.rec``, by key when an ``.idx`` is given.

    Without an ``.idx`` the keys are the records' positions in the file (0, 1, ...), found by one scan over
    the part headers on first use of ``keys``/``read``/``len``.

    The file is memory-mapped lazily, on first read, so one reader can be shared by loader workers and
    threads: no file position is shared. A forked worker reads through the map it inherited (the same
    read-only pages), a spawned one maps the file itself (the map is not pickled).
    Reads are slices of the map: no system call per read (a record read costs ~3 us, against ~8 us for two
    ``os.pread`` calls).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._map: mmap.mmap | None = None
        self._size = 0
        self._check_rec_file()
        self._keys: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._dense = False  # keys are exactly 0..n-1, so a key is its own position in _offsets
        self._sorted_order: np.ndarray | None = None  # otherwise keys are found by binary search
        self._sorted_keys: np.ndarray | None = None
        if self.idx_path is not None:
            self._keys, self._offsets = _read_idx(self.idx_path, self.rec_path, self._size)
            self._index_ready()
        self._check_last_record()

    # -- opening and validation ------------------------------------------------------------------

    def _check_rec_file(self) -> None:
        if not self.rec_path.is_file():
            raise PlscError(f"{self.rec_path}: no such RecordIO file")
        size = self.rec_path.stat().st_size
        if size % 4:
            raise PlscError(f"{self.rec_path}: size {size} is not a multiple of 4; the file is truncated")
        self._size = size
        if size:
            self._read_part_header(0)  # a file not starting with the magic word is not RecordIO at all

    def _check_last_record(self) -> None:
        """Walk the parts of the record at the highest indexed offset: catches a file truncated inside it."""
        if self._offsets is not None and len(self._offsets):
            self._record_end(int(self._offsets.max()))

    def _index_ready(self) -> None:
        keys = self._keys
        keys.flags.writeable = False  # handed out by .keys
        self._dense = bool(len(keys) == 0 or (keys[0] == 0 and np.array_equal(keys, np.arange(len(keys)))))
        if not self._dense:
            self._sorted_order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sorted_order]

    def _ensure_index(self) -> None:
        if self._offsets is None:
            self._offsets = np.fromiter(self._scan_offsets(), dtype=np.int64)
            self._keys = np.arange(len(self._offsets), dtype=np.int64)
            self._index_ready()

    # -- low-level reads -------------------------------------------------------------------------

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.rec_path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def _pread(self, length: int, offset: int) -> bytes:
        # Never called on an empty file: every read is of a record, checked against the size first.
        data = self._mapped()[offset : offset + length]
        if len(data) != length:
            raise PlscError(
                f"{self.rec_path}: offset {offset}: needs {length} bytes but the file ends at {self._size} "
                "(truncated)"
            )
        return data

    def _read_part_header(self, offset: int) -> tuple[int, int]:
        """(continuation flag, length) of the part starting at ``offset``."""
        if offset + _PART_HEADER.size > self._size:
            raise PlscError(
                f"{self.rec_path}: offset {offset}: record header past the end of the file (truncated)"
            )
        magic, lrecord = _PART_HEADER.unpack(self._pread(_PART_HEADER.size, offset))
        if magic != MAGIC:
            raise PlscError(
                f"{self.rec_path}: offset {offset}: bad magic 0x{magic:08x}, not a RecordIO record"
            )
        cflag, length = lrecord >> _LENGTH_BITS, lrecord & _LENGTH_MASK
        if offset + _PART_HEADER.size + _padded(length) > self._size:
            raise PlscError(
                f"{self.rec_path}: offset {offset}: record of {length} bytes runs past the end "
                f"of the file ({self._size} bytes); truncated"
            )
        return cflag, length

    def _parts(self, offset: int) -> Iterator[tuple[int, int]]:
        """(data offset, length) of each part of the record at ``offset``; checks the flag sequence."""
        cflag, length = self._read_part_header(offset)
        if cflag not in (WHOLE, FIRST):
            raise PlscError(
                f"{self.rec_path}: offset {offset}: not the start of a record (continuation flag {cflag})"
            )
        yield offset + _PART_HEADER.size, length
        position = offset + _PART_HEADER.size + _padded(length)
        while cflag in (FIRST, MIDDLE):
            cflag, length = self._read_part_header(position)
            if cflag not in (MIDDLE, LAST):
                raise PlscError(
                    f"{self.rec_path}: offset {position}: split record started at {offset} "
                    f"is not continued (continuation flag {cflag})"
                )
            yield position + _PART_HEADER.size, length
            position += _PART_HEADER.size + _padded(length)

    def _record_end(self, offset: int) -> int:
        end = offset
        for data_offset, length in self._parts(offset):
            end = data_offset + _padded(length)
        return end

    def _scan_offsets(self) -> Iterator[int]:
        offset = 0
        while offset < self._size:
            yield offset
            offset = self._record_end(offset)

    def _read_with_end(self, offset: int) -> tuple[bytes, int]:
        """(record with its parts rejoined, offset just past its padding)."""
        chunks, end = [], offset
        for data_offset, length in self._parts(offset):
            chunks.append(self._pread(length, data_offset))
            end = data_offset + _padded(length)
        return MAGIC_BYTES.join(chunks), end

    # -- public API ------------------------------------------------------------------------------

    @property
    def keys(self) -> np.ndarray:
        """The record keys (int64), in ``.idx`` order; positions 0..n-1 without an ``.idx``."""
        self._ensure_index()
        return self._keys

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return self._position(key) is not None

    def offsets_of(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """The byte offsets of the records ``keys`` (int64), for :meth:`read_at`."""
        return self._offsets[self._positions(keys)]

    def offset_of(self, key: int) -> int:
        position = self._position(key)
        if position is None:
            raise PlscError(f"{self._index_name()}: no record with key {key}")
        return int(self._offsets[position])

    def read_at(self, offset: int) -> bytes:
        """The record (parts rejoined) whose first part starts at byte ``offset``."""
        if offset < 0 or offset >= self._size or offset % 4:
            raise PlscError(
                f"{self.rec_path}: offset {offset} is not a record position (file is {self._size} bytes)"
            )
        return self._read_with_end(offset)[0]

    def read(self, key: int) -> bytes:
        """The record stored under ``key``."""
        return self.read_at(self.offset_of(key))

    def read_header(self, key: int) -> IRHeader:
        """The IRHeader of record ``key``, reading only its first bytes when the record is not split."""
        offset = self.offset_of(key)
        cflag, length = self._read_part_header(offset)
        where = f"{self.rec_path}: key {key}"
        if cflag != WHOLE:
            return unpack_header(self.read_at(offset), where)
        # One read covers the header and up to 8 labels; a longer label list costs a second read.
        prefix = self._pread(min(length, IR_HEADER_SIZE + 32), offset + _PART_HEADER.size)
        flag = _IR_HEADER.unpack_from(prefix)[0] if len(prefix) >= IR_HEADER_SIZE else 0
        if IR_HEADER_SIZE + 4 * flag > len(prefix):
            prefix = self._pread(min(length, IR_HEADER_SIZE + 4 * flag), offset + _PART_HEADER.size)
        return unpack_header(prefix, where)

    def first_labels(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """The class label (scalar, or first of several) of each record in ``keys``, as float32.

        Reading 5M headers one ``pread`` at a time takes minutes in Python; here the headers are gathered from
        a read-only memory map in one vectorised pass. Records that are split or look wrong go through
        :meth:`read_header`, which either copes or raises the precise error.
        """
        keys = np.asarray(keys).ravel()
        labels = np.zeros(len(keys), dtype=np.float32)
        if not len(labels):
            return labels
        words, first_word, length, flag, whole = self._headers(self.offsets_of(keys))
        label_word = np.where(flag == 0, first_word + 3, first_word + 8)
        simple = whole & (length >= IR_HEADER_SIZE + 4 * np.minimum(flag, 1)) & (label_word < len(words))
        labels[simple] = words[label_word[simple]].view("<f4")
        for position in np.flatnonzero(~simple):
            labels[position] = first_label(self.read_header(int(keys[position])))
        return labels

    def payload_spans(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file offset, length) of the payload of each record in ``keys``, found in one vectorised pass over
        their headers, for :meth:`read_span`; offset -1 where the record is split by the writer or looks
        wrong (read it with :meth:`read`, which either copes or raises the precise error)."""
        words, first_word, length, flag, whole = self._headers(self.offsets_of(keys))
        prefix = IR_HEADER_SIZE + 4 * flag.astype(np.int64)
        plain = whole & (length >= prefix)
        starts = np.where(plain, first_word * 4 + _PART_HEADER.size + prefix, -1)
        return starts, np.where(plain, length - prefix, 0)

    def _headers(self, offsets: np.ndarray):
        """Part and IRHeader fields of the records at ``offsets`` from a memory map, vectorised: (words,
        first word, part length, IRHeader flag, whether the record is one whole part under the magic)."""
        # An empty file cannot be mapped; it has no records, so ``offsets`` is empty then.
        words = np.memmap(self.rec_path, dtype="<u4", mode="r") if self._size else np.zeros(0, "<u4")
        last = len(words) - 1

        def word(index: np.ndarray) -> np.ndarray:  # clipped: out-of-file reads are excluded by `whole`
            return words[np.minimum(index, last)]

        first_word = np.asarray(offsets, dtype=np.int64) // 4  # 4-byte aligned, checked with the index
        lrecord = word(first_word + 1)
        length, cflag = (lrecord & _LENGTH_MASK).astype(np.int64), lrecord >> _LENGTH_BITS
        flag = word(first_word + 2)
        end = first_word * 4 + _PART_HEADER.size + length
        in_file = (first_word + 2 <= last) & (end <= self._size)
        whole = (word(first_word) == MAGIC) & (cflag == WHOLE) & in_file
        return words, first_word, length, flag, whole

    def read_span(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the file from ``offset`` (a span from :meth:`payload_spans`, which lies in the
        file: no size check)."""
        return self._mapped()[offset : offset + length]

    def __iter__(self) -> Iterator[bytes]:
        """Every record in file order (ignores the ``.idx``)."""
        offset = 0
        while offset < self._size:
            record, offset = self._read_with_end(offset)
            yield record

    def close(self) -> None:
        if self._map is not None:
            self._map.close()  # in this process only: a forked worker's copy of the map stays open
        self._map = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def __getstate__(self) -> dict:
        # A map cannot be pickled; the receiver maps the file itself on first read.
        state = self.__dict__.copy()
        state["_map"] = None
        return state

    # -- key lookup ------------------------------------------------------------------------------

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised key -> (position in ``_offsets``, whether the key exists)."""
        self._ensure_index()
        if self._dense:
            return keys, (keys >= 0) & (keys < len(self._keys))
        if not len(self._sorted_keys):
            return keys, np.zeros(len(keys), dtype=bool)
        slots = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        return self._sorted_order[slots], self._sorted_keys[slots] == keys

    def _positions(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions of ``keys`` in ``_offsets``; PlscError naming the first key that is absent."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        positions, found = self._lookup(keys)
        if not found.all():
            raise PlscError(f"{self._index_name()}: no record with key {keys[~found][0]}")
        return positions

    def _position(self, key: int) -> int | None:
        positions, found = self._lookup(np.array([int(key)], dtype=np.int64))
        return int(positions[0]) if found[0] else None

    def _index_name(self) -> str:
        return str(self.idx_path) if self.idx_path is not None else str(self.rec_path)


def _read_idx(idx_path: Path, rec_path: Path, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``key<TAB>offset`` lines -> (keys, offsets), checking that every offset is inside the ``.rec``."""
    if not idx_path.is_file():
        raise PlscError(f"{idx_path}: no such RecordIO index file")
    try:
        text = idx_path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise PlscError(f"{idx_path}: not a RecordIO index (not ASCII text)") from None
    table = _parse_idx_fast(text)
    if table is None:
        table = _parse_idx_lines(idx_path, text)
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    _check_idx_table(idx_path, rec_path, rec_size, keys, offsets)
    return keys, offsets


def _parse_idx_fast(text: str) -> np.ndarray | None:
    """numpy parse of a well-formed index (MS1M's has 5M lines); None when anything looks off."""
    fields = text.split()
    lines = sum(1 for line in text.splitlines() if line.strip())
    if len(fields) != 2 * lines or text.count("\t") != lines:
        return None
    try:
        return np.array(fields, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        return None


def _parse_idx_lines(idx_path: Path, text: str) -> np.ndarray:
    """Line-by-line parse, so the error names the first bad line."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 2:
                raise ValueError
            rows.append((int(fields[0]), int(fields[1])))
        except ValueError:
            raise PlscError(
                f"{idx_path}: line {number}: expected 'key<TAB>offset', got {line[:60]!r}"
            ) from None
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _check_idx_table(
    idx_path: Path, rec_path: Path, rec_size: int, keys: np.ndarray, offsets: np.ndarray
) -> None:
    if len(keys) == 0:
        return
    bad = np.flatnonzero((offsets < 0) | (offsets >= rec_size) | (offsets % 4 != 0))
    if len(bad):
        at = int(bad[0])
        raise PlscError(
            f"{idx_path}: key {keys[at]} points at offset {offsets[at]}, which is not a record position "
            f"in {rec_path} ({rec_size} bytes)"
        )
    unique, counts = np.unique(keys, return_counts=True)
    if len(unique) != len(keys):
        raise PlscError(f"{idx_path}: key {unique[counts > 1][0]} appears more than once")


# ----------------------------------------------------------------------------------------------------
# Writing


def split_parts(record: bytes) -> list[bytes]:
    """Cut ``record`` at every magic word found at a 4-byte-aligned position, dropping the word itself."""
    parts, start, search = [], 0, 0
    while True:
        found = record.find(MAGIC_BYTES, search)
        if found < 0 or found + 4 > len(record):
            break
        if found % 4 == 0:
            parts.append(record[start:found])
            start = found + 4
        search = found + 1
    parts.append(record[start:])
    return parts


def encode_record(record: bytes) -> bytes:
    """The on-disk bytes of one record: its parts with their headers, plus the final padding."""
    record = bytes(record)
    if len(record) >= MAX_RECORD_BYTES:
        raise PlscError(
            f"record of {len(record)} bytes is too large for RecordIO (limit {MAX_RECORD_BYTES - 1})"
        )
    parts = split_parts(record)
    flags = [WHOLE] if len(parts) == 1 else [FIRST] + [MIDDLE] * (len(parts) - 2) + [LAST]
    out = bytearray()
    for cflag, part in zip(flags, parts, strict=True):
        out += _PART_HEADER.pack(MAGIC, (cflag << _LENGTH_BITS) | len(part))
        out += part
    out += bytes(_padded(len(out)) - len(out))
    return bytes(out)


class RecordWriter:
    """Write a ``.rec`` (and optionally its ``.idx``) atomically.

    Data goes to temporary files beside the targets, renamed into place by :meth:`close`. Leaving the ``with``
    block on an exception (or calling :meth:`abort`) removes them, so a failed write never leaves a truncated
    ``.rec`` that looks valid next to an older ``.idx``.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec = PendingFile(self.rec_path)
        self._idx = None
        if self.idx_path is not None:
            try:
                self._idx = PendingFile(self.idx_path, "w", encoding="ascii", newline="\n")
            except BaseException:
                self._rec.discard()
                raise
        self._offset = 0
        self._count = 0
        self._keys: set[int] = set()
        self._closed = False

    @property
    def count(self) -> int:
        return self._count

    def write(self, record: bytes, key: int | None = None) -> int:
        """Append one record (key defaults to the number written so far); returns its offset."""
        key = self._count if key is None else int(key)
        if key in self._keys:
            raise PlscError(f"{self.rec_path}: key {key} written twice")
        encoded = encode_record(record)
        offset = self._offset
        self._rec.file.write(encoded)
        if self._idx is not None:
            self._idx.file.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        self._offset += len(encoded)
        self._count += 1
        return offset

    def close(self) -> None:
        """Finish: flush and move the files into place."""
        if self._closed:
            return
        self._closed = True
        pending = [self._rec] + ([self._idx] if self._idx is not None else [])
        try:
            for file in pending:  # both complete on disk before either is renamed
                file.sync()
            for file in pending:
                file.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything written (a file already renamed into place stays)."""
        self._closed = True
        for pending in (self._rec, self._idx):
            if pending is not None:
                pending.discard()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_property(path: str | os.PathLike, num_classes: int, height: int, width: int) -> None:
    """InsightFace's ``property`` file, ``num_classes,height,width``, written atomically."""
    write_atomic(path, f"{int(num_classes)},{int(height)},{int(width)}\n")


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """(num_classes, height, width) from an InsightFace ``property`` file."""
    path = Path(path)
    try:
        num_classes, height, width = (int(field) for field in path.read_text().strip().split(","))
    except (OSError, ValueError):
        raise PlscError(f"{path}: expected 'num_classes,height,width' (e.g. 93431,112,112)") from None
    return num_classes, height, width


def write_insightface(
    output_prefix: str | os.PathLike,
    samples: Sequence[tuple[bytes | os.PathLike | str, int]],
    image_size: tuple[int, int] = (112, 112),
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Write ``<prefix>.rec``, ``<prefix>.idx`` and ``property`` (beside them) in InsightFace's layout.

    ``samples`` are (encoded image bytes or a path to read them from, label). Images are stored verbatim and
    ordered by label (stable), because identity records describe each class as one contiguous key range.
    ``image_size`` is (height, width) for ``property``. ``progress``: optional callable wrapping an iterable
    (e.g. ``functools.partial(plsc.console.progress, total=..., desc=..., unit=...)``).
    Returns ``{"images", "num_classes", "rec", "idx", "property"}``.
    """
    labels = _check_labels(output_prefix, [label for _, label in samples])
    order = np.argsort(labels, kind="stable")
    num_images, num_classes = len(labels), int(labels.max()) + 1
    first_identity_key = num_images + 1
    end_key = first_identity_key + num_classes
    if end_key > _FLOAT32_EXACT_LIMIT:
        raise PlscError(
            f"{output_prefix}: {end_key} records exceed what float32 header labels can address exactly"
        )
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")
    items = order if progress is None else progress(order)
    with RecordWriter(rec_path, idx_path) as writer:
        writer.write(pack(IRHeader(2, (first_identity_key, end_key), 0, 0), b""), key=0)
        for key, index in enumerate(items, start=1):
            source, label = samples[index]
            header = IRHeader(0, float(label), key, 0)
            writer.write(pack(header, _payload_bytes(source)), key=key)
        _write_identity_records(writer, labels[order], first_identity_key)
    property_path = prefix.parent / "property"
    write_property(property_path, num_classes, *image_size)
    return {
        "images": num_images,
        "num_classes": num_classes,
        "rec": rec_path,
        "idx": idx_path,
        "property": property_path,
    }


def _check_labels(where, labels: Sequence[int]) -> np.ndarray:
    if not len(labels):
        raise PlscError(f"{where}: no images to write")
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
        raise PlscError(f"{where}: labels must be non-negative integers")
    return array.astype(np.int64)


def _write_identity_records(writer: RecordWriter, sorted_labels: np.ndarray, first_identity_key: int) -> None:
    """One record per class 0..max: label [first image key, end key); an absent class gets an empty range."""
    num_classes = int(sorted_labels[-1]) + 1
    starts = np.searchsorted(sorted_labels, np.arange(num_classes), side="left") + 1
    ends = np.searchsorted(sorted_labels, np.arange(num_classes), side="right") + 1
    for label in range(num_classes):
        key = first_identity_key + label
        header = IRHeader(2, (int(starts[label]), int(ends[label])), key, 0)
        writer.write(pack(header, b""), key=key)


def _payload_bytes(source: bytes | os.PathLike | str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as error:
        raise PlscError(f"{source}: cannot read image ({error.strerror})") from None


# ----------------------------------------------------------------------------------------------------
# Training dataset


def find_image_keys(reader: RecordReader, rec_path: Path) -> tuple[str, np.ndarray]:
    """The layout of a ``.rec`` ("insightface" or "flat") and the keys of its image records."""
    if len(reader) == 0:
        raise PlscError(f"{rec_path}: contains no records")
    if 0 in reader:
        header, payload = unpack(reader.read(0), f"{rec_path}: key 0")
        # An image always has bytes; InsightFace's header record has none (its multi-label images also
        # have flag > 0, so the flag alone cannot tell the two apart).
        if header.flag > 0 and not payload:
            return "insightface", _insightface_image_keys(reader, rec_path, header)
    return "flat", np.array(reader.keys, dtype=np.int64)


def _insightface_image_keys(reader: RecordReader, rec_path: Path, header: IRHeader) -> np.ndarray:
    end = header.label[0]
    if not (math.isfinite(end) and end == int(end) and 1 < end <= len(reader)):
        # Checked before anything is sized by it: a damaged header must not allocate 10^15 keys.
        raise PlscError(f"{rec_path}: header record says images are keys 1..{end:g}-1, but the file "
                        f"has {len(reader)} records (label {header.label})")
    end = int(end)
    keys = np.arange(1, end, dtype=np.int64)
    missing = keys[~np.isin(keys, reader.keys)]
    if len(missing):
        raise PlscError(
            f"{rec_path}: header record says images are keys 1..{end - 1}, but key {missing[0]} is missing"
        )
    return keys


def _index_beside(rec_path: Path, idx_path: str | os.PathLike | None) -> str | os.PathLike | None:
    """``idx_path``, or when it is None the ``.idx`` beside the ``.rec`` if there is one."""
    if idx_path is None and rec_path.with_suffix(".idx").is_file():
        return rec_path.with_suffix(".idx")
    return idx_path


def count_record_images(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> int:
    """How many images a :class:`RecordDataset` of ``rec_path`` holds, from its index (the ``.idx`` beside
    it when there is one) and its header record, without reading the images' labels."""
    rec_path = Path(rec_path)
    with RecordReader(rec_path, _index_beside(rec_path, idx_path)) as reader:
        return len(find_image_keys(reader, rec_path)[1])


class RecordDataset:
    """Face training samples straight from a ``.rec``: ``dataset[i] -> (BGR uint8 HxWx3, label)``.

    Layouts: InsightFace (record 0 is a header with flag > 0 and an empty payload; images are keys
    ``1..label[0]-1``) and im2rec's flat layout (every key is an image). Multi-label image headers use their
    first label as the class. When ``idx_path`` is None the ``.idx`` beside the ``.rec`` is used if it exists.

    Opening reads only the image headers (labels), not the images.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        rec_path = Path(rec_path)
        self.reader = RecordReader(rec_path, _index_beside(rec_path, idx_path))
        self.rec_path = rec_path
        self._rec_text = str(rec_path)
        self.layout, self.image_keys = find_image_keys(self.reader, rec_path)  # "insightface" or "flat"
        self.image_offsets = self.reader.offsets_of(self.image_keys)  # no key lookup per sample
        # Where each image's encoded bytes lie: one slice of the map per sample, no header parsing.
        self._payload_starts, self._payload_lengths = self.reader.payload_spans(self.image_keys)
        self.labels = self._read_labels()
        self.num_classes = int(self.labels.max()) + 1

    def _read_labels(self) -> np.ndarray:
        values = self.reader.first_labels(self.image_keys)
        bad = np.flatnonzero(~is_class_label(values))
        if len(bad):
            key, value = int(self.image_keys[bad[0]]), values[bad[0]]
            raise PlscError(f"{self.rec_path}: key {key}: label {value:g} is not a non-negative integer "
                            f"below {LABEL_LIMIT} (float32 labels hold larger integers inexactly)")
        return values.astype(np.int64)

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        payload = self.encoded(index)
        image = decode_image_bytes(payload)
        if image is None:  # the message is only built when needed (it costs as much as the read)
            raise _undecodable(self._where(index), payload)
        return image, int(self.labels[index])

    def encoded(self, index: int) -> bytes:
        """Image ``index``'s encoded bytes (the record's payload)."""
        start = int(self._payload_starts[index])  # numpy's IndexError when out of range
        if start >= 0:
            return self.reader.read_span(start, int(self._payload_lengths[index]))
        return unpack(self.reader.read_at(int(self.image_offsets[index])), self._where(index))[1]

    def _where(self, index: int) -> str:
        return f"{self._rec_text}: key {self.image_keys[index]}"


def decode_image(payload: bytes, where: str) -> np.ndarray:
    """Encoded bytes -> BGR uint8 HxWx3, or a PlscError naming ``where``."""
    image = decode_image_bytes(payload)
    if image is None:
        raise _undecodable(where, payload)
    return image


def _undecodable(where: str, payload: bytes) -> PlscError:
    return PlscError(f"{where}: payload of {len(payload)} bytes is not a decodable image")

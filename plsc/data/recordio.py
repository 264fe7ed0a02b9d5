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

Past float32's exact range (2**24 = 16,777,216 records): MXNet's ``pack`` stores every label as float32, so
the insightface layout's header and identity records, which hold record keys, hold them rounded (to even
keys up to 2**25, multiples of 4 up to 2**26). For WebFace42M arcface_torch's docs
(``docs/prepare_webface42m.md``) make the ``.rec`` with mxnet's im2rec: image records only, IRHeader
``(0, label, id = key, 0)``, the key (the image's position in the ``.lst``, shuffled by default) stored only
in the ``.idx`` as an integer; ``MXFaceDataset`` then takes every ``.idx`` key as an image (record 0's flag
is 0). Class labels stay float32 in every layout: exact below 2**24 classes. plsc writes the im2rec layout
past 2**24 records, reads both, and reads an insightface header past 2**24 by finding the identity record
nearest the rounded key.

Nothing here imports paddle, so the module also works where only mxnet is installed (the compat tests).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from plsc.atomic import PendingFile, write_atomic
from plsc.config import MAX_CLASSES
from plsc.data.folder import decode_image_bytes
from plsc.data.recordio_index import ImageIndex, load_current_index, open_image_index
from plsc.errors import PlscError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")  # magic, lrecord
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_BYTES = 1 << _LENGTH_BITS  # a record (before splitting) must be shorter than this

_ROWS = 1 << 20  # index entries per slice of a whole-index check: temporaries of a few MB at any size
# Records per vectorised header pass (their pages are then unmapped). A pass maps about one page per
# record of an image or larger: 4096 keep that window at ~17 MB, 17 B/sample at 1M images.
HEADER_ROWS = 1 << 12
_HEADER_SPAN = 64  # bytes from a record's start that reading its header touches (8 + 24 + a first label)
_IDX_BLOCK_BYTES = 1 << 24  # .idx text parsed per block

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

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 index_on_demand: bool = False):
        """``index_on_demand``: read the ``.idx`` on the first lookup by key rather than now (a reader that
        only reads at known offsets, as RecordDataset's, never reads it)."""
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
        if self.idx_path is not None and not index_on_demand:
            self._ensure_index()

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

    def _ensure_index(self) -> None:
        """Keys and offsets from the ``.idx``, or without one from a scan of the part headers."""
        if self._offsets is not None:
            return
        if self.idx_path is None:
            offsets = np.fromiter(self._scan_offsets(), dtype=np.int64)
            keys = np.arange(len(offsets), dtype=np.int64)
        else:
            keys, offsets = _read_idx(self.idx_path, self.rec_path, self._size)
        self._dense = is_key_range(keys, 0)
        if not self._dense:
            self._sorted_order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sorted_order]
            self._check_unique_keys()
        keys.flags.writeable = offsets.flags.writeable = False  # handed out by .keys and .offsets
        self._keys, self._offsets = keys, offsets
        self._check_last_record()

    def _check_unique_keys(self) -> None:
        ordered = self._sorted_keys
        for start in range(0, len(ordered) - 1, _ROWS):
            part = ordered[start : start + _ROWS + 1]
            repeated = np.flatnonzero(part[1:] == part[:-1])
            if len(repeated):
                raise PlscError(f"{self._index_name()}: key {part[repeated[0]]} appears more than once")

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

    @property
    def offsets(self) -> np.ndarray:
        """The record offsets (int64), in the order of :attr:`keys`."""
        self._ensure_index()
        return self._offsets

    def __len__(self) -> int:
        return len(self.keys)

    def first_missing(self, keys: np.ndarray) -> int | None:
        """The first of ``keys`` that has no record, or None (looked up a slice at a time)."""
        for start in range(0, len(keys), _ROWS):
            part = np.asarray(keys[start : start + _ROWS], dtype=np.int64)
            found = self._lookup(part)[1]
            if not found.all():
                return int(part[~found][0])
        return None

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
        return self._header_at(self.offset_of(key), f"{self.rec_path}: key {key}")

    def _header_at(self, offset: int, where: str) -> IRHeader:
        cflag, length = self._read_part_header(offset)
        if cflag != WHOLE:
            return unpack_header(self.read_at(offset), where)
        # One read covers the header and up to 8 labels; a longer label list costs a second read.
        prefix = self._pread(min(length, IR_HEADER_SIZE + 32), offset + _PART_HEADER.size)
        flag = _IR_HEADER.unpack_from(prefix)[0] if len(prefix) >= IR_HEADER_SIZE else 0
        if IR_HEADER_SIZE + 4 * flag > len(prefix):
            prefix = self._pread(min(length, IR_HEADER_SIZE + 4 * flag), offset + _PART_HEADER.size)
        return unpack_header(prefix, where)

    def first_labels(self, keys: Sequence[int] | np.ndarray) -> np.ndarray:
        """The class label (scalar, or first of several) of each record in ``keys``, as float32."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        return self.image_headers(self.offsets_of(keys), keys)[2]

    def payload_spans(self, keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file offset, length) of the payload of each record in ``keys``, for :meth:`read_span`; where the
        record is split by the writer or looks wrong, -(record offset) - 1 and 0 (read it with
        :meth:`read_at`, which either copes or raises the precise error)."""
        keys = np.asarray(keys, dtype=np.int64).ravel()
        starts, lengths, _ = self.image_headers(self.offsets_of(keys), keys)
        return starts, lengths

    def image_headers(self, offsets: np.ndarray, keys: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Payload start (see :meth:`payload_spans`), payload length (uint32) and class label (float32) of
        the records at ``offsets`` (named by ``keys`` in errors).

        Reading 5M headers one ``pread`` at a time takes minutes in Python; here they are gathered from a
        read-only memory map in vectorised passes of HEADER_ROWS records, each pass's pages unmapped after it
        (they stay in the page cache), so the memory used does not grow with the file. A record whose label
        is not where a whole record has it is read whole, which either copes or raises the precise error.
        """
        count = len(offsets)
        starts, lengths = np.empty(count, np.int64), np.empty(count, np.uint32)
        labels = np.empty(count, np.float32)
        if count:  # an empty file cannot be mapped; it has no records, so ``offsets`` is empty then
            with open(self.rec_path, "rb") as file:
                pages = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            words = np.frombuffer(pages, dtype="<u4")
            for first in range(0, count, HEADER_ROWS):
                rows = slice(first, first + HEADER_ROWS)
                part = np.asarray(offsets[rows], dtype=np.int64)
                starts[rows], lengths[rows], labels[rows] = self._header_fields(words, part)
                _unmap_pages(pages, part)
            del words
            pages.close()
        for position in np.flatnonzero(np.isnan(labels)):
            header = self._header_at(int(offsets[position]), f"{self.rec_path}: key {keys[position]}")
            labels[position] = first_label(header)
        return starts, lengths, labels

    def _header_fields(self, words: np.ndarray, offsets: np.ndarray):
        """(payload starts, payload lengths, labels; NaN where the record must be read whole) of the records
        at ``offsets`` (4-byte aligned, checked with the index), from the words of the mapped file."""
        last = len(words) - 1

        def word(index: np.ndarray) -> np.ndarray:  # clipped: out-of-file reads are excluded by `whole`
            return words[np.minimum(index, last)]

        first_word = offsets // 4
        lrecord = word(first_word + 1)
        length, cflag = (lrecord & _LENGTH_MASK).astype(np.int64), lrecord >> _LENGTH_BITS
        flag = word(first_word + 2).astype(np.int64)
        in_file = (first_word + 2 <= last) & (offsets + _PART_HEADER.size + length <= self._size)
        whole = (word(first_word) == MAGIC) & (cflag == WHOLE) & in_file
        label_word = np.where(flag == 0, first_word + 3, first_word + 8)
        has_label = whole & (length >= IR_HEADER_SIZE + 4 * np.minimum(flag, 1)) & (label_word <= last)
        labels = np.where(has_label, word(label_word).view("<f4"), np.float32(np.nan))
        prefix = IR_HEADER_SIZE + 4 * flag
        plain = whole & (length >= prefix)
        starts = np.where(plain, offsets + _PART_HEADER.size + prefix, -offsets - 1)
        return starts, np.where(plain, length - prefix, 0), labels

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
    table = _parse_idx_blocks(idx_path)
    if table is None:
        try:
            text = idx_path.read_text(encoding="ascii")
        except UnicodeDecodeError:
            raise PlscError(f"{idx_path}: not a RecordIO index (not ASCII text)") from None
        rows = _parse_idx_lines(idx_path, text)
        table = rows[:, 0].copy(), rows[:, 1].copy()
    _check_idx_offsets(idx_path, rec_path, rec_size, *table)
    return table


def _parse_idx_blocks(idx_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """numpy parse of a well-formed index, a block of lines at a time into arrays sized by a first count of
    the lines: 16 bytes per record and one block of text (a 42M-line index is ~0.9 GB of text, and ~5 GB as
    Python strings). None when anything looks off (the line-by-line parse then names the line)."""
    with open(idx_path, "rb") as file:
        lines = _count_lines(file)
        keys, offsets = np.empty(lines, np.int64), np.empty(lines, np.int64)
        file.seek(0)
        row, carry = 0, b""
        while block := file.read(_IDX_BLOCK_BYTES):
            text = carry + block
            cut = text.rfind(b"\n") + 1
            carry = text[cut:]
            if cut and (row := _parse_idx_block(text[:cut], keys, offsets, row)) is None:
                return None
        if carry.strip() and (row := _parse_idx_block(carry + b"\n", keys, offsets, row)) is None:
            return None
    return (keys, offsets) if row == lines else None


def _count_lines(file) -> int:
    count, last = 0, b"\n"
    while block := file.read(_IDX_BLOCK_BYTES):
        count += block.count(b"\n")
        last = block[-1:]
    return count + (last != b"\n")


def _parse_idx_block(text: bytes, keys: np.ndarray, offsets: np.ndarray, row: int) -> int | None:
    """Fill rows from ``row`` with the lines of ``text`` (whole lines); the next row, or None if malformed."""
    lines = text.count(b"\n")
    if text.count(b"\t") != lines or row + lines > len(keys):
        return None
    try:
        with warnings.catch_warnings():  # numpy warns, then stops, at the first field that is not a number
            warnings.simplefilter("ignore")
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        return None
    if len(values) != 2 * lines:
        return None
    keys[row : row + lines], offsets[row : row + lines] = values[0::2], values[1::2]
    return row + lines


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


def _check_idx_offsets(idx_path: Path, rec_path: Path, rec_size: int, keys: np.ndarray, offsets: np.ndarray
                       ) -> None:
    for start in range(0, len(offsets), _ROWS):
        part = offsets[start : start + _ROWS]
        bad = np.flatnonzero((part < 0) | (part >= rec_size) | (part % 4 != 0))
        if len(bad):
            at = start + int(bad[0])
            raise PlscError(
                f"{idx_path}: key {keys[at]} points at offset {offsets[at]}, which is not a record position "
                f"in {rec_path} ({rec_size} bytes)"
            )


def is_key_range(keys: np.ndarray, first: int) -> bool:
    """Whether ``keys`` are exactly first, first + 1, ... (compared a slice at a time: no N-sized copy)."""
    for start in range(0, len(keys), _ROWS):
        part = keys[start : start + _ROWS]
        if not np.array_equal(part, np.arange(first + start, first + start + len(part))):
            return False
    return True


def _unmap_pages(pages: mmap.mmap, offsets: np.ndarray) -> None:
    """Drop this process's mapping of the pages around the headers at ``offsets`` (they stay in the page
    cache): without it a pass over a 200 GB file would end with the file in its resident set."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    low = int(offsets.min()) // mmap.PAGESIZE * mmap.PAGESIZE
    high = min(len(pages), int(offsets.max()) + _HEADER_SPAN)
    pages.madvise(mmap.MADV_DONTNEED, low, high - low)


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
        # Keys written so far: while they are 0, 1, 2, ... (every plsc layout) no set is kept, which for 42M
        # records would take gigabytes; the first other key turns the set on.
        self._keys: set[int] | None = None
        self._closed = False

    @property
    def count(self) -> int:
        return self._count

    def write(self, record: bytes, key: int | None = None) -> int:
        """Append one record (key defaults to the number written so far); returns its offset."""
        key = self._count if key is None else int(key)
        if self._keys is None and key != self._count:
            self._keys = set(range(self._count))
        if self._keys is not None and key in self._keys:
            raise PlscError(f"{self.rec_path}: key {key} written twice")
        encoded = encode_record(record)
        offset = self._offset
        self._rec.file.write(encoded)
        if self._idx is not None:
            self._idx.file.write(f"{key}\t{offset}\n")
        if self._keys is not None:
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


WRITE_LAYOUTS = ("auto", "insightface", "im2rec")


def write_insightface(
    output_prefix: str | os.PathLike,
    samples: Sequence[tuple[bytes | os.PathLike | str, int]],
    image_size: tuple[int, int] = (112, 112),
    progress: Callable[[Iterable], Iterable] | None = None,
    layout: str = "auto",
) -> dict:
    """Write ``<prefix>.rec``, ``<prefix>.idx`` and ``property`` (beside them) for InsightFace's trainers.

    ``samples`` are (encoded image bytes or a path to read them from, label); images are stored verbatim.
    ``layout``:

    - ``insightface``: the header record, the images ordered by label (stable) as keys 1..N, one record per
      class (each class one contiguous key range). Keys are held in float32 labels: at most 2**24 records.
    - ``im2rec``: what mxnet's im2rec writes, the layout arcface_torch documents for WebFace42M: image ``i``
      of ``samples`` is key ``i`` with IRHeader (0, label, i, 0), no header or identity records. Keys live
      only in the ``.idx``, as integers: any count fits.
    - ``auto``: insightface when the records fit in 2**24, else im2rec.

    Labels are float32 in both: classes below 2**24. ``image_size`` is (height, width) for ``property``.
    ``progress``: optional callable wrapping an iterable (e.g. ``functools.partial(plsc.console.progress,
    total=..., desc=..., unit=...)``). Returns ``{"images", "num_classes", "layout", "rec", "idx",
    "property"}``.
    """
    if layout not in WRITE_LAYOUTS:
        raise PlscError(f"layout must be one of {', '.join(WRITE_LAYOUTS)}, got {layout!r}")
    labels = _check_labels(output_prefix, [label for _, label in samples])
    num_images, num_classes = len(labels), int(labels.max()) + 1
    records = num_images + num_classes + 1  # the header label [first identity key, end key] holds this
    if layout == "auto":
        layout = "insightface" if records <= _FLOAT32_EXACT_LIMIT else "im2rec"
    if layout == "insightface" and records > _FLOAT32_EXACT_LIMIT:
        raise PlscError(
            f"{output_prefix}: {num_images} images of {num_classes} classes make {records} records, more "
            f"than the {_FLOAT32_EXACT_LIMIT} the insightface layout's float32 keys address exactly; use "
            "the im2rec layout"
        )
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rec_path, idx_path = prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")
    with RecordWriter(rec_path, idx_path) as writer:
        if layout == "insightface":
            _write_insightface_records(writer, samples, labels, progress)
        else:
            _write_im2rec_records(writer, samples, progress)
    property_path = prefix.parent / "property"
    write_property(property_path, num_classes, *image_size)
    return {
        "images": num_images,
        "num_classes": num_classes,
        "layout": layout,
        "rec": rec_path,
        "idx": idx_path,
        "property": property_path,
    }


def _write_insightface_records(writer: RecordWriter, samples, labels: np.ndarray, progress) -> None:
    order = np.argsort(labels, kind="stable")
    first_identity_key = len(labels) + 1
    end_key = first_identity_key + int(labels.max()) + 1
    writer.write(pack(IRHeader(2, (first_identity_key, end_key), 0, 0), b""), key=0)
    for key, index in enumerate(order if progress is None else progress(order), start=1):
        source, label = samples[index]
        writer.write(pack(IRHeader(0, float(label), key, 0), _payload_bytes(source)), key=key)
    _write_identity_records(writer, labels[order], first_identity_key)


def _write_im2rec_records(writer: RecordWriter, samples, progress) -> None:
    positions = range(len(samples))
    for key in positions if progress is None else progress(positions):
        source, label = samples[key]
        writer.write(pack(IRHeader(0, float(label), key, 0), _payload_bytes(source)), key=key)


def _check_labels(where, labels: Sequence[int]) -> np.ndarray:
    if not len(labels):
        raise PlscError(f"{where}: no images to write")
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
        raise PlscError(f"{where}: labels must be non-negative integers")
    if array.max() >= LABEL_LIMIT:
        raise PlscError(f"{where}: label {array.max()} is not below {LABEL_LIMIT}: RecordIO labels are "
                        "float32, exact for integers up to 2**24")
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
    """The layout of a ``.rec`` ("insightface" or "flat") and the keys of its image records (flat: the
    ``.idx``'s keys in its order, as arcface_torch takes them)."""
    if len(reader) == 0:
        raise PlscError(f"{rec_path}: contains no records")
    if 0 in reader:
        header, payload = unpack(reader.read(0), f"{rec_path}: key 0")
        # An image always has bytes; InsightFace's header record has none (its multi-label images also
        # have flag > 0, so the flag alone cannot tell the two apart).
        if header.flag > 0 and not payload:
            return "insightface", _insightface_image_keys(reader, rec_path, header)
    return "flat", reader.keys


def _insightface_image_keys(reader: RecordReader, rec_path: Path, header: IRHeader) -> np.ndarray:
    end = header.label[0]
    radius = float32_rounding_radius(end)
    if not (math.isfinite(end) and end == int(end) and 1 < end <= len(reader) + radius):
        # Checked before anything is sized by it: a damaged header must not allocate 10^15 keys.
        raise PlscError(f"{rec_path}: header record says images are keys 1..{end:g}-1, but the file "
                        f"has {len(reader)} records (label {header.label})")
    end = _first_identity_key(reader, rec_path, int(end), radius) if radius else int(end)
    keys = np.arange(1, end, dtype=np.int64)
    missing = reader.first_missing(keys)
    if missing is not None:
        raise PlscError(
            f"{rec_path}: header record says images are keys 1..{end - 1}, but key {missing} is missing"
        )
    return keys


def float32_rounding_radius(value: float) -> int:
    """How far the integer a float32 ``value`` was rounded from can lie from it: 0 below 2**24, half a
    float32 step above (1 up to 2**25, 2 up to 2**26: a 42M-image set)."""
    if not math.isfinite(value) or abs(value) < _FLOAT32_EXACT_LIMIT:
        return 0
    return int(np.spacing(np.float32(abs(value)))) // 2


def _first_identity_key(reader: RecordReader, rec_path: Path, stored: int, radius: int) -> int:
    """The header's first identity key past 2**24, where float32 stored it rounded: the one key within
    ``radius`` of ``stored`` whose record is an identity record (flag > 0, no payload) after an image."""
    found = [key for key in range(max(stored - radius, 2), stored + radius + 1)
             if _identity_follows_image(reader, rec_path, key)]
    if len(found) != 1:
        raise PlscError(f"{rec_path}: header record says images end at key {stored}, which float32 holds "
                        f"only to +-{radius}, and {len(found)} keys near it start the identity records")
    return found[0]


def _identity_follows_image(reader: RecordReader, rec_path: Path, key: int) -> bool:
    if key not in reader or key - 1 not in reader:
        return False
    header, payload = unpack(reader.read(key), f"{rec_path}: key {key}")
    before = unpack(reader.read(key - 1), f"{rec_path}: key {key - 1}")[1]
    return header.flag > 0 and not payload and len(before) > 0


def build_image_index(rec_path: Path, idx_path: Path | None) -> ImageIndex:
    """What opening a RecordDataset needs, from the ``.idx`` and every image record's header (reads them
    all: the slow part that the cached index file saves)."""
    with RecordReader(rec_path, idx_path) as reader:
        layout, keys = find_image_keys(reader, rec_path)
        offsets = reader.offsets if layout == "flat" else reader.offsets_of(keys)
        starts, lengths, values = reader.image_headers(offsets, keys)
    del offsets
    labels = _class_labels(rec_path, keys, values)
    del values
    first_key = int(keys[0])
    stored_keys = None if is_key_range(keys, first_key) else keys
    return ImageIndex(layout, first_key, starts, lengths, labels, stored_keys, int(labels.max()) + 1)


def _class_labels(rec_path: Path, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The float32 header labels as int32 classes, refusing the first that is not one."""
    for start in range(0, len(values), _ROWS):
        bad = np.flatnonzero(~is_class_label(values[start : start + _ROWS]))
        if len(bad):
            at = start + int(bad[0])
            raise PlscError(f"{rec_path}: key {keys[at]}: label {values[at]:g} is not a non-negative integer "
                            f"below {LABEL_LIMIT} (float32 labels hold larger integers inexactly)")
    return values.astype(np.int32)


def _index_beside(rec_path: Path, idx_path: str | os.PathLike | None) -> Path | None:
    """``idx_path``, or when it is None the ``.idx`` beside the ``.rec`` if there is one."""
    if idx_path is None and rec_path.with_suffix(".idx").is_file():
        return rec_path.with_suffix(".idx")
    return Path(idx_path) if idx_path is not None else None


def count_record_images(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> int:
    """How many images a :class:`RecordDataset` of ``rec_path`` holds, from its cached label index when that
    is current, else from its ``.idx`` (the one beside it when there is one) and its header record, without
    reading the images' labels."""
    rec_path = Path(rec_path)
    idx_path = _index_beside(rec_path, idx_path)
    index = load_current_index(rec_path, idx_path, LABEL_LIMIT)
    if index is not None:
        return len(index)
    with RecordReader(rec_path, idx_path) as reader:
        return len(find_image_keys(reader, rec_path)[1])


class RecordDataset:
    """Face training samples straight from a ``.rec``: ``dataset[i] -> (BGR uint8 HxWx3, label)``.

    Layouts: InsightFace (record 0 is a header with flag > 0 and an empty payload; images are keys
    ``1..label[0]-1``) and im2rec's flat layout (every key is an image, in ``.idx`` order). Multi-label image
    headers use their first label as the class. When ``idx_path`` is None the ``.idx`` beside the ``.rec`` is
    used if it exists.

    Opening maps the label index file of the ``.rec`` (plsc.data.recordio_index): where each image's bytes
    lie and its label, 16 bytes per image shared by the processes of a node. The first open builds it from
    the image headers (reading them through the file) and writes it. ``index_cache``: "write" (that),
    "read" (use an index file that is there, else build in memory and write none) or "off" (always build
    in memory: every open reads every header). ``labels`` are int32.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 index_cache: str = "write"):
        rec_path = Path(rec_path)
        self.reader = RecordReader(rec_path, _index_beside(rec_path, idx_path), index_on_demand=True)
        self.rec_path = rec_path
        self._rec_text = str(rec_path)
        build = functools.partial(build_image_index, rec_path, self.reader.idx_path)
        self.index = open_image_index(rec_path, self.reader.idx_path, build, LABEL_LIMIT, cache=index_cache)
        self.layout = self.index.layout  # "insightface" or "flat"
        self.num_classes = self.index.num_classes

    @property
    def labels(self) -> np.ndarray:
        return self.index.labels

    @property
    def image_keys(self) -> np.ndarray:
        """The record key of each image (int64)."""
        return self.index.image_keys()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        payload = self.encoded(index)
        image = decode_image_bytes(payload)
        if image is None:  # the message is only built when needed (it costs as much as the read)
            raise _undecodable(self._where(index), payload)
        return image, int(self.index.labels[index])

    def encoded(self, index: int) -> bytes:
        """Image ``index``'s encoded bytes (the record's payload)."""
        start = int(self.index.payload_starts[index])  # numpy's IndexError when out of range
        if start >= 0:
            return self.reader.read_span(start, int(self.index.payload_lengths[index]))
        return unpack(self.reader.read_at(-start - 1), self._where(index))[1]

    def _where(self, index: int) -> str:
        return f"{self._rec_text}: key {self.index.key(index)}"


def decode_image(payload: bytes, where: str) -> np.ndarray:
    """Encoded bytes -> BGR uint8 HxWx3, or a PlscError naming ``where``."""
    image = decode_image_bytes(payload)
    if image is None:
        raise _undecodable(where, payload)
    return image


def _undecodable(where: str, payload: bytes) -> PlscError:
    return PlscError(f"{where}: payload of {len(payload)} bytes is not a decodable image")

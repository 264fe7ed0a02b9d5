"""Class-center shards to and from ``.npy`` files, a block of rows at a time.

A shard is the largest thing a rank holds; a host copy of it to save or load a checkpoint doubled the
memory of the checkpoint phase. Here a shard is written as the ``.npy`` header followed by its rows, block
by block, straight from the tensor's memory when it is on the CPU (a view, no copy) or through one block's
host copy from another device; and read back a block at a time into one buffer, each block copied into the
head's own tensor. (Reading through a memory map costs no copy either, but every page read stays mapped,
and counted as resident, until the map closes: the peak RSS then grows by the shard's size.)
The files are ordinary ``.npy`` files, byte for byte what ``np.save`` writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plsc.errors import PlscError
from plsc.finite import require_finite

# Rows per block: 8 MiB of float32 at embedding 512, small against any shard worth streaming.
BLOCK_ROWS = 4096


def write_center_shard(head, path: Path, kind: str) -> None:
    """One of the head's matrices (``PartialFC.state_kinds``) into ``path``, streamed (``row_blocks``)."""
    columns, dtype = head.state_kinds()[kind]
    write_npy(path, (head.shard.count, columns), dtype, head.row_blocks(kind))


def write_npy(path: Path, shape: tuple[int, int], dtype, blocks: Iterable[np.ndarray]) -> None:
    """Write an ``.npy`` file of ``shape`` and ``dtype`` whose rows are the concatenation of ``blocks``."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    written = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for block in blocks:
            if block.dtype != dtype or block.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"{path}: block {block.dtype} {block.shape} does not fit {dtype} {shape}")
            f.write(memoryview(np.ascontiguousarray(block)).cast("B"))
            written += block.shape[0]
    if written != shape[0]:
        raise ValueError(f"{path}: {written} rows written, {shape[0]} expected")


@dataclass(frozen=True)
class FileRows:
    """Rows ``[start, stop)`` of a 2-D ``.npy`` file."""

    path: Path
    start: int
    stop: int


def npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(byte offset of the data, shape, dtype) of a C-ordered ``.npy`` file, from its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order:
            raise PlscError(f"{path}: Fortran-ordered arrays are not class-center shards")
        return f.tell(), shape, dtype


class RowPieces:
    """Consecutive row ranges of one or more ``.npy`` files, read as one matrix without holding it.

    :meth:`blocks` reads the rows a block at a time into one reused buffer (plain reads: no mapping whose
    pages would count as resident memory); ``np.asarray`` reads the whole matrix.
    """

    def __init__(self, pieces: Sequence[FileRows], width: int, dtype):
        self.pieces = list(pieces)
        self.dtype = np.dtype(dtype)
        self.shape = (sum(p.stop - p.start for p in self.pieces), width)
        for piece in self.pieces:
            _, shape, stored = npy_layout(piece.path)
            if stored != self.dtype or len(shape) != 2 or shape[1] != width or piece.stop > shape[0]:
                raise PlscError(f"{piece.path}: holds {stored} {shape}, expected {self.dtype} rows of "
                                 f"{width} up to row {piece.stop}")

    def blocks(self, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, rows)`` of at most ``block_rows`` rows, in order. ``rows`` is the same buffer each
        time: use it before asking for the next block."""
        buffer = np.empty((min(block_rows, self.shape[0]), self.shape[1]), self.dtype)
        row_bytes = self.shape[1] * self.dtype.itemsize
        first = 0
        for piece in self.pieces:
            offset = npy_layout(piece.path)[0]
            with open(piece.path, "rb") as f:
                f.seek(offset + piece.start * row_bytes)
                for start in range(0, piece.stop - piece.start, block_rows):
                    rows = buffer[: min(block_rows, piece.stop - piece.start - start)]
                    if f.readinto(memoryview(rows).cast("B")) != rows.nbytes:
                        raise PlscError(f"{piece.path}: shorter than its header says")
                    require_finite(f"rows {piece.start + start}..{piece.start + start + len(rows) - 1}", rows,
                                   piece.path)
                    yield first + start, rows
            first += piece.stop - piece.start

    def __array__(self, dtype=None, copy=None):
        whole = np.empty(self.shape, self.dtype)
        for start, rows in self.blocks():
            whole[start : start + len(rows)] = rows
        return whole if dtype is None else whole.astype(dtype)

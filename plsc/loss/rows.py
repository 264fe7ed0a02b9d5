"""Row stores: a [rows, width] matrix of class centers or velocities whose rows are read as float32 and
written back rounded to the storage (float32, float16, or int8 codes with per-row scales:
:class:`plsc.loss.int8_rows.Int8Rows`), behind one protocol (:class:`RowStore`), so that the momentum step
and the heads are the same code for every storage. How each store moves its rows fast is
:mod:`plsc.loss.row_backend`'s business.
"""

from __future__ import annotations

from typing import Protocol

import paddle

from plsc.loss.int8_rows import Int8Rows
from plsc.loss.row_backend import GATHER_WRITES_INTO, cast, put_rows_, take_rows


class RowStore(Protocol):
    shape: list[int]
    # Whether gather() writes into a given ``out`` (so a caller may keep one buffer across steps).
    gathers_into: bool

    @property
    def dtype(self) -> str: ...

    def gather(self, index: paddle.Tensor, out: paddle.Tensor | None = None) -> paddle.Tensor:
        """``matrix[index]`` as float32 (into ``out`` where :attr:`gathers_into`)."""

    def scatter_(self, index: paddle.Tensor, rows: paddle.Tensor) -> None:
        """``matrix[index] = rows`` in place (``index`` unique), rounding to the storage."""

    def read_block(self, start: int, stop: int) -> paddle.Tensor:
        """Rows ``[start, stop)`` as a float32 copy."""

    def write_block_(self, start: int, rows: paddle.Tensor) -> None:
        """``matrix[start : start + len(rows)] = rows``, rounding to the storage."""

    def tensors(self) -> list[paddle.Tensor]:
        """Every tensor holding the store's state."""

    def float_tensors(self) -> list[paddle.Tensor]:
        """The state tensors that hold floating-point numbers (what an inf/nan check reads)."""


class FloatRows:
    """A float32 or float16 tensor as a row store. float32 rows move by Paddle's own gather and scatter;
    other dtypes through :mod:`plsc.loss.row_backend`, cast on the way (Paddle's CPU kernels have no float16
    gather or scatter, and its float16 casts are slow)."""

    def __init__(self, tensor: paddle.Tensor):
        self.tensor = tensor
        self.shape = tensor.shape
        self.is_float32 = tensor.dtype == paddle.float32
        self.gathers_into = GATHER_WRITES_INTO and self.is_float32

    @property
    def dtype(self) -> str:
        return str(self.tensor.dtype).split(".")[-1]

    def gather(self, index: paddle.Tensor, out: paddle.Tensor | None = None) -> paddle.Tensor:
        if not self.is_float32:
            return cast(take_rows(self.tensor, index), paddle.float32)
        if out is None or not self.gathers_into:
            return paddle.gather(self.tensor, index)
        # The same memory every step instead of fresh pages (Paddle 3.x: GATHER_WRITES_INTO).
        paddle.index_select(self.tensor, index, out=out)
        return out

    def scatter_(self, index: paddle.Tensor, rows: paddle.Tensor) -> None:
        if self.is_float32:
            paddle.scatter_(self.tensor, index, rows, overwrite=True)
        else:
            put_rows_(self.tensor, index, cast(rows, self.tensor.dtype))

    def read_block(self, start: int, stop: int) -> paddle.Tensor:
        return self.tensor[start:stop].astype("float32")

    def write_block_(self, start: int, rows: paddle.Tensor) -> None:
        self.tensor[start : start + rows.shape[0]] = rows.astype(self.tensor.dtype)

    def tensors(self) -> list[paddle.Tensor]:
        return [self.tensor]

    def float_tensors(self) -> list[paddle.Tensor]:
        return [self.tensor]


def row_store(matrix) -> RowStore:
    """``matrix`` as a row store: a Paddle tensor (float32, float16) wrapped, a store (Int8Rows) itself."""
    return FloatRows(matrix) if isinstance(matrix, paddle.Tensor) else matrix


def new_rows(rows: int, width: int, dtype: str):
    """Zeros of ``dtype``: a float32 or float16 tensor, or :class:`Int8Rows`."""
    return Int8Rows(rows, width) if dtype == "int8" else paddle.zeros([rows, width], dtype=dtype)


def gather_rows(matrix, index: paddle.Tensor, out: paddle.Tensor | None = None) -> paddle.Tensor:
    """``matrix[index]`` as float32 of any matrix :func:`row_store` takes."""
    return row_store(matrix).gather(index, out)

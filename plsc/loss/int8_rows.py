"""Class-center velocity in 8 bits per element (``loss.velocity_dtype: int8``).

Row ``i`` of the matrix is ``codes[i] * scale[i]``: int8 codes in [-127, 127] and one float32 scale per row,
``scale = max |row| / 127``, codes rounded to nearest (``floor(x + 0.5)``: the same on every Paddle). A row
costs ``width + 4`` bytes instead of ``2 * width`` in float16, so with float16 centers a class costs 1.5x its
center instead of 2x. The momentum step reads its rows as float32 (dequantised), steps them, and writes them
back requantised: on the CPU in one compiled pass over the rows
(:func:`plsc.loss.row_backend.momentum_rows_in_place_`), elsewhere a block of rows at a time
(:func:`plsc.loss.rows.lazy_update`, :mod:`plsc.loss.streaming`).

Why a float16 container: the codes' bytes live in a float16 tensor of half the width, viewed as int8 for
the arithmetic. Gathers and scatters then move float16 rows, which every Paddle and device can
(:func:`plsc.loss.row_backend.take_rows`);
Paddle has no int8 scatter on CPU or GPU, 2.6 no int8 gather on CPU, and
2.6 crashes viewing a 1-byte tensor as a wider dtype (the other direction works).
"""

from __future__ import annotations

import numpy as np
import paddle

from plsc.loss.row_backend import (
    CODE_MAX,
    copy_rows_into,
    dequantize_on_host,
    host_blocks,
    is_cpu_and_contiguous,
    put_rows_,
    quantize_on_host,
    reference_dequantize,
    reference_quantize,
    source_blocks,
    take_rows,
)


def quantize(rows: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """float32 ``rows`` [n, w] -> (codes as a float16 container [n, w / 2], scales float32 [n, 1])."""
    return quantize_on_host(rows) if is_cpu_and_contiguous(rows) else reference_quantize(rows)


def dequantize(container: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """A float16 container of codes [n, w / 2] and its scales [n, 1] -> float32 rows [n, w]."""
    if is_cpu_and_contiguous(container) and is_cpu_and_contiguous(scale):
        return dequantize_on_host(container, scale)
    return reference_dequantize(container, scale)


class Int8Rows:
    """A [rows, width] float matrix kept as int8 codes and per-row float32 scales (``width`` even)."""

    def __init__(self, rows: int, width: int):
        if width % 2:
            raise ValueError(f"int8 rows need an even width, got {width}")
        self.shape = [rows, width]
        self.codes = paddle.zeros([rows, width // 2], dtype="float16")  # the container: see the module doc
        self.scale = paddle.zeros([rows, 1], dtype="float32")

    @property
    def dtype(self) -> str:
        return "int8"

    gathers_into = False  # every gather dequantises into a new tensor

    def tensors(self) -> list[paddle.Tensor]:
        return [self.codes, self.scale]

    def float_tensors(self) -> list[paddle.Tensor]:
        """The scales: the codes are integers in a float16 container, whose bits are no float16 numbers."""
        return [self.scale]

    def gather(self, index: paddle.Tensor, out: paddle.Tensor | None = None) -> paddle.Tensor:
        """``matrix[index]`` dequantised, float32 (a new tensor: ``out`` is not used)."""
        return dequantize(take_rows(self.codes, index), paddle.gather(self.scale, index))

    def scatter_(self, index: paddle.Tensor, rows: paddle.Tensor) -> None:
        """``matrix[index] = rows`` (``index`` unique), requantised."""
        codes, scale = quantize(rows)
        put_rows_(self.codes, index, codes)
        paddle.scatter_(self.scale, index, scale, overwrite=True)

    def read_block(self, start: int, stop: int) -> paddle.Tensor:
        """Rows ``[start, stop)`` dequantised (gathered: a container's slice cannot be viewed as int8)."""
        return self.gather(paddle.arange(start, stop))

    def write_block_(self, start: int, rows: paddle.Tensor) -> None:
        self.scatter_(paddle.arange(start, start + rows.shape[0]), rows)

    def code_blocks(self, block_rows: int):
        """The codes as int8 numpy blocks [n, width] (views of the tensor on the CPU; host copies else)."""
        for block in host_blocks(self.codes, block_rows):
            yield block.view(np.int8)

    def scale_blocks(self, block_rows: int):
        """The scales as float32 numpy blocks [n, 1]."""
        yield from host_blocks(self.scale, block_rows)

    def set_codes(self, codes, scale) -> None:
        """Overwrite codes [rows, width] int8 and scales [rows, 1] with saved ones, exactly: arrays, or
        objects with ``blocks()`` (:class:`plsc.checkpoint.shards.RowPieces`)."""
        copy_rows_into(self.codes, _ViewedAsContainer(codes))
        copy_rows_into(self.scale, scale)


class _ViewedAsContainer:
    """int8 code rows [n, w] as the float16 container's rows [n, w / 2] (a numpy view: no copy)."""

    def __init__(self, codes):
        self.codes = codes

    def blocks(self, block_rows: int):
        for start, rows in source_blocks(self.codes, block_rows):
            yield start, np.ascontiguousarray(rows, dtype=np.int8).view(np.float16)


class Dequantized:
    """Saved codes [n, w] and their scales [n, 1] (arrays or ``blocks()`` sources) read as float32 rows, a
    block at a time: what float velocity loads from an int8 checkpoint."""

    def __init__(self, codes, scale):
        self.codes, self.scale = codes, scale
        self.shape = tuple(codes.shape)

    def blocks(self, block_rows: int):
        for (start, codes), (_, scale) in zip(source_blocks(self.codes, block_rows),
                                              source_blocks(self.scale, block_rows), strict=True):
            yield start, codes.astype(np.float32) * scale


def self_check() -> str | None:
    """Scatter, gather and block reads of a small store on the current device against numpy's quantisation
    (the device's view, gather and scatter kernels are the parts that may differ): None when they agree,
    else what went wrong, in one line."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 8)).astype(np.float32) * np.float32([[1e-4], [1], [0], [30], [1e-2], [5]])
    expected_scale = np.abs(rows).max(axis=1, keepdims=True) / CODE_MAX
    expected = np.rint(np.divide(rows, expected_scale, out=np.zeros_like(rows), where=expected_scale > 0))
    try:
        store = Int8Rows(9, 8)
        index = paddle.to_tensor(np.array([7, 0, 3, 8, 1, 5]))
        store.scatter_(index, paddle.to_tensor(rows))
        gathered, block = store.gather(index).numpy(), store.read_block(0, 9).numpy()[[7, 0, 3, 8, 1, 5]]
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    for name, values in (("gather", gathered), ("block read", block)):
        if not np.allclose(values, expected * expected_scale, rtol=1e-6, atol=0):
            return f"{name} after scatter differs from numpy's quantisation"
    return None

"""Moving class-center rows: gather them as float32 and scatter them back in the storage dtype (float32,
float16, or int8 codes with per-row scales: :class:`plsc.loss.int8_rows.Int8Rows`), float16 <-> float32
casts, numpy views of a CPU tensor's own memory, and block copies between a tensor and the host.

A matrix here is a Paddle tensor or a row store that is not one (``Int8Rows``): the store gathers, scatters,
reads and writes its own rows as float32, so the momentum step is the same code for every storage.
"""

from __future__ import annotations

import ctypes
import inspect

import cv2
import numpy as np
import paddle

# Paddle 3.x's index_select can write into a given tensor; 2.6's has no ``out`` parameter.
GATHER_WRITES_INTO = "out" in inspect.signature(paddle.index_select).parameters
# Rows per block when a matrix is copied to or from the host (checkpoints): a few MB whatever its size.
STATE_BLOCK_ROWS = 4096


def gathers_into(matrix: paddle.Tensor) -> bool:
    """Whether :func:`gather_rows` writes ``matrix``'s rows into a given ``out`` (float32 storage, a Paddle
    that can); callers ask first, so as not to allocate an ``out`` that would go unused."""
    return GATHER_WRITES_INTO and matrix.dtype == paddle.float32


def gather_rows(matrix: paddle.Tensor, index: paddle.Tensor, out: paddle.Tensor | None = None
                ) -> paddle.Tensor:
    """``matrix[index]`` as float32, whatever the storage dtype. ``out``: a float32 [len(index), emb] tensor
    to write the rows into where :func:`gathers_into` says so; otherwise the rows are a new tensor. Returns
    the rows."""
    if not isinstance(matrix, paddle.Tensor):
        return matrix.gather(index)
    if out is not None and gathers_into(matrix):
        paddle.index_select(matrix, index, out=out)
        return out
    return as_float32(take_rows(matrix, index))


def take_rows(matrix: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """``matrix[index]`` in the matrix's own dtype."""
    if matrix.dtype == paddle.float16:
        # Paddle's CPU gather has no float16 kernel; bfloat16 has one in 2.6 and 3.x and the same width, so
        # the bits move through a free view and are never interpreted as bfloat16 numbers.
        return paddle.view(paddle.gather(paddle.view(matrix, "bfloat16"), index), "float16")
    return paddle.gather(matrix, index)


def as_float32(tensor: paddle.Tensor) -> paddle.Tensor:
    """``tensor`` itself when already float32: ``astype`` to the same dtype would still copy every element."""
    return cast(tensor, paddle.float32)


def cast(tensor: paddle.Tensor, dtype) -> paddle.Tensor:
    """``tensor.astype(dtype)`` (``tensor`` itself when it has that dtype already).

    On CPU, float16 <-> float32 goes through OpenCV's conversion (F16C instructions), written straight into
    the new tensor's memory: IEEE round to nearest even, the same bits as numpy's and Paddle 3.x's casts
    (tested; Paddle 2.6's CPU cast is sometimes one ulp off), and 20x faster than Paddle's CPU kernel for
    float32 -> float16 (7 ms against 140 ms for 98 x 1024 x 512 elements, measured), which had made the
    float16 center update cost 0.4 s per step at 100,000 sampled rows (0.13 s with this).
    """
    if tensor.dtype == dtype:
        return tensor
    if is_cpu_and_contiguous(tensor) and {tensor.dtype, dtype} == {paddle.float16, paddle.float32}:
        out = paddle.empty(tensor.shape, dtype=dtype)
        source, target = host_view(tensor), host_view(out)
        # OpenCV spells float16 as int16 (CV_16S): the same bits, viewed.
        if dtype == paddle.float32:
            source = source.view(np.int16)
        else:
            target = target.view(np.int16)
        if cv2.convertFp16(source, target) is not target:
            raise RuntimeError("cv2.convertFp16 did not write into the given buffer")
        return out
    return tensor.astype(dtype)


def scatter_rows_(matrix: paddle.Tensor, index: paddle.Tensor, rows: paddle.Tensor) -> None:
    """``matrix[index] = rows`` in place (``index`` unique), rounding to the storage dtype."""
    if not isinstance(matrix, paddle.Tensor):
        matrix.scatter_(index, rows)
    else:
        put_rows_(matrix, index, cast(rows, matrix.dtype))


def read_block(matrix, start: int, stop: int) -> paddle.Tensor:
    """Rows ``[start, stop)`` as a float32 copy."""
    if not isinstance(matrix, paddle.Tensor):
        return matrix.read_block(start, stop)
    return matrix[start:stop].astype("float32")


def write_block_(matrix, start: int, rows: paddle.Tensor) -> None:
    """``matrix[start : start + len(rows)] = rows``, rounding to the storage dtype."""
    if not isinstance(matrix, paddle.Tensor):
        matrix.write_block_(start, rows)
    else:
        matrix[start : start + rows.shape[0]] = rows.astype(matrix.dtype)


def put_rows_(matrix: paddle.Tensor, index: paddle.Tensor, rows: paddle.Tensor) -> None:
    """``matrix[index] = rows`` in place (``index`` unique), ``rows`` already in the matrix's dtype."""
    if matrix.dtype == paddle.float16 and matrix.place.is_cpu_place():
        # Paddle's CPU scatter has no float16 kernel (nor same-width bfloat16/int16 ones); index_put_ has one
        # but expands the row ids to one index per element: 0.5 s and +690 MB per 100,000 x 512 rows. A
        # numpy view of the tensors' own memory copies the rows directly (0.02 s).
        host_view(matrix)[index.numpy()] = host_view(rows)
    else:
        paddle.scatter_(matrix, index, rows, overwrite=True)  # ~20x faster than index_put_ on CPU


def is_cpu_and_contiguous(tensor: paddle.Tensor) -> bool:
    """Whether :func:`host_view` may view ``tensor`` (Paddle 2.6 slices are copies, 3.x ones may be views)."""
    return tensor.place.is_cpu_place() and tensor.is_contiguous()


def host_view(tensor: paddle.Tensor) -> np.ndarray:
    """A writable numpy array over a contiguous CPU tensor's own memory (no copy); valid while it lives."""
    dtype = np.dtype(str(tensor.dtype).split(".")[-1])
    count = int(np.prod(tensor.shape))
    memory = (ctypes.c_byte * (count * dtype.itemsize)).from_address(tensor.data_ptr())
    return np.ctypeslib.as_array(memory).view(dtype).reshape(tensor.shape)


def host_blocks(tensor: paddle.Tensor, block_rows: int = STATE_BLOCK_ROWS):
    """The tensor's rows as numpy blocks: views of its own memory on the CPU, one block's host copy at a time
    from another device. Valid until the tensor changes."""
    whole = host_view(tensor) if is_cpu_and_contiguous(tensor) else None
    for start in range(0, tensor.shape[0], block_rows):
        yield whole[start : start + block_rows] if whole is not None else \
            tensor[start : start + block_rows].numpy()


def copy_rows_into(tensor: paddle.Tensor, source, block_rows: int = STATE_BLOCK_ROWS) -> None:
    """``tensor[:] = source`` a block of rows at a time, cast to the tensor's dtype (numpy's rounding):
    ``source`` an array, or an object whose ``blocks(n)`` yields ``(first row, rows)``
    (:class:`plsc.checkpoint.shards.RowPieces`)."""
    target = host_view(tensor) if is_cpu_and_contiguous(tensor) else None
    for start, rows in source_blocks(source, block_rows):
        if target is not None:
            target[start : start + len(rows)] = rows
        else:
            tensor[start : start + len(rows)] = paddle.to_tensor(np.asarray(rows)).astype(tensor.dtype)


def source_blocks(source, block_rows: int = STATE_BLOCK_ROWS):
    """``(first row, rows)`` of an array, or of an object with its own ``blocks(n)``."""
    if hasattr(source, "blocks"):
        yield from source.blocks(block_rows)
    else:
        for start in range(0, len(source), block_rows):
            yield start, source[start : start + block_rows]

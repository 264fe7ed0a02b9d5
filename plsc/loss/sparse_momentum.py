"""Momentum SGD for class centers that touches only what a step needs.

Both modes follow Paddle's Momentum with L2 weight decay, ``v = mu * v + (g + wd * w); w = w - lr * v``:

- ``lazy`` (default): only the sampled rows change, weight and velocity alike. Cost follows the sampled
  classes.
- ``dense``: PLSC v2.2's semantics, the optimizer seeing the whole matrix: unsampled rows get a zero gradient,
  but their velocity still decays and weight decay still applies to them. Cost follows all classes.

Weights and velocities may be stored in float16 (PLSC's FP16 mode); the update is computed in float32.

Speed (see ``plsc bench head``): the arithmetic is Paddle's own fused momentum kernel, one pass over the rows
instead of five elementwise ops each allocating a fresh [rows, emb] tensor; on CPU a fresh tensor of that
size costs more in page faults than the arithmetic itself.
"""

from __future__ import annotations

import ctypes
import inspect

import cv2
import numpy as np
import paddle
from paddle import _C_ops

# Rows per block when the dense update walks the whole matrix: bounds its float32 scratch to a few MB.
DENSE_BLOCK_ROWS = 16384
# Sampled rows per block of the lazy update: 2 MB of float32 velocity rows at embedding 512, which stay in
# cache from their gather through the momentum kernel to their scatter. Measured at 100,000 x 512 rows of a
# 1M-class matrix (hugepage malloc, 2 threads): 90 ms per update with 1024 rows, 92 with 512, 153 with 4096.
UPDATE_BLOCK_ROWS = 1024


# Paddle 3.x's index_select can write into a given tensor; 2.6's has no ``out`` parameter.
GATHER_WRITES_INTO = "out" in inspect.signature(paddle.index_select).parameters


def gathers_into(matrix: paddle.Tensor) -> bool:
    """Whether :func:`gather_rows` writes ``matrix``'s rows into a given ``out`` (float32 storage, a Paddle
    that can); callers ask first, so as not to allocate an ``out`` that would go unused."""
    return GATHER_WRITES_INTO and matrix.dtype == paddle.float32


def gather_rows(matrix: paddle.Tensor, index: paddle.Tensor, out: paddle.Tensor | None = None
                ) -> paddle.Tensor:
    """``matrix[index]`` as float32, whatever the storage dtype. ``out``: a float32 [len(index), emb] tensor
    to write the rows into where :func:`gathers_into` says so; otherwise the rows are a new tensor. Returns
    the rows."""
    if matrix.dtype == paddle.float16:
        # Paddle's CPU gather has no float16 kernel; bfloat16 has one in 2.6 and 3.x and the same width, so
        # the bits move through a free view and are never interpreted as bfloat16 numbers.
        rows = paddle.view(paddle.gather(paddle.view(matrix, "bfloat16"), index), "float16")
        return cast(rows, paddle.float32)
    if out is not None and gathers_into(matrix):
        paddle.index_select(matrix, index, out=out)
        return out
    return as_float32(paddle.gather(matrix, index))


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
    rows = cast(rows, matrix.dtype)
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


def momentum_(weight, velocity, grad, lr: float, momentum: float, weight_decay: float, grad_scale: float):
    """float32 ``weight`` and ``velocity`` stepped in place: the kernel ``paddle.optimizer.Momentum`` runs.

    ``_C_ops.momentum_`` is private, but its signature is the same in Paddle 2.6 and 3.x, and using it means
    the update is Paddle's Momentum by construction. Its ``rescale_grad`` is ignored by the CPU kernel (2.6
    and 3.3, measured), so a scale other than 1 is applied here.
    """
    if grad_scale != 1.0:
        grad = grad * grad_scale
    lr_tensor = paddle.full([1], lr, dtype="float32")
    nesterov, multi_precision, rescale_grad = False, False, 1.0
    _C_ops.momentum_(weight, grad, velocity, lr_tensor, None, momentum, nesterov, "l2_decay", weight_decay,
                     multi_precision, rescale_grad)


@paddle.no_grad()
def lazy_update(
    weight, velocity, index, grad, lr: float, momentum: float, weight_decay: float,
    grad_scale: float = 1.0, rows: paddle.Tensor | None = None,
) -> None:
    """Update ``weight[index]`` and ``velocity[index]`` in place from ``grad`` (the sampled rows' gradient).

    ``rows``: ``gather_rows(weight, index)`` if the caller already has it (the forward pass gathered them);
    it may be overwritten.
    """
    rows = None if rows is None else rows.detach()
    # Block by block: the velocity rows (and float16 casts) exist for one block at a time, so the update
    # adds a few MB to the step's peak memory instead of another [sampled, emb] float32 tensor.
    for start in range(0, index.shape[0], UPDATE_BLOCK_ROWS):
        block = slice(start, start + UPDATE_BLOCK_ROWS)
        block_index = index[block]
        block_rows = gather_rows(weight, block_index) if rows is None else rows[block]
        block_velocity = gather_rows(velocity, block_index)
        momentum_(block_rows, block_velocity, as_float32(grad[block]), lr, momentum, weight_decay, grad_scale)
        scatter_rows_(velocity, block_index, block_velocity)
        scatter_rows_(weight, block_index, block_rows)


@paddle.no_grad()
def dense_update(
    weight, velocity, index, grad, lr: float, momentum: float, weight_decay: float,
    grad_scale: float = 1.0, rows: paddle.Tensor | None = None,
) -> None:
    """The whole matrix steps, with ``grad`` on the sampled rows and zero elsewhere.

    The sampled rows' new values are computed first, from their old values; then every row takes the
    zero-gradient step block by block (float32 scratch of one block, whatever the class count); then the
    sampled rows are overwritten with their values from the first part.
    """
    rows = gather_rows(weight, index) if rows is None else rows.detach()
    rows_velocity = gather_rows(velocity, index)
    momentum_(rows, rows_velocity, as_float32(grad), lr, momentum, weight_decay, grad_scale)
    zero_grad = None
    for start in range(0, weight.shape[0], DENSE_BLOCK_ROWS):
        stop = min(start + DENSE_BLOCK_ROWS, weight.shape[0])
        block_weight = weight[start:stop].astype("float32")
        block_velocity = velocity[start:stop].astype("float32")
        if zero_grad is None or zero_grad.shape != block_weight.shape:
            zero_grad = paddle.zeros_like(block_weight)
        momentum_(block_weight, block_velocity, zero_grad, lr, momentum, weight_decay, 1.0)
        weight[start:stop] = block_weight.astype(weight.dtype)
        velocity[start:stop] = block_velocity.astype(velocity.dtype)
    scatter_rows_(velocity, index, rows_velocity)
    scatter_rows_(weight, index, rows)


UPDATES = {"lazy": lazy_update, "dense": dense_update}

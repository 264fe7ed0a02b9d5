"""Row stores and the one walk that steps them: the class centers' sparse momentum.

A row store is a [rows, width] matrix of class centers or velocities whose rows are read as float32 and
written back rounded to the storage (float32, float16, or int8 codes with per-row scales:
:class:`plsc.loss.int8_rows.Int8Rows`), behind one protocol (:class:`RowStore`), so that the momentum step
and the heads are the same code for every storage. How each store moves its rows fast is
:mod:`plsc.loss.row_backend`'s business.

The momentum step lives here because it is the stores' one writer during training: a walk over blocks of
rows, gathered as float32, stepped and scattered back (:func:`lazy_update`); the head reads the store
(``gather``) and this walk writes it, so the store and its update read as one. Both modes follow Paddle's
Momentum with L2 weight decay, ``v = mu * v + (g + wd * w); w = w - lr * v``:

- ``lazy`` (default): only the sampled rows change, weight and velocity alike. Cost follows the sampled
  classes.
- ``dense``: PLSC v2.2's semantics, the optimizer seeing the whole matrix: unsampled rows get a zero gradient,
  but their velocity still decays and weight decay still applies to them. Cost follows all classes.

Speed (see ``plsc bench head``): a float32 or float16 weight on the CPU, with a velocity of its dtype or int8,
steps in place, in one compiled pass over the sampled rows (no gather, no scatter); other stores walk blocks
of rows through Paddle's own fused momentum kernel, one pass over a block instead of five elementwise ops
each allocating a fresh [rows, emb] tensor (on CPU a fresh tensor of that size costs more in page faults than
the arithmetic itself). Both are Paddle's Momentum to the bit.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import paddle
from paddle import _C_ops

from plsc.loss.int8_rows import Int8Rows
from plsc.loss.row_backend import (
    GATHER_WRITES_INTO,
    cast,
    gather_into,
    momentum_rows_in_place_,
    on_host,
    put_rows_,
    steps_in_place,
    take_rows,
)


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
        # float16 gathers into a float32 ``out`` on the host only (row_backend.gather_into)
        self.gathers_into = on_host(tensor, dtype=tensor.dtype) or (self.is_float32 and GATHER_WRITES_INTO)

    @property
    def dtype(self) -> str:
        return str(self.tensor.dtype).split(".")[-1]

    def gather(self, index: paddle.Tensor, out: paddle.Tensor | None = None) -> paddle.Tensor:
        if out is not None and self.gathers_into:
            return gather_into(out, self.tensor, index)  # the same memory every step instead of fresh pages
        if not self.is_float32:
            return cast(take_rows(self.tensor, index), paddle.float32)
        return paddle.gather(self.tensor, index)

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


# Rows per block when the dense update walks the whole matrix: bounds its float32 scratch to a few MB.
DENSE_BLOCK_ROWS = 16384
# Sampled rows per block of the lazy update: 2 MB of float32 velocity rows at embedding 512, which stay in
# cache from their gather through the momentum kernel to their scatter. Measured at 100,000 x 512 rows of a
# 1M-class matrix (hugepage malloc, 2 threads): 90 ms per update with 1024 rows, 92 with 512, 153 with 4096.
UPDATE_BLOCK_ROWS = 1024


def momentum_(weight, velocity, grad, lr: paddle.Tensor, momentum: float, weight_decay: float,
              grad_scale: float):
    """float32 ``weight`` and ``velocity`` stepped in place: the kernel ``paddle.optimizer.Momentum`` runs,
    with the learning rate as a float32 [1] tensor (made once per update, not once per block).

    ``_C_ops.momentum_`` is private, but its signature is the same in Paddle 2.6 and 3.x, and using it means
    the update is Paddle's Momentum by construction. Its ``rescale_grad`` is ignored by the CPU kernel (2.6
    and 3.3, measured), so a scale other than 1 is applied here.
    """
    if grad_scale != 1.0:
        grad = grad * grad_scale
    nesterov, multi_precision, rescale_grad = False, False, 1.0
    _C_ops.momentum_(weight, grad, velocity, lr, None, momentum, nesterov, "l2_decay", weight_decay,
                     multi_precision, rescale_grad)


@paddle.no_grad()
def lazy_update(
    weight, velocity, index, grad, lr: float, momentum: float, weight_decay: float,
    grad_scale: float = 1.0, rows: paddle.Tensor | None = None, block_rows: int | None = None,
) -> None:
    """The one walk of every update: ``weight[index]`` and ``velocity[index]`` stepped in place from
    ``grad`` (the rows' float32 gradient; None: zero). ``weight``, ``velocity``: row stores, made once by
    their owner (:func:`row_store` of a tensor). ``rows``: the weight's rows already gathered as float32 (the
    forward pass gathered them; they are overwritten), or None.

    A float32 or float16 weight on the CPU with a velocity of its dtype or int8 steps where it lies, in one
    compiled pass (:func:`~plsc.loss.row_backend.momentum_rows_in_place_`). Other stores walk the rows a
    block of ``block_rows`` at a time (UPDATE_BLOCK_ROWS by default): gathered as float32, stepped by
    Paddle's kernel, scattered back; the velocity rows (and float16 casts) exist for one block at a time, so
    the update adds a few MB to the step's peak memory instead of another [rows, emb] float32 tensor. Both
    give the same bits.
    """
    if isinstance(weight, FloatRows):
        # The velocity's tensors: a float matrix, or int8 codes in their container with their scales.
        velocity_tensor, velocity_scale = (velocity.tensor, None) if isinstance(velocity, FloatRows) else \
            (velocity.codes, velocity.scale)
        if steps_in_place(weight.tensor, velocity_tensor, grad, velocity_scale):
            momentum_rows_in_place_(weight.tensor, velocity_tensor, index, grad, lr, momentum, weight_decay,
                                    grad_scale, velocity_scale)
            return
    rows = None if rows is None else rows.detach()
    count, block_rows = index.shape[0], block_rows or UPDATE_BLOCK_ROWS
    zero_grad = None
    lr_tensor = paddle.full([1], lr, dtype="float32")
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        block_index = rows_of(index, start, stop)
        block_weight = weight.gather(block_index) if rows is None else rows_of(rows, start, stop)
        block_velocity = velocity.gather(block_index)
        if grad is not None:
            block_grad = rows_of(grad, start, stop)
        elif zero_grad is None or zero_grad.shape != block_weight.shape:
            block_grad = zero_grad = paddle.zeros_like(block_weight)
        else:
            block_grad = zero_grad
        momentum_(block_weight, block_velocity, block_grad, lr_tensor, momentum, weight_decay, grad_scale)
        velocity.scatter_(block_index, block_velocity)
        weight.scatter_(block_index, block_weight)


def rows_of(tensor: paddle.Tensor, start: int, stop: int) -> paddle.Tensor:
    """Rows ``[start, stop)`` of ``tensor``: the tensor itself when they are all of it (Paddle 2.6's slices
    are copies)."""
    return tensor if start == 0 and stop == tensor.shape[0] else tensor[start:stop]


@paddle.no_grad()
def dense_update(
    weight, velocity, index, grad, lr: float, momentum: float, weight_decay: float,
    grad_scale: float = 1.0, rows: paddle.Tensor | None = None,
) -> None:
    """The whole matrix steps, with ``grad`` on the sampled rows and zero elsewhere: the sampled rows as
    :func:`lazy_update` steps them, then every other row with a zero gradient."""
    lazy_update(weight, velocity, index, grad, lr, momentum, weight_decay, grad_scale, rows)
    decay_unsampled_rows(weight, velocity, index, lr, momentum, weight_decay)


@paddle.no_grad()
def decay_unsampled_rows(weight, velocity, index: paddle.Tensor, lr: float, momentum: float,
                         weight_decay: float) -> None:
    """The dense mode's zero-gradient step of every row not in ``index`` (those were stepped already), a
    block of rows at a time: float32 scratch of one block, whatever the class count."""
    sampled = np.zeros(weight.shape[0], dtype=bool)
    sampled[index.numpy()] = True
    unsampled = paddle.to_tensor(np.flatnonzero(~sampled))
    lazy_update(weight, velocity, unsampled, None, lr, momentum, weight_decay, block_rows=DENSE_BLOCK_ROWS)


UPDATES = {"lazy": lazy_update, "dense": dense_update}

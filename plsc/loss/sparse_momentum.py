"""Momentum SGD for class centers that touches only what a step needs.

Both modes follow Paddle's Momentum with L2 weight decay, ``v = mu * v + (g + wd * w); w = w - lr * v``:

- ``lazy`` (default): only the sampled rows change, weight and velocity alike. Cost follows the sampled
  classes.
- ``dense``: PLSC v2.2's semantics, the optimizer seeing the whole matrix: unsampled rows get a zero gradient,
  but their velocity still decays and weight decay still applies to them. Cost follows all classes.

Weights and velocities may be stored in float16 (PLSC's FP16 mode), velocities also in int8 with a scale per
row (:mod:`plsc.loss.int8_rows`); the update is computed in float32, a block of rows at a time.

Speed (see ``plsc bench head``): the arithmetic is Paddle's own fused momentum kernel, one pass over the rows
instead of five elementwise ops each allocating a fresh [rows, emb] tensor; on CPU a fresh tensor of that
size costs more in page faults than the arithmetic itself.
"""

from __future__ import annotations

import numpy as np
import paddle
from paddle import _C_ops

from plsc.loss.rows import row_store

# Rows per block when the dense update walks the whole matrix: bounds its float32 scratch to a few MB.
DENSE_BLOCK_ROWS = 16384
# Sampled rows per block of the lazy update: 2 MB of float32 velocity rows at embedding 512, which stay in
# cache from their gather through the momentum kernel to their scatter. Measured at 100,000 x 512 rows of a
# 1M-class matrix (hugepage malloc, 2 threads): 90 ms per update with 1024 rows, 92 with 512, 153 with 4096.
UPDATE_BLOCK_ROWS = 1024


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
    grad_scale: float = 1.0, rows: paddle.Tensor | None = None, velocity_rows: paddle.Tensor | None = None,
    block_rows: int | None = None,
) -> None:
    """The one walk of every update: ``weight[index]`` and ``velocity[index]`` stepped in place from
    ``grad`` (the rows' float32 gradient; None: zero), a block of ``block_rows`` rows at a time
    (UPDATE_BLOCK_ROWS by default). ``weight``, ``velocity``: anything :func:`plsc.loss.rows.row_store` takes.
    ``rows``, ``velocity_rows``: the rows already gathered as float32 (the forward pass gathered the weight's
    rows; they are overwritten), or None.

    Block by block: the velocity rows (and float16 casts) exist for one block at a time, so the update adds
    a few MB to the step's peak memory instead of another [rows, emb] float32 tensor.
    """
    weight, velocity = row_store(weight), row_store(velocity)
    rows = None if rows is None else rows.detach()
    count, block_rows = index.shape[0], block_rows or UPDATE_BLOCK_ROWS
    zero_grad = None
    for start in range(0, count, block_rows):
        stop = min(start + block_rows, count)
        block_index = rows_of(index, start, stop)
        block_weight = weight.gather(block_index) if rows is None else rows_of(rows, start, stop)
        block_velocity = velocity.gather(block_index) if velocity_rows is None else \
            rows_of(velocity_rows, start, stop)
        if grad is not None:
            block_grad = rows_of(grad, start, stop)
        elif zero_grad is None or zero_grad.shape != block_weight.shape:
            block_grad = zero_grad = paddle.zeros_like(block_weight)
        else:
            block_grad = zero_grad
        momentum_(block_weight, block_velocity, block_grad, lr, momentum, weight_decay, grad_scale)
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

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

import paddle
from paddle import _C_ops

from plsc.loss.rows import as_float32, gather_rows, read_block, scatter_rows_, write_block_

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
        block_weight, block_velocity = read_block(weight, start, stop), read_block(velocity, start, stop)
        if zero_grad is None or zero_grad.shape != block_weight.shape:
            zero_grad = paddle.zeros_like(block_weight)
        momentum_(block_weight, block_velocity, zero_grad, lr, momentum, weight_decay, 1.0)
        write_block_(weight, start, block_weight)
        write_block_(velocity, start, block_velocity)
    scatter_rows_(velocity, index, rows_velocity)
    scatter_rows_(weight, index, rows)


UPDATES = {"lazy": lazy_update, "dense": dense_update}

"""Momentum SGD for class centers that touches only what a step needs.

Both modes follow Paddle's Momentum with L2 weight decay, ``v = mu * v + (g + wd * w); w = w - lr * v``:

- ``lazy`` (default): only the sampled rows change, weight and velocity alike. Cost follows the sampled classes.
- ``dense``: PLSC v2.2's semantics, the optimizer seeing the whole matrix: unsampled rows get a zero gradient,
  but their velocity still decays and weight decay still applies to them. Cost follows all classes.

Weights and velocities may be stored in float16 (PLSC's FP16 mode); the update is computed in float32.
"""

from __future__ import annotations

import paddle


def gather_rows(matrix: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """``matrix[index]`` as float32, whatever the storage dtype."""
    if matrix.dtype == paddle.float16:
        # Paddle's CPU gather has no float16 kernel; bfloat16 has one in 2.6 and 3.x and the same width, so
        # the bits move through a free view and are never interpreted as bfloat16 numbers.
        rows = paddle.view(paddle.gather(paddle.view(matrix, "bfloat16"), index), "float16")
    else:
        rows = paddle.gather(matrix, index)
    return rows.astype("float32")


def scatter_rows_(matrix: paddle.Tensor, index: paddle.Tensor, rows: paddle.Tensor) -> None:
    """``matrix[index] = rows`` in place, rounding to the storage dtype (index_put_ has float16 CPU kernels)."""
    paddle.index_put_(matrix, (index,), rows.astype(matrix.dtype))


@paddle.no_grad()
def lazy_update(weight, velocity, index, grad, lr: float, momentum: float, weight_decay: float) -> None:
    """Update ``weight[index]`` and ``velocity[index]`` in place from ``grad`` (the sampled rows' gradient)."""
    rows = gather_rows(weight, index)
    step = grad.astype("float32") + weight_decay * rows
    rows_velocity = momentum * gather_rows(velocity, index) + step
    scatter_rows_(velocity, index, rows_velocity)
    scatter_rows_(weight, index, rows - lr * rows_velocity)


@paddle.no_grad()
def dense_update(weight, velocity, index, grad, lr: float, momentum: float, weight_decay: float) -> None:
    """The whole matrix steps, with ``grad`` scattered into otherwise-zero rows."""
    full_weight = weight.astype("float32")
    full_grad = weight_decay * full_weight
    # Sampled indices are unique, so "add g to those rows" is a gather, an add and an overwriting scatter.
    sampled_rows = paddle.gather(full_grad, index) + grad.astype("float32")
    full_grad = paddle.scatter(full_grad, index, sampled_rows, overwrite=True)
    new_velocity = momentum * velocity.astype("float32") + full_grad
    paddle.assign(new_velocity.astype(velocity.dtype), velocity)
    paddle.assign((full_weight - lr * new_velocity).astype(weight.dtype), weight)


UPDATES = {"lazy": lazy_update, "dense": dense_update}

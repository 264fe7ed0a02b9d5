"""Row and column sums of a float matrix as products with a ones vector.

Paddle's CPU reductions along an axis are several times slower than a matrix-vector product of the same
matrix (3.3.1, 2 threads, [128, 4096] float32: 1.5 ms for the column sums against 0.05 ms, 0.43 ms for the
row sums against 0.04 ms). The streaming head sums each chunk's exponentials by row (the softmax's
normaliser); both heads sum [batch, sampled] products by column (each center's radial gradient). The ones
take their length from the matrix itself, so the same code runs in a static graph whose batch size is
unknown.
"""

from __future__ import annotations

import paddle


def column_sums(matrix: paddle.Tensor) -> paddle.Tensor:
    """``matrix.sum(axis=0)``, [cols]."""
    ones = paddle.ones_like(matrix[:, :1])
    return paddle.matmul(ones, matrix, transpose_x=True).reshape([-1])


def row_sums(matrix: paddle.Tensor) -> paddle.Tensor:
    """``matrix.sum(axis=1)``, [rows]."""
    ones = paddle.ones_like(matrix[:1, :])
    return paddle.matmul(matrix, ones, transpose_y=True).reshape([-1])

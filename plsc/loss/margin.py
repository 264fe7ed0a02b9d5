"""The margin softmax of one rank's sampled class centers: the cosine of each embedding of the global batch to
each center (:class:`_CosineToCenters`), the combined margin ``s * (cos(m1 * theta + m2) - m3)`` at the
target column and ``s * cos(theta)`` elsewhere, and the mean softmax cross entropy
(:class:`_MarginSoftmaxCrossEntropy`). With inter-class filtering (``Margin.interclass_filtering_threshold``
> 0) every non-target cosine above the threshold counts as 0 before the margin and gets no gradient.

Built from ops that have CPU kernels (Paddle's fused ``margin_cross_entropy`` has none), and written against a
``comm`` object so that the same code computes the loss of one process or of a class-sharded classifier: every
rank holds some columns of the logits of the whole global batch, and the softmax normaliser and the target
logit are summed across ranks.

Both layers write their backward out, and in eager mode overwrite their own [batch, k] and [k, emb] buffers
once they are done with them (``paddle.in_dynamic_mode()`` at each such op, or inside the
:mod:`plsc.loss.row_backend` function that runs it): each in-place op saves a fresh tensor of that size, and
on CPU a fresh tensor's page faults cost more than its arithmetic. Never in a static program
(``paddle.jit.to_static``), which plans its own buffers and where in-place ops on these variables miscompute
(3.3: NaN) or are refused (2.6: "viewed Tensor"). How each pass runs fast on the CPU is the backend's
business; this module reads as the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import paddle
import paddle.nn.functional as F

from plsc.loss.row_backend import (
    matmul_into,
    max_per_row,
    multiply_,
    squared_row_norms,
    subtract_,
    subtract_scaled_rows_,
)

# acos is evaluated on cos(theta) clipped this far inside [-1, 1]: the exact derivative -1/sin(theta) is
# infinite at the ends, and rounding can push a normalised dot product past 1.
_COS_EPS = 1e-6
# sin(theta) = sqrt(1 - cos^2) is floored at this value for the same reason.
_SIN_SQUARED_FLOOR = 1e-12
# F.normalize's default epsilon: norms below it are replaced by it.
NORMALIZE_EPS = 1e-12


@dataclass(frozen=True)
class Margin:
    m1: float
    m2: float
    m3: float
    scale: float
    # Inter-class filtering (``loss.interclass_filtering_threshold``, arcface_torch's CombinedMarginLoss, the
    # PartialFC paper): a cosine to another class's center above this is most likely the same identity under
    # two labels; it enters the softmax as 0 (after the scale: exp(0) in the normaliser) and gets no
    # gradient. 0: off, and the loss computes nothing for it.
    interclass_filtering_threshold: float = 0.0

    @classmethod
    def from_list(cls, margins, scale: float, interclass_filtering_threshold: float = 0.0) -> Margin:
        m1, m2, m3 = (float(m) for m in margins)
        return cls(m1, m2, m3, float(scale), float(interclass_filtering_threshold))


ARCFACE = Margin(1.0, 0.5, 0.0, 64.0)
COSFACE = Margin(1.0, 0.0, 0.35, 64.0)


def target_logit(cos_theta: paddle.Tensor, margin: Margin) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``cos(m1 * theta + m2) - m3`` and its slope in ``cos_theta`` as autograd differentiates it: the exact
    derivative wherever it is finite, 0 where the evaluation clips."""
    if margin.m1 == 1.0 and margin.m2 == 0.0:
        return cos_theta - margin.m3, paddle.ones_like(cos_theta)  # CosFace: no trigonometry, no rounding
    if margin.m1 == 1.0:
        # cos(theta + m2) = cos(theta) cos(m2) - sin(theta) sin(m2): no acos, so no clipping of cos(theta).
        sin_squared = 1.0 - cos_theta * cos_theta
        sin_theta = paddle.sqrt(paddle.clip(sin_squared, min=_SIN_SQUARED_FLOOR))
        unclipped = (sin_squared > _SIN_SQUARED_FLOOR).astype(cos_theta.dtype)
        logit = cos_theta * math.cos(margin.m2) - sin_theta * math.sin(margin.m2) - margin.m3
        return logit, math.cos(margin.m2) + math.sin(margin.m2) * cos_theta / sin_theta * unclipped
    clipped = paddle.clip(cos_theta, -1.0 + _COS_EPS, 1.0 - _COS_EPS)
    unclipped = ((cos_theta > -1.0 + _COS_EPS) & (cos_theta < 1.0 - _COS_EPS)).astype(cos_theta.dtype)
    angle = margin.m1 * paddle.acos(clipped) + margin.m2
    slope = margin.m1 * paddle.sin(angle) / paddle.sqrt(1.0 - clipped * clipped) * unclipped
    return paddle.cos(angle) - margin.m3, slope


def at_columns(matrix: paddle.Tensor, column: paddle.Tensor) -> paddle.Tensor:
    """``matrix[b, column[b]]`` for each row b (``column``: [batch, 1]), [batch].

    Without ``broadcast=False`` Paddle's take_along_axis first broadcasts ``matrix`` to its own shape, a copy
    of the whole [batch, classes] matrix (41 ms against 0.006 ms at [128, 100000], 3.3.1)."""
    return paddle.take_along_axis(matrix, column, axis=1, broadcast=False).squeeze(1)


def put_columns(matrix: paddle.Tensor, column: paddle.Tensor, values: paddle.Tensor) -> paddle.Tensor:
    """``matrix[b, column[b]] = values[b]`` for each row b (``column``: [batch, 1]), in place when eager."""
    if paddle.in_dynamic_mode():
        return matrix.put_along_axis_(column, values.unsqueeze(1), 1)
    return matrix.put_along_axis(column, values.unsqueeze(1), 1)


def filtered_entries(cosine: paddle.Tensor, margin: Margin) -> paddle.Tensor:
    """[batch, k] bool: where inter-class filtering sets the cosine to 0, every entry above the margin's
    threshold. A row's target column is among them when its cosine is: the callers write the target logit
    over it afterwards. Called only with filtering on (a threshold > 0): off, no [batch, k] pass is made."""
    # A [1] operand: comparing with a Python number took 2-3x longer on CPU (80-96 ms against 33-56 ms at
    # [128, 100000], 3.3.1, 2 threads).
    threshold = paddle.full([1], margin.interclass_filtering_threshold, dtype=cosine.dtype)
    return paddle.greater_than(cosine, threshold)


def zero_where(matrix: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
    """``matrix`` with 0 where ``mask`` is true, in place when eager."""
    if paddle.in_dynamic_mode():
        return matrix.masked_fill_(mask, 0.0)
    return paddle.masked_fill(matrix, mask, 0.0)


# Row and column sums as products with a ones vector: Paddle's CPU reductions along an axis are several times
# slower than a matrix-vector product of the same matrix (3.3.1, 2 threads, [128, 4096] float32: 1.5 ms for
# the column sums against 0.05 ms, 0.43 ms for the row sums against 0.04 ms). The ones take their length from
# the matrix itself, so the same code runs in a static graph whose batch size is unknown.


def column_sums(matrix: paddle.Tensor) -> paddle.Tensor:
    """``matrix.sum(axis=0)``, [cols]: each center's radial gradient sums a [batch, k] product by column."""
    ones = paddle.ones_like(matrix[:, :1])
    return paddle.matmul(ones, matrix, transpose_x=True).reshape([-1])


def row_sums(matrix: paddle.Tensor) -> paddle.Tensor:
    """``matrix.sum(axis=1)``, [rows]: the streaming head's softmax normaliser, chunk by chunk."""
    ones = paddle.ones_like(matrix[:1, :])
    return paddle.matmul(matrix, ones, transpose_y=True).reshape([-1])


class ScratchRows:
    """One [rows, emb] tensor kept from step to step: the class centers' gradient, or their gathered rows.

    On CPU a fresh tensor of that size is fresh pages from the OS (glibc unmaps freed buffers over 32 MiB),
    and faulting them in costs more than the arithmetic written into them: at 100,000 x 512 the head's
    backward took 0.91 s with this instead of 1.21 s (0.69 against 0.92 s in a second pair of runs). Paddle
    hands the gradient a PyLayer returns to the leaf's ``.grad`` without a copy (2.6 and 3.x, tested), so the
    leaf's gradient *is* this tensor until the next backward overwrites it; the head's ``apply`` consumes it
    before that.
    """

    def __init__(self):
        self.tensor: paddle.Tensor | None = None

    def shaped(self, shape: list[int], dtype) -> paddle.Tensor:
        if self.tensor is None or self.tensor.shape != list(shape) or self.tensor.dtype != dtype:
            self.tensor = None  # the old one goes first: never two at once
            self.tensor = paddle.empty(shape, dtype=dtype)
        return self.tensor

    def release(self) -> None:
        self.tensor = None


def inverse_row_norms(squared_norms: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """F.normalize's inverse norms of rows with these squared norms, and where each norm is live: 1 above
    F.normalize's floor, 0 where the floor replaces it (a constant there: no gradient through it)."""
    norms = paddle.sqrt(squared_norms)
    return 1.0 / paddle.clip(norms, min=NORMALIZE_EPS), (norms > NORMALIZE_EPS).astype(norms.dtype)


class _CosineToCenters(paddle.autograd.PyLayer):
    """``matmul(unit_embeddings, F.normalize(centers, axis=1), transpose_y=True)`` without normalised centers.

    The centers' norms scale the columns of the [batch, k] product instead of the [k, emb] rows, and the
    backward is written out (:func:`center_grad`): a matmul into one [k, emb] buffer and one pass over it.
    F.normalize's autograd makes about five [k, emb] temporaries instead, each a fresh allocation costing more
    than its arithmetic.

    The columns are scaled by the 1-D inverse norms themselves: Paddle's CPU broadcast of a [1, k] operand
    takes its generic index path (3-7x slower at [128, 100000]), an expand() materialises a [batch, k] copy,
    and the 1-D operand does neither (measured on 2.6.2 and 3.3.1: multiply_ 10 ms against 14-16 ms expanded,
    57 ms [1, k]).

    The centers' squared norms come in as an input, computed by the caller (:func:`cosine_to_centers`):
    eagerly, a static program reads the same numbers as eager mode, however they were computed.
    """

    @staticmethod
    def forward(ctx, unit_embeddings, centers, squared_norms, scratch: ScratchRows | None):
        inverse_norms, norm_is_live = inverse_row_norms(squared_norms)
        cosine = multiply_(paddle.matmul(unit_embeddings, centers, transpose_y=True), inverse_norms)
        ctx.save_for_backward(unit_embeddings, centers, inverse_norms, norm_is_live, cosine)
        # Paddle wants None, not a gradient, for an input that stops gradient; it also saves a matmul.
        ctx.wants_grad = (not unit_embeddings.stop_gradient, not centers.stop_gradient)
        ctx.scratch = scratch
        return cosine

    @staticmethod
    def backward(ctx, grad_cosine):
        unit_embeddings, centers, inverse_norms, norm_is_live, cosine = ctx.saved_tensor()
        # The incoming gradient is the autograd engine's own buffer (in PartialFC: the margin softmax's
        # exponentials; a tensor passed to backward() is copied first, tested on 2.6 and 3.x): scaled in
        # place.
        grad = multiply_(grad_cosine, inverse_norms)
        grad_embeddings = grad_centers = None
        if ctx.wants_grad[0]:
            grad_embeddings = paddle.matmul(grad, centers)
        if ctx.wants_grad[1]:
            grad_centers = center_grad(unit_embeddings, grad, centers, cosine, inverse_norms, norm_is_live,
                                       ctx.scratch)
        return grad_embeddings, grad_centers, None  # no gradient through the given norms (see forward)


def center_grad(unit_embeddings, grad, centers, cosine, inverse_norms, norm_is_live,
                scratch: ScratchRows | None = None) -> paddle.Tensor:
    """d loss / d centers [k, emb] of ``cosine = unit_embeddings @ (centers / |centers|)^T``:
    ``G^T unit_embeddings - radial * centers``, with ``G`` [batch, k] = d loss / d cosine already scaled by
    the inverse norms and ``radial_j = sum_b G_bj cosine_bj / |w_j|`` (0 where the norm is floored).

    Written into ``scratch`` when given (:func:`~plsc.loss.row_backend.matmul_into`); in eager mode
    overwrites ``cosine`` (its last use: one [batch, k] allocation less at the step's memory peak,
    51 MB at k=100,000, batch 128).
    """
    radial = column_sums(multiply_(cosine, grad)) * inverse_norms * norm_is_live
    out = None if scratch is None else scratch.shaped(centers.shape, centers.dtype)
    projected = matmul_into(out, grad, unit_embeddings, transpose_x=True)
    return subtract_scaled_rows_(projected, centers, radial)


def cosine_to_centers(
    embeddings: paddle.Tensor, centers: paddle.Tensor, scratch: ScratchRows | None = None,
    squared_norms: paddle.Tensor | None = None,
) -> paddle.Tensor:
    """[batch, k] cosine similarity of each embedding with each center row, differentiable in both.

    ``scratch``: where the centers' gradient is written (see ScratchRows); it then lives there, overwritten by
    the next backward through the same scratch. In eager mode the backward overwrites the returned cosine
    (it is saved for the backward, whose last use of it is a product with the gradient): read it before.
    ``squared_norms``: the centers' squared row norms (:func:`~plsc.loss.row_backend.squared_row_norms`,
    taken without gradient), when the caller has them; else computed here.
    """
    if squared_norms is None:
        squared_norms = squared_row_norms(centers.detach())
    return _CosineToCenters.apply(F.normalize(embeddings, axis=1), centers, squared_norms, scratch)


class _MarginSoftmaxCrossEntropy(paddle.autograd.PyLayer):
    """Margin logits, softmax and mean cross entropy in one layer, backward written out.

    Same value and gradient as the plain composition of Paddle ops (the tests' reference); its autograd keeps
    about a dozen [batch, classes] tensors alive (one-hot, shifted, exp, and their gradients), this keeps one:
    the exponentials (overwriting the logits), which the backward turns into the gradient. On CPU each
    [batch, classes] tensor costs a fresh allocation, the dominant cost of the loss once the matmuls are
    excluded.
    """

    @staticmethod
    def forward(ctx, cosine, labels, margin: Margin, comm):
        has_target = labels >= 0
        column = paddle.where(has_target, labels, paddle.zeros_like(labels)).unsqueeze(1)
        cos_target = at_columns(cosine, column)
        logits = cosine * margin.scale
        filtered = []  # the mask the backward needs, when filtering is on
        if margin.interclass_filtering_threshold > 0:
            filtered.append(filtered_entries(cosine, margin))
            logits = zero_where(logits, filtered[0])
        # Rows whose class lives on another rank write their own logit back (filtered or not): no margin for
        # them.
        target_logits, target_slopes = target_logit(cos_target, margin)
        target = paddle.where(has_target, margin.scale * target_logits, at_columns(logits, column))
        logits = put_columns(logits, column, target)
        row_max = comm.all_reduce_max(max_per_row(logits))
        shifted = subtract_(logits, row_max)
        exp = shifted.exp_() if paddle.in_dynamic_mode() else paddle.exp(shifted)
        sum_exp = comm.all_reduce_sum_(row_sums(exp))
        has_target_float = has_target.astype(cosine.dtype)
        target_shifted = comm.all_reduce_sum_((target - row_max.squeeze(1)) * has_target_float)
        slope = margin.scale * target_slopes * has_target_float
        ctx.save_for_backward(exp, sum_exp, column, has_target, slope, *filtered)
        ctx.scale = margin.scale
        return (paddle.log(sum_exp) - target_shifted).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, column, has_target, slope, *filtered = ctx.saved_tensor()
        per_row = grad_loss / exp.shape[0]
        softmax_target = at_columns(exp, column) / sum_exp
        # d loss / d logit = per_row * (softmax - one_hot); d logit / d cosine = scale, except at the target
        # column, where the target logit's own slope applies. The exponentials are not needed again: the
        # gradient overwrites them in eager mode (one [batch, classes] allocation less).
        row_factors = (per_row * ctx.scale / sum_exp).unsqueeze(1)
        grad = multiply_(exp, row_factors)
        if filtered:  # a filtered logit is the constant 0: no gradient (the target column is written below)
            grad = zero_where(grad, filtered[0])
        at_target = paddle.where(
            has_target,
            per_row * (softmax_target - 1.0) * slope,
            at_columns(grad, column),
        )
        return put_columns(grad, column, at_target), None


def margin_softmax_cross_entropy(cosine: paddle.Tensor, labels: paddle.Tensor, margin: Margin, comm):
    """Mean margin-softmax cross entropy of ``cosine`` [batch, columns], with far fewer [batch, columns]
    temporaries than the composed ops (see :class:`_MarginSoftmaxCrossEntropy`). ``labels``: [batch] int64
    column index, or -1 where the row's class is not among these columns (it lives on another rank)."""
    return _MarginSoftmaxCrossEntropy.apply(cosine, labels, margin, comm)

"""Combined margin softmax: target logit ``s * (cos(m1 * theta + m2) - m3)``, other logits ``s * cos(theta)``.

Built from ops that have CPU kernels (Paddle's fused ``margin_cross_entropy`` has none), and written against a
``comm`` object so that the same code computes the loss of one process or of a class-sharded classifier: every
rank holds some columns of the logits of the whole global batch, and the softmax normaliser and the target
logit are summed across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import paddle

# acos is evaluated on cos(theta) clipped this far inside [-1, 1]: the exact derivative -1/sin(theta) is
# infinite at the ends, and rounding can push a normalised dot product past 1.
_COS_EPS = 1e-6
# sin(theta) = sqrt(1 - cos^2) is floored at this value for the same reason.
_SIN_SQUARED_FLOOR = 1e-12


@dataclass(frozen=True)
class Margin:
    m1: float
    m2: float
    m3: float
    scale: float

    @classmethod
    def from_list(cls, margins, scale: float) -> Margin:
        m1, m2, m3 = (float(m) for m in margins)
        return cls(m1, m2, m3, float(scale))


ARCFACE = Margin(1.0, 0.5, 0.0, 64.0)
COSFACE = Margin(1.0, 0.0, 0.35, 64.0)


def target_logit(cos_theta: paddle.Tensor, margin: Margin) -> paddle.Tensor:
    """``cos(m1 * theta + m2) - m3`` with its exact derivative wherever it is finite."""
    if margin.m1 == 1.0 and margin.m2 == 0.0:
        return cos_theta - margin.m3  # CosFace: no trigonometry, no rounding
    if margin.m1 == 1.0:
        # cos(theta + m2) = cos(theta) cos(m2) - sin(theta) sin(m2): no acos, so no clipping of cos(theta).
        sin_theta = paddle.sqrt(paddle.clip(1.0 - cos_theta * cos_theta, min=_SIN_SQUARED_FLOOR))
        return cos_theta * math.cos(margin.m2) - sin_theta * math.sin(margin.m2) - margin.m3
    theta = paddle.acos(paddle.clip(cos_theta, -1.0 + _COS_EPS, 1.0 - _COS_EPS))
    return paddle.cos(margin.m1 * theta + margin.m2) - margin.m3


def in_place_allowed() -> bool:
    """Whether the fused losses may overwrite their own buffers: in eager mode each in-place op saves a
    fresh [batch, classes] or [k, emb] tensor. Not in a static program (``paddle.jit.to_static``), which
    plans its own buffers and where in-place ops on these variables miscompute (3.3: NaN) or are refused
    (2.6: "viewed Tensor")."""
    return paddle.in_dynamic_mode()


def at_columns(matrix: paddle.Tensor, column: paddle.Tensor) -> paddle.Tensor:
    """``matrix[b, column[b]]`` for each row b (``column``: [batch, 1]), [batch].

    Without ``broadcast=False`` Paddle's take_along_axis first broadcasts ``matrix`` to its own shape, a copy
    of the whole [batch, classes] matrix (41 ms against 0.006 ms at [128, 100000], 3.3.1)."""
    return paddle.take_along_axis(matrix, column, axis=1, broadcast=False).squeeze(1)


def put_columns(matrix: paddle.Tensor, column: paddle.Tensor, values: paddle.Tensor) -> paddle.Tensor:
    """``matrix[b, column[b]] = values[b]`` for each row b (``column``: [batch, 1]), in place when allowed."""
    if in_place_allowed():
        return matrix.put_along_axis_(column, values.unsqueeze(1), 1)
    return matrix.put_along_axis(column, values.unsqueeze(1), 1)


def exp_shifted(logits: paddle.Tensor, row_max: paddle.Tensor) -> paddle.Tensor:
    """``exp(logits - row_max)``, overwriting ``logits`` when allowed."""
    if in_place_allowed():
        return logits.subtract_(row_max).exp_()
    return paddle.exp(logits - row_max)


def target_logit_slope(cos_theta: paddle.Tensor, margin: Margin) -> paddle.Tensor:
    """d target_logit / d cos_theta as autograd differentiates :func:`target_logit` (0 where it clips)."""
    if margin.m1 == 1.0 and margin.m2 == 0.0:
        return paddle.ones_like(cos_theta)
    if margin.m1 == 1.0:
        sin_squared = 1.0 - cos_theta * cos_theta
        unclipped = (sin_squared > _SIN_SQUARED_FLOOR).astype(cos_theta.dtype)
        sin_theta = paddle.sqrt(paddle.clip(sin_squared, min=_SIN_SQUARED_FLOOR))
        return math.cos(margin.m2) + math.sin(margin.m2) * cos_theta / sin_theta * unclipped
    clipped = paddle.clip(cos_theta, -1.0 + _COS_EPS, 1.0 - _COS_EPS)
    unclipped = ((cos_theta > -1.0 + _COS_EPS) & (cos_theta < 1.0 - _COS_EPS)).astype(cos_theta.dtype)
    angle = margin.m1 * paddle.acos(clipped) + margin.m2
    return margin.m1 * paddle.sin(angle) / paddle.sqrt(1.0 - clipped * clipped) * unclipped


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
        # Rows whose class lives on another rank write their own plain logit back: no margin for them.
        target = margin.scale * paddle.where(has_target, target_logit(cos_target, margin), cos_target)
        logits = put_columns(cosine * margin.scale, column, target)
        row_max = comm.all_reduce_max(logits.max(axis=1, keepdim=True))
        exp = exp_shifted(logits, row_max)
        sum_exp = comm.all_reduce_sum_(exp.sum(axis=1))
        has_target_float = has_target.astype(cosine.dtype)
        target_shifted = comm.all_reduce_sum_((target - row_max.squeeze(1)) * has_target_float)
        slope = margin.scale * target_logit_slope(cos_target, margin) * has_target_float
        ctx.save_for_backward(exp, sum_exp, column, has_target, slope)
        ctx.scale = margin.scale
        return (paddle.log(sum_exp) - target_shifted).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, column, has_target, slope = ctx.saved_tensor()
        per_row = grad_loss / exp.shape[0]
        softmax_target = at_columns(exp, column) / sum_exp
        # d loss / d logit = per_row * (softmax - one_hot); d logit / d cosine = scale, except at the target
        # column, where the target logit's own slope applies. The exponentials are not needed again: the
        # gradient overwrites them when allowed (one [batch, classes] allocation less).
        row_factors = (per_row * ctx.scale / sum_exp).unsqueeze(1)
        grad = exp.multiply_(row_factors) if in_place_allowed() else exp * row_factors
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

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
import paddle.nn.functional as F

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


def margin_logits(cosine: paddle.Tensor, labels: paddle.Tensor, margin: Margin) -> paddle.Tensor:
    """Scaled logits with the margin applied at each row's label column.

    ``cosine``: [batch, classes]; ``labels``: [batch] int64 column index, or -1 where the row's class is not
    among these columns (it lives on another rank).
    """
    num_columns = cosine.shape[1]
    has_target = labels >= 0
    column = paddle.where(has_target, labels, paddle.zeros_like(labels))
    cos_target = paddle.take_along_axis(cosine, column.unsqueeze(1), axis=1)
    shift = (target_logit(cos_target, margin) - cos_target) * has_target.astype(cosine.dtype).unsqueeze(1)
    one_hot = F.one_hot(column, num_columns).astype(cosine.dtype)
    return margin.scale * (cosine + one_hot * shift)


def softmax_cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, comm) -> paddle.Tensor:
    """Mean cross entropy over the batch, with the softmax taken over the columns of every rank.

    Same label convention as :func:`margin_logits`. On one process ``comm`` is a LocalComm and this is the
    ordinary stable log-softmax cross entropy.
    """
    row_max = comm.all_reduce_max(logits.max(axis=1, keepdim=True).detach())
    shifted = logits - row_max
    sum_exp = comm.sum_across_ranks(paddle.exp(shifted).sum(axis=1))
    has_target = labels >= 0
    column = paddle.where(has_target, labels, paddle.zeros_like(labels))
    own_target = paddle.take_along_axis(shifted, column.unsqueeze(1), axis=1).squeeze(1)
    target = comm.sum_across_ranks(own_target * has_target.astype(logits.dtype))
    return (paddle.log(sum_exp) - target).mean()

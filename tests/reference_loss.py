"""The margin softmax written as plain composed Paddle ops, autograd doing the backward: the reference that
the head's hand-written losses (plsc.loss.margin, plsc.loss.streaming) are compared against."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from plsc.loss.margin import Margin, at_columns, target_logit


def margin_logits(cosine: paddle.Tensor, labels: paddle.Tensor, margin: Margin) -> paddle.Tensor:
    """Scaled logits with the margin applied at each row's label column.

    ``cosine``: [batch, classes]; ``labels``: [batch] int64 column index, or -1 where the row's class is not
    among these columns (it lives on another rank).
    """
    num_columns = cosine.shape[1]
    has_target = labels >= 0
    column = paddle.where(has_target, labels, paddle.zeros_like(labels))
    has_target_column = has_target.astype(cosine.dtype).unsqueeze(1)
    is_target = F.one_hot(column, num_columns).astype(cosine.dtype) * has_target_column
    cos_target = at_columns(cosine, column.unsqueeze(1)).unsqueeze(1)
    if margin.interclass_filtering_threshold > 0:
        cosine = cosine * filtering_keep(cosine, is_target, margin.interclass_filtering_threshold)
    shift = (target_logit(cos_target, margin)[0] - cos_target) * has_target_column
    return margin.scale * (cosine + is_target * shift)


def filtering_keep(cosine: paddle.Tensor, is_target: paddle.Tensor, threshold: float) -> paddle.Tensor:
    """Inter-class filtering as arcface_torch's CombinedMarginLoss states it: a constant factor, 0 where a
    cosine other than the row's target is above ``threshold``, else 1 (no gradient flows through it)."""
    above = (cosine.detach() > threshold).astype(cosine.dtype)
    return 1.0 - above * (1.0 - is_target)


def softmax_cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, comm) -> paddle.Tensor:
    """Mean cross entropy over the batch, the softmax taken over the columns of every rank of ``comm``.

    Same label convention as :func:`margin_logits`; with a LocalComm the ordinary stable log-softmax cross
    entropy.
    """
    row_max = comm.all_reduce_max(logits.max(axis=1, keepdim=True).detach())
    shifted = logits - row_max
    sum_exp = sum_across_ranks(paddle.exp(shifted).sum(axis=1), comm)
    has_target = labels >= 0
    column = paddle.where(has_target, labels, paddle.zeros_like(labels))
    own_target = at_columns(shifted, column.unsqueeze(1))
    target = sum_across_ranks(own_target * has_target.astype(logits.dtype), comm)
    return (paddle.log(sum_exp) - target).mean()


def sum_across_ranks(tensor: paddle.Tensor, comm) -> paddle.Tensor:
    """Sum over ranks; the other ranks' terms enter as a constant, so the gradient flows to this rank's own
    term only (the all-gather's backward sums the contributions where they meet)."""
    total = comm.all_reduce_sum_(tensor.detach().clone())
    return tensor + (total - tensor.detach())

"""The streaming strategy of the PartialFC head: the margin softmax over the sampled centers, one chunk of
centers at a time.

The whole-matrix strategy (:class:`~plsc.loss.partial_fc.WholeMatrix`) gathers every sampled center into a
float32 [sampled, emb] tensor and forms [global batch, sampled] logits, softmax and gradients. Here nothing of
either size exists beyond one chunk of ``chunk_size`` sampled centers (``loss.chunk_size``), so a rank's
memory is its class centers, their velocity and a few chunk-sized buffers. Three walks over the chunks, each
gathering the chunk's rows (float16 -> float32 per chunk) and recomputing its cosines and margin logits:

1. forward (:meth:`Streaming.loss`): per-row running max and sum of exponentials (rescaled when the max
   grows; inter-class filtering, when on, first sets the chunk's filtered logits to 0), and the target logit;
   the ranks combine them as the whole-matrix head does (one all-reduce of the max, one of the sum, one of the
   target logit). Saves only [batch]-sized statistics and the unit embeddings.
2. backward: each chunk's softmax gradient (0 at the filtered entries, their mask recomputed from the same
   cosines); accumulates d(embeddings) and the squared norm of the chunk's center gradient, without forming
   that gradient (see :func:`center_grad_sq_norm`). The norm, a sum of squares, is finite exactly when the
   gradient is (barring float32 overflow of the square itself), so the trainer's found-inf check reads it
   instead of a [sampled, emb] gradient.
3. update (:meth:`Streaming.apply`): once the trainer knows whether the step is skipped (found-inf), each
   chunk's center gradient is formed again and applied to weight + velocity at once (lazy or dense momentum,
   weight decay, ``grad_scale`` as in :func:`plsc.loss.rows.lazy_update`).

Why the update waits for a third walk under loss scaling: the skip decision covers the backbone's
gradients, which exist only after the head's backward has returned d(embeddings); an update applied earlier
could not be undone exactly (float16 storage rounds). The price is two more matmuls per chunk than the
whole-matrix head's three; the memory saved is what the head is for. Without loss scaling nothing can skip
the step (clipping touches the backbone only), and the training step commits to the update before the
backward (:class:`~plsc.loss.partial_fc.HeadStep`'s ``update_in_backward``): walk 2 applies it, walk 3 does
not happen.

An optimizer step of several micro-batches (``train.grad_accum``) runs walks 1 and 2 per micro-batch, over
the same sampled centers, and keeps each one's statistics; walk 3 then forms each chunk's center gradient of
every micro-batch, sums them and applies the sum once.

The loss is a Python loop over chunks with host-side control; it runs eagerly in static mode too
(``traceable = False``: the trainer compiles the backbone only).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import paddle
import paddle.nn.functional as F

from plsc.loss.margin import (
    ScratchRows,
    at_columns,
    center_grad,
    column_sums,
    filtered_entries,
    inverse_row_norms,
    put_columns,
    row_sums,
    target_logit,
    zero_where,
)
from plsc.loss.row_backend import max_per_row, multiply_, squared_row_norms, subtract_
from plsc.loss.rows import decay_unsampled_rows, dense_update, lazy_update

if TYPE_CHECKING:  # the head imports this module to offer the strategy
    from plsc.loss.partial_fc import CenterUpdate, HeadStep, MicroBatch, PartialFC


@dataclass
class SoftmaxStatistics:
    """What the backward and the update need from the forward, all of size [global batch] or [batch, emb]."""

    unit_embeddings: paddle.Tensor  # [B, emb] float32, detached
    row_max: paddle.Tensor  # [B, 1] the largest logit of each row over every rank's columns
    sum_exp: paddle.Tensor  # [B] sum over every rank's columns of exp(logit - row_max)
    cos_target: paddle.Tensor  # [B] cosine of each row with its own class center (0 where not on this rank)
    # [sampled] per center, as the forward computed them: the later walks see the same rows (the weight does
    # not change before the update), so they reuse these instead of recomputing them.
    inverse_norms: paddle.Tensor
    norm_is_live: paddle.Tensor
    columns: list[tuple[paddle.Tensor, paddle.Tensor]]  # per chunk: chunk_columns' (column, inside)
    terms: RowTerms | None = None  # known in the backward


@dataclass
class RowTerms:
    """The softmax gradient's per-row parts, the same in every chunk: formed once per backward."""

    target_logits: paddle.Tensor  # [B] each row's margin logit at its target column
    factors: paddle.Tensor  # [B, 1] d loss / d logit = factors * exp(logit - row_max), off the target
    at_target: paddle.Tensor  # [B] d loss / d cosine at the target column

    @classmethod
    def of(cls, stats: SoftmaxStatistics, grad_per_row: float, margin) -> RowTerms:
        logits, slopes = target_logit(stats.cos_target, margin)
        target_logits, slope = margin.scale * logits, margin.scale * slopes
        softmax_target = paddle.exp(target_logits - stats.row_max.squeeze(1)) / stats.sum_exp
        return cls(target_logits, (grad_per_row * margin.scale / stats.sum_exp).unsqueeze(1),
                   grad_per_row * (softmax_target - 1.0) * slope)


@dataclass
class ChunkCosine:
    """One chunk's cosines, as the whole-matrix head's cosine layer computes them column by column."""

    rows: paddle.Tensor  # [c, emb] float32 centers
    cosine: paddle.Tensor  # [B, c]
    inverse_norms: paddle.Tensor  # [c]
    norm_is_live: paddle.Tensor  # [c]: 0 where F.normalize's floor replaces the norm (no gradient through it)


def chunk_cosine(unit_embeddings: paddle.Tensor, rows: paddle.Tensor, inverse_norms=None, norm_is_live=None
                 ) -> ChunkCosine:
    """The chunk's cosines; its rows' inverse norms and liveness computed here unless given."""
    if inverse_norms is None:
        inverse_norms, norm_is_live = inverse_row_norms(squared_row_norms(rows))
    cosine = multiply_(paddle.matmul(unit_embeddings, rows, transpose_y=True), inverse_norms)
    return ChunkCosine(rows, cosine, inverse_norms, norm_is_live)


def chunk_columns(remapped: paddle.Tensor, start: int, count: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Each row's target column inside the chunk ``[start, start + count)`` ([B, 1], 0 where the target is
    elsewhere) and whether it is inside ([B] bool)."""
    inside = (remapped >= start) & (remapped < start + count)
    column = paddle.where(inside, remapped - start, paddle.zeros_like(remapped)).unsqueeze(1)
    return column, inside


def put_targets(matrix: paddle.Tensor, column, inside, values: paddle.Tensor) -> paddle.Tensor:
    """``matrix[b, column[b]] = values[b]`` for the rows whose target is inside the chunk, in place; the
    other rows write their own value back (as the whole-matrix loss does)."""
    return put_columns(matrix, column, paddle.where(inside, values, at_columns(matrix, column)))


def softmax_grad_of_chunk(chunk: ChunkCosine, columns, stats: SoftmaxStatistics, margin) -> paddle.Tensor:
    """d loss / d cosine for the chunk's columns, [B, c] (``columns``: the chunk's ``chunk_columns``; the
    backward has set ``stats.terms``)."""
    column, inside = columns
    terms = stats.terms
    logits = chunk.cosine * margin.scale  # a new tensor: the plain cosines are needed for the center gradient
    filtered = None
    if margin.interclass_filtering_threshold > 0:  # the forward's mask: the same cosines, recomputed
        filtered = filtered_entries(chunk.cosine, margin)
        zero_where(logits, filtered)
    exp = subtract_(put_targets(logits, column, inside, terms.target_logits), stats.row_max).exp_()
    grad = multiply_(exp, terms.factors)
    if filtered is not None:  # a filtered logit is the constant 0: no gradient
        zero_where(grad, filtered)
    # At the target column: per_row * (softmax - 1) * the target logit's slope (as the whole-matrix loss).
    return put_targets(grad, column, inside, terms.at_target)


def center_grad_sq_norm(unit_gram: paddle.Tensor, grad: paddle.Tensor, chunk: ChunkCosine) -> paddle.Tensor:
    """Squared Frobenius norm of the chunk's center gradient ``D = G^T U - radial * rows`` without forming D.

    ``G`` = d loss / d cosine scaled by the inverse norms ([B, c]), ``U`` the unit embeddings. Row j of D is
    row j of ``G^T U`` minus its projection on the center (``radial_j * rows_j``), so
    ``|D|^2 = <U U^T, G G^T> - sum_j live_j S_j^2`` with ``S_j = sum_b G_bj cos_bj``: a [B, B] product
    instead of a [c, emb] one.
    """
    projection = (column_sums(grad * chunk.cosine) * chunk.norm_is_live).astype("float64")
    gram = paddle.matmul(grad, grad, transpose_y=True).astype("float64")
    # The two sums in float64: their difference cancels where centers align with their samples.
    return (gram * unit_gram).sum() - (projection * projection).sum()


class _StreamingMarginLoss(paddle.autograd.PyLayer):
    """Margin softmax cross entropy of the global batch over the head's sampled centers, walked by chunk."""

    @staticmethod
    def forward(ctx, unit_embeddings, strategy: Streaming, head: PartialFC, micro: MicroBatch):
        remapped = micro.remapped
        stats = strategy.forward_statistics(head, unit_embeddings.detach(), micro.step.index, remapped)
        micro.step.stats.append(stats)
        margin, comm = head.margin, head.comm
        has_target = (remapped >= 0).astype("float32")
        target = margin.scale * target_logit(stats.cos_target, margin)[0]
        target_shifted = comm.all_reduce_sum_((target - stats.row_max.squeeze(1)) * has_target)
        ctx.strategy, ctx.head, ctx.pending, ctx.stats = strategy, head, micro.step, stats
        return (paddle.log(stats.sum_exp) - target_shifted).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        return ctx.strategy.backward_walk(ctx.head, ctx.pending, ctx.stats, grad_loss)


class Streaming:
    """The strategy that holds at most ``chunk_size`` sampled centers' buffers at a time (module doc)."""

    traceable = False  # a loop with host-side control: the loss stays eager in static mode

    def __init__(self, chunk_size: int):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        # [chunk, emb] buffers kept across chunks and steps: a chunk's gathered centers (where their store
        # gathers into a given tensor) and its center gradient. A fresh buffer per chunk costs its
        # page faults and first touch: the gathers took 2-3x longer.
        self._chunk_buffers: defaultdict[tuple[str, int], ScratchRows] = defaultdict(ScratchRows)

    def chunks(self, index: paddle.Tensor):
        """``(start, index of the chunk's centers)`` over the sampled centers ``index``."""
        for start in range(0, index.shape[0], self.chunk_size):
            yield start, index[start : start + self.chunk_size]

    def chunk_gradients(self, head: PartialFC, index: paddle.Tensor, stats: SoftmaxStatistics):
        """``(index, ChunkCosine, G)`` per chunk of the sampled centers ``index`` after a micro-batch's
        forward (``stats``): rows gathered again, and :meth:`chunk_gradient`."""
        for (start, chunk_index), columns in zip(self.chunks(index), stats.columns, strict=True):
            rows = self.gather_chunk(head, chunk_index)
            yield chunk_index, *self.chunk_gradient(head, rows, start, columns, stats)

    @staticmethod
    def chunk_gradient(head: PartialFC, rows: paddle.Tensor, start: int, columns, stats: SoftmaxStatistics
                       ) -> tuple[ChunkCosine, paddle.Tensor]:
        """The chunk's cosines with a micro-batch, recomputed with the forward's norms (``rows``: the chunk's
        centers, from sampled center ``start`` on), and ``G`` = d loss / d cosine times the centers' inverse
        norms, [B, c]."""
        stop = start + rows.shape[0]
        chunk = chunk_cosine(stats.unit_embeddings, rows, stats.inverse_norms[start:stop],
                             stats.norm_is_live[start:stop])
        grad = softmax_grad_of_chunk(chunk, columns, stats, head.margin)
        return chunk, multiply_(grad, chunk.inverse_norms)

    def gather_chunk(self, head: PartialFC, index: paddle.Tensor) -> paddle.Tensor:
        """A chunk's class centers as float32, in a kept buffer where possible (valid until the next chunk's
        gather)."""
        store = head.weight_rows
        if not store.gathers_into:
            return store.gather(index)
        buffer = self._chunk_buffers["weight", index.shape[0]]
        return store.gather(index, buffer.shaped([index.shape[0], head.embedding_size], paddle.float32))

    def release_scratch(self) -> None:
        self._chunk_buffers.clear()

    def prepare(self, head: PartialFC, pending: HeadStep) -> None:
        """Nothing: each walk gathers its own chunks."""

    def loss(self, head: PartialFC, all_embeddings: paddle.Tensor, micro: MicroBatch) -> paddle.Tensor:
        return _StreamingMarginLoss.apply(F.normalize(all_embeddings, axis=1), self, head, micro)

    @paddle.no_grad()
    def forward_statistics(self, head: PartialFC, unit_embeddings: paddle.Tensor, index: paddle.Tensor,
                           remapped: paddle.Tensor) -> SoftmaxStatistics:
        """Walk 1: the softmax's row max and sum of exponentials over every rank, and the target cosines, of a
        micro-batch (labels ``remapped``) over the sampled centers ``index``."""
        batch = unit_embeddings.shape[0]
        row_max = paddle.full([batch, 1], -np.inf, dtype="float32")
        sum_exp = paddle.zeros([batch], dtype="float32")
        cos_target = paddle.zeros([batch], dtype="float32")
        inverse_norms, norm_is_live, columns = [], [], []
        scale = head.margin.scale
        for start, chunk_index in self.chunks(index):
            chunk = chunk_cosine(unit_embeddings, self.gather_chunk(head, chunk_index))
            inverse_norms.append(chunk.inverse_norms)
            norm_is_live.append(chunk.norm_is_live)
            column, inside = chunk_columns(remapped, start, chunk_index.shape[0])
            columns.append((column, inside))
            cos_at_column = at_columns(chunk.cosine, column)
            cos_target = paddle.where(inside, cos_at_column, cos_target)
            if head.margin.interclass_filtering_threshold > 0:  # 0 stays 0 when scaled into a logit below
                zero_where(chunk.cosine, filtered_entries(chunk.cosine, head.margin))
            logits = put_targets(chunk.cosine.scale_(scale), column, inside,
                                 scale * target_logit(cos_at_column, head.margin)[0])
            new_max = paddle.maximum(row_max, max_per_row(logits))
            sum_exp = sum_exp * paddle.exp(row_max - new_max).squeeze(1) + \
                row_sums(subtract_(logits, new_max).exp_())
            row_max = new_max
        global_max = head.comm.all_reduce_max(row_max)
        sum_exp = head.comm.all_reduce_sum_(sum_exp * paddle.exp(row_max - global_max).squeeze(1))
        return SoftmaxStatistics(unit_embeddings, global_max, sum_exp, cos_target,
                                 paddle.concat(inverse_norms), paddle.concat(norm_is_live), columns)

    @paddle.no_grad()
    def backward_walk(self, head: PartialFC, pending: HeadStep, stats: SoftmaxStatistics,
                      grad_loss: paddle.Tensor) -> paddle.Tensor:
        """Walk 2 of a micro-batch (its forward's ``stats``): d(unit embeddings), and the squared norm of its
        centers' gradient, added to the step's (for the inf/nan check); or, with the step's
        ``update_in_backward``, d(unit embeddings) and each chunk's update applied at once (one walk, two
        matmuls per chunk fewer than :meth:`apply`'s own walk)."""
        unit = stats.unit_embeddings
        stats.terms = RowTerms.of(stats, float(grad_loss) / unit.shape[0], head.margin)
        grad_embeddings = paddle.zeros_like(unit)
        update = pending.update_in_backward
        if update is not None:
            for index, chunk, grad in self.chunk_gradients(head, pending.index, stats):
                grad_embeddings.addmm_(grad, chunk.rows)  # before the update overwrites the rows
                self.update_chunk(head, index, chunk.rows, self.center_grad_of(chunk, grad, stats), update)
            finish_update(head, pending.index, update)
            pending.applied_in_backward = True
            return grad_embeddings
        unit64 = unit.astype("float64")
        unit_gram = paddle.matmul(unit64, unit64, transpose_y=True)
        sq_norm = paddle.zeros([], dtype="float64")
        for _, chunk, grad in self.chunk_gradients(head, pending.index, stats):
            grad_embeddings.addmm_(grad, chunk.rows)
            sq_norm += center_grad_sq_norm(unit_gram, grad, chunk)
        # Summed over the micro-batches: finite exactly when each one's is.
        sq_norm = sq_norm.astype("float32").reshape([1])
        pending.grad_sq_norm = sq_norm if pending.grad_sq_norm is None else pending.grad_sq_norm + sq_norm
        return grad_embeddings

    def center_grads(self, head: PartialFC, pending: HeadStep) -> list[paddle.Tensor]:
        """The squared norm of the centers' gradient (summed over the micro-batches): finite exactly when
        every gradient element is (an overflow of the squares aside), so an inf/nan check reads it. Nothing
        when the step committed to the update before the backward (``update_in_backward``: the backward
        applies it, no check can undo it)."""
        if pending.update_in_backward is not None:
            return []
        if pending.grad_sq_norm is None:
            raise RuntimeError("Streaming: no gradient before a backward pass")
        backward_passes = sum(stats.terms is not None for stats in pending.stats)
        if backward_passes != pending.micro_batches:
            raise RuntimeError(f"Streaming: the backward pass of {backward_passes} of the step's "
                               f"{pending.micro_batches} micro-batches has run")
        return [pending.grad_sq_norm]

    @paddle.no_grad()
    def apply(self, head: PartialFC, pending: HeadStep, update: CenterUpdate) -> None:
        """Walk 3: each chunk's center gradient, formed again from every micro-batch's statistics, summed and
        applied at once (times ``update.grad_scale``); nothing when the step committed to the update before
        the backward, whose walk applied it."""
        if pending.update_in_backward is not None:
            if not pending.applied_in_backward:
                raise RuntimeError("Streaming: the committed update was not applied by a backward")
            return
        self.center_grads(head, pending)  # every backward has run
        for number, (start, index) in enumerate(self.chunks(pending.index)):
            rows = self.gather_chunk(head, index)
            grad_rows = None
            for stats in pending.stats:
                chunk, grad = self.chunk_gradient(head, rows, start, stats.columns[number], stats)
                if grad_rows is None:
                    grad_rows = self.center_grad_of(chunk, grad, stats)
                else:  # a second buffer: the first holds the sum
                    grad_rows.add_(self.center_grad_of(chunk, grad, stats, "center_grad_part"))
            self.update_chunk(head, index, rows, grad_rows, update)
        finish_update(head, pending.index, update)

    def center_grad_of(self, chunk: ChunkCosine, grad: paddle.Tensor, stats: SoftmaxStatistics,
                       buffer: str = "center_grad") -> paddle.Tensor:
        """The chunk's center gradient of one micro-batch, [c, emb], in the kept ``buffer`` (overwrites
        ``chunk.cosine``)."""
        scratch = self._chunk_buffers[buffer, chunk.rows.shape[0]]
        return center_grad(stats.unit_embeddings, grad, chunk.rows, chunk.cosine, chunk.inverse_norms,
                           chunk.norm_is_live, scratch)

    def update_chunk(self, head: PartialFC, index, rows: paddle.Tensor, grad_rows: paddle.Tensor,
                     update: CenterUpdate) -> None:
        """The chunk's center gradient ``grad_rows``, stepped into its ``rows`` (as gathered) and velocities
        (lazy sparse momentum)."""
        lazy_update(head.weight_rows, head.velocity_rows, index, grad_rows, update.lr, update.momentum,
                    update.weight_decay, update.grad_scale, rows=rows, block_rows=index.shape[0])


def finish_update(head: PartialFC, index: paddle.Tensor, update: CenterUpdate) -> None:
    """After every chunk's sampled rows stepped: the dense mode's zero-gradient step of all the others."""
    if head.update is dense_update:
        decay_unsampled_rows(head.weight_rows, head.velocity_rows, index, update.lr, update.momentum,
                             update.weight_decay)

"""PartialFC: a margin-softmax classifier whose class centers are sharded across ranks and sampled per step.

Each rank owns a contiguous shard of class centers ([num_local, emb]) and sees the embeddings and labels of
the whole global batch. Per step it keeps every positive class of the batch that it owns plus uniformly random
negatives (without replacement) up to ``floor(ratio * num_local)`` (:mod:`plsc.loss.sampling`), and computes
its columns of the margin softmax; the softmax itself spans all ranks (see :mod:`plsc.loss.margin`). With
ratio 1.0 every center is used and the result is exactly the full classifier.

One head, :class:`PartialFC`: it owns the state (the shard, the centers, their velocity, the sampling, what
checkpoints read and write) and runs a step in explicit phases on a :class:`HeadStep` the caller holds. How
the sampled centers' loss and update are computed is its strategy, chosen once when the head is built
(:func:`build_head`): :class:`WholeMatrix` gathers every sampled center into one float32 tensor;
:class:`plsc.loss.streaming.Streaming` walks them a chunk at a time (``loss.chunk_size``). Both give the same
numbers.

The class centers are not a Paddle parameter managed by an optimizer: the step's gradient exists only for the
sampled rows, and the sparse momentum of :mod:`plsc.loss.rows` applies it, so nothing per step is
O(num_classes).

Gradient accumulation (``train.grad_accum``): one optimizer step may take several micro-batches. The head
samples once, from the labels of all of them (:meth:`PartialFC.prepare`), each micro-batch's loss reads those
centers with its own labels (:meth:`HeadStep.micro_batch`), the center gradients of the micro-batches'
backward passes add up, and :meth:`PartialFC.apply` steps the centers once: the step of one batch holding
them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import paddle

from plsc.distributed import LocalComm, shard_classes
from plsc.loss.int8_rows import Dequantized
from plsc.loss.margin import Margin, ScratchRows, cosine_to_centers, margin_softmax_cross_entropy
from plsc.loss.row_backend import (
    STATE_BLOCK_ROWS,
    copy_rows_into,
    host_blocks,
    source_blocks,
    squared_row_norms,
)
from plsc.loss.rows import UPDATES, new_rows, row_store
from plsc.loss.sampling import num_sampled, sample_centers
from plsc.loss.streaming import Streaming

# Initial centers: N(0, std^2), generated per block of classes so that a class's row depends only on
# (seed, class id), never on how classes are sharded, and no float64 copy of the matrix ever exists.
INIT_STD = 0.01  # arcface_torch's (partial_fc_v2.py:71)
INIT_BLOCK = 4096


def center_init_std(init_ranks: int, num_classes: int, embedding_size: int) -> float:
    """The initial centers' standard deviation (``loss.center_init_ranks``): INIT_STD for 0; else PLSC v2.2's
    ``sqrt(2 / (embedding + num_local))`` with ``num_local = ceil(C / ranks)`` the classes of one of its
    ``init_ranks`` ranks (dynamic/classifiers/lsc.py:53,66; static/classifiers/lsc.py:53,72). A count of ranks
    named in the config, not this run's: every sharding starts from the same matrix."""
    if init_ranks <= 0:
        return INIT_STD
    return math.sqrt(2.0 / (embedding_size + -(-num_classes // init_ranks)))


def init_class_centers(seed: int, start: int, count: int, embedding_size: int, std: float = INIT_STD
                       ) -> np.ndarray:
    """Rows ``[start, start + count)`` of the global initial class-center matrix, float32."""
    out = np.empty((count, embedding_size), dtype=np.float32)
    for offset, rows in center_blocks(seed, start, count, embedding_size, std):
        out[offset : offset + len(rows)] = rows
    return out


def center_blocks(seed: int, start: int, count: int, embedding_size: int, std: float = INIT_STD):
    """The rows of :func:`init_class_centers` as ``(offset, rows)`` pieces of at most INIT_BLOCK rows, so that
    a caller can fill its own storage without ever holding a second copy of the matrix."""
    stop = start + count
    for block in range(start // INIT_BLOCK, -(-stop // INIT_BLOCK) if count else 0):
        block_start = block * INIT_BLOCK
        rows = np.random.default_rng([seed, 0xC1A55, block]).standard_normal(
            (INIT_BLOCK, embedding_size), dtype=np.float32
        )
        lo, hi = max(start, block_start), min(stop, block_start + INIT_BLOCK)
        rows = rows[lo - block_start : hi - block_start]
        rows *= np.float32(std)
        yield lo - start, rows


def init_class_center_tensor(seed: int, start: int, count: int, embedding_size: int, dtype: str,
                             std: float = INIT_STD):
    """:func:`init_class_centers` as a Paddle tensor of ``dtype``, written block by block into its storage:
    peak memory is the tensor itself, not a float32 numpy copy plus a Paddle copy plus a cast."""
    centers = paddle.empty([count, embedding_size], dtype=dtype)
    for offset, rows in center_blocks(seed, start, count, embedding_size, std):
        block = paddle.to_tensor(rows)
        if centers.dtype == paddle.float32:
            # scatter_ writes 10x faster than slice assignment (set_value), but has no float16 kernel.
            paddle.scatter_(centers, paddle.arange(offset, offset + len(rows)), block, overwrite=True)
        else:
            centers[offset : offset + len(rows)] = block.astype(dtype)
    return centers


@dataclass(frozen=True)
class CenterUpdate:
    """One step's update of the sampled centers: the sparse momentum's settings (:mod:`plsc.loss.rows`) and
    the factor its gradient is taken with (1/loss_scale, 1/optim.grad_divisor)."""

    lr: float
    momentum: float
    weight_decay: float
    grad_scale: float = 1.0


@dataclass
class HeadStep:
    """One optimizer step of the head between its phases, held by the caller: the head keeps nothing of a
    step. :meth:`PartialFC.prepare` makes it, the losses of its micro-batches (:meth:`micro_batch`,
    :meth:`PartialFC.loss`) and their backward passes fill it, and :meth:`PartialFC.apply` updates the
    centers from it once; a skipped step is dropped with it."""

    index: paddle.Tensor  # the sampled centers, as rows of this rank's shard
    # Each label of the step as a column of the sampled centers, -1 where another rank's: micro-batch by
    # micro-batch, each one's global batch in rank order (as the all_gather of its embeddings).
    remapped: paddle.Tensor
    # The update the caller commits to before the backward, when nothing can skip the step (the training
    # step's one decision): the streaming strategy then applies it inside its backward walk and has no
    # gradient left to check or apply; the whole-matrix one applies it in apply() as always. Only for a step
    # of one micro-batch: with more, the update waits for the last one's gradient.
    update_in_backward: CenterUpdate | None = None
    micro_batches: int = 1
    rows: paddle.Tensor | None = None  # WholeMatrix: the sampled rows, a leaf collecting their grad
    squared_norms: paddle.Tensor | None = None  # WholeMatrix: their squared norms, without gradient
    # Streaming: each micro-batch's softmax statistics, in the order their forwards ran.
    stats: list[Any] = field(default_factory=list)
    grad_sq_norm: paddle.Tensor | None = None  # Streaming: summed by the backward passes that left the update
    # Records, checked by apply(), never consulted to choose a path: the backward applied
    # ``update_in_backward``; apply() ran.
    applied_in_backward: bool = False
    applied: bool = False

    def micro_batch(self, number: int | None = None) -> MicroBatch:
        """Micro-batch ``number`` (0-based) of the step: the step's centers, its own labels' columns. None:
        the step's only micro-batch (a step of one is its own micro-batch)."""
        if number is None:
            if self.micro_batches != 1:
                raise ValueError(f"a step of {self.micro_batches} micro-batches takes its losses one "
                                 "micro-batch at a time (HeadStep.micro_batch)")
            number = 0
        if not 0 <= number < self.micro_batches:
            raise ValueError(f"micro-batch {number} of a step of {self.micro_batches}")
        rows = self.remapped.shape[0] // self.micro_batches
        return MicroBatch(self, number, self.remapped[number * rows : (number + 1) * rows])


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch's loss reads: the :class:`HeadStep` it belongs to (its sampled centers, where its
    backward leaves the gradient) and the columns of its own global batch's labels."""

    step: HeadStep
    number: int
    remapped: paddle.Tensor

    def micro_batch(self) -> MicroBatch:
        """Itself: a loss takes a micro-batch or a step of one alike (:meth:`HeadStep.micro_batch`)."""
        return self


class HeadStrategy(Protocol):
    """How the head computes a step's loss, gradient and update over its sampled centers; every method is
    given the head (its state) and the step's :class:`HeadStep`, and keeps nothing of the step itself."""

    traceable: bool  # the loss is tensors only: static mode may compile it (``rows_loss``)

    def prepare(self, head: PartialFC, pending: HeadStep) -> None:
        """After sampling: gather what the loss reads into ``pending``."""

    def loss(self, head: PartialFC, all_embeddings: paddle.Tensor, micro: MicroBatch) -> paddle.Tensor:
        """The micro-batch's global mean margin-softmax loss; its backward adds to ``micro.step``'s gradient
        (and applies ``update_in_backward`` where the strategy can)."""

    def center_grads(self, head: PartialFC, pending: HeadStep) -> list[paddle.Tensor]:
        """After the backward passes: what an inf/nan check reads for the centers."""

    def apply(self, head: PartialFC, pending: HeadStep, update: CenterUpdate) -> None:
        """After the backward passes: the centers' update from their summed gradient, unless the backward
        applied it."""

    def release_scratch(self) -> None:
        """Free the buffers kept from step to step."""


class WholeMatrix:
    """The strategy that gathers every sampled center into one float32 [sampled, emb] tensor, a leaf that
    collects its gradient: cosines and margin softmax over it (:mod:`plsc.loss.margin`), then the update from
    that gradient. Its loss is tensors only, so static mode may compile it (:meth:`rows_loss`)."""

    traceable = True

    def __init__(self):
        self.center_grad_scratch = ScratchRows()
        # The sampled rows, gathered into the same memory every step where Paddle can (gathers_into):
        # a fresh [k, emb] tensor is fresh pages, and the forward over them took 0.44 s instead of 0.36 on
        # some days at k = 100,000 (the whole forward phase measured; 0.36 in every run with the kept buffer).
        self.gathered_rows_scratch = ScratchRows()

    def prepare(self, head: PartialFC, pending: HeadStep) -> None:
        """Gather the sampled centers into ``pending.rows``, a new leaf on the rows' memory each step: its
        gradient starts empty, as a fresh gather's does (Paddle adds each backward's gradient to what a leaf
        already holds). Their squared norms are taken here, eagerly, so that a compiled loss reads the same
        numbers as an eager one."""
        out = None
        if head.weight_rows.gathers_into:
            out = self.gathered_rows_scratch.shaped([pending.index.shape[0], head.embedding_size],
                                                    paddle.float32)
        pending.rows = head.weight_rows.gather(pending.index, out).detach()
        pending.squared_norms = squared_row_norms(pending.rows)
        pending.rows.stop_gradient = False

    def loss(self, head: PartialFC, all_embeddings: paddle.Tensor, micro: MicroBatch) -> paddle.Tensor:
        step = micro.step
        return self.rows_loss(head, all_embeddings, step.rows, step.squared_norms, micro.remapped,
                              micro.number == 0)

    def rows_loss(self, head: PartialFC, all_embeddings: paddle.Tensor, rows: paddle.Tensor,
                  squared_norms: paddle.Tensor, remapped: paddle.Tensor, first_micro_batch: bool = True
                  ) -> paddle.Tensor:
        # The first micro-batch's center gradient may become the leaf's .grad in the kept scratch
        # (ScratchRows); the later ones' backward passes add theirs into that .grad, so they must not write
        # into the scratch.
        scratch = self.center_grad_scratch if first_micro_batch else None
        cosine = cosine_to_centers(all_embeddings, rows, scratch, squared_norms)
        return head.margin_loss(cosine, remapped, head.margin, head.comm)

    def center_grads(self, head: PartialFC, pending: HeadStep) -> list[paddle.Tensor]:
        if pending.rows.grad is None:
            raise RuntimeError("PartialFC: no center gradient before a backward pass")
        return [pending.rows.grad]

    def apply(self, head: PartialFC, pending: HeadStep, update: CenterUpdate) -> None:
        (grad,) = self.center_grads(head, pending)
        # The gathered rows are reused (and overwritten): the weight has not changed since they were gathered.
        head.update(head.weight_rows, head.velocity_rows, pending.index, grad, update.lr, update.momentum,
                    update.weight_decay, grad_scale=update.grad_scale, rows=pending.rows)

    def release_scratch(self) -> None:
        self.center_grad_scratch.release()
        self.gathered_rows_scratch.release()


class PartialFC:
    """The sharded, sampled classifier of one rank, with its class centers and their momentum.

    A step in phases, each given the :class:`HeadStep` the first returned: :meth:`prepare`, :meth:`loss`
    (then the caller's backward), :meth:`center_grads` (what an inf/nan check reads), :meth:`apply`. The
    strategy (``strategy``: :class:`WholeMatrix` by default) computes the loss, the gradient and the update;
    the head samples, checks the phases' order and owns the state."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        sample_ratio: float = 1.0,
        momentum_mode: str = "lazy",
        center_dtype: str = "float32",
        velocity_dtype: str = "same",
        seed: int = 0,
        comm=None,
        margin_loss=margin_softmax_cross_entropy,
        device_sampler=None,
        init_std: float = INIT_STD,
        strategy: HeadStrategy | None = None,
    ):
        """``margin_loss(cosine, remapped, margin, comm)`` and ``device_sampler(all_labels, num_local, wanted)
        -> (index, remapped)``: a fused kernel and an on-device sampler in place of the portable code, each
        once it passed its start-up parity check (:func:`plsc.loss.fast_paths.select_fast_paths`).
        ``velocity_dtype``: ``same`` (as the centers), ``float32``, ``float16`` or ``int8``
        (:mod:`plsc.loss.int8_rows`). ``init_std``: of the initial centers (:func:`center_init_std`)."""
        self.comm = comm or LocalComm()
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = margin
        self.sample_ratio = sample_ratio
        self.seed = seed
        self.update = UPDATES[momentum_mode]
        self.shard = shard_classes(num_classes, self.comm.rank, self.comm.world_size)
        shard = self.shard
        self.weight = init_class_center_tensor(seed, shard.start, shard.count, embedding_size, center_dtype,
                                               init_std)
        self.velocity = new_rows(shard.count, embedding_size, center_dtype if velocity_dtype == "same"
                                     else velocity_dtype)
        # The same matrices as row stores, made once: read as float32, written back in the storage dtype.
        self.weight_rows, self.velocity_rows = row_store(self.weight), row_store(self.velocity)
        self.margin_loss = margin_loss
        self.device_sampler = device_sampler
        self.strategy = WholeMatrix() if strategy is None else strategy

    @property
    def traceable(self) -> bool:
        """Whether the loss compiles under paddle.jit.to_static (static mode): :meth:`rows_loss`."""
        return self.strategy.traceable

    def sample(self, labels: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(index, remapped)`` for the global batch's ``labels`` at ``step``
        (:func:`plsc.loss.sampling.sample_centers` on this rank's shard)."""
        return sample_centers(labels - self.shard.start, self.shard.count, self.sample_ratio, self.seed, step,
                              self.comm.rank)

    def __call__(self, embeddings: paddle.Tensor, labels: paddle.Tensor, step: int,
                 update_in_backward: CenterUpdate | None = None) -> tuple[paddle.Tensor, HeadStep]:
        """Loss of this rank's local batch (identical on every rank: it is the global batch's mean) and the
        step it belongs to."""
        pending = self.prepare(labels, step, update_in_backward)
        return self.loss(self.comm.all_gather_with_grad(embeddings), pending), pending

    def prepare(self, labels: paddle.Tensor, step: int, update_in_backward: CenterUpdate | None = None,
                micro_batches: int = 1) -> HeadStep:
        """The eager half of an optimizer step: gather the global batch's labels, sample this rank's centers
        once from all of them, and let the strategy gather what its losses read. ``labels``: this rank's,
        ``micro_batches`` equal micro-batches one after the other. ``update_in_backward``: see
        :class:`HeadStep`."""
        if labels.shape[0] % micro_batches:
            raise ValueError(f"{labels.shape[0]} labels do not split into {micro_batches} micro-batches")
        if update_in_backward is not None and micro_batches != 1:
            raise ValueError(f"an update inside the backward needs a step of one micro-batch, not "
                             f"{micro_batches}")
        all_labels = self.comm.all_gather(labels.reshape([-1]))
        if micro_batches > 1:  # [ranks, micro, batch] -> [micro, ranks, batch]: micro-batch by micro-batch
            all_labels = all_labels.reshape([self.comm.world_size, micro_batches, -1]).transpose([1, 0, 2])
            all_labels = all_labels.reshape([-1])
        # This rank's centers, sampled on a host copy of the labels, or by the constructor's
        # ``device_sampler`` (no copy to the host).
        count = self.shard.count
        if self.device_sampler is not None:
            index, remapped = self.device_sampler(all_labels, count, num_sampled(count, self.sample_ratio))
        else:
            index, remapped = self.sample(all_labels.numpy(), step)
            index, remapped = paddle.to_tensor(index), paddle.to_tensor(remapped)
        pending = HeadStep(index, remapped, update_in_backward, micro_batches)
        self.strategy.prepare(self, pending)
        return pending

    def loss(self, all_embeddings: paddle.Tensor, pending: HeadStep | MicroBatch) -> paddle.Tensor:
        """Margin softmax of a micro-batch's global batch over the step's sampled centers (``pending``: the
        micro-batch, or a step of one)."""
        return self.strategy.loss(self, all_embeddings, pending.micro_batch())

    def rows_loss(self, all_embeddings: paddle.Tensor, rows: paddle.Tensor, squared_norms: paddle.Tensor,
                  remapped: paddle.Tensor):
        """The tensor-only core of :meth:`loss` of a :attr:`traceable` strategy, on gathered ``rows`` and
        their ``squared_norms``: holds no Python state changes, so static mode can compile it
        (``paddle.jit.to_static``)."""
        return self.strategy.rows_loss(self, all_embeddings, rows, squared_norms, remapped)

    def center_grads(self, pending: HeadStep) -> list[paddle.Tensor]:
        """What an inf/nan check of the step reads for the class centers, once the backward passes have run:
        their gradient, or a number finite exactly when it is; nothing when the backward applied the
        update."""
        return self.strategy.center_grads(self, pending)

    def apply(self, pending: HeadStep, update: CenterUpdate) -> None:
        """Step the sampled centers with their gradient, summed over the micro-batches (times
        ``update.grad_scale``), once; nothing more when the backward applied the committed update."""
        committed = pending.update_in_backward
        if committed not in (None, update):
            raise RuntimeError(f"the head's update {update} differs from the one committed to before the "
                               f"backward, {committed}")
        if pending.applied:
            raise RuntimeError("PartialFC: the step's update was applied already")
        self.strategy.apply(self, pending, update)
        pending.applied = True

    def release_scratch(self) -> None:
        """Free the strategy's kept buffers (before a checkpoint's host copies, which need the memory
        more)."""
        self.strategy.release_scratch()

    def state_tensors(self) -> list[paddle.Tensor]:
        """Every tensor of the head's state (weight, velocity and, for int8 velocity, its scales)."""
        return [self.weight, *self.velocity_rows.tensors()]

    def float_tensors(self) -> list[paddle.Tensor]:
        """The state tensors that hold floating-point numbers (what an inf/nan check reads): int8 velocity's
        codes are integers, kept in a float16 container whose bits are no float16 numbers."""
        return [self.weight, *self.velocity_rows.float_tensors()]

    @property
    def storage_dtype(self) -> str:
        """The centers' numpy dtype name: ``float32`` or ``float16``."""
        return str(self.weight.dtype).split(".")[-1]

    @property
    def velocity_dtype(self) -> str:
        """The velocity's storage: ``float32``, ``float16`` or ``int8`` (codes and per-row scales)."""
        return self.velocity_rows.dtype

    def state_kinds(self) -> dict[str, tuple[int, str]]:
        """``{kind: (columns, numpy dtype)}`` of the matrices :meth:`row_blocks` yields, as checkpoints store
        them: ``weight`` and ``velocity``, and ``velocity_scale`` [rows, 1] for int8 velocity."""
        kinds = {"weight": (self.embedding_size, self.storage_dtype),
                 "velocity": (self.embedding_size, self.velocity_dtype)}
        if self.velocity_dtype == "int8":
            kinds["velocity_scale"] = (1, "float32")
        return kinds

    def row_blocks(self, kind: str, block_rows: int = STATE_BLOCK_ROWS):
        """The rows of one of :meth:`state_kinds` as numpy blocks: views of the tensor's own memory on the
        CPU, one block's host copy at a time from another device. Valid until the next update."""
        if self.velocity_dtype == "int8" and kind != "weight":
            return self.velocity.code_blocks(block_rows) if kind == "velocity" else \
                self.velocity.scale_blocks(block_rows)
        return host_blocks(getattr(self, kind), block_rows)

    def set_state(self, weight, velocity=None, velocity_scale=None) -> None:
        """Overwrite the centers and velocities in place: arrays, or objects with ``blocks()`` yielding
        ``(first row, rows)`` (:class:`plsc.checkpoint.shards.RowPieces`), copied a block at a time and cast
        to the storage dtype (numpy's rounding). ``velocity`` None: the velocity stays as it is.
        ``velocity_scale`` given: ``velocity`` holds int8 codes (:mod:`plsc.loss.int8_rows`), copied exactly
        into int8 velocity and dequantised into float velocity; float velocity into int8 is quantised."""
        expected = (self.shard.count, self.embedding_size)
        for given in (weight, velocity):
            if given is not None and tuple(given.shape) != expected:
                raise ValueError(f"class-center shard has shape {tuple(given.shape)}, expected {expected}")
        copy_rows_into(self.weight, weight)
        if velocity is None:
            return
        saved_int8 = velocity_scale is not None
        if self.velocity_dtype == "int8" and saved_int8:
            self.velocity.set_codes(velocity, velocity_scale)
            return
        source = Dequantized(velocity, velocity_scale) if saved_int8 else velocity
        if self.velocity_dtype == "int8":
            for start, rows in source_blocks(source):
                self.velocity.write_block_(start, paddle.to_tensor(np.asarray(rows, dtype=np.float32)))
        else:
            copy_rows_into(self.velocity, source)


def build_head(chunk_size: int = 0, **kwargs) -> PartialFC:
    """The head with its strategy: :class:`WholeMatrix` when ``chunk_size`` is 0, else
    :class:`~plsc.loss.streaming.Streaming` with chunks of ``chunk_size`` sampled centers
    (``loss.chunk_size``)."""
    return PartialFC(**kwargs, strategy=Streaming(chunk_size) if chunk_size else WholeMatrix())

"""PartialFC: a margin-softmax classifier whose class centers are sharded across ranks and sampled per step.

Each rank owns a contiguous shard of class centers ([num_local, emb]) and sees the embeddings and labels of
the whole global batch. Per step it keeps every positive class of the batch that it owns plus uniformly random
negatives (without replacement) up to ``ceil(ratio * num_local)``, gathers those rows, and computes its
columns of the margin softmax; the softmax itself spans all ranks (see :mod:`plsc.loss.margin`). With ratio
1.0 every center is used and the result is exactly the full classifier.

The class centers are not a Paddle parameter managed by an optimizer: the step's gradient exists only for the
gathered rows, and :mod:`plsc.loss.sparse_momentum` applies it, so nothing per step is O(num_classes).
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from plsc.distributed import LocalComm, shard_classes
from plsc.loss.margin import Margin, in_place_allowed, margin_softmax_cross_entropy
from plsc.loss.sparse_momentum import UPDATES, gather_rows, gathers_into, host_view, is_cpu_and_contiguous

# Initial centers: N(0, INIT_STD^2), generated per block of classes so that a class's row depends only on
# (seed, class id), never on how classes are sharded, and no float64 copy of the matrix ever exists.
INIT_STD = 0.01
INIT_BLOCK = 4096
# Rows per block when a shard is copied to or from the host (checkpoints): a few MB whatever the shard.
STATE_BLOCK_ROWS = 4096
# F.normalize's default epsilon: norms below it are replaced by it.
NORMALIZE_EPS = 1e-12


def init_class_centers(seed: int, start: int, count: int, embedding_size: int) -> np.ndarray:
    """Rows ``[start, start + count)`` of the global initial class-center matrix, float32."""
    out = np.empty((count, embedding_size), dtype=np.float32)
    for offset, rows in center_blocks(seed, start, count, embedding_size):
        out[offset : offset + len(rows)] = rows
    return out


def center_blocks(seed: int, start: int, count: int, embedding_size: int):
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
        rows *= np.float32(INIT_STD)
        yield lo - start, rows


def init_class_center_tensor(seed: int, start: int, count: int, embedding_size: int, dtype: str):
    """:func:`init_class_centers` as a Paddle tensor of ``dtype``, written block by block into its storage:
    peak memory is the tensor itself, not a float32 numpy copy plus a Paddle copy plus a cast."""
    centers = paddle.empty([count, embedding_size], dtype=dtype)
    for offset, rows in center_blocks(seed, start, count, embedding_size):
        block = paddle.to_tensor(rows)
        if centers.dtype == paddle.float32:
            # scatter_ writes 10x faster than slice assignment (set_value), but has no float16 kernel.
            paddle.scatter_(centers, paddle.arange(offset, offset + len(rows)), block, overwrite=True)
        else:
            centers[offset : offset + len(rows)] = block.astype(dtype)
    return centers


def num_sampled(num_local: int, ratio: float) -> int:
    return min(num_local, math.ceil(ratio * num_local))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of integers by sort and compare: numpy 2's hash-based unique is ~5x slower here."""
    values = np.sort(values)
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def distinct_uniform(rng: np.random.Generator, population: int, count: int) -> np.ndarray:
    """``count`` distinct integers drawn uniformly from ``[0, population)``, sorted, in O(count log count).

    numpy's ``Generator.choice(replace=False)`` allocates and shuffles ``arange(population)`` whenever
    ``count > population / 50``: O(num_classes) per step. Here: i.i.d. draws until at least ``count``
    distinct values exist, then a uniformly chosen few of them dropped to leave ``count``. Why this is
    uniform over all ``count``-subsets: how many values are drawn depends only on how many distinct ones came
    up, so the distinct set's law is unchanged by any relabelling of the population; dropping a uniform
    subset of it keeps that symmetry, and a symmetric law on ``count``-subsets is the uniform one.
    When ``count`` is a large share of the population, repeats pile up and a permutation is cheaper.
    """
    if 2 * count > population:
        return np.sort(rng.permutation(population)[:count])
    # Draws that give ``count`` distinct values on average, -N log(1 - count/N), plus a few standard
    # deviations, so that one round nearly always suffices and few values are dropped.
    expected = -population * math.log1p(-count / population)
    values = sorted_unique(rng.integers(0, population, size=int(expected + 4 * math.sqrt(count) + 16)))
    while len(values) < count:
        more = rng.integers(0, population, size=2 * (count - len(values)) + 16)
        values = sorted_unique(np.concatenate([values, more]))
    # The drop is O(len(values)) = O(count) at worst (numpy may permute them), never O(population).
    return np.delete(values, rng.choice(len(values), size=len(values) - count, replace=False))


def sample_centers(
    local_labels: np.ndarray, num_local: int, ratio: float, seed: int, step: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Choose this step's class centers on one rank.

    ``local_labels``: [batch] label minus the shard start, any value outside ``[0, num_local)`` meaning "not
    mine". Returns ``(index, remapped)``: the sorted local row ids to use, and each sample's column in that
    index (-1 when the class is not on this rank). Deterministic given (seed, step, rank).
    """
    mine = (local_labels >= 0) & (local_labels < num_local)
    positives = sorted_unique(local_labels[mine])
    wanted = num_sampled(num_local, ratio)
    if wanted >= num_local:
        index = np.arange(num_local, dtype=np.int64)
    elif len(positives) >= wanted:
        index = positives.astype(np.int64)
    else:
        rng = np.random.default_rng([seed, step, rank])
        # Draw from the num_local - P non-positive ids, numbered 0..; map the k-th of them to its class id by
        # skipping the positives below it (positives[i] - i counts the non-positives before positive i).
        drawn = distinct_uniform(rng, num_local - len(positives), wanted - len(positives))
        negatives = drawn + np.searchsorted(positives - np.arange(len(positives)), drawn, side="right")
        # Two disjoint sorted runs: a stable sort (timsort for integers) merges them in one pass.
        index = np.sort(np.concatenate([positives, negatives]).astype(np.int64), kind="stable")
    remapped = np.full(local_labels.shape, -1, dtype=np.int64)
    remapped[mine] = np.searchsorted(index, local_labels[mine])
    return index, remapped


def margin_softmax_loss(cosine: paddle.Tensor, labels: paddle.Tensor, margin: Margin, comm) -> paddle.Tensor:
    """The portable margin softmax loss: CPU and GPU, one rank or many (``labels``: -1 = not on this rank)."""
    return margin_softmax_cross_entropy(cosine, labels, margin, comm)


def scale_columns(matrix: paddle.Tensor, factors: paddle.Tensor) -> paddle.Tensor:
    """``matrix * factors[None, :]``, in place when allowed (see ``in_place_allowed``).

    Against the 1-D ``factors`` itself: Paddle's CPU broadcast of a [1, k] operand takes its generic index
    path (3-7x slower at [128, 100000]), an expand() materialises a [batch, k] copy, and the 1-D operand
    does neither (measured on 2.6.2 and 3.3.1: multiply_ 10 ms against 14-16 ms expanded, 57 ms [1, k]).
    """
    return matrix.multiply_(factors) if in_place_allowed() else matrix * factors


class ScratchRows:
    """One [rows, emb] tensor kept from step to step, for the class centers' gradient.

    On CPU a fresh tensor of that size is fresh pages from the OS (glibc unmaps freed buffers over 32 MiB),
    and faulting them in costs more than the arithmetic written into them: at 100,000 x 512 the head's
    backward took 0.91 s with this instead of 1.21 s (0.69 against 0.92 s in a second pair of runs). Paddle
    hands the gradient a PyLayer returns to the leaf's ``.grad`` without a copy (2.6 and 3.x, tested), so the
    leaf's gradient *is* this tensor until the next backward overwrites it; PartialFC consumes it in
    :meth:`PartialFC.step` before that.
    """

    def __init__(self):
        self.tensor: paddle.Tensor | None = None

    def like(self, other: paddle.Tensor) -> paddle.Tensor:
        return self.shaped(other.shape, other.dtype)

    def shaped(self, shape: list[int], dtype) -> paddle.Tensor:
        if self.tensor is None or self.tensor.shape != list(shape) or self.tensor.dtype != dtype:
            self.tensor = None  # the old one goes first: never two at once
            self.tensor = paddle.empty(shape, dtype=dtype)
        return self.tensor

    def release(self) -> None:
        self.tensor = None


def radial_rows(centers: paddle.Tensor, radial: paddle.Tensor, scratch: ScratchRows | None) -> paddle.Tensor:
    """``centers * -radial[:, None]``, written into ``scratch`` when given and in-place ops are allowed."""
    factors = (-radial).unsqueeze(1)  # a [k, 1] operand: Paddle's fast broadcast along rows
    if scratch is None or not in_place_allowed():
        return centers * factors
    rows = scratch.like(centers)
    rows.copy_(centers, False)
    return rows.multiply_(factors)


def products(saved: paddle.Tensor, grad: paddle.Tensor) -> paddle.Tensor:
    """``saved * grad``, written over ``saved`` when in-place ops are allowed: the backward's last use of it,
    and one [batch, k] allocation less at the step's memory peak (51 MB at k=100,000, batch 128)."""
    return saved.multiply_(grad) if in_place_allowed() else saved * grad


class _CosineToCenters(paddle.autograd.PyLayer):
    """``matmul(unit_embeddings, F.normalize(centers, axis=1), transpose_y=True)`` without normalised centers.

    The centers' norms scale the columns of the [batch, k] product instead of the [k, emb] rows, and the
    backward is written out: ``d centers = G^T unit_embeddings - (sum_b G * cosine) / |w| * centers`` with
    ``G = d cosine / |w|``, one addmm into one [k, emb] buffer. F.normalize's autograd makes about five
    [k, emb] temporaries instead, each a fresh allocation costing more than its arithmetic.
    """

    @staticmethod
    def forward(ctx, unit_embeddings, centers, scratch: ScratchRows | None):
        # Squared row norms as k dot products (bmm): no [k, emb] temporary, unlike square().sum() or p_norm.
        norms = paddle.sqrt(paddle.bmm(centers.unsqueeze(1), centers.unsqueeze(2)).reshape([-1]))
        inverse_norms = 1.0 / paddle.clip(norms, min=NORMALIZE_EPS)  # F.normalize's floor on the norm
        cosine = scale_columns(paddle.matmul(unit_embeddings, centers, transpose_y=True), inverse_norms)
        # Where the floor is active the norm is a constant: no gradient through it (as F.normalize).
        norm_is_live = (norms > NORMALIZE_EPS).astype(norms.dtype)
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
        grad = scale_columns(grad_cosine, inverse_norms)
        radial = products(cosine, grad).sum(axis=0) * inverse_norms * norm_is_live
        grad_embeddings = grad_centers = None
        if ctx.wants_grad[0]:
            grad_embeddings = paddle.matmul(grad, centers)
        if ctx.wants_grad[1]:
            grad_centers = radial_rows(centers, radial, ctx.scratch)
            if in_place_allowed():
                grad_centers.addmm_(grad.t(), unit_embeddings)
            else:
                grad_centers = paddle.addmm(grad_centers, grad.t(), unit_embeddings)
        return grad_embeddings, grad_centers


def cosine_to_centers(
    embeddings: paddle.Tensor, centers: paddle.Tensor, scratch: ScratchRows | None = None
) -> paddle.Tensor:
    """[batch, k] cosine similarity of each embedding with each center row, differentiable in both.

    ``scratch``: where the centers' gradient is written (see ScratchRows); it then lives there, overwritten by
    the next backward through the same scratch. In eager mode the backward overwrites the returned cosine
    (it is saved for the backward, whose last use of it is a product with the gradient): read it before.
    """
    return _CosineToCenters.apply(F.normalize(embeddings, axis=1), centers, scratch)


def copy_rows_into(tensor: paddle.Tensor, source, block_rows: int = STATE_BLOCK_ROWS) -> None:
    """``tensor[:] = source`` a block of rows at a time (see :meth:`PartialFC.set_state`)."""
    if hasattr(source, "blocks"):
        blocks = source.blocks(block_rows)
    else:
        blocks = ((start, source[start : start + block_rows]) for start in range(0, len(source), block_rows))
    target = host_view(tensor) if is_cpu_and_contiguous(tensor) else None
    for start, rows in blocks:
        if target is not None:
            target[start : start + len(rows)] = rows
        else:
            tensor[start : start + len(rows)] = paddle.to_tensor(np.asarray(rows)).astype(tensor.dtype)


class PartialFC:
    """The sharded, sampled classifier of one rank, with its class centers and their momentum."""

    traceable = True  # its loss compiles under paddle.jit.to_static (static mode)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Margin,
        sample_ratio: float = 1.0,
        momentum_mode: str = "lazy",
        center_dtype: str = "float32",
        seed: int = 0,
        comm=None,
    ):
        self.comm = comm or LocalComm()
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = margin
        self.sample_ratio = sample_ratio
        self.seed = seed
        self.update = UPDATES[momentum_mode]
        self.shard = shard_classes(num_classes, self.comm.rank, self.comm.world_size)
        shard = self.shard
        self.weight = init_class_center_tensor(seed, shard.start, shard.count, embedding_size, center_dtype)
        self.velocity = paddle.zeros_like(self.weight)
        self._index: paddle.Tensor | None = None
        self._sampled: paddle.Tensor | None = None
        # Replaceable by a fused kernel that passed its start-up parity check (plsc.loss.fast_paths).
        self.margin_loss = margin_softmax_loss
        self.center_grad_scratch = ScratchRows()
        # The sampled rows, gathered into the same memory every step where Paddle can (gathers_into):
        # a fresh [k, emb] tensor is fresh pages, and the forward over them took 0.44 s instead of 0.36 on
        # some days at k = 100,000 (the whole forward phase measured; 0.36 in every run with the kept buffer).
        self.gathered_rows_scratch = ScratchRows()

    def sample(self, labels: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        return sample_centers(
            labels - self.shard.start, self.shard.count, self.sample_ratio, self.seed, step, self.comm.rank
        )

    def __call__(self, embeddings: paddle.Tensor, labels: paddle.Tensor, step: int) -> paddle.Tensor:
        """Loss of this rank's local batch; identical on every rank (it is the global batch's mean)."""
        sampled, remapped = self.prepare(labels, step)
        return self.loss(self.comm.all_gather_with_grad(embeddings), sampled, remapped)

    def prepare(self, labels: paddle.Tensor, step: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """The eager half of a step: gather the global batch's labels, sample this rank's centers and gather
        them as a leaf that collects their gradient. Returns ``(sampled, remapped)`` for :meth:`loss`."""
        all_labels = self.comm.all_gather(labels.reshape([-1]))
        self._index, remapped = self.sample_tensors(all_labels, step)
        out = None
        if gathers_into(self.weight):
            shape = [self._index.shape[0], self.embedding_size]
            out = self.gathered_rows_scratch.shaped(shape, paddle.float32)
        # A new leaf on the rows' memory each step: its gradient starts empty, as a fresh gather's does
        # (Paddle adds each backward's gradient to what a leaf already holds).
        sampled = gather_rows(self.weight, self._index, out).detach()
        sampled.stop_gradient = False
        self._sampled = sampled
        return sampled, remapped

    def sample_tensors(self, all_labels: paddle.Tensor, step: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """:meth:`sample` on tensors; replaceable by Paddle's on-device sampler (plsc.loss.fast_paths)."""
        index, remapped = self.sample(all_labels.numpy(), step)
        return paddle.to_tensor(index), paddle.to_tensor(remapped)

    def loss(self, all_embeddings: paddle.Tensor, sampled: paddle.Tensor, remapped: paddle.Tensor):
        """The tensor-only half: margin softmax of the global batch over the sampled centers. Holds no Python
        state changes, so static mode can compile it (``paddle.jit.to_static``)."""
        cosine = cosine_to_centers(all_embeddings, sampled, self.center_grad_scratch)
        return self.margin_loss(cosine, remapped, self.margin, self.comm)

    def skip_step(self) -> None:
        """Forget the pending gradient without applying it (a step with an inf/nan gradient)."""
        self._index = self._sampled = None

    @property
    def sampled_grad(self) -> paddle.Tensor | None:
        """Gradient of the last loss for the sampled centers, once backward has run."""
        return None if self._sampled is None else self._sampled.grad

    def plan_update(self, lr: float, momentum: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Announce a step that nothing will skip or clip (the streaming head then updates during the
        backward); the whole-matrix head applies its update in :meth:`step` either way."""

    def center_grads_to_check(self) -> list[paddle.Tensor]:
        """What the trainer's found-inf check reads for the class centers: their gradient."""
        return [self.sampled_grad]

    def center_grad_sq_norm(self) -> paddle.Tensor:
        """Squared norm of the sampled centers' gradient, [1] (this rank's shard), for clip-by-global-norm."""
        return paddle.square(self.sampled_grad).sum().reshape([1])

    def step(self, lr: float, momentum: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Apply the sampled centers' gradient (times ``grad_scale``, e.g. 1/loss_scale or a clip factor)."""
        grad = self.sampled_grad
        if grad is None:
            raise RuntimeError("PartialFC.step() before a backward pass")
        # The gathered rows are reused (and overwritten): the weight has not changed since they were gathered.
        self.update(self.weight, self.velocity, self._index, grad, lr, momentum, weight_decay,
                    grad_scale=grad_scale, rows=self._sampled)
        self._index = self._sampled = None

    def release_scratch(self) -> None:
        """Free the kept [k, emb] buffers (before a checkpoint's host copies, which need the memory more)."""
        self.center_grad_scratch.release()
        self.gathered_rows_scratch.release()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the whole shard; checkpoints stream it instead (:meth:`row_blocks`)."""
        return {"weight": self.weight.numpy(), "velocity": self.velocity.numpy()}

    @property
    def storage_dtype(self) -> str:
        """The centers' numpy dtype name: ``float32`` or ``float16``."""
        return str(self.weight.dtype).split(".")[-1]

    def row_blocks(self, kind: str, block_rows: int = STATE_BLOCK_ROWS):
        """The rows of ``weight`` or ``velocity`` as numpy blocks: views of the tensor's own memory on the
        CPU, one block's host copy at a time from another device. Valid until the next update."""
        tensor = getattr(self, kind)
        whole = host_view(tensor) if is_cpu_and_contiguous(tensor) else None
        for start in range(0, tensor.shape[0], block_rows):
            yield whole[start : start + block_rows] if whole is not None else \
                tensor[start : start + block_rows].numpy()

    def set_state(self, weight, velocity) -> None:
        """Overwrite the centers and velocities in place with ``weight`` and ``velocity``: arrays, or objects
        with ``blocks()`` yielding ``(first row, rows)`` (:class:`plsc.checkpoint.shards.RowPieces`), copied a
        block at a time and cast to the storage dtype (numpy's rounding)."""
        expected = (self.shard.count, self.embedding_size)
        if tuple(weight.shape) != expected or tuple(velocity.shape) != expected:
            raise ValueError(f"class-center shard has shape {tuple(weight.shape)}, expected {expected}")
        for tensor, source in ((self.weight, weight), (self.velocity, velocity)):
            copy_rows_into(tensor, source)

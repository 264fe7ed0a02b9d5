"""PartialFC: a margin-softmax classifier whose class centers are sharded across ranks and sampled per step.

Each rank owns a contiguous shard of class centers ([num_local, emb]) and sees the embeddings and labels of the
whole global batch. Per step it keeps every positive class of the batch that it owns plus uniformly random
negatives (without replacement) up to ``ceil(ratio * num_local)``, gathers those rows, and computes its columns
of the margin softmax; the softmax itself spans all ranks (see :mod:`plsc.loss.margin`). With ratio 1.0 every
center is used and the result is exactly the full classifier.

The class centers are not a Paddle parameter managed by an optimizer: the step's gradient exists only for the
gathered rows, and :mod:`plsc.loss.sparse_momentum` applies it, so nothing per step is O(num_classes).
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from plsc.distributed import LocalComm, shard_classes
from plsc.loss.margin import Margin, margin_logits, softmax_cross_entropy
from plsc.loss.sparse_momentum import UPDATES, gather_rows

# Initial centers: N(0, INIT_STD^2), generated per block of classes so that a class's row depends only on
# (seed, class id), never on how classes are sharded, and no float64 copy of the matrix ever exists.
INIT_STD = 0.01
INIT_BLOCK = 4096


def init_class_centers(seed: int, start: int, count: int, embedding_size: int) -> np.ndarray:
    """Rows ``[start, start + count)`` of the global initial class-center matrix, float32."""
    out = np.empty((count, embedding_size), dtype=np.float32)
    stop = start + count
    for block in range(start // INIT_BLOCK, -(-stop // INIT_BLOCK) if count else 0):
        block_start = block * INIT_BLOCK
        rows = np.random.default_rng([seed, 0xC1A55, block]).standard_normal(
            (INIT_BLOCK, embedding_size), dtype=np.float32
        )
        lo, hi = max(start, block_start), min(stop, block_start + INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - block_start : hi - block_start] * np.float32(INIT_STD)
    return out


def num_sampled(num_local: int, ratio: float) -> int:
    return min(num_local, math.ceil(ratio * num_local))


def sample_centers(
    local_labels: np.ndarray, num_local: int, ratio: float, seed: int, step: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """Choose this step's class centers on one rank.

    ``local_labels``: [batch] label minus the shard start, any value outside ``[0, num_local)`` meaning "not
    mine". Returns ``(index, remapped)``: the sorted local row ids to use, and each sample's column in that
    index (-1 when the class is not on this rank). Deterministic given (seed, step, rank).
    """
    mine = (local_labels >= 0) & (local_labels < num_local)
    positives = np.unique(local_labels[mine])
    wanted = num_sampled(num_local, ratio)
    if wanted >= num_local:
        index = np.arange(num_local, dtype=np.int64)
    elif len(positives) >= wanted:
        index = positives.astype(np.int64)
    else:
        rng = np.random.default_rng([seed, step, rank])
        # Draw from the num_local - P non-positive ids, numbered 0..; map the k-th of them to its class id by
        # skipping the positives below it (positives[i] - i counts the non-positives before positive i).
        drawn = rng.choice(num_local - len(positives), size=wanted - len(positives), replace=False)
        drawn = np.sort(drawn)
        negatives = drawn + np.searchsorted(positives - np.arange(len(positives)), drawn, side="right")
        index = np.union1d(positives, negatives).astype(np.int64)
    remapped = np.full(local_labels.shape, -1, dtype=np.int64)
    remapped[mine] = np.searchsorted(index, local_labels[mine])
    return index, remapped


class PartialFC:
    """The sharded, sampled classifier of one rank, with its class centers and their momentum."""

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
        centers = init_class_centers(seed, self.shard.start, self.shard.count, embedding_size)
        self.weight = paddle.to_tensor(centers).astype(center_dtype)
        self.velocity = paddle.zeros_like(self.weight)
        self._index: paddle.Tensor | None = None
        self._sampled: paddle.Tensor | None = None

    def sample(self, labels: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        return sample_centers(
            labels - self.shard.start, self.shard.count, self.sample_ratio, self.seed, step, self.comm.rank
        )

    def __call__(self, embeddings: paddle.Tensor, labels: paddle.Tensor, step: int) -> paddle.Tensor:
        """Loss of this rank's local batch; identical on every rank (it is the global batch's mean)."""
        all_embeddings = self.comm.all_gather_with_grad(embeddings)
        all_labels = self.comm.all_gather(labels.reshape([-1]))
        index, remapped = self.sample(all_labels.numpy(), step)
        self._index = paddle.to_tensor(index)
        sampled = gather_rows(self.weight, self._index)
        sampled.stop_gradient = False
        self._sampled = sampled
        cosine = paddle.matmul(F.normalize(all_embeddings, axis=1), F.normalize(sampled, axis=1), transpose_y=True)
        labels_tensor = paddle.to_tensor(remapped)
        return softmax_cross_entropy(margin_logits(cosine, labels_tensor, self.margin), labels_tensor, self.comm)

    @property
    def sampled_grad(self) -> paddle.Tensor | None:
        """Gradient of the last loss for the sampled centers, once backward has run."""
        return None if self._sampled is None else self._sampled.grad

    def step(self, lr: float, momentum: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Apply the sampled centers' gradient (times ``grad_scale``, e.g. 1/loss_scale or a clip factor)."""
        grad = self.sampled_grad
        if grad is None:
            raise RuntimeError("PartialFC.step() before a backward pass")
        if grad_scale != 1.0:
            grad = grad * grad_scale
        self.update(self.weight, self.velocity, self._index, grad, lr, momentum, weight_decay)
        self._index = self._sampled = None

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight.numpy(), "velocity": self.velocity.numpy()}

    def set_state(self, weight: np.ndarray, velocity: np.ndarray) -> None:
        expected = (self.shard.count, self.embedding_size)
        if weight.shape != expected or velocity.shape != expected:
            raise ValueError(f"class-center shard has shape {weight.shape}, expected {expected}")
        self.weight = paddle.to_tensor(weight).astype(self.weight.dtype)
        self.velocity = paddle.to_tensor(velocity).astype(self.velocity.dtype)

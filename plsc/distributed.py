"""The few collectives the model-parallel classifier needs, behind one small interface.

Single-process training uses :class:`LocalComm`, whose collectives are identities, so the single-process and
distributed paths run the same loss code. :class:`CollectiveComm` does the real thing with
``paddle.distributed`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist

from plsc.errors import PlscError
from plsc.models.precision import own_state


@dataclass(frozen=True)
class ClassShard:
    """The contiguous range of global class ids one rank owns: ``[start, start + count)``."""

    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


def shard_classes(num_classes: int, rank: int, world_size: int) -> ClassShard:
    """Balanced contiguous sharding: the first ``num_classes % world_size`` ranks get one extra class.

    Works for any ``num_classes >= 0`` (a rank may own zero classes when there are fewer classes than ranks).
    """
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return ClassShard(start, base + (1 if rank < extra else 0))


class LocalComm:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_gather_with_grad(self, tensor: paddle.Tensor) -> paddle.Tensor:
        return tensor

    def all_gather(self, tensor: paddle.Tensor) -> paddle.Tensor:
        return tensor

    def all_reduce_max(self, tensor: paddle.Tensor) -> paddle.Tensor:
        return tensor

    def all_reduce_sum_(self, tensor: paddle.Tensor) -> paddle.Tensor:
        return tensor

    def all_reduce_sum_coalesced_(self, tensors: list[paddle.Tensor], bucket_bytes: int) -> None:
        pass

    def any_true(self, flag: bool) -> bool:
        return flag

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        return array

    def broadcast_(self, tensor: paddle.Tensor, src: int = 0) -> paddle.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


class _AllGatherWithGrad(paddle.autograd.PyLayer):
    """all_gather forward; backward returns this rank's slice of the gradient summed over ranks.

    ``dist.all_gather`` alone passes no gradient. Gloo has no reduce_scatter, so the backward is an all_reduce
    followed by a slice; on NCCL the same result could come from reduce_scatter with less traffic.
    """

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank = dist.get_rank()
        ctx.rows = tensor.shape[0]
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, tensor)
        return paddle.concat(parts, axis=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        begin = ctx.rank * ctx.rows
        return grad[begin : begin + ctx.rows]


class CollectiveComm:
    """Collectives across the ranks of the default process group (initialised by the caller)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather_with_grad(self, tensor: paddle.Tensor) -> paddle.Tensor:
        return _AllGatherWithGrad.apply(tensor)

    def all_gather(self, tensor: paddle.Tensor) -> paddle.Tensor:
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, tensor)
        return paddle.concat(parts, axis=0)

    def all_reduce_max(self, tensor: paddle.Tensor) -> paddle.Tensor:
        result = tensor.detach().clone()
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
        return result

    def all_reduce_sum_(self, tensor: paddle.Tensor) -> paddle.Tensor:
        if tensor.dtype == paddle.float16 and tensor.place.is_cpu_place():
            # Paddle 3's gloo sums float16 wrongly (measured with 3.3.1: 1 + 1 gives inf; 2.6.2 is right), so
            # on CPU the sum runs in float32. numpy rounds it back to float16: Paddle 2.6's CPU cast to
            # float16 truncates toward zero (measured with 2.6.2); numpy rounds to nearest, as an exact sum
            # would.
            wide = paddle.to_tensor(tensor.numpy().astype(np.float32))
            dist.all_reduce(wide, op=dist.ReduceOp.SUM)
            paddle.assign(paddle.to_tensor(wide.numpy().astype(np.float16)), output=tensor)
            return tensor
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_sum_coalesced_(self, tensors: list[paddle.Tensor], bucket_bytes: int) -> None:
        """Sum every tensor over ranks in place, with one all-reduce per bucket of :func:`coalesce` instead
        of one per tensor (PLSC v2.2 dynamic/utils/parallel_grad_scaler.py:161-183 reduced the backbone's
        gradients in 128 MiB groups the same way). Each bucket is copied into one flat tensor, reduced, and
        copied back. The sums are the per-tensor ones: on two ranks bit for bit (a + b); on more, an element's
        order of addition may depend on where it sits in the buffer (ring algorithms), a float32 rounding."""
        for bucket in coalesce(tensors, bucket_bytes):
            if len(bucket) == 1:  # nothing to coalesce: no copies
                self.all_reduce_sum_(bucket[0])
                continue
            flat = self.all_reduce_sum_(paddle.concat([t.reshape([-1]) for t in bucket]))
            start = 0
            for tensor in bucket:  # slices are views: one copy each (paddle.split would copy twice)
                stop = start + int(np.prod(tensor.shape))
                paddle.assign(flat[start:stop].reshape(tensor.shape), output=tensor)
                start = stop

    def any_true(self, flag: bool) -> bool:
        """A decision every rank takes together (found_inf, early stop, best model)."""
        value = paddle.to_tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        """Every rank's rows, concatenated in rank order; ranks may hold different row counts.

        all_gather needs equal shapes, so each rank pads to the largest count and the padding is cut off.
        """
        counts = self.all_gather(paddle.to_tensor([array.shape[0]], dtype="int64")).numpy()
        padded = np.zeros((int(counts.max()), *array.shape[1:]), dtype=array.dtype)
        padded[: array.shape[0]] = array
        gathered = self.all_gather(paddle.to_tensor(padded)).numpy().reshape(len(counts), *padded.shape)
        return np.concatenate([rows[:count] for rows, count in zip(gathered, counts, strict=True)])

    def broadcast_(self, tensor: paddle.Tensor, src: int = 0) -> paddle.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        dist.barrier()


def launched_world_size() -> int:
    """The ranks ``paddle.distributed.launch`` started this process among (1 outside a launch)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def coalesce(tensors: list[paddle.Tensor], bucket_bytes: int) -> list[list[paddle.Tensor]]:
    """The tensors in buckets of one dtype each, in their given order within a dtype, each bucket holding at
    most ``bucket_bytes`` (a larger tensor gets a bucket of its own); ``bucket_bytes`` 0: one bucket per
    tensor."""
    by_dtype: dict[str, list[paddle.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(str(tensor.dtype), []).append(tensor)
    buckets: list[list[paddle.Tensor]] = []
    for same_dtype in by_dtype.values():
        size = bucket_bytes + 1  # start a bucket with the first tensor
        for tensor in same_dtype:
            nbytes = int(np.prod(tensor.shape)) * tensor.element_size()
            if size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(tensor)
            size += nbytes
    return buckets


def make_comm():
    """LocalComm for a single process, CollectiveComm when launched with more than one rank."""
    if launched_world_size() <= 1:
        return LocalComm()
    if not dist.is_initialized():
        dist.init_parallel_env()
    return CollectiveComm()


def require_classes_per_rank(num_classes: int, world_size: int) -> None:
    """Every rank must own at least one class: the sharded softmax has no columns to work with otherwise."""
    if num_classes < world_size:
        raise PlscError(
            f"cannot shard {num_classes} classes over {world_size} ranks; use at most {num_classes} ranks"
        )


def share_statistics_from_rank0(model: paddle.nn.Layer, comm) -> None:
    """Copy rank 0's non-learned state (BatchNorm running statistics) to every rank.

    Each rank normalises its own batches in training, so running statistics drift apart; checkpoints hold
    rank 0's. Sharing them first makes every rank evaluate exactly the model a checkpoint saves.
    """
    for tensor in own_state(model).values():  # the tensors themselves: an fp16 model's state_dict() copies
        if tensor.stop_gradient:
            comm.broadcast_(tensor, src=0)


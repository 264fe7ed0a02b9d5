"""GPU fast paths, each used only after a one-batch parity check against the portable code at start-up.

- ``margin_cross_entropy``: Paddle's fused margin softmax (margin, softmax and cross entropy in one kernel).
  It has no CPU kernel. Used in one process only: with several ranks it expects global column ids and its
  own model-parallel group, while the portable sharded softmax (plsc.loss.margin) serves any rank count.
  Never with inter-class filtering, which it does not do.
- ``class_center_sample``: Paddle's on-device sampler, saving the per-step copy of the labels to the host.
  One process only (with several ranks it ignores the rank's shard), GPU only (on CPU the host sampler costs
  no copy and stays reproducible from (seed, step, rank); Paddle's draws from Paddle's global generator).
- ``cudnn_nhwc`` (the backbone's channels-last layout) is checked in :mod:`plsc.models.layout_check`.

The ranks take the same path: the head's paths are one-process only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn.functional as F

from plsc.loss.margin import margin_softmax_cross_entropy
from plsc.loss.sampling import num_sampled, sample_centers
from plsc.parity import ENABLED, PARITY_TOLERANCE, FastPath, attempt, differs, on_gpu

log = logging.getLogger("plsc.fast_paths")


def fused_margin_loss(cosine: paddle.Tensor, labels: paddle.Tensor, margin, comm) -> paddle.Tensor:
    """:func:`plsc.loss.margin.margin_softmax_cross_entropy` in one kernel (one process: labels are
    columns)."""
    return F.margin_cross_entropy(
        cosine, labels, margin1=margin.m1, margin2=margin.m2, margin3=margin.m3, scale=margin.scale
    )


def device_sampler(all_labels: paddle.Tensor, num_local: int, wanted: int
                   ) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(index, remapped)`` of ``wanted`` centers by Paddle's class_center_sample (one process: the shard is
    every class): PartialFC's ``device_sampler``."""
    remapped, index = F.class_center_sample(all_labels, num_local, wanted)
    return index, remapped


def check_margin_cross_entropy(margin, comm) -> FastPath:
    if margin.interclass_filtering_threshold > 0:
        return FastPath("margin_cross_entropy", "unavailable (loss.interclass_filtering_threshold: the fused "
                        "kernel does not filter; the portable margin softmax is used)")

    def parity() -> str:
        rng = np.random.default_rng(0)
        cosine_np = rng.uniform(-0.6, 0.9, (16, 40)).astype(np.float32)
        labels = paddle.to_tensor(rng.integers(0, 40, 16))
        losses, grads = [], []
        for loss_fn in (fused_margin_loss, margin_softmax_cross_entropy):
            cosine = paddle.to_tensor(cosine_np, stop_gradient=False)
            loss = loss_fn(cosine, labels, margin, comm)
            loss.backward()
            losses.append(loss)
            grads.append(cosine.grad)
        error = max(differs(*losses), differs(*grads))
        return ENABLED if error <= PARITY_TOLERANCE else f"disabled (parity: differs by {error:.2g})"

    return attempt("margin_cross_entropy", parity)


def check_class_center_sample(num_classes: int, sample_ratio: float, seed: int = 0) -> FastPath:
    """The on-device sampler against the host one, for a one-process head of ``num_classes``."""
    if not on_gpu():
        return FastPath("class_center_sample", "unavailable (GPU only; the host sampler is used)")

    def parity() -> str:
        labels = np.random.default_rng(0).integers(0, num_classes, 64)
        wanted = num_sampled(num_classes, sample_ratio)
        index, remapped = (t.numpy() for t in device_sampler(paddle.to_tensor(labels), num_classes, wanted))
        expected, _ = sample_centers(labels, num_classes, sample_ratio, seed, 0, 0)
        valid = (
            len(np.unique(index)) == len(index) == len(expected)
            and set(labels) <= set(index)
            and np.array_equal(index[remapped], labels)
        )
        return ENABLED if valid else "disabled (parity: sampled ids or remapped labels differ)"

    return attempt("class_center_sample", parity)


@dataclass(frozen=True)
class HeadFastPaths:
    """The head's implementations chosen at start-up (PartialFC's constructor arguments) and the checks'
    outcomes."""

    results: list[FastPath] = field(default_factory=list)
    margin_loss: Callable = margin_softmax_cross_entropy
    device_sampler: Callable | None = None

    def head_kwargs(self) -> dict:
        return {"margin_loss": self.margin_loss, "device_sampler": self.device_sampler}


def select_fast_paths(margin, num_classes: int, sample_ratio: float, comm, seed: int = 0) -> HeadFastPaths:
    """Check the head's fast paths and log the outcome; those that passed go to the head's constructor."""
    if comm.world_size > 1:
        reason = f"unavailable ({comm.world_size} ranks: the portable sharded softmax and sampler are used)"
        results = [FastPath("margin_cross_entropy", reason), FastPath("class_center_sample", reason)]
    else:
        results = [check_margin_cross_entropy(margin, comm),
                   check_class_center_sample(num_classes, sample_ratio, seed)]
    by_name = {r.name: r for r in results}
    chosen = HeadFastPaths(
        results,
        fused_margin_loss if by_name["margin_cross_entropy"].enabled else margin_softmax_cross_entropy,
        device_sampler if by_name["class_center_sample"].enabled else None,
    )
    for result in results:
        log.info("fast path %s: %s", result.name, result.status)
    return chosen

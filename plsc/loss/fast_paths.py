"""GPU fast paths, each used only after a one-batch parity check against the portable code at start-up.

- ``margin_cross_entropy``: Paddle's fused margin softmax (margin, softmax and cross entropy in one kernel).
  It has no CPU kernel. Used in one process only: with several ranks it expects global column ids and its
  own model-parallel group, while the portable sharded softmax (plsc.loss.margin) serves any rank count.
- ``class_center_sample``: Paddle's on-device sampler, saving the per-step copy of the labels to the host.
  One process only (with several ranks it ignores the rank's shard), GPU only (on CPU the host sampler costs
  no copy and stays reproducible from (seed, step, rank); Paddle's draws from Paddle's global generator).
- ``cudnn_nhwc``: the backbone in channels-last layout on cuDNN, checked against the same weights in NCHW.
  On CPU, NHWC runs on the portable CPU convolutions (slower than NCHW there; a GPU tensor-core effect).

The ranks take the same path: the head's paths are one-process only, and the layout check is agreed on
(``comm.any_true``).
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

log = logging.getLogger("plsc.fast_paths")

ENABLED = "enabled"
# Loss and gradients of a fused kernel may differ from the composed ops by float rounding only.
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FastPath:
    name: str
    status: str  # ENABLED, or why the portable path is used

    @property
    def enabled(self) -> bool:
        return self.status == ENABLED


def on_gpu() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


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


def _differs(a: paddle.Tensor, b: paddle.Tensor) -> float:
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def _attempt(name: str, check) -> FastPath:
    """Run ``check`` (returns a status); a missing kernel or any failure of the op means 'unavailable'."""
    try:
        return FastPath(name, check())
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        message = str(exc).strip()
        reason = "no CPU kernel" if "cpu kernel" in message.lower() else message.splitlines()[0][:120]
        return FastPath(name, f"unavailable ({reason})")


def check_margin_cross_entropy(margin, comm) -> FastPath:
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
        error = max(_differs(*losses), _differs(*grads))
        return ENABLED if error <= PARITY_TOLERANCE else f"disabled (parity: differs by {error:.2g})"

    return _attempt("margin_cross_entropy", parity)


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

    return _attempt("class_center_sample", parity)


def check_cudnn_nhwc(model: paddle.nn.Layer, data_format: str, build_nchw_twin, image_size: int) -> FastPath:
    """``build_nchw_twin()``: the same weights built for NCHW (called only when there is a check to run)."""
    if data_format != "NHWC":
        return FastPath("cudnn_nhwc", "unavailable (the model is NCHW)")
    if not on_gpu():
        return FastPath("cudnn_nhwc", "unavailable (CPU: NHWC runs on the portable CPU convolutions)")

    def parity() -> str:
        twin = build_nchw_twin()
        images = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 3, image_size, image_size)))
        images = images.astype("float32")
        model.eval()
        twin.eval()
        with paddle.no_grad():
            error = _differs(model(images.transpose([0, 2, 3, 1])), twin(images))
        model.train()
        return ENABLED if error <= PARITY_TOLERANCE else f"failed (differs from NCHW by {error:.2g})"

    return _attempt("cudnn_nhwc", parity)


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


def agreed(result: FastPath, comm) -> FastPath:
    """``result`` as every rank must take it: a path that failed on any rank is disabled on all."""
    rejected_somewhere = comm.any_true(not result.enabled)
    if result.enabled and rejected_somewhere:
        return FastPath(result.name, "disabled (failed on another rank)")
    return result

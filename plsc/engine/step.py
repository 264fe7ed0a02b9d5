"""One training step, top to bottom: the head's sampling, forward, loss and backward of each micro-batch,
the backbone gradients' all-reduce, the collective inf/nan check, the backbone's clip, the optimizer step, the
class centers' update.

Gradient accumulation (``train.grad_accum`` = N): the step takes N micro-batches at once, so that it
equals one step of a batch N times larger (with batch statistics frozen). The head samples its centers once,
from every micro-batch's labels; each micro-batch's loss is divided by N (the mean over the whole step) and
its backward adds to the backbone's ``.grad`` and to the centers' gradient. Everything after the backward
passes happens once: the all-reduce, the inf/nan check (an inf in any micro-batch skips them all), the clip,
the updates.

The one decision of the step is made once, when it is built: whether the head may apply its update inside the
backward. Only when nothing can skip the step and the step has one micro-batch: without loss scaling there is
no inf/nan check, and clipping never touches the class centers (PLSC v2.2 clips the backbone alone,
parallel_grad_scaler.py:21-62), so the centers' update is known before the backward and its gradient need not
be kept. Under loss scaling the update waits for the check, which covers the backbone's gradients, known only
after the whole backward; with several micro-batches it waits for the last one's gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math

import paddle

from plsc.config import Config, OptimConfig
from plsc.data import normalize_batch
from plsc.engine.loss_scaler import DynamicLossScaler, found_inf_anywhere
from plsc.errors import PlscError
from plsc.loss.partial_fc import CenterUpdate

log = logging.getLogger("plsc.train")


class TrainingDiverged(PlscError):
    """The loss or the weights became non-finite, or too many steps in a row were skipped for inf/nan
    gradients. Raised before anything is saved from the non-finite state, on every rank at the same step."""


def diverged(step: int, reason: str, latest_checkpoint) -> TrainingDiverged:
    """The error that ends a diverged run at ``step`` (1-based), naming the checkpoint a restart takes."""
    kept = f"the last checkpoint is {latest_checkpoint}" if latest_checkpoint else "no checkpoint was saved"
    return TrainingDiverged(f"training diverged at step {step}: {reason}; nothing was saved from it "
                            f"({kept}); try a lower optim.lr or optim.clip_norm > 0")


class TrainStep:
    """``step(images, labels, step, lr) -> loss``: one optimizer step of the data-parallel backbone and the
    class-sharded head, over ``train.grad_accum`` micro-batches. ``backbone`` and ``head_loss`` are the
    model's forward and the head's loss as :mod:`plsc.engine.modes` compiled them (or not); ``checkpoints``
    names the last checkpoint when the run diverges."""

    def __init__(self, config: Config, model, backbone, head, head_loss, optimizer,
                 scaler: DynamicLossScaler, comm, amp_level: str | None, checkpoints):
        self.model, self.backbone, self.head, self.head_loss = model, backbone, head, head_loss
        self.optimizer, self.scaler, self.comm, self.checkpoints = optimizer, scaler, comm, checkpoints
        self.optim, self.train = config.optim, config.train
        self.autocast = contextlib.nullcontext
        if amp_level:
            self.autocast = lambda: paddle.amp.auto_cast(level=amp_level)
        self.micro_batches = config.train.grad_accum
        # The step's one decision (module docstring).
        self.update_in_backward = not scaler.enabled and self.micro_batches == 1
        self.skipped_steps = 0  # steps dropped for an inf/nan gradient (loss scaling)
        self.skipped_in_a_row = 0

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor, step: int, lr: float) -> float:
        """Train on the optimizer step's rank batch, ``train.grad_accum`` equal micro-batches one after the
        other, at 0-based ``step`` with learning rate ``lr``; the global batch's mean loss."""
        optim, scaler, comm, micro_batches = self.optim, self.scaler, self.comm, self.micro_batches
        self.model.train()
        unscale = (1.0 / scaler.scale) / optim.grad_divisor  # a disabled scaler's scale is 1
        # Center gradients were scaled with the loss too (train.unscale_center_grads: whether that is undone).
        center_scale = unscale if self.train.unscale_center_grads else 1.0 / optim.grad_divisor
        update = center_update(optim, lr, center_scale)
        assert not (self.update_in_backward and (scaler.enabled or micro_batches > 1)), \
            "a skippable or accumulating step updated in the backward"
        pending = self.head.prepare(labels, step, update if self.update_in_backward else None, micro_batches)

        # Forward and backward of each micro-batch, its loss divided by their number: the backbone's .grad
        # and ``pending`` sum the step's gradient. Static mode runs two compiled programs here, the backbone
        # and the head's loss; the all_gather of the embeddings between them stays eager: Paddle 3's static
        # graph (PIR) has no all_gather, and Paddle 2.6's has no PyLayer with collectives in it.
        loss = None
        images_per_micro_batch = paddle.chunk(images, micro_batches) if micro_batches > 1 else [images]
        for number, micro_images in enumerate(images_per_micro_batch):
            with self.autocast():
                embeddings = self.backbone(normalize_batch(micro_images))
            if embeddings.dtype != paddle.float32:
                embeddings = embeddings.astype("float32")  # the margin softmax computes in float32
            # The loss is the global batch's mean, the same on every rank.
            micro_loss = self.head_loss(comm.all_gather_with_grad(embeddings), pending.micro_batch(number))
            if micro_batches > 1:
                micro_loss = micro_loss / micro_batches
            (micro_loss * scaler.scale if scaler.enabled else micro_loss).backward()
            loss = micro_loss.detach() if loss is None else loss + micro_loss.detach()

        # The backbone's gradients summed over the ranks in place: each rank's covers its own samples of the
        # global-mean loss.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        comm.all_reduce_sum_coalesced_(grads, self.train.allreduce_bucket_mb * 2**20)
        if scaler.enabled and found_inf_anywhere(grads + self.head.center_grads(pending), comm):
            self.skip(step + 1)  # the head's step is dropped with ``pending``
            return float(loss)
        self.skipped_in_a_row = 0
        backbone_scale = clip_factor(grads, unscale, optim.clip_norm, optim.clip_max_factor) * unscale
        if backbone_scale != 1.0:
            with paddle.no_grad():
                for grad in grads:
                    grad.scale_(backbone_scale)
        self.optimizer.set_lr(lr)
        # The optimizer names its velocity tensors on its first step from the process-wide name counter, and
        # restores saved state by those names: a fresh name scope makes them the same in every run.
        with paddle.utils.unique_name.guard():
            self.optimizer.step()
        self.optimizer.clear_grad()
        self.head.apply(pending, update)
        if scaler.enabled:
            scaler.update(found_inf=False)
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            # Without loss scaling nothing skips the step. The loss is the global batch's, the same on every
            # rank, so every rank stops here; the weights this step changed are never saved.
            raise diverged(step + 1, f"the loss is {loss_value}", self.checkpoints.latest())
        return loss_value

    def skip(self, step: int) -> None:
        """An inf/nan gradient on some rank at (1-based) ``step``: every rank drops the step (backbone and
        class centers untouched; BatchNorm's running statistics have already seen the batch, as with Paddle's
        GradScaler)."""
        self.optimizer.clear_grad()
        log.warning("step %d: inf/nan gradient at loss scale %g, step skipped", step, self.scaler.scale)
        self.scaler.update(found_inf=True)
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        limit = self.train.max_skipped_steps
        if self.skipped_in_a_row >= limit:  # the skip decision is collective: every rank stops here
            raise diverged(step, f"{limit} steps in a row skipped for inf/nan gradients "
                           f"(train.max_skipped_steps), loss scale down to {self.scaler.scale:g}",
                           self.checkpoints.latest())


def clip_factor(grads: list[paddle.Tensor], unscale: float, clip_norm: float, max_factor: float) -> float:
    """The backbone's clip factor, ``min(clip_norm / (norm + 1e-6), max_factor)`` (1 without clipping), as
    PLSC v2.2's dynamic mode clips after the all-reduce and the unscale (parallel_grad_scaler.py:21-62,
    159-197). The class centers are never clipped.

    ``unscale``: the factor that turns the summed gradients into the ones the update takes (undoing loss
    scaling, dividing by ``optim.grad_divisor``); the norm is theirs. Backbone gradients are identical on
    every rank after their all-reduce, so every rank computes the same factor.
    """
    if clip_norm <= 0:
        return 1.0
    squares = paddle.add_n([paddle.square(grad.astype("float32")).sum() for grad in grads])
    norm = math.sqrt(squares.item()) * unscale
    return min(clip_norm / (norm + 1e-6), max_factor)


def center_update(optim: OptimConfig, lr: float, grad_scale: float) -> CenterUpdate:
    """The class centers' sparse momentum step at backbone rate ``lr``, gradient times ``grad_scale``. Their
    rate: ``lr`` itself, or with ``optim.center_lr`` as their base rate, the same point of the same schedule;
    their decay: ``optim.center_weight_decay``, null meaning ``optim.weight_decay``."""
    rate = lr * optim.center_lr / optim.lr if optim.center_lr > 0 else lr
    decay = optim.weight_decay if optim.center_weight_decay is None else optim.center_weight_decay
    return CenterUpdate(rate, optim.momentum, decay, grad_scale)

"""The trainer's start-up mode policy: what runs compiled (``train.mode``) and in which precision
(``train.precision``).

Static mode compiles the backbone's forward and the head's loss with ``paddle.jit.to_static``, each as a layer
of its own; the head's loss only once the compiled program reproduces the eager one on a batch. Everything
else (sampling, optimizer steps, checkpoints) stays eager code shared by both modes.
"""

from __future__ import annotations

import logging

import numpy as np
import paddle
from paddle.jit.dy2static.program_translator import StaticFunction

from plsc.config import Config
from plsc.loss.partial_fc import PartialFC
from plsc.loss.row_backend import squared_row_norms
from plsc.loss.rows import gather_rows
from plsc.parity import on_gpu

log = logging.getLogger("plsc.train")

PADDLE_MAJOR = int(paddle.__version__.split(".")[0]) or 99  # a source build says 0.0.0: the newest


class BackboneStep(paddle.nn.Layer):
    """The backbone's training forward as a layer of its own: compiling it leaves ``model.forward`` eager for
    evaluation and export (to_static swaps a sublayer's forward only while it traces)."""

    def __init__(self, model: paddle.nn.Layer):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)


class HeadLossStep(paddle.nn.Layer):
    """:meth:`PartialFC.rows_loss` as a layer (to_static compiles layers and functions, not methods of
    others)."""

    def __init__(self, head: PartialFC):
        super().__init__()
        self.head = head

    def forward(self, all_embeddings, sampled, squared_norms, remapped):
        return self.head.rows_loss(all_embeddings, sampled, squared_norms, remapped)


class CompiledHeadLoss:
    """``(all_embeddings, HeadStep or MicroBatch) -> loss`` through the compiled :class:`HeadLossStep`
    ``program``: the micro-batch's tensors go in, the step itself stays eager."""

    def __init__(self, program: paddle.nn.Layer):
        self.program = program

    def __call__(self, all_embeddings, pending):
        micro = pending.micro_batch()  # a step of one micro-batch, or the micro-batch itself
        step = micro.step
        return self.program(all_embeddings, step.rows, step.squared_norms, micro.remapped)


def compile_backbone(model: paddle.nn.Layer, mode: str):
    """The backbone's training forward for ``mode``: the model itself in dynamic mode, else its compiled
    :class:`BackboneStep`."""
    return model if mode == "dynamic" else compile_for_mode(BackboneStep(model), mode)


def compile_for_mode(step: paddle.nn.Layer, mode: str, has_collectives: bool = False) -> paddle.nn.Layer:
    """``step`` itself in dynamic mode; in static mode its static-graph program (``paddle.jit.to_static``,
    the whole forward as one graph: ``full_graph=True``), which reproduces the eager losses and gradients.

    Except a step with collectives on Paddle 2.6, which stays eager: 2.6's static all_reduce needs fleet's
    static communicator ("You must initialize the gloo environment first"), which ``init_parallel_env`` does
    not set up. (2.6's bytecode translator, SOT, would cut the graph around the collectives, but its program
    sums the margin's two gradient paths in another order: 1-ulp differences that grow to 4e-2 in 20 steps.)
    """
    if mode == "dynamic" or (has_collectives and PADDLE_MAJOR < 3):
        return step
    return paddle.jit.to_static(step, full_graph=True)


def _relative_error(actual: np.ndarray, desired: np.ndarray) -> float:
    return float(np.abs(actual - desired).max() / max(1.0, np.abs(desired).max()))


def is_compiled(step) -> bool:
    """Whether ``step`` runs a static program (to_static replaces a layer's forward in place)."""
    if isinstance(step, CompiledHeadLoss):
        step = step.program
    return isinstance(getattr(step, "forward", None), StaticFunction)


def backbone_amp_level(precision: str) -> str | None:
    """The ``paddle.amp`` level of the backbone's forward; None: it computes in float32.

    fp16 is PLSC's pure FP16 (O2: float16 weights with float32 master copies, BatchNorm in float32), amp is
    O1 (float16 where Paddle's lists allow). GPU only: CPU builds have no float16 matmul or conv kernels, and
    AMP there does nothing. Class-center storage (``loss.center_dtype``) and loss scaling apply on any device.
    """
    if precision == "fp32" or not on_gpu():
        return None
    return {"fp16": "O2", "amp": "O1"}[precision]


def compile_head_loss(head: PartialFC, mode: str, comm, rows: int, num_classes: int):
    """The head's loss for ``mode``, ``(all_embeddings, HeadStep or MicroBatch) -> loss``:
    :meth:`PartialFC.loss` itself, or a compiled loss once it reproduces the eager one on one batch.

    Why the check: Paddle 3.3's static PyLayer silently drops in-place ops in a PyLayer's forward
    (measured: ``out.multiply_(2)`` there has no effect under to_static), so a loss made of such layers
    compiles without error into wrong numbers. Such a loss runs eagerly (logged); the rest stays static.
    """
    if not head.traceable:
        return head.loss
    compiled = compile_for_mode(HeadLossStep(head), mode, has_collectives=True)
    if not is_compiled(compiled):
        return head.loss
    error = head_loss_error(head, HeadLossStep(head), compiled, rows, num_classes)
    error = comm.all_reduce_max(paddle.to_tensor([error])).item()
    if not error <= 1e-5:  # nan included
        log.warning("static mode: the compiled loss differs from the eager loss by %.3g on a test batch; "
                    "the loss runs eagerly (in-place ops in a PyLayer do not survive to_static)", error)
        return head.loss
    return CompiledHeadLoss(compiled)


def head_loss_error(head: PartialFC, eager: paddle.nn.Layer, compiled: paddle.nn.Layer, rows: int,
                    num_classes: int) -> float:
    """Largest relative difference of loss and gradients between the two, on a batch shaped like a
    training batch of ``rows`` (the global batch: the program traced here is the one training reuses)."""
    rng = np.random.default_rng(0)  # the same global batch on every rank, as all_gather would give
    labels = rng.integers(0, num_classes, rows)
    embeddings = rng.standard_normal((rows, head.embedding_size)).astype(np.float32)
    index, remapped = head.sample(labels, 0)
    outputs = []
    for step in (eager, compiled):
        inputs = [paddle.to_tensor(embeddings, stop_gradient=False),
                  gather_rows(head.weight, paddle.to_tensor(index))]
        squared_norms = squared_row_norms(inputs[1])
        inputs[1].stop_gradient = False
        loss = step(*inputs, squared_norms, paddle.to_tensor(remapped))
        loss.backward()
        outputs.append([loss.numpy()] + [x.grad.numpy() for x in inputs])
    return max(_relative_error(a, b) for a, b in zip(*outputs, strict=True))


def log_modes(config: Config, compiled: dict[str, bool], amp_level: str | None, scaler) -> None:
    """One log line for the graph mode, one for the precision."""
    train = config.train
    if train.mode == "static":
        loss = "and loss compiled" if compiled["loss"] else "compiled (the loss runs eagerly)"
        log.info("static mode: backbone %s by paddle.jit.to_static; the embeddings' all_gather runs "
                 "eagerly between them", loss)
    else:
        log.info("dynamic mode")
    backbone = f"paddle.amp {amp_level}" if amp_level else "float32"
    if amp_level is None and train.precision != "fp32":
        backbone += " (no float16 kernels on this device)"
    scaling = "no loss scaling"
    if scaler.enabled:
        scaling = f"dynamic loss scaling from {scaler.scale:g}"
    log.info("precision %s: backbone computes in %s, class centers stored as %s, %s",
             train.precision, backbone, config.loss.center_dtype, scaling)

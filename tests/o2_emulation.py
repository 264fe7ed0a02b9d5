"""What ``train.precision fp16`` does to the backbone on a GPU, done on the CPU.

On a GPU the trainer calls ``paddle.amp.decorate(level="O2", save_dtype="float32", master_weight=...)``; on
the CPU Paddle's decorate returns the model untouched (it checks the tracer's place first). Here Paddle's own
decorate runs in full, with its two device probes answering "a GPU of compute capability >= 7": the
parameters become float16 except the normalisation layers' (``amp_initialize``), the optimizer keeps float32
master weights (``_set_multi_precision``) and every layer gets the float32 ``StateDictHook``. Both Paddle 2.6
and 3.x name the probes ``_dygraph_tracer`` and ``_is_gpu_float16_supported`` in ``paddle.amp.auto_cast``
(tests/test_fp16_o2.py checks the effect: a renamed probe fails there rather than emulating nothing).

What cannot run on a CPU: a float16 forward or backward (no float16 conv/matmul kernel) and the optimizer's
update (no float16 momentum kernel). :func:`create_step_state` creates the optimizer state the first GPU
step would, with Paddle's own accumulator code, without the kernel.
"""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import paddle

from plsc.engine import trainer as trainer_module

AUTO_CAST = importlib.import_module("paddle.amp.auto_cast")  # the module (paddle.amp.auto_cast is a function)


class _GpuPlace:
    """The answers a CUDA place gives to decorate's device checks."""

    def is_gpu_place(self):
        return True

    def is_xpu_place(self):
        return False

    def is_custom_place(self):
        return False


class _TracerOnGpu:
    def __init__(self, tracer):
        self._tracer = tracer
        self._expected_place = _GpuPlace()

    def __getattr__(self, name):
        return getattr(self._tracer, name)


@contextlib.contextmanager
def decorate_as_on_gpu(monkeypatch):
    """Within the block, ``paddle.amp.decorate`` acts as on a GPU, and the trainer picks O2 for fp16."""
    real_tracer = AUTO_CAST._dygraph_tracer
    with monkeypatch.context() as patch:
        patch.setattr(AUTO_CAST, "_dygraph_tracer", lambda: _TracerOnGpu(real_tracer()))
        patch.setattr(AUTO_CAST, "_is_gpu_float16_supported", lambda: True)
        patch.setattr(trainer_module, "backbone_amp_level", lambda precision: {"fp16": "O2"}.get(precision))
        yield


def create_step_state(optimizer) -> None:
    """The optimizer state a GPU step creates before its kernel runs (float32 master weights of the float16
    parameters, velocities), by Paddle's own code and in a fresh name scope as the training step
    (plsc.engine.step.TrainStep) steps. After a resume this binds the restored state by name, as the first
    step after resuming does."""
    from paddle.base.layer_helper import LayerHelper

    with paddle.utils.unique_name.guard():
        if getattr(optimizer, "helper", None) is None:  # Paddle 2.6 creates it in the optimization pass
            optimizer.helper = LayerHelper(type(optimizer).__name__)
        block = paddle.static.default_main_program().global_block()
        # a step updates the parameters that have gradients (not BatchNorm's statistics)
        trained = [p for p in optimizer._parameter_list if not p.stop_gradient]
        optimizer._create_accumulators(block, trained)


def state_after_steps(optimizer, seed: int = 0) -> None:
    """The optimizer state a few GPU steps leave: :func:`create_step_state`, then values no float16
    parameter holds (master weights off the float16 grid, yet rounding to the parameters), so that a restore
    that rebuilt them from the float16 weights would show."""
    create_step_state(optimizer)
    rng = np.random.default_rng(seed)
    for master in optimizer._master_weights.values():
        value = master.numpy()
        master.set_value(value + rng.uniform(-1, 1, value.shape).astype(np.float32) * 1e-5 * np.abs(value))
    for by_param in optimizer._accumulators.values():
        for velocity in by_param.values():
            noise = rng.standard_normal(velocity.shape).astype(np.float32) * 1e-3
            velocity.set_value(noise.astype(velocity.numpy().dtype))  # float16 without master weights


def master_weights(optimizer) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in optimizer._master_weights.items()}


def velocities(optimizer) -> dict[str, np.ndarray]:
    return {t.name: t.numpy() for by_param in optimizer._accumulators.values() for t in by_param.values()}

"""What a backbone costs, read from its built layers: trainable parameters, and multiply-adds per image.

Multiply-adds count the convolutions and fully connected layers, the convention of insightface's published
figures (IResNet-50 at 112 x 112: 6.3 G, IResNet-100: 12.1 G); BatchNorm, PReLU and the additions of the
residual sums are left out. A convolution costs ``(in_channels / groups) * kernel_h * kernel_w`` per output
element and a Linear ``in_features`` per output element, whatever the layout. Layers whose products are
not sublayers (a ViT's attention: queries x keys and weights x values) report them through a
``matmul_multiply_adds(output)`` method, counted as arcface_torch counts them for its ViT figures (ViT-B
11.4 G: backbones/vit.py ``extra_gflops``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from plsc.models import build_model


@dataclass(frozen=True)
class BackboneCost:
    parameters: int  # trainable (BatchNorm's running statistics are not)
    multiply_adds: int  # per image, at the image size it was measured at


def trainable_parameters(model: nn.Layer) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


def _layer_multiply_adds(layer: nn.Layer, output: paddle.Tensor) -> int:
    weight_shape = list(layer.weight.shape)
    per_output = int(np.prod(weight_shape[1:])) if isinstance(layer, nn.Conv2D) else weight_shape[0]
    return int(np.prod(output.shape)) * per_output


def multiply_adds(model: nn.Layer, image_size: int, data_format: str = "NCHW") -> int:
    """Multiply-adds of one ``image_size`` image through ``model``'s Conv2D and Linear layers, from the
    output shapes of one forward pass of a zero image (eval mode, no gradient; the mode is restored)."""
    counted = [0]

    def count(layer, inputs, output):
        counted[0] += _layer_multiply_adds(layer, output)

    def count_matmuls(layer, inputs, output):
        counted[0] += layer.matmul_multiply_adds(output)

    hooks = [layer.register_forward_post_hook(count) for layer in model.sublayers()
             if isinstance(layer, (nn.Conv2D, nn.Linear))]
    hooks += [layer.register_forward_post_hook(count_matmuls) for layer in model.sublayers()
              if hasattr(layer, "matmul_multiply_adds")]
    shape = [1, 3, image_size, image_size] if data_format == "NCHW" else [1, image_size, image_size, 3]
    training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            model(paddle.zeros(shape, dtype="float32"))
    finally:
        for hook in hooks:
            hook.remove()
        if training:
            model.train()
    return counted[0]


@contextlib.contextmanager
def scratch_on_cpu():
    """Paddle on the CPU, with its CPU random state and its parameter-name counter as they were on entry
    restored on exit: a model built here changes nothing a training run draws or names afterwards."""
    device = paddle.device.get_device()
    paddle.device.set_device("cpu")
    # The current device's generator, not device="cpu": Paddle 2.6's set_rng_state fails on a device name.
    rng_state = paddle.get_rng_state()
    try:
        with paddle.utils.unique_name.guard():
            yield
    finally:
        paddle.set_rng_state(rng_state)
        paddle.device.set_device(device)


# The backbones built inside shared_scratch_builds(), by (config, image size); None outside it.
_shared_builds: dict | None = None


@contextlib.contextmanager
def shared_scratch_builds():
    """Inside, :func:`scratch_backbone` builds each backbone once: ``plsc plan`` reads the cost and the
    memory profile of one build (a ViT-B takes 3 s to build on 2 cores). Outside, nothing is kept."""
    global _shared_builds
    outer, _shared_builds = _shared_builds, {} if _shared_builds is None else _shared_builds
    try:
        yield
    finally:
        _shared_builds = outer


def scratch_backbone(model_config, image_size: int) -> nn.Layer:
    """The backbone a plsc.config.ModelConfig describes, in float32 and NCHW (the layout changes no count
    or size), built on the CPU without changing what a training run draws or names (:func:`scratch_on_cpu`).
    Call it on the CPU (inside :func:`scratch_on_cpu`) to use it there."""
    nchw = dataclasses.replace(model_config, data_format="NCHW")
    key = (tuple(dataclasses.asdict(nchw).items()), image_size)
    if _shared_builds is not None and key in _shared_builds:
        return _shared_builds[key]
    with scratch_on_cpu():
        model = build_model(nchw, image_size=image_size)
    if _shared_builds is not None:
        _shared_builds[key] = model
    return model


def backbone_cost(model_config, image_size: int) -> BackboneCost:
    """:class:`BackboneCost` of the backbone a plsc.config.ModelConfig describes, built on the CPU in
    float32 and NCHW (the layout changes no count): 2-6 s for IResNet-50/100 on 2 cores, once per process."""
    nchw = dataclasses.replace(model_config, data_format="NCHW")
    return _backbone_cost(type(nchw), tuple(dataclasses.asdict(nchw).items()), image_size)


@functools.cache
def _backbone_cost(config_type, config_fields: tuple, image_size: int) -> BackboneCost:
    model = scratch_backbone(config_type(**dict(config_fields)), image_size)
    with scratch_on_cpu():
        return BackboneCost(trainable_parameters(model), multiply_adds(model, image_size))

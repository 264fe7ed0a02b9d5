"""Building blocks and argument checks shared by every backbone family (IResNet, MobileFaceNet).

BatchNorm uses epsilon 1e-5 and Paddle's momentum 0.9 (running = 0.9 * running + 0.1 * batch, i.e.
PyTorch's 0.1), as PLSC v2.2's backbones do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import paddle
from paddle import nn

from plsc.errors import PlscError

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
DATA_FORMATS = ("NCHW", "NHWC")


def check_backbone_args(data_format: str, width: float, input_size: int, embedding_size: int) -> None:
    """Reject arguments that would otherwise fail deep inside Paddle with an unreadable shape error."""
    if data_format not in DATA_FORMATS:
        raise PlscError(f"data_format must be NCHW or NHWC, got {data_format!r}")
    if not width > 0:
        raise PlscError(f"model width must be a positive multiplier, got {width!r}")
    if input_size < 1 or embedding_size < 1:
        raise PlscError(f"input_size and embedding_size must be positive, got {input_size}, {embedding_size}")


def scaled_channels(base: int, width: float) -> int:
    """``base * width`` rounded to a whole channel count, never below 1 (width 0.25: 64 -> 16)."""
    return max(1, int(round(base * width)))


def downsampled_side(input_size: int, halvings: int) -> int:
    """Feature-map side after ``halvings`` stride-2 'same'-padded convolutions (each gives ceil(side / 2))."""
    side = input_size
    for _ in range(halvings):
        side = math.ceil(side / 2)
    return side


def to_channels_first(x: paddle.Tensor, data_format: str) -> paddle.Tensor:
    return paddle.transpose(x, [0, 3, 1, 2]) if data_format == "NHWC" else x


class Plsc22Name(NamedTuple):
    """Where one plsc tensor lives in PLSC v2.2."""

    key: str  # canonical structured key of PLSC v2.2's dynamic-mode state_dict()
    ckpt_name: str  # Paddle tensor name = file stem in PLSC v2.2 checkpoints (``<ckpt_name>.pdparam``)
    static_name: str | None  # name in PLSC v2.2 static-mode checkpoints; None where PLSC has no static model


def batch_norm(channels: int, data_format: str) -> nn.BatchNorm2D:
    return nn.BatchNorm2D(channels, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, data_format=data_format)


class ConvBN(nn.Layer):
    """Bias-free conv -> BN -> optional PReLU; 'same' padding for odd kernels unless given (MobileFaceNet's
    global depthwise conv: 0). Sub-layers ``conv``, ``bn`` [, ``prelu``]: the state_dict keys the PLSC v2.2
    name maps walk."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        data_format: str,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        prelu: bool = False,
    ):
        super().__init__()
        # Paddle's default conv initialiser is already Kaiming-normal (fan in), what ResNets train well with.
        self.conv = nn.Conv2D(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=kernel // 2 if padding is None else padding,
            groups=groups,
            bias_attr=False,
            data_format=data_format,
        )
        self.bn = batch_norm(out_channels, data_format)
        self.prelu = nn.PReLU(out_channels, init=0.25, data_format=data_format) if prelu else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)

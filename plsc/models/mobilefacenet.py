"""MobileFaceNet, tensor-for-tensor compatible with PLSC v2.2's MobileFaceNet_128.

Layout (input 112 px; every conv is bias-free and followed by BN, epsilon 1e-5):

* stem: conv 3x3 stride 2 -> BN -> PReLU (64 ch), then depthwise 3x3 -> BN -> PReLU;
* 15 inverted-residual bottlenecks ``1x1 expand -> BN -> PReLU -> depthwise 3x3(stride) -> BN -> PReLU ->
  1x1 project -> BN`` (+ identity when stride 1 and channels unchanged), in groups (expansion, out channels,
  repeats, first stride): (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1);
* head: 1x1 conv to 512 -> BN -> PReLU, global depthwise conv (kernel = final feature side, 7 at 112 px)
  -> BN, [dropout], 1x1 conv to the embedding -> BN, flatten.
"""

from __future__ import annotations

import re

import paddle
from paddle import nn

from plsc.models.layers import ConvBN, Plsc22Name, check_backbone_args, downsampled_side, scaled_channels

STEM_CHANNELS = 64
# (expansion, out channels, repeats, stride of the first repeat)
BOTTLENECK_GROUPS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
HEAD_CHANNELS = 512
# stride-2 layers: the stem conv and the first bottleneck of three groups
NUM_HALVINGS = 1 + sum(1 for group in BOTTLENECK_GROUPS if group[3] == 2)


class Bottleneck(nn.Layer):
    """MobileNetV2 inverted residual with PReLU; linear (no activation) after the projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int, data_format: str):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBN(in_channels, hidden, 1, data_format, prelu=True)
        self.depthwise = ConvBN(hidden, hidden, 3, data_format, stride=stride, groups=hidden, prelu=True)
        self.project = ConvBN(hidden, out_channels, 1, data_format)
        self.use_identity = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_identity else out


class MobileFaceNet(nn.Layer):
    """MobileFaceNet: float32 images [N, 3, S, S] (or [N, S, S, 3] for NHWC) -> raw embeddings [N, E]."""

    def __init__(
        self,
        embedding_size: int = 128,
        width: float = 1.0,
        data_format: str = "NCHW",
        dropout: float = 0.0,
        input_size: int = 112,
    ):
        super().__init__()
        check_backbone_args(data_format, width, input_size, embedding_size)
        stem = scaled_channels(STEM_CHANNELS, width)
        self.stem = ConvBN(3, stem, 3, data_format, stride=2, prelu=True)
        self.stem_depthwise = ConvBN(stem, stem, 3, data_format, groups=stem, prelu=True)
        self.blocks, channels = self._make_blocks(stem, width, data_format)
        head = scaled_channels(HEAD_CHANNELS, width)
        self.head_expand = ConvBN(channels, head, 1, data_format, prelu=True)
        # The global depthwise conv (GDC) replaces pooling: its kernel covers the whole final feature map.
        side = downsampled_side(input_size, NUM_HALVINGS)
        self.head_gdc = ConvBN(head, head, side, data_format, groups=head, padding=0)
        # PLSC takes a dropout argument for every backbone; it has no parameters, so where it sits does not
        # affect checkpoints. Here it drops GDC features before the embedding projection, as IResNet does.
        self.dropout = nn.Dropout(dropout)
        self.embedding = ConvBN(head, embedding_size, 1, data_format)

    @staticmethod
    def _make_blocks(in_channels: int, width: float, data_format: str) -> tuple[nn.Sequential, int]:
        blocks = []
        for expansion, base_channels, repeats, first_stride in BOTTLENECK_GROUPS:
            out_channels = scaled_channels(base_channels, width)
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                blocks.append(Bottleneck(in_channels, out_channels, stride, expansion, data_format))
                in_channels = out_channels
        return nn.Sequential(*blocks), in_channels

    def forward(self, x):
        x = self.stem_depthwise(self.stem(x))
        x = self.head_gdc(self.head_expand(self.blocks(x)))
        x = self.embedding(self.dropout(x))
        return paddle.flatten(x, start_axis=1)  # [N, E, 1, 1] and [N, 1, 1, E] both flatten to [N, E]


def mobilefacenet(
    embedding_size: int = 128,
    width: float = 1.0,
    data_format: str = "NCHW",
    dropout: float = 0.0,
    input_size: int = 112,
) -> MobileFaceNet:
    """MobileFaceNet; PLSC v2.2 calls it MobileFaceNet_128 after its default embedding size."""
    return MobileFaceNet(embedding_size, width, data_format, dropout, input_size)


# ----------------------------------------------------------------------------------------------------
# PLSC v2.2 names

# plsc sub-layer path -> PLSC v2.2 path. PLSC's bottleneck is one Sequential whose indices 0..7 are
# conv, BN, PReLU (expand), conv, BN, PReLU (depthwise), conv, BN (project).
_PLSC22_PATHS = (
    (r"^stem\.", "conv1."),
    (r"^stem_depthwise\.", "dw_conv1."),
    (r"^head_expand\.", "conv2."),
    (r"^head_gdc\.", "linear7."),
    (r"^embedding\.", "linear1."),
    (r"^blocks\.(\d+)\.expand\.conv\.", r"blocks.\1.conv.0."),
    (r"^blocks\.(\d+)\.expand\.bn\.", r"blocks.\1.conv.1."),
    (r"^blocks\.(\d+)\.expand\.prelu\.", r"blocks.\1.conv.2."),
    (r"^blocks\.(\d+)\.depthwise\.conv\.", r"blocks.\1.conv.3."),
    (r"^blocks\.(\d+)\.depthwise\.bn\.", r"blocks.\1.conv.4."),
    (r"^blocks\.(\d+)\.depthwise\.prelu\.", r"blocks.\1.conv.5."),
    (r"^blocks\.(\d+)\.project\.conv\.", r"blocks.\1.conv.6."),
    (r"^blocks\.(\d+)\.project\.bn\.", r"blocks.\1.conv.7."),
)


def _plsc22_key(key: str) -> str:
    for pattern, replacement in _PLSC22_PATHS:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise KeyError(f"no PLSC v2.2 counterpart for MobileFaceNet tensor {key!r}")


def plsc22_names(model: MobileFaceNet) -> dict[str, Plsc22Name]:
    """``{plsc state_dict key: Plsc22Name}`` in state_dict order, for importing PLSC v2.2 MobileFaceNet_128.

    PLSC v2.2 names every MobileFaceNet tensor automatically, in creation order: conv weights and BN
    gamma/beta share one counter (``create_parameter_<n>.w_0``), BN running mean/variance are
    ``batch_norm2d_<m>.w_1``/``.w_2`` and PReLU alphas ``p_re_lu_<k>.w_0``. PLSC v2.2 has no static
    MobileFaceNet, so ``static_name`` is None.
    """
    counters = {"create_parameter": 0, "batch_norm2d": 0, "p_re_lu": 0}

    def auto_name(kind: str, suffix: str = "w_0", advance: bool = True) -> str:
        name = f"{kind}_{counters[kind]}.{suffix}"
        counters[kind] += advance
        return name

    names = {}
    for key in model.state_dict():
        if key.endswith("._mean"):
            ckpt_name = auto_name("batch_norm2d", "w_1", advance=False)
        elif key.endswith("._variance"):  # the last tensor of a BN: the next BN gets the next number
            ckpt_name = auto_name("batch_norm2d", "w_2")
        elif key.endswith("._weight"):
            ckpt_name = auto_name("p_re_lu")
        else:
            ckpt_name = auto_name("create_parameter")
        names[key] = Plsc22Name(_plsc22_key(key), ckpt_name, None)
    return names

"""IResNet ("improved ResNet" of ArcFace) backbones, tensor-for-tensor compatible with PLSC v2.2's FresResNet.

Layout (the insightface IResNet, as PLSC v2.2 builds FresResNet50/100):

* stem: conv 3x3 stride 1 -> BN -> PReLU (the 112 px input keeps its size);
* four stages of basic blocks ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` plus the identity,
  where the first block of every stage has stride 2 and a ``conv1x1(stride 2) -> BN`` shortcut;
* head: BN over the feature map -> dropout -> flatten (channel-major) -> Linear -> BN1d (affine).

All convolutions are bias-free (layers shared with MobileFaceNet: :mod:`plsc.models.layers`).
``state_dict()`` lists the tensors in PLSC v2.2's creation order, and :func:`plsc22_names` gives each one's
PLSC v2.2 key, checkpoint file stem and static-mode name.
"""

from __future__ import annotations

import paddle
from paddle import nn

from plsc.models.layers import (
    BN_EPSILON,
    BN_MOMENTUM,
    ConvBN,
    Plsc22Name,
    batch_norm,
    check_backbone_args,
    downsampled_side,
    scaled_channels,
    to_channels_first,
)

STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_CHANNELS = (64, 128, 256, 512)


class IBasicBlock(nn.Layer):
    """Pre-BN basic block; the stride sits on the second conv, and there is no activation after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, data_format: str):
        super().__init__()
        # Creation order = state_dict order = PLSC v2.2's order: bn_in, conv_a, prelu, conv_b, shortcut.
        self.bn_in = batch_norm(in_channels, data_format)
        self.conv_a = ConvBN(in_channels, out_channels, 3, data_format)
        self.prelu = nn.PReLU(out_channels, init=0.25, data_format=data_format)
        self.conv_b = ConvBN(out_channels, out_channels, 3, data_format, stride=stride)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvBN(in_channels, out_channels, 1, data_format, stride=stride)

    def forward(self, x):
        residual = self.conv_b(self.prelu(self.conv_a(self.bn_in(x))))
        identity = x if self.shortcut is None else self.shortcut(x)
        return residual + identity


class EmbeddingHead(nn.Layer):
    """BN -> dropout -> flatten -> Linear -> BN1d (PLSC's fc_type 'E').

    It always runs channels-first, so the Linear rows follow a channel-major flatten of [C, side, side]
    whatever the backbone's data_format: the row order of PLSC v2.2's ``fc.w_0`` for NCHW and NHWC alike.
    """

    def __init__(self, channels: int, side: int, embedding_size: int, dropout: float, data_format: str):
        super().__init__()
        self.data_format = data_format
        self.bn_features = batch_norm(channels, "NCHW")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * side * side, embedding_size)
        self.bn_embedding = nn.BatchNorm1D(embedding_size, momentum=BN_MOMENTUM, epsilon=BN_EPSILON)

    def forward(self, x):
        x = self.bn_features(to_channels_first(x, self.data_format))
        x = paddle.flatten(self.dropout(x), start_axis=1)
        return self.bn_embedding(self.fc(x))


class IResNet(nn.Layer):
    """IResNet backbone: float32 images [N, 3, S, S] (or [N, S, S, 3] for NHWC) -> raw embeddings [N, E]."""

    def __init__(
        self,
        stage_blocks: tuple[int, ...],
        embedding_size: int = 512,
        width: float = 1.0,
        data_format: str = "NCHW",
        dropout: float = 0.0,
        input_size: int = 112,
    ):
        super().__init__()
        check_backbone_args(data_format, width, input_size, embedding_size)
        self.data_format = data_format
        channels = [scaled_channels(c, width) for c in STAGE_CHANNELS]
        self.stem = ConvBN(3, channels[0], 3, data_format)
        self.stem_prelu = nn.PReLU(channels[0], init=0.25, data_format=data_format)
        self.stages = nn.LayerList()
        in_channels = channels[0]
        for out_channels, num_blocks in zip(channels, stage_blocks, strict=True):
            self.stages.append(self._make_stage(in_channels, out_channels, num_blocks, data_format))
            in_channels = out_channels
        side = downsampled_side(input_size, halvings=len(stage_blocks))
        self.head = EmbeddingHead(in_channels, side, embedding_size, dropout, data_format)

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, num_blocks: int, data_format: str) -> nn.Sequential:
        blocks = [IBasicBlock(in_channels, out_channels, 2, data_format)]
        blocks += [IBasicBlock(out_channels, out_channels, 1, data_format) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.stem_prelu(self.stem(x))
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def _iresnet(depth: int):
    def build(
        embedding_size: int = 512,
        width: float = 1.0,
        data_format: str = "NCHW",
        dropout: float = 0.0,
        input_size: int = 112,
    ) -> IResNet:
        return IResNet(STAGE_BLOCKS[depth], embedding_size, width, data_format, dropout, input_size)

    build.__name__ = build.__qualname__ = f"iresnet{depth}"
    build.__doc__ = f"IResNet-{depth}, stage blocks {list(STAGE_BLOCKS[depth])}."
    return build


iresnet18 = _iresnet(18)
iresnet34 = _iresnet(34)
iresnet50 = _iresnet(50)
iresnet100 = _iresnet(100)
iresnet200 = _iresnet(200)


# ----------------------------------------------------------------------------------------------------
# PLSC v2.2 names

# (plsc BN suffix, PLSC file-stem suffix, PLSC static suffix); the order is the state_dict order of a BN.
_BN_TENSORS = (
    ("weight", "scale", "w_0"),
    ("bias", "offset", "b_0"),
    ("_mean", "mean", "w_1"),
    ("_variance", "variance", "w_2"),
)


class _Plsc22Namer:
    """Names tensors the way PLSC v2.2 does, walking the layers in creation order.

    Dynamic FresResNet gives every tensor an explicit name except PReLU (auto ``p_re_lu_<n>``); static mode
    names everything automatically (``conv2d_<n>``, ``batch_norm_<n>``, ``prelu_<n>``, ``fc_<n>``), so both
    need per-kind counters that advance in creation order.
    """

    def __init__(self):
        self.names: dict[str, Plsc22Name] = {}
        self.counters = {"p_re_lu": 0, "conv2d": 0, "batch_norm": 0, "prelu": 0, "fc": 0}

    def _next(self, kind: str) -> int:
        self.counters[kind] += 1
        return self.counters[kind] - 1

    def bn(self, ours: str, theirs: str, stem: str) -> None:
        static = f"batch_norm_{self._next('batch_norm')}"
        for suffix, file_suffix, static_suffix in _BN_TENSORS:
            self.names[f"{ours}.{suffix}"] = Plsc22Name(
                f"{theirs}.{suffix}", f"{stem}_{file_suffix}", f"{static}.{static_suffix}"
            )

    def conv_bn(self, ours: str, theirs: str, conv_stem: str, bn_stem: str) -> None:
        static = f"conv2d_{self._next('conv2d')}.w_0"
        self.names[f"{ours}.conv.weight"] = Plsc22Name(f"{theirs}._conv.weight", conv_stem, static)
        self.bn(f"{ours}.bn", f"{theirs}._batch_norm", bn_stem)

    def prelu(self, ours: str, theirs: str) -> None:
        self.names[f"{ours}._weight"] = Plsc22Name(
            f"{theirs}._weight", f"p_re_lu_{self._next('p_re_lu')}.w_0", f"prelu_{self._next('prelu')}.w_0"
        )

    def linear(self, ours: str, theirs: str) -> None:
        static = f"fc_{self._next('fc')}"
        for suffix, tensor in (("weight", "w_0"), ("bias", "b_0")):
            name = Plsc22Name(f"{theirs}.{suffix}", f"fc.{tensor}", f"{static}.{tensor}")
            self.names[f"{ours}.{suffix}"] = name


def _name_block(namer: _Plsc22Namer, ours: str, theirs: str, unit: str, block: IBasicBlock) -> None:
    """PLSC calls the residual convs branch2a/2b, the shortcut branch1, the first BN ``bn_<unit>_before``."""

    def conv_bn(layer: str, plsc_layer: str, branch: str) -> None:
        conv_stem, bn_stem = f"res{unit}_{branch}_weights", f"bn{unit}_{branch}"
        namer.conv_bn(f"{ours}.{layer}", f"{theirs}.{plsc_layer}", conv_stem, bn_stem)

    namer.bn(f"{ours}.bn_in", f"{theirs}._batch_norm", f"bn_{unit}_before")
    conv_bn("conv_a", "conv0", "branch2a")
    namer.prelu(f"{ours}.prelu", f"{theirs}.prelu")
    conv_bn("conv_b", "conv1", "branch2b")
    if block.shortcut is not None:
        conv_bn("shortcut", "short", "branch1")


def plsc22_names(model: IResNet) -> dict[str, Plsc22Name]:
    """``{plsc state_dict key: Plsc22Name}`` in state_dict order, for importing PLSC v2.2 FresResNet weights.

    Verified against PLSC v2.2 for FresResNet50 and FresResNet100 (every key, file stem and static name).
    Other depths follow the same rule; PLSC v2.2 never shipped them. Block ``i`` of stage ``s`` (2..5) is unit
    ``res{s}{chr(97 + i)}``, so FresResNet100's stage 4 runs past 'z' into '{', '|', '}', '~'. Shapes are
    PLSC's at width 1; PReLU alphas are [C] here and in dynamic checkpoints but 4-D in static ones.
    """
    namer = _Plsc22Namer()
    namer.conv_bn("stem", "conv", "conv1_weights", "bn_conv1")
    namer.prelu("stem_prelu", "prelu")
    block_index = 0
    for stage_index, stage in enumerate(model.stages):
        for unit_index, block in enumerate(stage):
            unit = f"{stage_index + 2}{chr(97 + unit_index)}"
            _name_block(namer, f"stages.{stage_index}.{unit_index}", f"block_list.{block_index}", unit, block)
            block_index += 1
    namer.bn("head.bn_features", "fc._batch_norm_1", "bn_fc_1")
    namer.linear("head.fc", "fc.fc")
    namer.bn("head.bn_embedding", "fc._batch_norm_2", "bn_fc_2")
    return namer.names

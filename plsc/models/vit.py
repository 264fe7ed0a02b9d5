"""Vision Transformers for 112 x 112 faces, as insightface's arcface_torch builds vit_t, vit_s, vit_b, vit_l.

Layout (recognition/arcface_torch/backbones/vit.py and backbones/__init__.py:39-94):

* patch embedding: one 9 x 9 convolution of stride 9 (with bias), so a 112 px face is a 12 x 12 grid of
  144 patches (the last 4 pixel rows and columns fall outside every patch), plus a learned position
  embedding per patch; there is no class token;
* ``depth`` pre-norm blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))`` with LayerNorm epsilon 1e-5, attention
  of 8 heads whose query/key/value projection has no bias (the output projection has one), scale
  head_dim ** -0.5, and an MLP of hidden width 4 x dim with ReLU6 between its two biased Linears;
* a final LayerNorm, then the feature head on all patch tokens flattened (token-major):
  Linear(144 * dim -> dim, no bias) -> BN1d(eps 2e-5) -> Linear(dim -> embedding, no bias) -> BN1d(eps 2e-5).

Training-only regularisers: stochastic depth (drop path) on both residual branches, its rate rising
linearly from 0 at the first block to ``drop_path`` at the last; and patch masking, which feeds the blocks
a random ``int(patches * (1 - mask_ratio))`` of each image's patches and puts a learned mask token in the
dropped places after the final LayerNorm, so the feature head always sees the full grid.

=========  ===  =====  =====  =========  ==========  ======================
name       dim  depth  heads  drop path  mask ratio  GFLOPs (README table)
=========  ===  =====  =====  =========  ==========  ======================
vit_t      256  12     8      0.1        0.1         1.5
vit_s      512  12     8      0.1        0.1         5.7
vit_b      512  24     8      0.1        0.1         11.4
vit_l      768  24     8      0.05       0.1         25.3
=========  ===  =====  =====  =========  ==========  ======================

arcface_torch's only ViT-L is ``vit_l_dp005_mask_005`` (backbones/__init__.py:88-94): drop path 0.05 and a
declared mask ratio 0.05, but its forward masks with ``random_masking``'s default ratio 0.1 whenever the
declared ratio is above 0 (backbones/vit.py forward_features calls ``self.random_masking(x)`` without the
ratio), so 0.1 is what it trains with and what vit_l uses here.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
from paddle import nn

from plsc.errors import PlscError
from plsc.models.layers import BN_MOMENTUM, check_backbone_args, to_channels_first

PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4
LN_EPSILON = 1e-5
FEATURE_BN_EPSILON = 2e-5  # arcface_torch's feature head, unlike the 1e-5 of plsc's CNN backbones
# timm's trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. +-100 std: in effect a plain normal.
_WEIGHT_INIT = nn.initializer.Normal(std=0.02)


@dataclass(frozen=True)
class VitArch:
    dim: int
    depth: int
    drop_path: float
    mask_ratio: float


ARCHS = {
    "vit_t": VitArch(dim=256, depth=12, drop_path=0.1, mask_ratio=0.1),
    "vit_s": VitArch(dim=512, depth=12, drop_path=0.1, mask_ratio=0.1),
    "vit_b": VitArch(dim=512, depth=24, drop_path=0.1, mask_ratio=0.1),
    "vit_l": VitArch(dim=768, depth=24, drop_path=0.05, mask_ratio=0.1),
}


def scaled_dim(dim: int, width: float) -> int:
    """``dim * width`` rounded to a whole number of heads (at least one channel per head)."""
    return max(NUM_HEADS, int(round(dim * width / NUM_HEADS)) * NUM_HEADS)


def patch_grid(input_size: int) -> int:
    """Patches per side: a stride-9 9 x 9 convolution without padding covers ``input_size // 9``."""
    return input_size // PATCH_SIZE


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    bias_attr = nn.initializer.Constant(0.0) if bias else False
    return nn.Linear(in_features, out_features, weight_attr=_WEIGHT_INIT, bias_attr=bias_attr)


def drop_path(x: paddle.Tensor, rate: float, training: bool) -> paddle.Tensor:
    """Zero a residual branch for a random ``rate`` of the samples, scaling the rest by 1 / (1 - rate)."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    # paddle.shape, not x.shape: the batch size is only known at run time in a static graph.
    noise = paddle.rand(paddle.shape(x)[:1], dtype=x.dtype).reshape([-1] + [1] * (x.ndim - 1))
    return x * paddle.floor(keep + noise) / keep


class SelfAttention(nn.Layer):
    """Multi-head self-attention. Its two token-by-token products (queries x keys, weights x values) are
    not Linear layers, so it reports their multiply-adds itself (:meth:`matmul_multiply_adds`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.head_dim = dim // NUM_HEADS
        self.qkv = _linear(dim, 3 * dim, bias=False)
        self.proj = _linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape([-1, tokens, 3, NUM_HEADS, self.head_dim]).transpose([2, 0, 3, 1, 4])
        query, key, value = qkv[0], qkv[1], qkv[2]
        weights = paddle.matmul(query, key, transpose_y=True) * self.head_dim**-0.5
        mixed = paddle.matmul(nn.functional.softmax(weights, axis=-1), value)
        return self.proj(mixed.transpose([0, 2, 1, 3]).reshape([-1, tokens, dim]))

    @staticmethod
    def matmul_multiply_adds(output: paddle.Tensor) -> int:
        """Output [N, T, D]: each of the two products is T x T x D multiply-adds per image (all heads)."""
        batch, tokens, dim = output.shape
        return 2 * batch * tokens * tokens * dim


class Block(nn.Layer):
    def __init__(self, dim: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, epsilon=LN_EPSILON)
        self.attn = SelfAttention(dim)
        self.norm2 = nn.LayerNorm(dim, epsilon=LN_EPSILON)
        self.fc1 = _linear(dim, MLP_RATIO * dim)
        self.act = nn.ReLU6()
        self.fc2 = _linear(MLP_RATIO * dim, dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        mlp = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + drop_path(mlp, self.drop_path_rate, self.training)


class VisionTransformer(nn.Layer):
    """arcface_torch's face ViT: float32 images [N, 3, S, S] (or [N, S, S, 3] for NHWC, transposed on entry:
    the single patch convolution gains nothing from channels-last) -> raw embeddings [N, E]."""

    def __init__(
        self,
        arch: VitArch,
        embedding_size: int = 512,
        width: float = 1.0,
        data_format: str = "NCHW",
        dropout: float = 0.0,
        input_size: int = 112,
    ):
        super().__init__()
        check_backbone_args(data_format, width, input_size, embedding_size)
        side = patch_grid(input_size)
        if side < 1:
            raise PlscError(f"a ViT needs images of at least {PATCH_SIZE} px (one patch), got {input_size}")
        if not 0 <= arch.mask_ratio < 1 or not 0 <= arch.drop_path < 1:
            raise PlscError(f"ViT mask ratio and drop path must be in [0, 1), got {arch}")
        dim = scaled_dim(arch.dim, width)
        self.data_format = data_format
        self.num_patches = side * side
        self.mask_ratio = arch.mask_ratio
        self.patch_embed = nn.Conv2D(3, dim, PATCH_SIZE, stride=PATCH_SIZE)
        self.pos_embed = self.create_parameter([1, self.num_patches, dim], default_initializer=_WEIGHT_INIT)
        rates = [arch.drop_path * i / max(1, arch.depth - 1) for i in range(arch.depth)]
        self.blocks = nn.LayerList([Block(dim, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim, epsilon=LN_EPSILON)
        self.mask_token = self.create_parameter([1, 1, dim], default_initializer=_WEIGHT_INIT)
        # PLSC passes every backbone a dropout; here it drops flattened tokens before the feature head, as
        # IResNet's does before its embedding Linear (arcface_torch's ViTs train without dropout).
        self.dropout = nn.Dropout(dropout)
        self.feature = _linear(self.num_patches * dim, dim, bias=False)
        self.feature_bn = nn.BatchNorm1D(dim, momentum=BN_MOMENTUM, epsilon=FEATURE_BN_EPSILON)
        self.embedding = _linear(dim, embedding_size, bias=False)
        self.embedding_bn = nn.BatchNorm1D(embedding_size, momentum=BN_MOMENTUM, epsilon=FEATURE_BN_EPSILON)

    def kept_patches(self) -> int:
        """Patches each image keeps in a training step (all of them in evaluation)."""
        return int(self.num_patches * (1 - self.mask_ratio)) if self.training else self.num_patches

    def forward(self, x):
        x = self.patch_embed(to_channels_first(x, self.data_format))
        tokens = x.flatten(2).transpose([0, 2, 1]) + self.pos_embed  # [N, patches, dim], row-major grid
        masking = self.training and self.kept_patches() < self.num_patches
        if masking:
            # a random permutation of the patches per image
            order = paddle.argsort(paddle.rand(paddle.shape(tokens)[:2]), axis=1)
            x = _gather_tokens(tokens, order[:, : self.kept_patches()])
        else:
            x = tokens
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if masking:
            dropped = paddle.zeros_like(tokens[:, self.kept_patches():]) + self.mask_token
            x = _gather_tokens(paddle.concat([x, dropped], axis=1), paddle.argsort(order, axis=1))
        x = self.dropout(paddle.flatten(x, start_axis=1))
        return self.embedding_bn(self.embedding(self.feature_bn(self.feature(x))))


def _gather_tokens(tokens: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """``tokens[n, index[n, k], :]`` for each image n: [N, T, D] and [N, K] -> [N, K, D]."""
    return paddle.take_along_axis(tokens, index.unsqueeze(-1).tile([1, 1, tokens.shape[-1]]), axis=1)


def _vit(name: str):
    def build(
        embedding_size: int = 512,
        width: float = 1.0,
        data_format: str = "NCHW",
        dropout: float = 0.0,
        input_size: int = 112,
        mask_ratio: float | None = None,
        drop_path: float | None = None,
    ) -> VisionTransformer:
        arch = ARCHS[name]
        arch = VitArch(
            arch.dim,
            arch.depth,
            arch.drop_path if drop_path is None else drop_path,
            arch.mask_ratio if mask_ratio is None else mask_ratio,
        )
        return VisionTransformer(arch, embedding_size, width, data_format, dropout, input_size)

    build.__name__ = name
    build.__doc__ = f"arcface_torch's {name}; ``mask_ratio`` / ``drop_path`` None: its own ({ARCHS[name]})."
    return build


vit_t = _vit("vit_t")
vit_s = _vit("vit_s")
vit_b = _vit("vit_b")
vit_l = _vit("vit_l")

"""The face ViTs (vit_t/s/b/l) against insightface arcface_torch's architecture, counted independently.

arcface_torch (recognition/arcface_torch/backbones/__init__.py:39-94, backbones/vit.py) builds them for 112 px
faces with 9 px patches (a 12 x 12 grid), 8 heads, MLP ratio 4, qkv without bias, and the feature head
Linear(144 * dim -> dim, no bias) -> BN -> Linear(dim -> 512, no bias) -> BN. From those facts alone, at
``get_model(name, num_features=512)``:

=====  ============================  ===============================================  ================
name   trainable parameters          multiply-adds per image                          README (GFLOPs)
=====  ============================  ===============================================  ================
vit_t  19,137,792                    1,504,882,688                                    1.5
vit_s  76,023,296                    5,746,548,736                                    5.7
vit_b  113,833,472                   11,437,170,688                                   11.4
vit_l  255,684,352                   25,337,794,560                                   25.3
=====  ============================  ===============================================  ================

(the numbers the closed forms below give; the tests compare the built models to the closed forms).
"""

from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from plsc import cli
from plsc.config import ConfigError, load_config
from plsc.errors import PlscError
from plsc.models import MODELS, build_model
from plsc.models.cost import multiply_adds, trainable_parameters
from plsc.models.vit import drop_path

# arcface_torch's architecture facts (backbones/__init__.py:39-94): (embed_dim, depth)
ARCFACE_VITS = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}
README_GFLOPS = {"vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3}  # arcface_torch README.md:137-140
PATCH, MLP_RATIO = 9, 4


def closed_form_parameters(dim: int, depth: int, image: int = 112, embedding: int = 512) -> int:
    patches = (image // PATCH) ** 2
    patch_embed = 3 * PATCH * PATCH * dim + dim  # conv weight + bias
    tokens = patches * dim + dim  # position embedding + mask token
    attention = dim * 3 * dim + dim * dim + dim  # qkv (no bias) + proj (bias)
    mlp = dim * MLP_RATIO * dim + MLP_RATIO * dim + MLP_RATIO * dim * dim + dim
    block = 2 * 2 * dim + attention + mlp  # two LayerNorms
    # two bias-free Linears, each followed by a BN's affine pair
    head = patches * dim * dim + 2 * dim + dim * embedding + 2 * embedding
    return patch_embed + tokens + depth * block + 2 * dim + head  # + final LayerNorm


def closed_form_multiply_adds(dim: int, depth: int, image: int = 112, embedding: int = 512) -> int:
    patches = (image // PATCH) ** 2
    linears = patches * (3 * dim * dim + dim * dim + 2 * MLP_RATIO * dim * dim)
    products = 2 * patches * patches * dim  # queries x keys and weights x values, all heads together
    head = patches * dim * dim + dim * embedding
    return patches * 3 * PATCH * PATCH * dim + depth * (linears + products) + head


@pytest.mark.parametrize("name", list(ARCFACE_VITS))
def test_closed_form_multiply_adds_are_the_published_gflops(name):
    assert round(closed_form_multiply_adds(*ARCFACE_VITS[name]) / 1e9, 1) == README_GFLOPS[name]


@pytest.mark.parametrize("name", list(ARCFACE_VITS))
def test_parameters_at_full_size_are_arcface_torchs(name):
    with paddle.LazyGuard():  # shapes without memory: vit_l is 1 GB of float32
        model = MODELS[name](embedding_size=512, input_size=112)
    assert trainable_parameters(model) == closed_form_parameters(*ARCFACE_VITS[name])


def test_vit_t_at_full_size_embeds_and_counts_its_multiply_adds():
    paddle.seed(0)
    model = MODELS["vit_t"](embedding_size=512, input_size=112)
    assert multiply_adds(model, 112) == closed_form_multiply_adds(256, 12)
    for training in (True, False):
        model.train() if training else model.eval()
        assert model(paddle.rand([2, 3, 112, 112])).shape == [2, 512]


@pytest.mark.parametrize("name", list(ARCFACE_VITS))
@pytest.mark.parametrize("image", [32, 56])
def test_multiply_adds_of_tiny_widths_follow_the_closed_form(name, image):
    dim, depth = ARCFACE_VITS[name]
    model = MODELS[name](embedding_size=16, width=1 / 16, input_size=image)
    assert trainable_parameters(model) == closed_form_parameters(dim // 16, depth, image, 16)
    assert multiply_adds(model, image) == closed_form_multiply_adds(dim // 16, depth, image, 16)


# --- patch masking and drop path ----------------------------------------------------------------------------


def tiny_vit(mask_ratio=None, drop=0.0, name="vit_t", **options):
    paddle.seed(1)
    return MODELS[name](embedding_size=16, width=1 / 16, input_size=56, mask_ratio=mask_ratio,
                        drop_path=drop, **options)


def feature_head_input(model, images):
    """The [N, patches, dim] tokens the feature head flattens, captured by a hook."""
    seen = []
    hook = model.feature.register_forward_pre_hook(lambda layer, inputs: seen.append(inputs[0]))
    model(images)
    hook.remove()
    return seen[0].reshape([images.shape[0], model.num_patches, -1]).numpy()


def masked_positions(model, tokens):
    return np.all(tokens == model.mask_token.numpy()[0], axis=-1)  # [N, patches]


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_training_masks_the_ratio_of_patches_and_evaluation_none(ratio):
    model = tiny_vit(ratio)
    images = paddle.rand([6, 3, 56, 56])
    patches = model.num_patches  # 6 x 6 at 56 px
    model.train()
    masked = masked_positions(model, feature_head_input(model, images))
    assert (masked.sum(axis=1) == patches - int(patches * (1 - ratio))).all()
    assert len({tuple(row) for row in masked}) > 1  # drawn per image
    model.eval()
    assert not masked_positions(model, feature_head_input(model, images)).any()


def test_kept_patches_go_through_the_blocks_on_their_own_and_back_to_their_places():
    """Training with masking = the evaluation-mode blocks run on each image's kept patches alone (attention
    over the kept set), with every kept patch's result at its own grid position."""
    model = tiny_vit(0.5)
    images = paddle.rand([3, 3, 56, 56])
    model.train()
    tokens = feature_head_input(model, images)
    kept = ~masked_positions(model, tokens)
    model.eval()
    with paddle.no_grad():
        embedded = model.patch_embed(images).flatten(2).transpose([0, 2, 1]) + model.pos_embed
        for n in range(3):
            x = embedded[n:n + 1][:, paddle.to_tensor(np.flatnonzero(kept[n]))]
            for block in model.blocks:
                x = block(x)
            np.testing.assert_allclose(tokens[n][kept[n]], model.norm(x).numpy()[0], rtol=1e-4, atol=1e-5)


def test_drop_path_rates_rise_linearly_to_the_setting():
    assert [b.drop_path_rate for b in tiny_vit(drop=0.2).blocks] == pytest.approx(np.linspace(0, 0.2, 12))
    assert tiny_vit(drop=None, name="vit_l").blocks[-1].drop_path_rate == 0.05  # arcface_torch vit_l
    assert tiny_vit(drop=None).blocks[-1].drop_path_rate == 0.1
    assert tiny_vit(None).mask_ratio == 0.1 and tiny_vit(None, name="vit_l").mask_ratio == 0.1


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    paddle.seed(2)
    x = paddle.ones([4000, 3, 5])
    out = drop_path(x, 0.3, training=True).numpy()
    per_sample = out.reshape(4000, -1)
    assert np.isclose(per_sample, 0.0).sum() + np.isclose(per_sample, 1 / 0.7).sum() == per_sample.size
    assert (per_sample.min(axis=1) == per_sample.max(axis=1)).all()
    dropped = (per_sample[:, 0] == 0).mean()
    assert abs(dropped - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 4000)  # 5 binomial standard deviations
    assert drop_path(x, 0.3, training=False) is x


def test_nhwc_input_gives_the_nchw_embedding():
    nchw = tiny_vit(0.1)
    nhwc = tiny_vit(0.1, data_format="NHWC")
    nhwc.set_state_dict(nchw.state_dict())
    nchw.eval(), nhwc.eval()
    images = paddle.rand([2, 3, 56, 56])
    np.testing.assert_allclose(nhwc(images.transpose([0, 2, 3, 1])).numpy(), nchw(images).numpy(), atol=1e-5)


# --- settings ----------------------------------------------------------------------------------------------


def test_settings_reach_the_model_and_are_refused_for_cnns():
    config = load_config(overrides=["model.name=vit_s", "model.width=0.0625", "model.patch_mask_ratio=0.25",
                                    "model.drop_path=0.0"])
    model = build_model(config.model, image_size=32)
    assert model.mask_ratio == 0.25 and max(b.drop_path_rate for b in model.blocks) == 0.0
    default = load_config(overrides=["model.name=vit_s", "model.patch_mask_ratio=null"]).model
    assert default.patch_mask_ratio is None
    with pytest.raises(PlscError, match="model.patch_mask_ratio apply to ViT models only"):
        build_model(load_config(overrides=["model.patch_mask_ratio=0.2"]).model, image_size=32)
    with pytest.raises(ConfigError, match=r"model.drop_path must be in \[0, 1\)"):
        load_config(overrides=["model.drop_path=1.0"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(overrides=["model.patch_mask_ratio=lots"])
    with pytest.raises(PlscError, match="at least 9 px"):
        MODELS["vit_t"](input_size=8)


# --- the commands ------------------------------------------------------------------------------------------

def mini_config(tiny_dir):
    return tiny_dir.parent.parent / "configs" / "cpu" / "mini.yaml"


TINY_VIT = ["model.name=vit_t", "model.width=0.0625", "model.embedding_size=16", "data.image_size=32"]


def test_plan_reports_the_vits_parameters_and_multiply_adds(tiny_dir, tmp_path, capsys):
    out = tmp_path / "plan.json"
    sets = [arg for item in [*TINY_VIT, f"data.root={tiny_dir}"] for arg in ("--set", item)]
    config = ["--config", str(mini_config(tiny_dir))]
    assert cli.main(["plan", *config, *sets, "--device", "cpu", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["backbone_params"] == closed_form_parameters(16, 12, 32, 16)
    assert plan["backbone_flops"] == closed_form_multiply_adds(16, 12, 32, 16)
    assert "vit_t:" in capsys.readouterr().out


def train_losses(tiny_dir, output, *extra):
    sets = [f"data.root={tiny_dir}", "data.val_bins=[]", "data.num_workers=0", *TINY_VIT, "loss.scale=16",
            "loss.sample_ratio=0.5", "optim.lr=0.01", "train.batch_size=48", "train.max_steps=3",
            "train.log_interval=1", "train.eval_interval=0", *extra]
    config = ["--config", str(mini_config(tiny_dir)), "--output", str(output)]
    assert cli.main(["train", *config, *[a for s in sets for a in ("--set", s)]]) == 0
    lines = (output / "train_log.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def test_train_runs_a_vit_with_the_whole_and_the_streaming_head(tiny_dir, tmp_path):
    """fp32, 3 steps on the bundled faces; the streaming head's first loss is the whole-matrix head's (same
    seed: the same masks and drop-path draws)."""
    whole = train_losses(tiny_dir, tmp_path / "whole")
    streaming = train_losses(tiny_dir, tmp_path / "streaming", "loss.chunk_size=7")
    assert len(whole) == len(streaming) == 3 and np.isfinite(whole + streaming).all()
    assert streaming[0] == pytest.approx(whole[0], rel=1e-5)


@pytest.mark.cpu_slow(reason="the ViT compiled by to_static (~8 s); static mode matching dynamic mode stays "
                              "fast for the IResNet, and the ViT trains in dynamic mode in the fast tier")
def test_static_mode_trains_the_vit_as_dynamic_mode_does(tiny_dir, tmp_path):
    """The static graph draws the same masks and drop paths: the 3 losses equal dynamic mode's (measured:
    within 1e-7 relative), and they differ from a run without masking or drop path."""
    dynamic = train_losses(tiny_dir, tmp_path / "dynamic")
    static = train_losses(tiny_dir, tmp_path / "static", "train.mode=static")
    np.testing.assert_allclose(static, dynamic, rtol=1e-5)
    plain = train_losses(tiny_dir, tmp_path / "plain", "model.patch_mask_ratio=0", "model.drop_path=0")
    assert abs(plain[0] - dynamic[0]) > 1e-3

"""Backbones: PLSC v2.2 equivalence (tensor names, shapes, reference outputs), data formats, sizes, registry.

The equivalence tests need ../shared/compat (the PLSC v2.2 manifest and its numpy test-vector generator) and
skip without it. They load the manifest's deterministic "fill B" weights through ``plsc22_names`` and compare
the output on the manifest's input with PLSC v2.2's own output.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import paddle
import pytest

from plsc.config import ModelConfig
from plsc.errors import PlscError
from plsc.models import MODELS, build_model, plsc22_key_map, plsc22_names
from plsc.models.iresnet import STAGE_BLOCKS

# manifest backbone -> (plsc constructor, embedding size)
PLSC22_BACKBONES = {
    "FresResNet50@emb512": ("iresnet50", 512),
    "FresResNet100@emb512": ("iresnet100", 512),
    "MobileFaceNet_128@emb128": ("mobilefacenet", 128),
    "MobileFaceNet_128@emb512": ("mobilefacenet", 512),
}
REFERENCE_TOLERANCE = 1e-5  # max|y - ref| / max row L2 norm(ref), the manifest's advice for fill B
TINY = {"iresnet18": 0.125, "mobilefacenet": 0.25}  # width that keeps a model tiny


# ----------------------------------------------------------------------------------------------------
# Shared material


@pytest.fixture(scope="module")
def manifest(shared_dir):
    return json.loads((shared_dir / "compat" / "plsc22_manifest.json").read_text())


@pytest.fixture(scope="module")
def testvectors(shared_dir):
    """The manifest's numpy-only generator of the reference input and weight fills, imported from its file."""
    path = shared_dir / "compat" / "plsc22_testvectors.py"
    spec = importlib.util.spec_from_file_location("plsc22_testvectors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_plsc22(backbone: str, data_format: str = "NCHW") -> paddle.nn.Layer:
    name, embedding_size = PLSC22_BACKBONES[backbone]
    return MODELS[name](embedding_size=embedding_size, data_format=data_format)


def fill_b_state(model, manifest_backbone: dict, testvectors) -> dict[str, np.ndarray]:
    """plsc state_dict filled with the manifest's fill B, addressed through plsc22_names."""
    params = {p["key"]: p for p in manifest_backbone["params"]}
    state = {}
    for key, name in plsc22_names(model).items():
        p = params[name.key]
        state[key] = testvectors.fill_b(p["k"], p["key"], p["shape"], p["role"])
    return state


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.linalg.norm(ref, axis=1).max())


# ----------------------------------------------------------------------------------------------------
# PLSC v2.2 equivalence


@pytest.mark.parametrize("backbone", list(PLSC22_BACKBONES))
def test_tensor_names_shapes_and_counts_match_plsc22(backbone, manifest):
    """At width 1 every tensor lines up 1:1, in order, with PLSC v2.2's: key, file stem, static name, shape"""
    expected = manifest["backbones"][backbone]
    params = {p["key"]: p for p in expected["params"]}
    model = build_plsc22(backbone)
    state = model.state_dict()
    names = plsc22_names(model)

    assert list(names) == list(state)
    canonical_in_order = sorted(params, key=lambda key: params[key]["sd_index"])
    assert [name.key for name in names.values()] == canonical_in_order
    for key, name in names.items():
        p = params[name.key]
        assert list(state[key].shape) == p["shape"], key
        assert name.ckpt_name == p["ckpt_name"], key
        assert name.static_name == p.get("static_name"), key
        assert (not state[key].stop_gradient) == p["trainable"], key
    assert len(state) == expected["num_unique_tensors"]
    assert sum(int(np.prod(t.shape)) for t in state.values()) == expected["num_elements"]
    assert plsc22_key_map(model) == {key: name.key for key, name in names.items()}


# Names as PLSC v2.2 itself wrote them (copied from its checkpoints and state_dict listings), so the name
# map is checked against PLSC's own spelling even without the shared manifest: (position in state_dict
# order, PLSC's structured key, checkpoint file stem, static-mode name).
PLSC22_LITERAL_NAMES = {
    "iresnet50": [
        (0, "conv._conv.weight", "conv1_weights", "conv2d_0.w_0"),
        (1, "conv._batch_norm.weight", "bn_conv1_scale", "batch_norm_0.w_0"),
        (5, "prelu._weight", "p_re_lu_0.w_0", "prelu_0.w_0"),
        (17, "block_list.0.conv1._batch_norm.weight", "bn2a_branch2b_scale", "batch_norm_3.w_0"),
        (40, "block_list.1.conv1._batch_norm._variance", "bn2b_branch2b_variance", "batch_norm_7.w_2"),
        (100, "block_list.5.prelu._weight", "p_re_lu_6.w_0", "prelu_6.w_0"),
        (395, "fc._batch_norm_2._variance", "bn_fc_2_variance", "batch_norm_78.w_2"),
    ],
    "mobilefacenet": [
        (0, "conv1.conv.weight", "create_parameter_0.w_0", None),
        (1, "conv1.bn.weight", "create_parameter_1.w_0", None),
        (5, "conv1.prelu._weight", "p_re_lu_0.w_0", None),
        (17, "blocks.0.conv.2._weight", "p_re_lu_2.w_0", None),
        (40, "blocks.1.conv.5._weight", "p_re_lu_5.w_0", None),
        (100, "blocks.5.conv.1._mean", "batch_norm2d_17.w_1", None),
        (282, "linear1.bn._variance", "batch_norm2d_49.w_2", None),
    ],
}


@pytest.mark.parametrize("name", sorted(PLSC22_LITERAL_NAMES))
def test_name_map_spells_names_as_plsc22_does(name):
    model = MODELS[name](width=0.0625, input_size=16, embedding_size=8)
    names = list(plsc22_names(model).values())
    assert len(names) == PLSC22_LITERAL_NAMES[name][-1][0] + 1
    for position, key, ckpt_name, static_name in PLSC22_LITERAL_NAMES[name]:
        assert tuple(names[position]) == (key, ckpt_name, static_name)


@pytest.mark.parametrize(
    "backbone, data_format",
    [
        pytest.param("FresResNet50@emb512", "NCHW", id="FresResNet50-NCHW"),
        pytest.param("FresResNet50@emb512", "NHWC", marks=pytest.mark.cpu_slow, id="FresResNet50-NHWC"),
        pytest.param("FresResNet100@emb512", "NCHW", marks=pytest.mark.cpu_slow, id="FresResNet100-NCHW"),
        pytest.param("FresResNet100@emb512", "NHWC", marks=pytest.mark.cpu_slow, id="FresResNet100-NHWC"),
        pytest.param("MobileFaceNet_128@emb128", "NCHW", id="MobileFaceNet-e128-NCHW"),
        pytest.param("MobileFaceNet_128@emb128", "NHWC", id="MobileFaceNet-e128-NHWC"),
        pytest.param("MobileFaceNet_128@emb512", "NCHW", id="MobileFaceNet-e512-NCHW"),
    ],
)
def test_fill_b_output_matches_plsc22_reference(backbone, data_format, manifest, testvectors):
    expected = manifest["backbones"][backbone]
    model = build_plsc22(backbone, data_format)
    model.set_state_dict(fill_b_state(model, expected, testvectors))
    model.eval()
    x = testvectors.make_input()  # NCHW [2, 3, 112, 112]
    if data_format == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    with paddle.no_grad():
        y = model(paddle.to_tensor(x)).numpy()

    ref = np.asarray(expected["reference"]["B"]["output"], dtype=np.float64)
    assert y.shape == tuple(expected["reference"]["B"]["output_shape"])
    assert relative_error(y, ref) <= REFERENCE_TOLERANCE


# ----------------------------------------------------------------------------------------------------
# Tiny models: layouts, sizes, widths


def random_state(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-trivial weights, including BN running statistics, so that layout mistakes cannot cancel out."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        shape = tensor.shape
        fan_in = np.prod(shape[1:]) if len(shape) == 4 else shape[0]  # conv [O, I, k, k]; Linear [in, out]
        if len(shape) > 1:
            value = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / fan_in)
        elif key.endswith("._variance"):
            value = rng.uniform(0.5, 1.5, shape)
        elif key.endswith(".weight"):  # BN gamma (PReLU alphas end in "._weight")
            value = rng.uniform(0.8, 1.2, shape)
        else:  # BN beta and mean, Linear bias, PReLU alpha
            value = rng.uniform(-0.2, 0.2, shape) + (0.25 if key.endswith("._weight") else 0.0)
        state[key] = value.astype(np.float32)
    return state


def tiny(name: str, **kwargs):
    kwargs.setdefault("width", TINY[name])
    kwargs.setdefault("input_size", 32)
    kwargs.setdefault("embedding_size", 16)
    return MODELS[name](**kwargs)


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_nhwc_output_equals_nchw_output(name, train):
    nchw, nhwc = tiny(name, data_format="NCHW"), tiny(name, data_format="NHWC")
    state = random_state(nchw)
    nchw.set_state_dict(state)
    nhwc.set_state_dict(state)
    for model in (nchw, nhwc):
        if train:  # Layer.train() has no mode argument on Paddle 2.6
            model.train()
        else:
            model.eval()
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)

    y_nchw = nchw(paddle.to_tensor(x)).numpy()
    y_nhwc = nhwc(paddle.to_tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))).numpy()
    assert y_nchw.shape == (3, 16)
    assert relative_error(y_nhwc, y_nchw) <= 1e-5


@pytest.mark.parametrize("input_size, side", [(112, 7), (56, 4), (32, 2)])
def test_input_size_sets_head_size(input_size, side):
    resnet = tiny("iresnet18", input_size=input_size)
    assert resnet.head.fc.weight.shape == [64 * side * side, 16]  # 512 x width 0.125 = 64 channels
    mobile = tiny("mobilefacenet", input_size=input_size)
    assert mobile.head_gdc.conv.weight.shape == [128, 1, side, side]  # 512 x 0.25 channels, global kernel
    x = paddle.rand([2, 3, input_size, input_size])
    resnet.eval()
    mobile.eval()
    assert resnet(x).shape == [2, 16]
    assert mobile(x).shape == [2, 16]


def test_width_scales_every_stage():
    model = tiny("iresnet18", width=0.25)
    first_convs = [stage[0].conv_b.conv.weight.shape[0] for stage in model.stages]
    assert first_convs == [16, 32, 64, 128]
    assert model.stem.conv.weight.shape == [16, 3, 3, 3]
    assert tiny("iresnet18", width=0.001).stem.conv.weight.shape[0] == 1  # never zero channels


@pytest.mark.parametrize("depth", sorted(STAGE_BLOCKS))
def test_depths_have_plsc_stage_layout(depth):
    model = MODELS[f"iresnet{depth}"](width=0.0625, input_size=16, embedding_size=4)
    assert tuple(len(stage) for stage in model.stages) == STAGE_BLOCKS[depth]
    # only the first block of a stage downsamples, so only it has a projection shortcut
    has_shortcut = [[block.shortcut is not None for block in stage] for stage in model.stages]
    assert has_shortcut == [[True] + [False] * (len(stage) - 1) for stage in model.stages]
    assert list(plsc22_names(model)) == list(model.state_dict())


def test_dropout_only_acts_in_train_mode():
    model = tiny("iresnet18", dropout=0.5)
    x = paddle.rand([2, 3, 32, 32])
    model.eval()
    assert np.array_equal(model(x).numpy(), model(x).numpy())
    model.train()
    paddle.seed(0)
    first = model(x).numpy()
    paddle.seed(1)
    assert not np.allclose(first, model(x).numpy())


@pytest.mark.parametrize("name", ["iresnet18", "mobilefacenet"])
def test_every_trainable_tensor_gets_a_gradient(name):
    model = tiny(name)
    model.train()
    model(paddle.rand([2, 3, 32, 32])).square().mean().backward()
    missing = [p.name for p in model.parameters() if not p.stop_gradient and p.grad is None]
    assert missing == []


# ----------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_plsc22_aliases():
    assert {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mobilefacenet"} <= set(MODELS)
    assert MODELS["FresResNet50"] is MODELS["iresnet50"]
    assert MODELS["FresResNet100"] is MODELS["iresnet100"]
    assert MODELS["MobileFaceNet_128"] is MODELS["mobilefacenet"]


@pytest.mark.parametrize("name", ["iresnet18", "MobileFaceNet_128"])
def test_build_model_uses_every_config_field(name):
    cfg = ModelConfig(name=name, embedding_size=24, width=0.125, data_format="NHWC", dropout=0.2)
    model = build_model(cfg, image_size=32)
    model.eval()
    assert model(paddle.rand([2, 32, 32, 3])).shape == [2, 24]
    assert model.stem.conv.weight.shape[0] == 8  # 64 stem channels x width 0.125
    dropout = model.head.dropout if name == "iresnet18" else model.dropout
    assert dropout.p == 0.2


def test_unknown_model_is_a_one_line_error_listing_known_names():
    with pytest.raises(PlscError) as error:
        build_model(ModelConfig(name="resnet50"))
    message = str(error.value)
    assert "\n" not in message
    assert "resnet50" in message
    assert all(name in message for name in MODELS)


@pytest.mark.parametrize("kwargs", [{"data_format": "NDHW"}, {"width": 0.0}, {"input_size": 0}])
def test_bad_arguments_are_plsc_errors(kwargs):
    with pytest.raises(PlscError):
        tiny("iresnet18", **kwargs)

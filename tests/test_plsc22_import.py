"""PLSC v2.2 checkpoint import: payloads, names, fp16, NHWC, static layout, classifier shards, errors.

Reference tests need ../shared/compat (the real MobileFaceNet_128 checkpoint written by PLSC's own save
code, the manifest and its numpy generator of the fill-B weights) and skip without it. Other fixtures are
written here in the v2.2 format from tiny plsc models, so every layout is covered at almost no cost.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import paddle
import pytest
from model_weights import random_state

from plsc import cli
from plsc.checkpoint import plsc22
from plsc.checkpoint.restore import restore_backbone
from plsc.errors import PlscError
from plsc.models import MODELS, plsc22_names

REFERENCE_TOLERANCE = 1e-5  # max|y - ref| / max row L2 norm(ref): the manifest's pass threshold for fill B
MFN_CHECKPOINT = "compat/ckpt_dynamic_MobileFaceNet_128/MobileFaceNet_128/best_model/cfp_fp"


# ----------------------------------------------------------------------------------------------------
# Writing checkpoints the way PLSC v2.2 does


class StaticPayload:
    """Pickles as PLSC's static mode saves a tensor: ``eval('data', {'data': array})``."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        return (eval, ("data", {"data": self.array}))


def write_tensor(directory: Path, stem: str, value: np.ndarray, static: bool, suffix: str = ".pdparam"):
    payload = StaticPayload(value) if static else (stem, value)  # dynamic: (tensor name, ndarray)
    (directory / f"{stem}{suffix}").write_bytes(pickle.dumps(payload, protocol=4))


def is_batch_norm(key: str) -> bool:
    return any(part.startswith("bn") for part in key.split("."))


def write_backbone(directory: Path, model, state: dict, mode="dynamic", data_format="NCHW", fp16=False):
    """``state`` in PLSC v2.2 files: dynamic or static names, static PReLU alphas 4-D, fp16-run dtypes."""
    directory.mkdir(parents=True, exist_ok=True)
    static = mode == "static"
    for key, name in plsc22_names(model).items():
        value = state[key]
        if static and key.endswith("._weight"):  # PReLU alpha
            value = value.reshape([1, -1, 1, 1] if data_format == "NCHW" else [1, 1, 1, -1])
        if fp16 and not is_batch_norm(key):  # an FP16 run keeps only BatchNorm in float32
            value = value.astype(np.float16)
        write_tensor(directory, name.static_name if static else name.ckpt_name, value, static)
        write_tensor(directory, f"{name.ckpt_name}_velocity_0", np.zeros_like(value), static, ".pdopt")


def write_meta(directory: Path, embedding_size: int, num_classes: int, world_size: int):
    meta = {
        "pretrain_world_size": world_size,
        "embedding_size": embedding_size,
        "num_classes": num_classes,
        "epoch": 0,
        "lr_state": {"last_epoch": 0, "last_lr": 0.1},
    }
    (directory / "meta.json").write_text(json.dumps(meta))


def write_shards(directory: Path, centers: np.ndarray, world_size: int, dtype=np.float32):
    """centers [C, E] as LargeScaleClassifier shards [E, num_local], ceil(C / W) classes per rank."""
    per_rank = -(-centers.shape[0] // world_size)
    for rank in range(world_size):
        shard = centers[rank * per_rank : (rank + 1) * per_rank].T.astype(dtype)
        write_tensor(directory, f"dist@fc@rank@{rank:05d}.w", shard, static=False)


def tiny_model(name="iresnet18", data_format="NCHW"):
    width = {"iresnet18": 0.125, "mobilefacenet": 0.25}[name]
    return MODELS[name](embedding_size=16, width=width, data_format=data_format, input_size=32)


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manifest(shared_dir):
    return json.loads((shared_dir / "compat" / "plsc22_manifest.json").read_text())


@pytest.fixture(scope="module")
def testvectors(shared_dir):
    return load_module(shared_dir / "compat" / "plsc22_testvectors.py", "plsc22_testvectors")


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.linalg.norm(ref, axis=1).max())


def embed(model, x: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


# ----------------------------------------------------------------------------------------------------
# The real checkpoint and the reference outputs


def test_real_mobilefacenet_checkpoint_reproduces_reference(shared_dir, manifest, testvectors):
    model, config = restore_backbone(shared_dir / MFN_CHECKPOINT)
    assert (config.model.name, config.model.embedding_size) == ("MobileFaceNet_128", 128)
    assert (config.data.image_size, config.data.num_classes) == (112, 1000)
    reference = np.asarray(manifest["backbones"]["MobileFaceNet_128@emb128"]["reference"]["B"]["output"])
    assert relative_error(embed(model, testvectors.make_input()), reference) <= REFERENCE_TOLERANCE


def test_real_checkpoint_classifier_becomes_center_matrix(shared_dir, testvectors):
    centers = plsc22.class_centers(shared_dir / MFN_CHECKPOINT)
    assert centers.shape == (1000, 128) and centers.dtype == np.float32
    np.testing.assert_array_equal(centers, testvectors.classifier_fill(128, 1000).T)


@pytest.fixture(scope="module")
def static_resnet50(shared_dir, manifest, testvectors, tmp_path_factory):
    """FresResNet50 fill B as a PLSC v2.2 *static* NCHW checkpoint, written from the manifest alone."""
    directory = tmp_path_factory.mktemp("static_r50") / "FresResNet50" / "best_model" / "cfp_fp"
    directory.mkdir(parents=True)
    for p in manifest["backbones"]["FresResNet50@emb512"]["params"]:
        value = testvectors.fill_b(p["k"], p["key"], p["shape"], p["role"])
        write_tensor(directory, p["static_name"], value.reshape(p.get("static_shape_NCHW", p["shape"])), True)
    write_tensor(directory, "learning_rate_0", np.array(0.1, np.float32), True, ".pdopt")
    write_meta(directory, 512, 10, 1)
    return directory


def test_static_fresresnet50_reproduces_reference(static_resnet50, manifest, testvectors):
    checkpoint = plsc22.inspect_checkpoint(static_resnet50)
    assert (checkpoint.mode, checkpoint.backbone) == ("static", "FresResNet50")
    assert checkpoint.data_format == "NCHW"
    model, config = restore_backbone(static_resnet50, backbone="iresnet50", embedding_size=512)
    reference = np.asarray(manifest["backbones"]["FresResNet50@emb512"]["reference"]["B"]["output"])
    assert relative_error(embed(model, testvectors.make_input()), reference) <= REFERENCE_TOLERANCE


# ----------------------------------------------------------------------------------------------------
# Layouts, dtypes and detection on tiny models


@pytest.mark.parametrize(
    "name, mode, data_format, fp16",
    [
        ("iresnet18", "dynamic", "NCHW", False),
        ("iresnet18", "dynamic", "NCHW", True),
        ("iresnet18", "static", "NCHW", False),
        ("iresnet18", "static", "NHWC", True),
        ("mobilefacenet", "dynamic", "NCHW", True),
    ],
)
def test_tiny_checkpoint_round_trips(tmp_path, name, mode, data_format, fp16):
    source = tiny_model(name)
    state = random_state(source)
    write_backbone(tmp_path, source, state, mode, data_format, fp16)
    write_meta(tmp_path, 16, 10, 1)

    checkpoint = plsc22.inspect_checkpoint(tmp_path)
    expected_name = "MobileFaceNet_128" if name == "mobilefacenet" else name
    assert (checkpoint.backbone, checkpoint.mode) == (expected_name, mode)
    assert checkpoint.data_format == data_format
    assert (checkpoint.embedding_size, checkpoint.image_size) == (16, 32)
    assert checkpoint.width == source.stem.conv.weight.shape[0] / 64
    model, _ = restore_backbone(tmp_path)
    for key, value in model.state_dict().items():
        stored = state[key].astype(np.float16) if fp16 and not is_batch_norm(key) else state[key]
        np.testing.assert_array_equal(value.numpy(), stored.astype(np.float32), err_msg=key)


def test_nhwc_static_checkpoint_builds_nhwc_and_matches_nchw(tmp_path):
    source = tiny_model()
    state = random_state(source)
    write_backbone(tmp_path, source, state, "static", "NHWC")
    nhwc, config = restore_backbone(tmp_path)
    nchw, _ = restore_backbone(tmp_path, data_format="NCHW")
    assert config.model.data_format == "NHWC"
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    y_nchw = embed(nchw, x)
    assert relative_error(embed(nhwc, np.ascontiguousarray(x.transpose(0, 2, 3, 1))), y_nchw) <= 1e-5


def test_payload_reader_accepts_both_payloads_and_refuses_code(tmp_path):
    value = np.arange(6, dtype=np.float16).reshape(2, 3)
    write_tensor(tmp_path, "dynamic", value, static=False)
    write_tensor(tmp_path, "static", value, static=True)
    for stem in ("dynamic", "static"):
        np.testing.assert_array_equal(plsc22.read_tensor_file(tmp_path / f"{stem}.pdparam"), value)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pdparam").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(PlscError, match="evil.pdparam: refusing to load the global builtins.print"):
        plsc22.read_tensor_file(tmp_path / "evil.pdparam")


# ----------------------------------------------------------------------------------------------------
# Classifier shards


@pytest.mark.parametrize("num_classes, world_size", [(10, 3), (12, 4), (7, 1)])
def test_shards_join_into_center_matrix(tmp_path, num_classes, world_size):
    centers = np.random.default_rng(0).standard_normal((num_classes, 4)).astype(np.float32)
    write_shards(tmp_path, centers, world_size, np.float16)
    write_meta(tmp_path, 4, num_classes, world_size)
    expected = centers.astype(np.float16).astype(np.float32)  # stored as float16, imported as float32
    np.testing.assert_array_equal(plsc22.class_centers(tmp_path), expected)


def test_shard_split_is_plscs():
    assert plsc22.shard_columns(93431, 8) == 11679  # MS1MV3 on 8 GPUs: 7 x 11679 + 11678
    assert 93431 - 7 * plsc22.shard_columns(93431, 8) == 11678


def test_missing_shard_is_one_clear_error(tmp_path):
    write_shards(tmp_path, np.zeros((10, 4), np.float32), 3)
    write_meta(tmp_path, 4, 10, 3)
    (tmp_path / "dist@fc@rank@00001.w.pdparam").unlink()
    with pytest.raises(PlscError, match=r"classifier shard dist@fc@rank@00001\.w\.pdparam is missing"):
        plsc22.class_centers(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture
def tiny_checkpoint(tmp_path):
    source = tiny_model()
    write_backbone(tmp_path, source, random_state(source))
    write_meta(tmp_path, 16, 10, 1)
    return tmp_path


def test_missing_parameter_is_one_line_cli_error(tiny_checkpoint, tiny_dir, capsys):
    (tiny_checkpoint / "res3a_branch2b_weights.pdparam").unlink()
    bins = ["--bin", str(tiny_dir / "lfw_disjoint_100.bin")]  # read (counted) before the model
    code = cli.main(["eval", "--checkpoint", str(tiny_checkpoint), *bins])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("plsc: error: ") and "missing (first: res3a_branch2b_weights.pdparam)" in err


@pytest.mark.parametrize(
    "hints, message",
    [
        ({"backbone": "FresResNet50"}, "holds iresnet18, not FresResNet50"),
        ({"embedding_size": 512}, "embedding size is 16, not 512"),
    ],
)
def test_hints_must_agree_with_the_tensors(tiny_checkpoint, hints, message):
    with pytest.raises(PlscError, match=message):
        restore_backbone(tiny_checkpoint, **hints)


def test_meta_json_must_agree_with_the_tensors(tiny_checkpoint):
    write_meta(tiny_checkpoint, 128, 10, 1)
    with pytest.raises(PlscError, match="meta.json has embedding_size 128, the tensors 16"):
        plsc22.inspect_checkpoint(tiny_checkpoint)


def test_parent_folder_error_names_the_checkpoints_inside(shared_dir):
    parent = shared_dir / MFN_CHECKPOINT / ".." / ".."
    with pytest.raises(PlscError, match=r"is not a checkpoint .*; checkpoints inside: 0, best_model/cfp_fp$"):
        restore_backbone(parent)


def test_plsc_checkpoint_is_not_mistaken_for_plsc22(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "x.pdparam").write_bytes(b"")
    assert not plsc22.is_plsc22_checkpoint(tmp_path)
    assert not plsc22.is_plsc22_checkpoint(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: a training run starts from a PLSC v2.2 checkpoint's backbone


def test_training_starts_from_the_real_checkpoints_backbone(shared_dir, manifest, testvectors, tiny_dir,
                                                             tmp_path):
    """`plsc train --resume-weights-only <PLSC v2.2 checkpoint>` on other data (40 classes, not its 1000):
    the run's model gives the manifest's fill-B reference output before its first step."""
    from plsc.config import load_config
    from plsc.engine.trainer import Trainer

    config = load_config("ms1mv3_mfn_dynamic_fp32_nchw_r0.1", [
        f"data.root={tiny_dir}", "data.val_bins=[]", "data.num_classes=0", "data.num_workers=0"])
    trainer = Trainer(config, tmp_path / "run", resume=shared_dir / MFN_CHECKPOINT, weights_only=True)
    trainer.model.eval()
    reference = np.asarray(manifest["backbones"]["MobileFaceNet_128@emb128"]["reference"]["B"]["output"])
    assert relative_error(embed(trainer.model, testvectors.make_input()), reference) <= REFERENCE_TOLERANCE
    assert trainer.state.step == 0 and trainer.num_classes == 40


def test_resume_from_a_plsc22_checkpoint_needs_weights_only(shared_dir, tiny_dir, tmp_path, capsys):
    argv = ["train", "--config", "ms1mv3_mfn_dynamic_fp32_nchw_r0.1", "--set", f"data.root={tiny_dir}",
            "--output", str(tmp_path / "run"), "--resume", str(shared_dir / MFN_CHECKPOINT)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is a PLSC v2.2 checkpoint: --resume-weights-only starts from its backbone" in err


def test_a_checkpoint_of_another_shape_is_refused_in_one_line(tiny_checkpoint, tiny_dir, tmp_path):
    from plsc.config import load_config
    from plsc.engine.trainer import Trainer

    config = load_config("cpu/mini", [f"data.root={tiny_dir}", "data.val_bins=[]", "data.num_workers=0"])
    with pytest.raises(PlscError, match="the checkpoint's embedding size is 16, not 128"):
        Trainer(config, tmp_path / "run", resume=tiny_checkpoint, weights_only=True)

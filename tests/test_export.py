"""Export (Paddle Inference, ONNX) and inference: parity with dygraph, layouts, batch sizes, files, errors.

Tiny IResNet-18 checkpoints (width 0.125, embedding 16, 32 px), trained NCHW and NHWC, and a tiny ViT-T (width
1/16: 16 channels, 3 x 3 patches at 32 px) are written with plsc's own checkpoint code; each is exported once
in both formats. ONNX tests skip without a usable paddle2onnx and
onnxruntime (pip install 'plsc[export]'; paddle2onnx 1.3.1 with Paddle 2.6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from model_weights import random_state

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.checkpoint.restore import restore_backbone
from plsc.config import load_config
from plsc.data.transforms import EvalTransform
from plsc.distributed import LocalComm
from plsc.errors import PlscError
from plsc.export import export_checkpoint, list_images, load_batch, locate_model, run_inference
from plsc.loss.margin import ARCFACE
from plsc.loss.partial_fc import PartialFC

ROOT = Path(__file__).resolve().parent.parent
PARITY_TOLERANCE = 1e-4  # max abs difference of L2-normalised embeddings
IMAGE_SIZE = 32
TINY_MODEL = [
    "model.name=iresnet18",
    "model.width=0.125",
    "model.embedding_size=16",
    f"data.image_size={IMAGE_SIZE}",
]
# (name, width, data_format) of the exported checkpoints
EXPORTED_MODELS = [("iresnet18", 0.125, "NCHW"), ("iresnet18", 0.125, "NHWC"), ("vit_t", 0.0625, "NCHW")]


def onnx_usable() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import paddle2onnx  # noqa: F401
    except Exception:  # ImportError, or paddle2onnx 2.x refusing Paddle 2.6 with a ValueError
        return False
    return True


needs_onnx = pytest.mark.skipif(not onnx_usable(), reason="needs paddle2onnx and onnxruntime (plsc[export])")


# ----------------------------------------------------------------------------------------------------
# Fixtures


def write_checkpoint(directory: Path, data_format: str, seed: int, name: str = "iresnet18",
                     width: float = 0.125) -> Path:
    """A plsc checkpoint of a tiny backbone with random weights, saved by plsc's own checkpoint code."""
    config = load_config(overrides=[*TINY_MODEL, f"model.data_format={data_format}", f"model.name={name}",
                                    f"model.width={width}"])
    paddle.seed(seed)
    from plsc.models import build_model

    model = build_model(config.model, image_size=IMAGE_SIZE)
    model.set_state_dict(random_state(model, seed))
    head = PartialFC(num_classes=10, embedding_size=16, margin=ARCFACE)
    comm, state = LocalComm(), ckpt.TrainingState()
    return ckpt.save_checkpoint(
        directory, comm=comm, state=state, config=config.to_dict(), model=model, optimizer=None, head=head
    )


def write_images(directory: Path, count: int = 7) -> Path:
    """Random colour images of assorted sizes (so resizing is exercised), as PNG and JPEG."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        side = 24 + 6 * index
        image = rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
        cv2.imwrite(str(directory / f"face{index:02d}.{'png' if index % 2 else 'jpg'}"), image)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module", params=EXPORTED_MODELS, ids=lambda model: f"{model[0]}-{model[2]}")
def exported(request, tmp_path_factory):
    """(checkpoint, export folder) for a tiny model trained in the given layout; both formats exported."""
    name, width, data_format = request.param
    root = tmp_path_factory.mktemp(f"export_{name}_{data_format}")
    checkpoint = write_checkpoint(root / "run" / "best_model" / "lfw", data_format, 3, name, width)
    output = root / "exported_model"
    export_checkpoint(checkpoint, output, "paddle")
    if onnx_usable():
        export_checkpoint(checkpoint, output, "onnx")
    return checkpoint, output


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dygraph_embeddings(checkpoint: Path, paths: list[Path]) -> np.ndarray:
    """The checkpoint's model in its own training layout, fed the same preprocessed images."""
    model, config = restore_backbone(checkpoint)
    batch = load_batch(paths, EvalTransform(IMAGE_SIZE, config.model.data_format))
    with paddle.no_grad():
        return model(paddle.to_tensor(batch)).numpy()


# ----------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("engine", ["paddle", pytest.param("onnx", marks=needs_onnx)])
def test_engines_match_dygraph(exported, images, engine, batch_size):
    checkpoint, output = exported
    paths, embeddings = run_inference(output, images, engine=engine, batch_size=batch_size)
    assert embeddings.shape == (7, 16) and embeddings.dtype == np.float32
    reference = dygraph_embeddings(checkpoint, paths)
    assert np.abs(normalised(embeddings) - normalised(reference)).max() <= PARITY_TOLERANCE


def test_export_description(exported):
    checkpoint, output = exported
    description = json.loads((output / "export.json").read_text())
    assert description["input"] == {
        "name": "images",
        "shape": [None, 3, IMAGE_SIZE, IMAGE_SIZE],
        "dtype": "float32",
        "layout": "NCHW",
        "normalization": "RGB, (x / 255 - 0.5) / 0.5",
    }
    trained = json.loads((checkpoint / "manifest.json").read_text())["config"]["model"]
    assert description["model"] == {
        "name": trained["name"],
        "embedding_size": 16,
        "width": trained["width"],
        "trained_data_format": trained["data_format"],
    }
    assert (trained["name"], trained["width"], trained["data_format"]) in EXPORTED_MODELS
    assert description["source"] == {"checkpoint": str(checkpoint.resolve()), "format": "plsc"}
    paddle_files = description["artifacts"]["paddle"]["files"]
    assert {Path(name).suffix for name in paddle_files} >= {".pdiparams"}
    assert all((output / name).is_file() for name in paddle_files)
    if onnx_usable():  # exporting the second format kept the first in export.json
        assert description["artifacts"]["onnx"]["files"] == [f"{trained['name']}.onnx"]
    assert not [p for p in output.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]


@needs_onnx
def test_onnx_batch_axis_is_dynamic(exported):
    import onnxruntime

    checkpoint, output = exported
    name = json.loads((checkpoint / "manifest.json").read_text())["config"]["model"]["name"]
    session = onnxruntime.InferenceSession(str(output / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    assert not isinstance(batch_dim, int)  # a symbolic name, not a fixed size
    assert session.get_inputs()[0].shape[1:] == [3, IMAGE_SIZE, IMAGE_SIZE]


def test_plsc22_checkpoint_exports_and_reproduces_reference(shared_dir, tmp_path):
    """PLSC v2.2's MobileFaceNet checkpoint through `plsc export` and Paddle Inference gives the reference."""
    compat = shared_dir / "compat"
    checkpoint = compat / "ckpt_dynamic_MobileFaceNet_128/MobileFaceNet_128/best_model/cfp_fp"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path)]) == 0
    sys.path.insert(0, str(compat))
    try:
        import plsc22_testvectors
    finally:
        sys.path.remove(str(compat))
    from plsc.export import open_engine

    model = locate_model(tmp_path)
    assert model.model_file.stem == "MobileFaceNet_128" and model.image_size == 112
    y = open_engine(model, threads=1)(plsc22_testvectors.make_input())
    manifest = json.loads((compat / "plsc22_manifest.json").read_text())
    reference = np.asarray(manifest["backbones"]["MobileFaceNet_128@emb128"]["reference"]["B"]["output"])
    assert np.abs(y - reference).max() / np.linalg.norm(reference, axis=1).max() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# The CLI and bad input


def test_infer_cli_writes_npy_and_image_list(exported, images, tmp_path, capsys):
    _, output = exported
    target = tmp_path / "out" / "embeddings.npy"
    assert cli.main(["infer", "--model", str(output), "--images", str(images), "--output", str(target)]) == 0
    assert "7 embeddings of size 16" in capsys.readouterr().out
    assert np.load(target).shape == (7, 16)
    assert (tmp_path / "out" / "embeddings.txt").read_text().split() == [p.name for p in list_images(images)]
    assert sorted(p.name for p in target.parent.iterdir()) == ["embeddings.npy", "embeddings.txt"]


def test_infer_cli_prints_without_output(exported, images, capsys):
    _, output = exported
    one = next(iter(list_images(images)))
    assert cli.main(["infer", "--model", str(output), "--images", str(one)]) == 0
    assert capsys.readouterr().out.startswith(f"{one}\tnorm ")


def test_image_that_is_not_an_image_is_one_line_and_writes_nothing(exported, images, tmp_path, capsys):
    _, output = exported
    bad = tmp_path / "images"
    write_images(bad, 3)
    (bad / "face01.png").write_text("not an image")
    target = tmp_path / "out" / "embeddings.npy"
    code = cli.main(["infer", "--model", str(output), "--images", str(bad), "--output", str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("plsc: error: cannot decode image") and "face01.png" in err
    assert not target.parent.exists() or not list(target.parent.iterdir())


def test_missing_engine_and_bad_paths_are_clear_errors(exported, tmp_path):
    _, output = exported
    description = json.loads((output / "export.json").read_text())
    only_paddle = tmp_path / "only_paddle"
    only_paddle.mkdir()
    description["artifacts"] = {"paddle": {"files": []}}
    (only_paddle / "export.json").write_text(json.dumps(description))
    with pytest.raises(PlscError, match="holds no onnx export"):
        locate_model(only_paddle, "onnx")
    with pytest.raises(PlscError, match="has no export.json"):
        locate_model(tmp_path)
    with pytest.raises(PlscError, match="images not found"):
        list_images(tmp_path / "absent")
    with pytest.raises(PlscError, match="is not a checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "x")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("small") / "ck", "NCHW", seed=5)


def test_export_output_that_is_a_file_is_one_line_and_nothing_is_written(small_checkpoint, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"not a folder")
    code = cli.main(["export", "--checkpoint", str(small_checkpoint), "--output", str(target)])
    err = capsys.readouterr().err
    assert code == 2
    expected = f"plsc: error: --output {target} is a file, not a folder"  # plsc.output_paths, before any work
    assert err == expected + "\n"
    assert target.read_bytes() == b"not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "corrupt export description (Expecting property name enclosed in double quotes)"),
        (b"[1, 2]", "corrupt export description (not a JSON object)"),
        (b"\xff\xfe{}", "unreadable export description"),
    ],
)
def test_unreadable_export_json_is_refused_before_anything_is_written(small_checkpoint, tmp_path, capsys,
                                                                      content, message):
    output = tmp_path / "exported"
    output.mkdir()
    (output / "export.json").write_bytes(content)
    code = cli.main(["export", "--checkpoint", str(small_checkpoint), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"plsc: error: {output / 'export.json'}: {message}")
    assert err.count("\n") == 1
    assert folder_bytes(output) == {"export.json": content}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no staging folder beside it


@pytest.fixture(scope="module")
def small_export(small_checkpoint, tmp_path_factory) -> Path:
    """small_checkpoint exported (Paddle format), for tests that start from an existing export (a copy)."""
    output = tmp_path_factory.mktemp("small-export") / "exported"
    export_checkpoint(small_checkpoint, output, "paddle")
    return output


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_an_interrupted_export_leaves_the_previous_one_intact(small_checkpoint, small_export, tmp_path,
                                                               monkeypatch, failure):
    from plsc.export import exporter

    output = tmp_path / "exported"
    shutil.copytree(small_export, output)  # the previous export
    (output / "notes.txt").write_text("the user's own file")
    before = folder_bytes(output)
    original = exporter.save_inference_model

    def save_then_fail(model, prefix, image_size):
        original(model, prefix, image_size)  # the new files are written, then the export is cut short
        raise failure

    monkeypatch.setattr(exporter, "save_inference_model", save_then_fail)
    if failure is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            export_checkpoint(small_checkpoint, output, "paddle", name="other")
    else:
        message = f"^cannot write the export to {output}: No space left on device$"
        with pytest.raises(PlscError, match=message):
            export_checkpoint(small_checkpoint, output, "paddle", name="other")
    assert folder_bytes(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    monkeypatch.undo()
    description = export_checkpoint(small_checkpoint, output, "paddle", name="other")
    assert (output / "notes.txt").read_text() == "the user's own file"  # kept by a successful re-export
    assert all((output / name).is_file() for name in description["artifacts"]["paddle"]["files"])
    assert description["artifacts"]["paddle"]["files"][0].startswith("other.")


def test_paddle2onnx_for_the_wrong_paddle_is_a_clear_error(monkeypatch):
    """paddle2onnx 2.x raises ValueError at import under Paddle 2.6; the user gets the version to install."""
    import builtins
    import importlib.metadata

    from plsc.export.exporter import _import_paddle2onnx

    real_import = builtins.__import__

    def refusing_import(name, *args, **kwargs):
        if name == "paddle2onnx":
            raise ValueError("The paddlepaddle version should not be less than 3.0.0.dev20250426.")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refusing_import)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.1.0")
    expected = r"paddle2onnx 2\.1\.0 needs Paddle 3, this is Paddle .*: pip install 'paddle2onnx==1\.3\.1'"
    with pytest.raises(PlscError, match=expected):
        _import_paddle2onnx()


def run_script(name: str, **env: str) -> str:
    result = subprocess.run(
        ["sh", str(ROOT / "scripts" / name)],  # POSIX sh (dash on Debian), as PLSC ran them
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


@pytest.mark.parametrize(
    "script, env, expected",
    [
        (
            "validation_static.sh",
            {
                "CHECKPOINT_DIR": "ck",
                "DATA_DIR": "d",
                "VAL_TARGETS": "lfw,cfp_fp",
                "BACKBONE": "FresResNet50",
            },
            "eval --checkpoint ck --batch-size 128 --bin d/lfw.bin --bin d/cfp_fp.bin "
            "--backbone FresResNet50",
        ),
        (
            "validation_dynamic.sh",
            {"OUTPUT": "run", "BATCH_SIZE": "8"},
            "eval --checkpoint run/best_model/cfp_fp --batch-size 8 "
            "--bin MS1M_v3/lfw.bin --bin MS1M_v3/cfp_fp.bin --bin MS1M_v3/agedb_30.bin",
        ),
        (
            "export_static.sh",
            {"OUTPUT": "run", "EXPORT_TYPE": "onnx", "EMBEDDING_SIZE": "512"},
            "export --checkpoint run/best_model/cfp_fp --format onnx --output run/exported_model "
            "--embedding-size 512",
        ),
        (
            "export_dynamic.sh",
            {"CHECKPOINT_DIR": "ck", "OUTPUT_DIR": "out"},
            "export --checkpoint ck --format paddle --output out",
        ),
        (
            "inference.sh",
            {"MODEL": "m", "IMAGE_PATH": "faces", "EMBEDDINGS": "e.npy", "EXPORT_TYPE": "onnx"},
            "infer --model m --images faces --engine onnx --batch-size 32 --output e.npy",
        ),
    ],
)
def test_scripts_pass_their_settings_to_the_cli(script, env, expected):
    assert run_script(script, PYTHON="echo", **env).strip() == f"-m plsc.cli {expected}"


@pytest.mark.cpu_slow
def test_scripts_export_and_embed_end_to_end(tmp_path, images):
    """export_dynamic.sh then inference.sh on a real checkpoint (two fresh Python processes: ~15 s)."""
    checkpoint = write_checkpoint(tmp_path / "run" / "checkpoints" / "5", "NCHW", seed=4)
    exported = str(tmp_path / "x")
    run_script(
        "export_dynamic.sh", PYTHON=sys.executable, CHECKPOINT_DIR=str(checkpoint), OUTPUT_DIR=exported
    )
    run_script(
        "inference.sh",
        PYTHON=sys.executable,
        MODEL=exported,
        IMAGE_PATH=str(images),
        EMBEDDINGS=str(tmp_path / "e.npy"),
    )
    assert np.load(tmp_path / "e.npy").shape == (7, 16)

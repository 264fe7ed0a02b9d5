"""PLSC v2.2's tools/*.py command lines (tools/, plsc/seed_tools.py): each wrapper, run on bundled data,
writes what the plsc command it maps to writes."""

from __future__ import annotations

import filecmp
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_export import write_checkpoint

from plsc import cli
from plsc.seed_tools import TOOLS

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "tiny"


def run_tool(name: str, *argv: str) -> int:
    """tools/<name>.py run as a script, in this process."""
    saved = sys.argv
    sys.argv = [str(ROOT / "tools" / f"{name}.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = saved
    raise AssertionError("the tool did not exit")


def same_tree(left: Path, right: Path) -> None:
    left_files = sorted(p.relative_to(left) for p in left.rglob("*") if p.is_file())
    assert left_files == sorted(p.relative_to(right) for p in right.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(left, right, [str(p) for p in left_files], shallow=False)
    assert not mismatch and not errors


def test_mx_recordio_2_images_extracts_like_plsc_convert(tmp_path):
    root = tmp_path / "ms1m"
    root.mkdir()
    assert cli.main(["convert", "images2rec", "--root", str(TINY), "--output", str(root / "train")]) == 0
    shutil.copy(TINY / "lfw_disjoint_100.bin", root)
    assert run_tool("mx_recordio_2_images", "--root_dir", str(root), "--output_dir", str(tmp_path / "a")) == 0
    assert cli.main(["convert", "rec2images", "--rec", str(root / "train.rec"), "--output",
                     str(tmp_path / "b")]) == 0
    same_tree(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "lfw_disjoint_100.bin").is_file()
    images = len(list((tmp_path / "a" / "images").iterdir()))
    assert images == len((TINY / "label.txt").read_text().splitlines())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("seed") / "best_model" / "lfw", "NHWC", seed=6)


def test_export_writes_what_plsc_export_writes(checkpoint, tmp_path):
    assert run_tool("export", "--is_static", "False", "--export_type", "paddle", "--embedding_size", "16",
                    "--checkpoint_dir", str(checkpoint), "--output_dir", str(tmp_path / "a")) == 0
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "b"), "--format",
                     "paddle", "--embedding-size", "16"]) == 0
    described = [json.loads((tmp_path / side / "export.json").read_text()) for side in "ab"]
    assert described[0] == described[1] and described[0]["model"]["embedding_size"] == 16
    params = [next((tmp_path / side).glob("*.pdiparams")).read_bytes() for side in "ab"]
    assert params[0] == params[1]


def test_export_flags_map_and_a_disagreeing_size_is_refused(checkpoint, tmp_path, capsys):
    assert TOOLS["export"](["--checkpoint_dir", "c", "--output_dir", "o", "--export_type", "onnx",
                            "--is_static", "true", "--backbone", "FresResNet50"]) == [
        "export", "--checkpoint", "c", "--output", "o", "--format", "onnx", "--backbone", "FresResNet50"]
    assert run_tool("export", "--checkpoint_dir", str(checkpoint), "--output_dir", str(tmp_path / "x"),
                    "--embedding_size", "512") == 2
    assert "plsc: error:" in capsys.readouterr().err and not (tmp_path / "x" / "export.json").exists()


def test_recognition_builds_the_index_and_names_faces_like_plsc_demo(checkpoint, tmp_path):
    exported = tmp_path / "infer"
    assert cli.main(["export", "--checkpoint", str(checkpoint), "--output", str(exported)]) == 0
    model = next(path for path in exported.iterdir() if path.suffix in (".json", ".pdmodel") and
                 path.name != "export.json")
    label = tmp_path / "label.txt"
    label.write_text("".join(line + "\n" for line in (TINY / "label.txt").read_text().splitlines()[::20]))
    params = str(model.with_suffix(".pdiparams"))
    common = ["--rec_model_file_path", str(model), "--rec_params_file_path", params]

    assert run_tool("test_recognition", "--rec", *common, f"--build_index={tmp_path / 'a.npz'}",
                    f"--img_dir={TINY}", f"--label={label}") == 0
    assert cli.main(["demo", "index", "--gallery", str(TINY), "--label", str(label), "--index",
                     str(tmp_path / "b.npz"), "--model", str(model)]) == 0
    built = [np.load(tmp_path / f"{side}.npz") for side in "ab"]
    assert np.array_equal(built[0]["embeddings"], built[1]["embeddings"])
    assert len(built[0]["embeddings"]) == 12

    query = TINY / "images" / "00000007.jpg"
    assert run_tool("test_recognition", "--rec", *common, f"--index={tmp_path / 'a.npz'}", f"--input={query}",
                    "--cdd_num", "3", "--rec_thresh", "0.2", f"--output={tmp_path / 'ra'}") == 0
    assert cli.main(["demo", "recognize", "--index", str(tmp_path / "a.npz"), "--model", str(model),
                     "--input", str(query), "--output", str(tmp_path / "rb"), "--cdd-num", "3",
                     "--threshold", "0.2"]) == 0
    results = [json.loads((tmp_path / side / "00000007.json").read_text()) for side in ("ra", "rb")]
    assert results[0] == results[1] and results[0]["cdd_num"] == 3 and results[0]["threshold"] == 0.2


def test_recognition_flags_map_onto_the_detector_options():
    argv = TOOLS["test_recognition"]([
        "--det", "--det_model_file_path", "m/inference.pdmodel",
        "--det_params_file_path", "m/inference.pdiparams",
        "--rec", "--rec_model_file_path", "r/FresResNet50.pdmodel", "--index=i.bin", "--input=q.jpg",
        "--cdd_num", "10", "--output=./output"])
    assert argv == ["demo", "recognize", "--index", "i.bin", "--model", "r/FresResNet50.pdmodel", "--input",
                    "q.jpg", "--output", "./output", "--cdd-num", "10", "--det-model-file-path",
                    "m/inference.pdmodel", "--det-params-file-path", "m/inference.pdiparams"]

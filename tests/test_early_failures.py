"""Mistakes of the first hour fail early, naming what is wrong: data moved without its verification files,
more classes than labels, a checkpoint path that does not exist."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from plsc import cli
from plsc.config import load_config
from plsc.data import build_dataset
from plsc.engine import trainer as trainer_module
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError

PUBLISHED = "configs/ms1mv3_r50_dynamic_fp32_nchw_r0.1.yaml"  # val_bins: ${PLSC_DATA_ROOT}/MS1M_v3/*.bin
TINY = ["model.width=0.0625", "model.embedding_size=16", "data.image_size=32", "data.num_workers=0",
        "train.batch_size=16", "loss.sample_ratio=1.0"]


def test_val_bins_follow_data_root(project_root):
    config = load_config(project_root / PUBLISHED, ["data.root=/data/faces"])
    moved = ["/data/faces/lfw.bin", "/data/faces/cfp_fp.bin", "/data/faces/agedb_30.bin"]
    assert config.data.val_bins == moved


def test_val_bins_set_with_the_root_are_kept(project_root):
    config = load_config(project_root / PUBLISHED, ["data.root=/data/faces", "data.val_bins=[/v/lfw.bin]"])
    assert config.data.val_bins == ["/v/lfw.bin"]


def test_val_bins_outside_the_old_root_stay(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  root: faces\n  val_bins: [faces/a.bin, other/b.bin]\n")
    config = load_config(config_file, ["data.root=/new"])
    assert config.data.val_bins == ["/new/a.bin", "other/b.bin"]


def test_missing_val_bin_fails_before_data_and_model(project_root, tiny_dir, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("built before the verification files were checked")

    monkeypatch.setattr(trainer_module, "build_dataset", must_not_run)
    monkeypatch.setattr(trainer_module, "build_backbone", must_not_run)
    config = load_config(project_root / PUBLISHED, [f"data.root={tiny_dir}", *TINY])
    with pytest.raises(PlscError, match=rf"^data.val_bins: {tiny_dir}/lfw.bin not found"):
        Trainer(config, project_root / "unused")


def test_more_classes_than_labels_warns_with_both_numbers(tiny_dir, caplog):
    caplog.set_level(logging.WARNING, logger="plsc.data")
    config = load_config(overrides=[f"data.root={tiny_dir}", "data.num_classes=100"])
    assert build_dataset(config.data).num_classes == 100
    (line,) = [record.getMessage() for record in caplog.records if "num_classes" in record.getMessage()]
    # data/tiny: 40 people, labels 0..39 (its label.txt).
    labels = {int(row.split("\t")[1]) for row in (tiny_dir / "label.txt").read_text().splitlines()
              if row and not row.startswith("#")}
    assert len(labels) == 40
    assert line.startswith("data.num_classes is 100 but the folder data has 40 distinct labels: 60 class")


@pytest.mark.parametrize("command", [
    ["eval", "--checkpoint", "{missing}", "--bin", "data/tiny/lfw_disjoint_100.bin"],
    ["export", "--checkpoint", "{missing}", "--output", "{tmp}/export"],
    ["infer", "--model", "{missing}", "--images", "data/tiny/images"],
    ["demo", "index", "--gallery", "data/tiny", "--model", "{missing}", "--index", "{tmp}/g.npz"],
])
def test_missing_checkpoint_or_model_says_not_found(command, tmp_path, project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    missing = str(tmp_path / "no-such-run" / "checkpoints" / "7")
    argv = [part.format(missing=missing, tmp=tmp_path) for part in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plsc: error: ") and "not found" in err and missing in err
    assert not Path(tmp_path / "export").exists()


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_a_wrong_data_root_is_named_not_the_verification_file_under_it(nproc, tmp_path, capsys):
    """mini.yaml's verification file sits under its root: moved along with a wrong root it is missing too,
    but the root is what the user got wrong (one process and --nproc alike, before any rank starts)."""
    wrong = tmp_path / "wrong" / "path"
    argv = ["train", "--config", "cpu/mini", "--set", f"data.root={wrong}", "--output", str(tmp_path / "run"),
            *nproc]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"plsc: error: data.root: {wrong} is not a folder")
    assert not (tmp_path / "run" / "log").exists()

"""The accuracy harness end to end: ``pytest repro/accuracy -k res50_fp16 --checkpoint-dir D --data-dir E``.

D holds a tiny checkpoint in PLSC v2.2's format, packed as the published archive of the dynamic FP16 Res50
row: one pickled ``(name, ndarray)`` per tensor, named as PLSC names them, FP16 except BatchNorm, with
``best_model/cfp_fp/`` and ``best_model/lfw/``. A width-1/4 IResNet-18 stands in for the Res50 so that the run
takes seconds; the harness never looks at the architecture, plsc's importer detects it from the tensors. E
holds three 20-pair ``.bin`` files made from the bundled faces. The weights are untrained and 20 pairs give
accuracies in steps of 0.05, which can never come within 0.002 of the published agedb30 0.98367: the case must
run, fail its verdict and still write its result.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from plsc.data.verification_bin import save_bin

pytestmark = pytest.mark.cpu

ROW = "dynamic_res50_fp16_nhwc_r0.1"
STEM = "MS1M_v3_arcface_Res50_dynamic_0.1_NHWC_FP16_v2.2"
BIN_NAMES = ("agedb_30", "cfp_fp", "lfw")
PAIRS_PER_KIND = 10
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def plsc22_importer():
    return pytest.importorskip("plsc.checkpoint.plsc22", reason="needs plsc's PLSC v2.2 checkpoint importer")


@pytest.fixture(scope="module")
def verification_dir(tmp_path_factory, tiny_dir) -> Path:
    """agedb_30.bin, cfp_fp.bin, lfw.bin: 10 same and 10 different pairs each, from data/tiny."""
    by_person: dict[str, list[bytes]] = {}
    for line in (tiny_dir / "label.txt").read_text().splitlines():
        image, label = line.split("\t")
        by_person.setdefault(label, []).append((tiny_dir / image).read_bytes())
    people = list(by_person.values())
    directory = tmp_path_factory.mktemp("verification")
    for index, name in enumerate(BIN_NAMES):
        chosen = people[index * PAIRS_PER_KIND : (index + 1) * PAIRS_PER_KIND]
        same = [(images[0], images[1]) for images in chosen]
        different = [(chosen[i][2], chosen[(i + 1) % len(chosen)][3]) for i in range(len(chosen))]
        pairs = same + different
        save_bin(
            directory / f"{name}.bin", [image for pair in pairs for image in pair], [True] * 10 + [False] * 10
        )
    return directory


def write_plsc22_tensors(folder: Path, model) -> None:
    """PLSC v2.2's dynamic format: ``<tensor name>.pdparam`` = pickle of (name, array); FP16 but BatchNorm."""
    from plsc.models import plsc22_names

    folder.mkdir(parents=True)
    state = model.state_dict()
    for key, names in plsc22_names(model).items():
        value = state[key].numpy()
        if not names.ckpt_name.startswith("bn"):
            value = value.astype(np.float16)
        with open(folder / f"{names.ckpt_name}.pdparam", "wb") as handle:
            pickle.dump((names.ckpt_name, value), handle, protocol=4)
    meta = {"pretrain_world_size": 1, "embedding_size": 32, "num_classes": 10, "epoch": 0}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, plsc22_importer) -> Path:
    """A folder holding ``<STEM>.tgz`` as published: ``<STEM>/FresResNet50/best_model/{cfp_fp,lfw}/``."""
    from plsc.models import iresnet18

    model = iresnet18(embedding_size=32, width=0.0625, data_format="NCHW", dropout=0.0, input_size=112)
    staging = tmp_path_factory.mktemp("staging")
    for dataset in ("cfp_fp", "lfw"):
        write_plsc22_tensors(staging / STEM / "FresResNet50" / "best_model" / dataset, model)
    directory = tmp_path_factory.mktemp("checkpoints")
    with tarfile.open(directory / f"{STEM}.tgz", "w:gz") as tar:
        tar.add(staging / STEM, arcname=STEM)
    return directory


def run_accuracy_cases(project_root: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "repro/accuracy", "-k", "res50_fp16", "-rs", "-q", *options]
    return subprocess.run(command, cwd=project_root, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.fixture(scope="module")
def harness_run(project_root, verification_dir, checkpoint_dir, tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("results")
    options = ["--checkpoint-dir", str(checkpoint_dir), "--data-dir", str(verification_dir)]
    run = run_accuracy_cases(project_root, *options, "--results-dir", str(results_dir))
    return run, results_dir


@pytest.mark.cpu_slow(reason="trains the checkpoint the harness then scores (~12 "
                              "s)")
def test_the_row_with_a_checkpoint_runs_and_the_others_skip(harness_run):
    run, _ = harness_run
    assert "1 failed, 3 skipped" in run.stdout, run.stdout + run.stderr
    assert f"needs the published checkpoint {STEM.replace('dynamic', 'static')}" in run.stdout


def test_the_case_writes_its_result(harness_run):
    _, results_dir = harness_run
    result = json.loads((results_dir / "cpu" / f"{ROW}.json").read_text())
    assert result["claim_id"] == ROW and result["tier"] == "cpu"
    assert result["config"] == "configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml"
    assert result["published"] == {"agedb30": 0.98367, "cfp_fp": 0.99029, "lfw": 0.9985}
    assert set(result["measured"]) == {"agedb30", "cfp_fp", "lfw"}
    assert all(0.0 <= value <= 1.0 for value in result["measured"].values())
    assert result["tolerance"]["value"] == 0.002 and result["verdict"] == "fail"
    assert result["hardware"]["summary"] and result["software"]["paddle"]
    assert "-k res50_fp16" in result["command"] and result["time"]


def test_each_data_set_uses_its_own_best_model_else_cfp_fp(harness_run):
    _, results_dir = harness_run
    datasets = json.loads((results_dir / "cpu" / f"{ROW}.json").read_text())["details"]["datasets"]
    assert Path(datasets["lfw"]["checkpoint"]).parts[-2:] == ("best_model", "lfw")
    assert Path(datasets["cfp_fp"]["checkpoint"]).parts[-2:] == ("best_model", "cfp_fp")
    assert Path(datasets["agedb30"]["checkpoint"]).parts[-2:] == ("best_model", "cfp_fp")  # no agedb_30/
    assert datasets["lfw"]["pairs"] == 2 * PAIRS_PER_KIND


def test_the_archive_was_unpacked_beside_it(harness_run, checkpoint_dir):
    assert (checkpoint_dir / STEM / "FresResNet50" / "best_model" / "lfw" / "meta.json").is_file()


def test_without_data_or_checkpoints_every_case_skips_saying_what_it_needs(project_root, tmp_path):
    run = run_accuracy_cases(project_root, "--checkpoint-dir", str(tmp_path), "--results-dir", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 skipped" in run.stdout
    assert run.stdout.count("needs --data-dir DIR holding agedb_30.bin, cfp_fp.bin, lfw.bin") == 4
    assert "or --download to fetch https://plsc.bj.bcebos.com/pretrained_model/" in run.stdout
    assert not list(tmp_path.glob("*/*.json"))

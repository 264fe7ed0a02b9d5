"""plsc eval on any model (plsc.eval.sources, plsc.eval.runner): a plsc checkpoint, its PLSC v2.2 copy and its
Paddle and ONNX exports score alike on the same .bin; a run folder is scored with its best models; paths that
are no model fail in one line.

The reference for every kind is the verification the trainer itself ran on the checkpoint's weights at that
step (its evaluation record in train_log.jsonl); the ONNX export runs on onnxruntime, another engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_export import needs_onnx
from test_plsc22_import import write_backbone, write_meta
from tiny_run import TINY_RUN

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.checkpoint.restore import restore_backbone
from plsc.config import load_config
from plsc.data import verification_bin
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError
from plsc.eval.runner import evaluate_model, evaluate_run, run_models
from plsc.eval.sources import identify
from plsc.export import export_checkpoint

BIN = "lfw_disjoint_100.bin"
SET = "lfw_disjoint_100"
STEPS = 3
ACCURACY_TOLERANCE = 5e-5  # "the same to the 4th decimal"; 100 pairs give accuracies in steps of 0.01
XNORM_TOLERANCE = 1e-4  # relative: the engines' embeddings agree to ~1e-5 (tests/test_embedders.py)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("plsc: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory) -> Path:
    """A 3-step tiny run verified on the bundled set at steps 2 and 3."""
    output = tmp_path_factory.mktemp("eval-any") / "run"
    config = load_config(overrides=[f"data.root={tiny_dir}", f"data.val_bins=[{tiny_dir / BIN}]", *TINY_RUN,
                                    f"train.max_steps={STEPS}", "train.eval_interval=2"])
    Trainer(config, output).run()
    return output


def logged_accuracy(run: Path, step: int) -> float:
    """What the trainer's own verification gave at ``step``: its evaluation record in the log."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    (accuracy,) = [r["eval"][SET] for r in records if "eval" in r and r["step"] == step]
    return accuracy


@pytest.fixture(scope="module")
def models(run, tmp_path_factory) -> dict[str, Path]:
    """The step-3 checkpoint, its PLSC v2.2 copy, and its exports (both formats in one folder)."""
    scratch = tmp_path_factory.mktemp("models")
    checkpoint = run / "checkpoints" / str(STEPS)
    model, _ = restore_backbone(checkpoint)
    v22 = scratch / "plsc22"
    write_backbone(v22, model, {key: value.numpy() for key, value in model.state_dict().items()})
    write_meta(v22, 16, 40, 1)
    export = scratch / "export"
    export_checkpoint(checkpoint, export, "paddle")
    paths = {"plsc": checkpoint, "plsc22": v22, "export-folder": export}
    paths["paddle"] = next(path for path in export.iterdir() if path.suffix in (".json", ".pdmodel"))
    return paths


KINDS = ["plsc", "plsc22", "paddle", "export-folder", pytest.param("onnx", marks=needs_onnx)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_model_scores_what_training_logged(kind, models, run, tiny_dir):
    if kind == "onnx":
        export_checkpoint(models["plsc"], models["export-folder"], "onnx")  # beside the Paddle files
        path = next(models["export-folder"].glob("*.onnx"))
    else:
        path = models[kind]
    assert identify(path).kind == {"export-folder": "paddle"}.get(kind, kind)
    results = evaluate_model(path, [str(tiny_dir / BIN)], batch_size=32)
    reference = evaluate_model(models["plsc"], [str(tiny_dir / BIN)], batch_size=32, engine="dygraph")[SET]
    assert results[SET]["accuracy"] == pytest.approx(logged_accuracy(run, STEPS), abs=ACCURACY_TOLERANCE)
    assert results[SET]["accuracy"] == pytest.approx(reference["accuracy"], abs=ACCURACY_TOLERANCE)
    assert results[SET]["threshold"] == pytest.approx(reference["threshold"], abs=1e-9)
    assert results[SET]["xnorm"] == pytest.approx(reference["xnorm"], rel=XNORM_TOLERANCE)


@needs_onnx
def test_an_export_folder_with_both_formats_runs_the_one_engine_asks_for(models, tiny_dir):
    export_checkpoint(models["plsc"], models["export-folder"], "onnx")
    assert identify(models["export-folder"], "onnx").kind == "onnx"
    assert identify(models["export-folder"], "paddle").kind == "paddle"
    bins = [str(tiny_dir / BIN)]
    onnx = evaluate_model(models["export-folder"], bins, engine="onnx")[SET]
    paddle = evaluate_model(models["export-folder"], bins, engine="paddle")[SET]
    assert onnx["accuracy"] == pytest.approx(paddle["accuracy"], abs=ACCURACY_TOLERANCE)


def test_bin_takes_several_files_and_repeats(models, tiny_dir, tmp_path, capsys, monkeypatch):
    copies = [str(shutil.copy(tiny_dir / BIN, tmp_path / f"{name}.bin")) for name in ("a", "b", "c")]
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(models["plsc"]), "--bin", copies[0], copies[1], "--bin", copies[2],
            "--json", str(out)]
    reads, read_pickle = [], verification_bin._read_pickle

    def counted_read(path):
        reads.append(str(path))
        return read_pickle(path)

    monkeypatch.setattr(verification_bin, "_read_pickle", counted_read)
    assert cli.main(argv) == 0
    assert reads == copies  # each file read once: counted for the engine's choice, decoded later
    results = json.loads(out.read_text())
    assert list(results) == ["a", "b", "c"]
    assert len({metrics["accuracy"] for metrics in results.values()}) == 1  # one file's content, thrice
    assert "verification of" in capsys.readouterr().out


def test_a_checkpoint_without_bin_uses_its_saved_sets(models, run):
    results = evaluate_model(models["plsc"])
    assert list(results) == [SET]
    assert results[SET]["accuracy"] == pytest.approx(logged_accuracy(run, STEPS), abs=ACCURACY_TOLERANCE)


def test_a_run_is_scored_with_each_sets_best_model_others_with_the_latest(run, tiny_dir, tmp_path, capsys):
    best = run / "best_model" / SET
    best_metric = ckpt.read_manifest(best)["best_metric"][SET]
    out = tmp_path / "run.json"
    assert cli.main(["eval", "--run", str(run), "--json", str(out)]) == 0  # the sets of its config.yaml
    results = json.loads(out.read_text())
    assert list(results) == [SET] and results[SET]["model"] == str(best)
    assert results[SET]["accuracy"] == pytest.approx(best_metric["accuracy"], abs=ACCURACY_TOLERANCE)
    assert str(best) in capsys.readouterr().out  # the table's model column

    other = str(shutil.copy(tiny_dir / BIN, tmp_path / "other.bin"))  # no best model of that name
    latest = ckpt.CheckpointDir(run / "checkpoints").latest()
    assert run_models(run, [other, str(tiny_dir / BIN)]) == {other: latest, str(tiny_dir / BIN): best}
    results = evaluate_run(run, [str(tiny_dir / BIN), other])
    assert list(results) == [SET, "other"] and results["other"]["model"] == str(latest)
    assert results["other"]["accuracy"] == pytest.approx(logged_accuracy(run, STEPS), abs=ACCURACY_TOLERANCE)


@pytest.mark.parametrize("make, argv_tail, message", [
    (lambda p: p.write_text("notes"), [], "not a model file (.json, .pdmodel or .onnx)"),
    (lambda p: p.mkdir(), [], "is not a checkpoint (no manifest.json, no PLSC v2.2 *.pdparam files)"),
    (lambda p: None, [], "not found"),
])
def test_a_path_that_is_no_model_is_one_error_line(make, argv_tail, message, tmp_path, tiny_dir, capsys):
    path = tmp_path / "thing"
    make(path)
    assert cli.main(["eval", "--model", str(path), "--bin", str(tiny_dir / BIN), *argv_tail]) == 2
    assert message in one_error_line(capsys)


def test_a_run_folder_as_model_names_the_checkpoints_inside(run, tiny_dir, capsys):
    assert cli.main(["eval", "--model", str(run), "--bin", str(tiny_dir / BIN)]) == 2
    assert "checkpoints inside: best_model/lfw_disjoint_100, checkpoints/3" in one_error_line(capsys)


def test_options_that_do_not_fit_the_model_are_refused(models, tmp_path, tiny_dir):
    bins = [str(tiny_dir / BIN)]
    with pytest.raises(PlscError, match="--engine dygraph runs a checkpoint's model"):
        evaluate_model(models["paddle"], bins, engine="dygraph")
    with pytest.raises(PlscError, match="--engine onnx runs an ONNX export"):
        evaluate_model(models["plsc"], bins, engine="onnx")
    with pytest.raises(PlscError, match="--backbone apply to checkpoints"):
        evaluate_model(models["paddle"], bins, backbone="iresnet18")
    with pytest.raises(PlscError, match="records no verification sets .*pass --bin"):
        evaluate_model(models["plsc22"])
    with pytest.raises(PlscError, match="is not a run folder"):
        run_models(tmp_path)

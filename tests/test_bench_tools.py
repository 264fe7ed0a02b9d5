"""``plsc bench data|train|verify`` and the performance report (benchmarks/report.py), on tiny inputs.

Nothing here asserts on speed: rates are only checked to be positive and consistent with each other; the
numbers themselves are the benchmarks' output (benchmarks/results/*.json).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from benchmarks.report import BEGIN, END, NOT_MEASURED, render, render_figure, replace_block
from benchmarks.report import main as report_main
from plsc import cli
from plsc.bench import measure_in_fresh_process
from plsc.bench.data import (
    DataBenchSpec,
    RepeatedDataset,
    bench_data,
    build_source_dataset,
    encoded_images,
    measure,
    prepared_root,
    repeats_needed,
)
from plsc.bench.train import (
    PHASES,
    StepPhaseTimer,
    TrainBenchSpec,
    build_trainer,
    load_bench_config,
    run_steps,
)
from plsc.bench.verify import VerifyBenchSpec, bench_verify, random_pairs
from plsc.errors import PlscError
from plsc.eval.verification import evaluate

DATA_KEYS = ("pipeline_images_per_s", "raw_decode_images_per_s", "workers", "ratio_to_workers_x_raw")
TINY_TRAIN = ("train.batch_size=8", "data.num_workers=0", "data.image_size=32", "model.embedding_size=16")


def label_count(root) -> int:
    return sum(1 for line in (root / "label.txt").read_text().splitlines() if line.strip())


def tiny_data_spec(tiny_dir, source: str, workers: int) -> DataBenchSpec:
    return DataBenchSpec(source=source, root=str(tiny_dir), workers=workers, batches=2, warmup=1, rounds=2,
                         batch_size=32, image_size=56, threads=1)


# --- bench data --------------------------------------------------------------------------------------------


def check_data_result(result: dict, workers: int) -> None:
    assert all(key in result for key in DATA_KEYS)
    assert result["workers"] == workers
    assert result["pipeline_images_per_s"] > 0 and result["raw_decode_images_per_s"] > 0
    rounds = result["rounds"]
    assert len(rounds) == 2
    paired = [r["pipeline_images_per_s"] / (r["raw_decode_images_per_s"] * max(workers, 1)) for r in rounds]
    assert result["ratio_to_workers_x_raw"] == pytest.approx(np.median(paired))
    pipelines = [r["pipeline_images_per_s"] for r in rounds]
    assert result["pipeline_images_per_s"] == pytest.approx(np.median(pipelines))
    assert result["images_timed"] == 2 * 32


def test_bench_data_folder_in_process(tiny_dir):
    result = measure(tiny_data_spec(tiny_dir, "folder", 0))
    check_data_result(result, 0)
    assert result["dataset_images"] == label_count(tiny_dir)


def test_bench_data_rec_converts_the_same_images(tiny_dir, tmp_path):
    """The whole command path (conversion, fresh process, 1 worker) and the JSON it writes."""
    out = tmp_path / "data_rec.json"
    argv = ["bench", "data", "--source", "rec", "--workers", "1", "--root", str(tiny_dir), "--batches", "2",
            "--warmup", "1", "--rounds", "2", "--batch-size", "32", "--image-size", "56", "--threads", "1",
            "--json", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    check_data_result(result, 1)
    assert result["dataset_images"] == label_count(tiny_dir)
    assert result["rec_conversion_s"] > 0


def digests(payloads) -> list[str]:
    return sorted(hashlib.sha256(payload.tobytes()).hexdigest() for payload in payloads)


def test_rec_source_holds_the_folder_bytes(tiny_dir):
    files = [np.fromfile(tiny_dir / line.split("\t")[0], dtype=np.uint8)
             for line in (tiny_dir / "label.txt").read_text().splitlines() if line.strip()]
    with prepared_root(tiny_data_spec(tiny_dir, "rec", 0)) as (spec, _):
        dataset = build_source_dataset(spec)
        assert digests(encoded_images(dataset, range(len(dataset)))) == digests(files)


def test_repeated_dataset_cycles_in_order(tiny_dir):
    dataset = build_source_dataset(tiny_data_spec(tiny_dir, "folder", 0))
    repeated = RepeatedDataset(dataset, 3)
    assert len(repeated) == 3 * len(dataset)
    assert repeated[len(dataset) + 5][1] == dataset[5][1] == int(dataset.labels[5])
    np.testing.assert_array_equal(repeated[2 * len(dataset) + 7][0], dataset[7][0])
    assert repeats_needed(240, 10, 64) == 3 and repeats_needed(240, 1, 64) == 1


def test_child_error_comes_back_as_one_line(tmp_path):
    (tmp_path / "label.txt").write_text("images/missing.jpg\t0\n")
    spec = DataBenchSpec(source="folder", root=str(tmp_path), workers=0, batches=1, threads=1)
    with pytest.raises(PlscError, match="image not found"):
        bench_data(spec)


# --- bench train -------------------------------------------------------------------------------------------


def tiny_train_spec(project_root, steps: int = 3, warmup: int = 0) -> TrainBenchSpec:
    return TrainBenchSpec(config=str(project_root / "configs" / "cpu" / "mini.yaml"), overrides=TINY_TRAIN,
                          steps=steps, warmup=warmup, threads=1)


def test_bench_train_phases_cover_the_step_without_changing_it(project_root, tmp_path, monkeypatch):
    monkeypatch.chdir(project_root)  # the config's data root is relative
    config = load_bench_config(tiny_train_spec(project_root))
    timed = build_trainer(config, str(tmp_path / "timed"))
    timer = StepPhaseTimer(timed)
    timed_losses, clocks = run_steps(timed, 3, timer)
    plain_losses, _ = run_steps(build_trainer(config, str(tmp_path / "plain")), 3)
    np.testing.assert_allclose(timed_losses, plain_losses, rtol=1e-6)  # the wrappers change nothing
    assert timer.hooks_fired == 3
    for clock in clocks:
        assert set(clock.wall) == set(PHASES)
        assert all(seconds >= 0 for seconds in clock.wall.values())


def test_bench_train_command_writes_shares_summing_to_one(project_root, tmp_path, monkeypatch):
    monkeypatch.chdir(project_root)
    out = tmp_path / "train_tiny.json"
    argv = ["bench", "train", "--config", "configs/cpu/mini.yaml", "--steps", "3", "--warmup", "1",
            "--threads", "1", "--json", str(out)] + [arg for item in TINY_TRAIN for arg in ("--set", item)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert sum(result["phase_shares"].values()) == pytest.approx(1.0)
    assert result["outside_share"] == pytest.approx(result["phase_shares"]["data"]
                                                    + result["phase_shares"]["optimizer"])
    assert result["images_per_s"] == pytest.approx(8 * 3 / sum(result["step_s_all"]))
    assert len(result["losses"]) == 4 and result["gradient_hook_fired_steps"] == 4


# --- bench verify ------------------------------------------------------------------------------------------


def test_bench_verify_reports_what_evaluate_computes():
    result = bench_verify(VerifyBenchSpec(pairs=600, dim=64, repeats=2, seed=3))
    embeddings, issame = random_pairs(600, 64, seed=3)
    assert result["metrics"] == evaluate(embeddings, issame)
    assert len(result["evaluate_s_all"]) == 2 and result["evaluate_s"] > 0
    assert 0.5 < result["metrics"]["accuracy"] < 1.0  # "same" pairs are closer, but not trivially


def test_random_pairs_are_unit_rows_with_closer_same_pairs():
    embeddings, issame = random_pairs(400, 32, seed=1)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    cosines = np.einsum("ij,ij->i", embeddings[0::2], embeddings[1::2])
    assert cosines[issame].mean() > cosines[~issame].mean()


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["bench", "data", "--source", "tar", "--workers", "0"], "--source must be one of folder, rec"),
    (["bench", "data", "--source", "folder", "--workers", "0", "--root", "/no/such/dir"], "not a directory"),
    (["bench", "data", "--source", "folder", "--workers", "-1"], "--workers"),
    (["bench", "train", "--config", "/no/such.yaml"], "config file not found"),
    (["bench", "train", "--config", "configs/cpu/mini.yaml", "--set", "train.nope=1"], "unknown key"),
    (["bench", "verify", "--pairs", "5"], "--pairs must be >= 10"),
])
def test_bad_input_is_one_line_exit_2(argv, message, project_root, monkeypatch, capsys):
    monkeypatch.chdir(project_root)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plsc: error: ") and message in err and "\n" not in err


def test_measure_in_fresh_process_raises_on_a_crash():
    with pytest.raises(RuntimeError, match="failed"):
        measure_in_fresh_process("plsc.bench.no_such_module", {}, 1)


ENVIRONMENT_PROBE = """
import json, os, sys
print(json.dumps({name: os.environ.get(name) for name in ("GLIBC_TUNABLES", "OMP_NUM_THREADS")}))
"""


@pytest.mark.parametrize("preset", [None, ""], ids=["unset", "set-empty"])
def test_measuring_process_runs_with_the_plsc_commands_malloc_settings(preset, tmp_path, monkeypatch):
    from plsc.malloc import MALLOC_SETTINGS

    (tmp_path / "environment_probe.py").write_text(ENVIRONMENT_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    if preset is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", preset)  # already set, even empty: left alone, as plsc does
    seen = measure_in_fresh_process("environment_probe", {}, 3)
    assert seen == {"GLIBC_TUNABLES": MALLOC_SETTINGS if preset is None else preset, "OMP_NUM_THREADS": "3"}


# --- performance report ---------------------------------------------------------------------------------


def fake_results(directory):
    directory.mkdir(exist_ok=True)
    (directory / "verify.json").write_text(json.dumps(
        {"pairs": 6000, "dim": 512, "folds": 10, "thresholds": 400, "evaluate_s": 0.0123, "target_s": 2.0}))
    (directory / "data_folder.json").write_text(json.dumps(
        {"dataset_images": 240, "workers": 2, "pipeline_images_per_s": 1500.0,
         "raw_decode_images_per_s": 1000.0, "ratio_to_workers_x_raw": 0.75, "target_ratio": 0.8}))
    return directory


def test_missing_results_render_not_measured(tmp_path):
    text = render(tmp_path / "absent")
    for title in ("Classifier head", "Data pipeline", "Training step", "Verification", "Evaluation end to"):
        assert title in text
    # head rows + scaling, data rows, train, verify, eval
    assert text.count(NOT_MEASURED) == 6 + 1 + 4 + 1 + 1 + 1


def test_render_shows_the_numbers_of_the_files(tmp_path):
    results = fake_results(tmp_path / "results")
    (results / "eval.json").write_text(json.dumps({
        "setting": {"checkpoint": "untrained iresnet50 x1", "image_size": 112, "bin": "lfw_disjoint_100.bin",
                    "pairs": 100, "threads": 2},
        "wall_s": {"dygraph": 200.0, "paddle": 50.0}, "speedup": 4.0,
        "engine_build_s": {"twin_s": 1.0, "twin_save_and_predictor_s": 7.25, "save_and_predictor_s": 6.25},
        "metrics": {"dygraph": {"accuracy": 0.55}, "paddle": {"accuracy": 0.55}}}))
    text = render(results)
    assert re.search(r"untrained iresnet50 x1, 112 px +\| lfw_disjoint_100\.bin \(100 pairs\) +\| 2 +\| "
                     r"200\.0 s +\| 50\.0 s +\| 4\.00x +\| 0\.5500 +\| 7\.2 s", text)
    assert "0.012 s" in text and "< 2 s: met" in text
    assert "1,500" in text and "0.75" in text and ">= 0.8: not met" in text
    assert re.search(r"RecordIO \(\.rec/\.idx\) +\| not measured", text)


def test_report_is_idempotent_and_check_detects_staleness(tmp_path):
    results = fake_results(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nold\n{END}\nafter\n")
    figure = tmp_path / "figures" / "performance.png"
    args = ["--doc", str(readme), "--results-dir", str(results), "--figure", str(figure)]
    assert report_main(args + ["--check"]) == 1
    assert report_main(args) == 0
    written = readme.read_text()
    assert written.startswith("# title\n\nbefore\n") and written.endswith("after\n")
    assert "(figures/performance.png)" in written
    assert report_main(args + ["--check"]) == 0
    assert report_main(args) == 0 and readme.read_text() == written
    content = render(results)
    assert render(results) == content
    assert replace_block(replace_block(written, content), content) == replace_block(written, content)
    assert render_figure(results) == figure.read_bytes()


def test_report_without_markers_is_one_line_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert report_main(["--doc", str(readme), "--results-dir", str(tmp_path)]) == 2
    assert "exactly one" in capsys.readouterr().err


# --- plsc bench eval ---------------------------------------------------------------------------------------


def test_bench_eval_checks_its_spec_and_writes_a_checkpoint_plsc_eval_reads(tmp_path):
    from plsc.bench.eval import EvalBenchSpec, check_spec, measure_engine_build, write_untrained_checkpoint
    from plsc.checkpoint.restore import restore_backbone

    with pytest.raises(PlscError, match="--engines must name some of dygraph, paddle"):
        check_spec(EvalBenchSpec(engines=("onnx",)))
    with pytest.raises(PlscError, match="verification file not found"):
        check_spec(EvalBenchSpec(bin=str(tmp_path / "none.bin")))
    spec = EvalBenchSpec(model="iresnet18", width=0.125, embedding_size=16, image_size=32)
    checkpoint = write_untrained_checkpoint(tmp_path / "ck", spec)
    model, config = restore_backbone(checkpoint)
    assert (config.model.name, config.model.width, config.model.embedding_size) == ("iresnet18", 0.125, 16)
    assert config.data.image_size == 32 and sum(p.size for p in model.parameters()) > 0
    build = measure_engine_build(json.dumps({"checkpoint": str(checkpoint)}))
    # Durations, not compared with each other (a loaded machine can stretch either): the split is exact.
    assert build["twin_s"] > 0 and build["twin_save_and_predictor_s"] > 0
    assert build["save_and_predictor_s"] == max(0.0, build["twin_save_and_predictor_s"] - build["twin_s"])

"""Training curves (plsc.engine.curves): evaluation records in train_log.jsonl, VisualDL scalars beside it
and ``plsc plot``, whose lines must hold exactly the log's numbers (read back from the returned Figure, parsed
from the log here with json, not through the code under test)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_run import TINY_RUN

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.config import load_config
from plsc.engine.curves import plot_runs
from plsc.engine.trainer import Trainer

pytest.importorskip("matplotlib", reason="plsc plot needs matplotlib (plsc[plot], in the test extra)")

BIN = "lfw_disjoint_100.bin"
SET = "lfw_disjoint_100"
HAS_VISUALDL = importlib.util.find_spec("visualdl") is not None


def write_log(path: Path, records: list, cut_line: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in records] + (['{"step": 9, "lo'] if cut_line else [])
    (path / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    return path


def synthetic_records(scale: float) -> list[dict]:
    records = []
    for step in range(1, 9):
        records.append({"step": step, "epoch": 0, "loss": scale * 10.0 / step, "lr": 0.1 * 0.5 ** (step // 4),
                        "ips": 100.0 + step})
        if step % 4 == 0:
            records.append({"step": step, "eval": {"lfw": 0.5 + step / 100, "agedb": 0.4 + step / 50}})
    records[2]["loss"] = None  # a window of skipped steps logs null
    return records


def expected_series(log: Path) -> dict:
    """{panel label: (steps, values)} straight from the log file."""
    records = [json.loads(line) for line in (log / "train_log.jsonl").read_text().splitlines()
               if line.endswith("}")]
    train = [r for r in records if "loss" in r]
    steps = [r["step"] for r in train]
    series = {"loss": (steps, [math.nan if r["loss"] is None else r["loss"] for r in train]),
              "lr": (steps, [r["lr"] for r in train]), "ips": (steps, [r["ips"] for r in train])}
    for r in records:
        for name, value in r.get("eval", {}).items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(r["step"])
            values.append(value)
    return series


def drawn(figure, panel: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (np.asarray(line.get_xdata()), np.asarray(line.get_ydata(), dtype=float))
            for line in figure.axes[panel].lines}


def assert_same(actual: tuple, expected: tuple) -> None:
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], np.asarray(expected[1], dtype=float))  # NaN == NaN here


def decodable_png(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path)).shape


def test_plot_draws_the_logs_numbers_for_several_runs(tmp_path):
    runs = [write_log(tmp_path / "a", synthetic_records(1.0), cut_line=True),
            write_log(tmp_path / "b", synthetic_records(2.0))]
    out = tmp_path / "curves.png"
    figure = plot_runs(runs, out)
    height, width, _ = decodable_png(out)
    assert width > height > 100
    assert [ax.get_title() for ax in figure.axes] == ["loss", "learning rate", "verification accuracy"]
    for run in runs:
        expected = expected_series(run)
        assert_same(drawn(figure, 0)[run.name], expected["loss"])
        assert_same(drawn(figure, 1)[run.name], expected["lr"])
        for name in ("lfw", "agedb"):
            assert_same(drawn(figure, 2)[f"{run.name} {name}"], expected[name])
    # a colour per run, the same in every panel
    colours = {label: line.get_color() for ax in figure.axes for line in ax.lines
               for label in [line.get_label().split()[0]]}
    assert colours["a"] != colours["b"]


def test_plot_cli_and_its_one_line_errors(tmp_path, capsys, monkeypatch):
    run = write_log(tmp_path / "run", synthetic_records(1.0))
    out = tmp_path / "plots" / "c.png"
    assert cli.main(["plot", str(run), "--output", str(out)]) == 0
    assert decodable_png(out)
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
    assert "nothing not found: pass a run folder" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path / "plots")]) == 2  # a folder without a log
    assert "plots/train_log.jsonl not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert cli.main(["plot", str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "plsc: error: plsc plot needs matplotlib: pip install 'plsc[plot]'"


@pytest.fixture(scope="module")
def tiny_run_dir(tiny_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("curves") / "run"
    config = load_config(overrides=[f"data.root={tiny_dir}", f"data.val_bins=[{tiny_dir / BIN}]", *TINY_RUN,
                                    "train.max_steps=3", "train.eval_interval=2"])
    result = Trainer(config, output).run()
    return output, result


def test_a_real_run_logs_its_evaluations_and_plots_them(tiny_run_dir, tmp_path):
    output, result = tiny_run_dir
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    evaluations = [r for r in records if "eval" in r]
    assert [r["step"] for r in evaluations] == [2, 3]  # at the interval, and at the end
    assert evaluations[-1]["eval"][SET] == result.last_eval[SET]["accuracy"]
    best = ckpt.read_manifest(output / "best_model" / SET)
    logged = {r["step"]: r["eval"][SET] for r in evaluations}
    assert logged[best["step"]] == best["best_metric"][SET]["accuracy"]

    figure = plot_runs([output], tmp_path / "real.png")
    assert decodable_png(tmp_path / "real.png")
    expected = expected_series(output)
    assert_same(drawn(figure, 0)["run"], expected["loss"])
    assert_same(drawn(figure, 1)["run"], expected["lr"])
    assert_same(drawn(figure, 2)[f"run {SET}"], expected[SET])


@pytest.mark.skipif(not HAS_VISUALDL, reason="VisualDL is not installed (pip install 'plsc[visualdl]')")
def test_visualdl_scalars_hold_the_logs_numbers(tiny_run_dir):
    from visualdl import LogReader

    output, _ = tiny_run_dir
    (record_file,) = (output / "visualdl").iterdir()
    reader = LogReader(file_path=str(record_file))
    expected = expected_series(output)
    tags = {"train/loss": "loss", "train/lr": "lr", "train/ips": "ips", f"eval/{SET}": SET}
    for tag, (steps, values) in ((tag, expected[key]) for tag, key in tags.items()):
        scalars = reader.get_data("scalar", tag)
        assert [s.id for s in scalars] == steps
        # VisualDL stores float32
        np.testing.assert_allclose([s.value for s in scalars], values, rtol=1e-6)


def test_without_visualdl_nothing_but_the_log_is_written(tiny_run_dir):
    output, _ = tiny_run_dir
    assert (output / "visualdl").is_dir() == HAS_VISUALDL

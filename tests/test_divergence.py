"""Diverging runs stop: a non-finite loss (fp32), non-finite weights before a save, or too many skipped steps
in a row (loss scaling) end the run with one line naming the step; nothing non-finite is saved and the
training log stays strict JSON."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from test_engine import tiny_config, write_tiny_yaml

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.engine.step import TrainStep
from plsc.engine.trainer import Trainer, TrainingDiverged
from plsc.loss.partial_fc import PartialFC

QUICK = ("train.eval_interval=0", "train.save_interval=1", "train.keep_checkpoints=1")


def strict_log(output) -> list[dict]:
    """Every line of train_log.jsonl as strict JSON (Python's json takes NaN and Infinity unless told)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    lines = (output / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    return [record for record in records if "loss" in record]  # the training records


def poison_loss(trainer: Trainer, from_step: int, value: float = math.nan, steps=None) -> None:
    """Make the loss (and so every gradient) non-finite at 0-based steps >= from_step (or in ``steps``)."""
    original = trainer.step.head_loss

    def head_loss(all_embeddings, micro):
        loss = original(all_embeddings, micro)
        poisoned = trainer.state.step in steps if steps is not None else trainer.state.step >= from_step
        return loss * value if poisoned else loss

    trainer.step.head_loss = head_loss


def assert_same_backbone(directory, model) -> None:
    saved = ckpt.load_backbone_state(directory)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(saved[name]), value.numpy(), err_msg=name)


def test_nan_loss_in_fp32_stops_and_keeps_the_last_finite_checkpoint(tiny_dir, tmp_path):
    clean = Trainer(tiny_config(tiny_dir, "train.max_steps=2", *QUICK), tmp_path / "clean")
    clean.run()
    trainer = Trainer(tiny_config(tiny_dir, "train.max_steps=5", *QUICK), tmp_path / "run")
    poison_loss(trainer, from_step=2)  # the third step
    with pytest.raises(TrainingDiverged) as info:
        trainer.run()
    message = str(info.value)
    assert message.startswith("training diverged at step 3: the loss is nan;") and "\n" not in message
    assert str(tmp_path / "run" / "checkpoints" / "2") in message
    # keep_checkpoints=1 pruned nothing finite: step 2 is still there, as a clean 2-step run saved it.
    assert trainer.checkpoints.latest() == tmp_path / "run" / "checkpoints" / "2"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()) == ["2"]
    assert_same_backbone(tmp_path / "run" / "checkpoints" / "2", clean.model)
    assert [r["step"] for r in strict_log(tmp_path / "run")] == [1, 2]


def test_non_finite_weights_are_never_saved(tiny_dir, tmp_path, monkeypatch):
    """A finite loss whose update overflows the weights: the save after that step is refused."""
    trainer = Trainer(tiny_config(tiny_dir, "train.max_steps=4", *QUICK), tmp_path)
    original = TrainStep.__call__

    def train_step(step_self, images, labels, step, lr):
        loss = original(step_self, images, labels, step, lr)
        if trainer.state.step == 1:  # the second step's update: one weight overflows
            weight = trainer.model.parameters()[0]
            weight.set_value(np.full(weight.shape, np.inf, dtype="float32"))
        return loss

    monkeypatch.setattr(TrainStep, "__call__", train_step)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 2: the weights hold inf or nan;"):
        trainer.run()
    assert trainer.checkpoints.latest() == tmp_path / "checkpoints" / "1"
    saved = ckpt.load_backbone_state(tmp_path / "checkpoints" / "1")
    assert all(np.isfinite(np.asarray(value)).all() for value in saved.values())
    assert not (tmp_path / "checkpoints" / "2").exists()


def test_non_finite_class_centers_are_never_saved(tiny_dir, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tiny_dir, "train.max_steps=3", *QUICK), tmp_path)
    original = TrainStep.__call__

    def train_step(step_self, images, labels, step, lr):
        loss = original(step_self, images, labels, step, lr)
        if trainer.state.step == 2:
            trainer.head.weight[5, 3] = float("nan")
        return loss

    monkeypatch.setattr(TrainStep, "__call__", train_step)
    with pytest.raises(TrainingDiverged, match="at step 3: the weights hold inf or nan"):
        trainer.run()
    assert trainer.checkpoints.latest() == tmp_path / "checkpoints" / "2"


def test_too_many_skipped_steps_in_a_row_stop_a_loss_scaled_run(tiny_dir, tmp_path):
    overrides = ("train.precision=fp16", "train.max_skipped_steps=3", "train.max_steps=10", *QUICK)
    trainer = Trainer(tiny_config(tiny_dir, *overrides), tmp_path)
    poison_loss(trainer, from_step=2, value=math.inf)  # steps 3, 4, 5 are skipped; the third skip stops
    with pytest.raises(TrainingDiverged) as info:
        trainer.run()
    message = str(info.value)
    assert message.startswith("training diverged at step 5: 3 steps in a row skipped for inf/nan gradients")
    assert trainer.skipped_steps == 3
    # Steps 3 and 4 were skipped, so their weights equal step 2's: whatever was saved after them is finite.
    latest = trainer.checkpoints.latest()
    saved = ckpt.load_backbone_state(latest)
    assert all(np.isfinite(np.asarray(value)).all() for value in saved.values())
    log = strict_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[2]["loss"] is None and log[2]["skipped_steps"] == 1  # the inf loss is null, not Infinity


def test_skips_that_are_not_in_a_row_do_not_stop(tiny_dir, tmp_path):
    overrides = ("train.precision=fp16", "train.max_skipped_steps=2", "train.max_steps=6", *QUICK)
    trainer = Trainer(tiny_config(tiny_dir, *overrides), tmp_path)
    poison_loss(trainer, 0, value=math.nan, steps={1, 3, 5})
    assert trainer.run().steps == 6
    assert trainer.skipped_steps == 3
    assert [r["loss"] is None for r in strict_log(tmp_path)] == [False, True, False, True, False, True]


def test_divergence_is_one_cli_error_line_with_exit_2(tiny_dir, tmp_path, capsys, monkeypatch):
    config = write_tiny_yaml(tiny_dir, tmp_path / "tiny.yaml", "train.max_steps=4", *QUICK)
    original = PartialFC.loss  # the trainer's head_loss in dynamic mode
    steps = itertools.count()  # the head's loss runs once a step

    def loss(self, all_embeddings, pending):
        value = original(self, all_embeddings, pending)
        return value * math.nan if next(steps) >= 1 else value

    monkeypatch.setattr(PartialFC, "loss", loss)
    code = cli.main(["train", "--config", str(config), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("plsc:")]
    assert len(lines) == 1
    assert lines[0].startswith("plsc: error: training diverged at step 2: the loss is nan")
    assert "Traceback" not in err

"""The training loop end to end on the bundled faces: outputs, checkpoints, resume, signals, CLI."""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from tiny_run import TINY_RUN

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.config import OptimConfig, load_config
from plsc.data import normalize_batch
from plsc.engine.schedule import Schedule
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError

TINY_OVERRIDES = [*TINY_RUN, "train.eval_interval=4", "train.eval_batch_size=50"]


def tiny_config(tiny_dir: Path, *extra: str):
    return load_config(
        overrides=[
            f"data.root={tiny_dir}",
            f"data.val_bins=[{tiny_dir / 'lfw_disjoint_100.bin'}]",
            *TINY_OVERRIDES,
            *extra,
        ]
    )


def read_log(output: Path) -> list[dict]:
    """The training records of a run's log (evaluation records, {"step", "eval"}, have no loss)."""
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [record for record in records if "loss" in record]


# --- schedule ---------------------------------------------------------------------------------------------


def paddle_schedule_lrs(base_lr: float, warmup: int, inner, steps: int) -> list[float]:
    """The rates Paddle's own schedulers give steps 0..steps-1, stepped as PLSC v2.2's loops step them
    (dynamic/train.py:105-112 and 237: the rate is read, then ``lr_scheduler.step()``)."""
    scheduler = paddle.optimizer.lr.LinearWarmup(inner, warmup, 0.0, base_lr) if warmup else inner
    rates = []
    for _ in range(steps):
        rates.append(scheduler())
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup", [0, 4])
def test_step_schedule_equals_paddles_warmup_and_piecewise_decay(warmup):
    optim = OptimConfig(lr=0.1, lr_reference_batch=512, warmup_steps=warmup, decay_boundaries=[2, 3],
                        decay_factor=0.1)
    schedule = Schedule.from_config(optim, steps_per_epoch=10, total_steps=60, global_batch=1024)
    assert schedule.base_lr == pytest.approx(0.2)  # PLSC's base_lr = global_batch * lr / 512
    assert schedule.decay_steps == (20, 30)  # boundaries in global steps, as PLSC logs them
    inner = paddle.optimizer.lr.PiecewiseDecay([20, 30], [0.2, 0.02, 0.002])
    expected = paddle_schedule_lrs(0.2, warmup, inner, 60)
    np.testing.assert_allclose([schedule.lr(k) for k in range(60)], expected, rtol=1e-12)


def test_poly_schedule_equals_paddles_warmup_and_polynomial_decay():
    optim = OptimConfig(lr=0.5, schedule="poly", poly_power=2.0, warmup_steps=3)
    schedule = Schedule.from_config(optim, steps_per_epoch=7, total_steps=20, global_batch=64)
    assert schedule.base_lr == 0.5  # lr_reference_batch 0: no scaling
    inner = paddle.optimizer.lr.PolynomialDecay(0.5, decay_steps=17, end_lr=0.0, power=2.0)
    np.testing.assert_allclose([schedule.lr(k) for k in range(20)], paddle_schedule_lrs(0.5, 3, inner, 20),
                               rtol=1e-12, atol=1e-15)


def test_step_unit_boundaries_are_global_steps():
    optim = OptimConfig(lr=1.0, decay_unit="step", decay_boundaries=[5], decay_factor=0.5)
    schedule = Schedule.from_config(optim, steps_per_epoch=1000, total_steps=10, global_batch=8)
    assert [schedule.lr(k) for k in (4, 5)] == [1.0, 0.5]


# --- training ---------------------------------------------------------------------------------------------


def test_training_writes_log_checkpoints_and_best_model(tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, "train.max_steps=6")
    result = Trainer(config, tmp_path).run()
    assert result.steps == 6
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]) >= {"step", "epoch", "loss", "lr", "ips", "eta_s", "mem_mb"}
    assert records[-1]["epoch"] == 1 and records[-1]["lr"] == pytest.approx(0.005)  # decayed after epoch 1
    assert all(math.isfinite(r["loss"]) for r in records)
    assert load_config(tmp_path / "config.yaml").to_dict() == config.to_dict()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "6"
    # keep_checkpoints=1: the epoch-end checkpoint at step 5 was pruned when step 6 was saved
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["6"]
    manifest = ckpt.read_manifest(tmp_path / "checkpoints" / "6")
    assert manifest["step"] == 6 and manifest["num_classes"] == 40 and manifest["world_size"] == 1
    best = tmp_path / "best_model" / "lfw_disjoint_100"
    assert ckpt.read_manifest(best)["best_metric"]["lfw_disjoint_100"]["pairs"] == 100
    assert result.best["lfw_disjoint_100"]["step"] in (4, 6)


def test_resume_continues_the_same_trajectory(tiny_dir, tmp_path):
    """3 steps, stop, resume to 8 (crossing an epoch end) == 8 steps in one go."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    Trainer(tiny_config(tiny_dir, "train.max_steps=8", "train.eval_interval=0"), whole).run()
    Trainer(tiny_config(tiny_dir, "train.max_steps=3", "train.eval_interval=0"), split).run()
    resumed = Trainer(tiny_config(tiny_dir, "train.max_steps=8", "train.eval_interval=0"), split, resume=True)
    assert resumed.state.step == 3 and resumed.state.step_in_epoch == 3
    resumed.run()
    whole_losses = [r["loss"] for r in read_log(whole)]
    split_losses = [r["loss"] for r in read_log(split)]
    assert len(split_losses) == 8
    np.testing.assert_allclose(split_losses, whole_losses, rtol=1e-6)
    a, b = (ckpt.read_manifest(d / "checkpoints" / "8") for d in (whole, split))
    assert a["epoch"] == b["epoch"] == 1
    for kind in ("weight", "velocity"):
        np.testing.assert_allclose(
            np.load(whole / "checkpoints/8" / ckpt.shard_file(0, kind)),
            np.load(split / "checkpoints/8" / ckpt.shard_file(0, kind)),
            rtol=1e-5,
            atol=1e-7,
        )


def backbone_state(trainer: Trainer) -> dict[str, np.ndarray]:
    return {p.name: p.numpy().astype(np.float64) for p in trainer.model.parameters()}


@pytest.fixture(scope="module")
def unclipped_first_step(tiny_dir, tmp_path_factory):
    """The first batch, the backbone's weights and summed gradients before the first step, and the class
    centers after a step without clipping."""
    output = tmp_path_factory.mktemp("unclipped")
    trainer = Trainer(tiny_config(tiny_dir, "optim.clip_norm=0"), output)
    images, labels = next(iter(trainer.loader))
    before = backbone_state(trainer)
    pending = trainer.head.prepare(labels, 0)
    # The step's forward and backward, one process (no all-reduce to make)
    embeddings = trainer.model(normalize_batch(images))
    trainer.head.loss(trainer.comm.all_gather_with_grad(embeddings), pending).backward()
    grads = {p.name: p.grad.numpy().astype(np.float64)
             for p in trainer.model.parameters() if p.grad is not None}
    center_grad = (pending.index.numpy(), pending.rows.grad.numpy().astype(np.float64),
                   trainer.head.weight.numpy().astype(np.float64))
    stepped = Trainer(tiny_config(tiny_dir, "optim.clip_norm=0"), output)
    stepped.step(images, labels, stepped.state.step, 0.05)
    centers = (stepped.head.weight.numpy(), stepped.head.velocity.numpy())
    return images, labels, before, grads, centers, center_grad


def momentum_first_step(weight, grad, lr: float, decay: float):
    """Paddle's Momentum from zero velocity with L2 decay: velocity = grad + decay * weight."""
    return weight - lr * (grad + decay * weight)


# (clip_norm as a multiple of the gradient's norm, clip_max_factor): shrunk 1000x; 1.5x, allowed up to 2x
# (PLSC v2.2's amplification); 10x capped at 2x; 10x capped at 1x (arcface_torch's clip_grad_norm_).
@pytest.mark.parametrize("relative_clip, max_factor", [(1e-3, 1.0), (1.5, 2.0), (10.0, 2.0), (10.0, 1.0)])
@pytest.mark.parametrize("divisor", [1.0, 8.0])
def test_clipping_scales_the_backbone_alone(unclipped_first_step, tiny_dir, tmp_path, relative_clip,
                                            max_factor, divisor):
    """The backbone's first step equals Momentum's (numpy) on the gradient / optim.grad_divisor times
    min(clip / (norm + 1e-6), max); the class centers equal the unclipped run's exactly."""
    images, labels, before, grads, centers, _ = unclipped_first_step
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads.values())) / divisor
    clip = relative_clip * norm
    trainer = Trainer(tiny_config(tiny_dir, f"optim.clip_norm={clip!r}",
                                  f"optim.clip_max_factor={max_factor}", f"optim.grad_divisor={divisor}"),
                      tmp_path)
    lr, decay = 0.05, trainer.config.optim.weight_decay
    trainer.step(images, labels, trainer.state.step, lr)
    factor = min(clip / (norm + 1e-6), max_factor)
    after = backbone_state(trainer)
    off_clipped, off_unclipped = 0.0, 0.0
    for name, grad in grads.items():
        weight = before[name]
        tolerance = 1e-6 * max(1.0, np.abs(weight).max())
        clipped = momentum_first_step(weight, factor * grad / divisor, lr, decay)
        off_clipped = max(off_clipped, np.abs(after[name] - clipped).max() / tolerance)
        unclipped = momentum_first_step(weight, grad / divisor, lr, decay)
        off_unclipped = max(off_unclipped, np.abs(after[name] - unclipped).max() / tolerance)
    assert off_clipped <= 1.0, f"the backbone is {off_clipped:.3g} tolerances from the reference"
    if abs(factor - 1.0) > 0.1:  # the reference would have told an unclipped step apart
        assert off_unclipped > 100.0
    if divisor == 1.0:
        np.testing.assert_array_equal(trainer.head.weight.numpy(), centers[0])
        np.testing.assert_array_equal(trainer.head.velocity.numpy(), centers[1])


@pytest.mark.parametrize("unscaled", [True, False])
def test_center_gradients_keep_the_loss_scale_only_if_asked(unclipped_first_step, tiny_dir, tmp_path,
                                                            unscaled):
    """Loss scale 1024 (a CPU run scales and unscales but computes in float32), grad_divisor 8: the sampled
    centers' first (lazy) step takes the gradient / 8, or times 1024 / 8 with train.unscale_center_grads false
    (PLSC v2.2's FP16 runs); numpy reference from the unscaled gradient."""
    images, labels, _, _, _, (index, grad, weight) = unclipped_first_step
    settings = ["train.precision=fp16", "train.loss_scale_init=1024", "optim.grad_divisor=8",
                f"train.unscale_center_grads={str(unscaled).lower()}"]
    trainer = Trainer(tiny_config(tiny_dir, *settings), tmp_path)
    lr, decay = 0.05, trainer.config.optim.weight_decay
    trainer.step(images, labels, trainer.state.step, lr)
    scale = (1.0 if unscaled else 1024.0) / 8.0
    expected = momentum_first_step(weight[index], scale * grad, lr, decay)
    tolerance = 1e-6 * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(trainer.head.weight.numpy()[index], expected, rtol=0, atol=tolerance)


def test_failed_save_keeps_the_previous_checkpoint(tiny_dir, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tiny_dir, "train.max_steps=2", "train.eval_interval=0"), tmp_path)
    trainer.run()
    before = ckpt.read_manifest(tmp_path / "checkpoints" / "2")

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")  # a write that fills the disk halfway
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.paddle, "save", disk_full)
    trainer.state.step = 3
    with pytest.raises(PlscError, match=r"^no space left writing .*\.3\.partial/backbone\.pdparams$"):
        trainer.save_step_checkpoint()
    assert trainer.checkpoints.latest() == tmp_path / "checkpoints" / "2"
    assert ckpt.read_manifest(tmp_path / "checkpoints" / "2") == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "latest"]  # partial removed


def test_missing_shard_is_a_clear_error(tiny_dir, tmp_path):
    Trainer(tiny_config(tiny_dir, "train.max_steps=1", "train.eval_interval=0"), tmp_path).run()
    (tmp_path / "checkpoints" / "1" / ckpt.shard_file(0, "velocity")).unlink()
    with pytest.raises(Exception, match="incomplete.*rank00000.velocity"):
        ckpt.read_manifest(tmp_path / "checkpoints" / "1")


def test_new_class_count_reuses_only_the_backbone(tiny_dir, tmp_path, caplog):
    Trainer(tiny_config(tiny_dir, "train.max_steps=1", "train.eval_interval=0"), tmp_path / "a").run()
    with pytest.raises(PlscError, match="40 classes, this run 50"):  # --resume continues the same run
        Trainer(tiny_config(tiny_dir, "data.num_classes=50"), tmp_path / "b",
                resume=tmp_path / "a" / "checkpoints" / "1")
    finetune = Trainer(
        tiny_config(tiny_dir, "train.max_steps=1", "data.num_classes=50"),
        tmp_path / "b",
        resume=tmp_path / "a" / "checkpoints" / "1",
        weights_only=True,
    )
    assert "reusing the backbone only" in caplog.text
    assert finetune.state.step == 0 and finetune.head.weight.shape == [50, 16]
    saved = paddle.load(str(tmp_path / "a" / "checkpoints" / "1" / ckpt.BACKBONE))
    for name, value in finetune.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[name].numpy())


# --- command line -----------------------------------------------------------------------------------------


def write_tiny_yaml(tiny_dir: Path, path: Path, *extra: str) -> Path:
    sections: dict[str, dict[str, str]] = {}
    for override in [
        f"data.root={tiny_dir}",
        f"data.val_bins=[{tiny_dir / 'lfw_disjoint_100.bin'}]",
        *TINY_OVERRIDES,
        *extra,
    ]:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value  # a later one wins, as with --set (a YAML key is once)
    text = "".join(f"{section}:\n" + "".join(f"  {name}: {value}\n" for name, value in values.items())
                   for section, values in sections.items())
    path.write_text(text)
    return path


def test_eval_cli_prints_table_and_writes_json(tiny_dir, tmp_path, capsys):
    config = write_tiny_yaml(tiny_dir, tmp_path / "tiny.yaml", "train.max_steps=2", "train.eval_interval=0")
    assert cli.main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "lfw_disjoint_100" in out and "checkpoint:" in out
    checkpoint = tmp_path / "run" / "checkpoints" / "2"
    bin_file = str(tiny_dir / "lfw_disjoint_100.bin")
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--bin", bin_file, "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    assert set(results["lfw_disjoint_100"]) >= {
        "accuracy",
        "std",
        "threshold",
        "xnorm",
        "tar_at_far_1e-3",
        "pairs",
    }
    # The same weights evaluated inside training give the same numbers.
    best = ckpt.read_manifest(tmp_path / "run" / "best_model" / "lfw_disjoint_100")["best_metric"]
    assert results["lfw_disjoint_100"]["accuracy"] == pytest.approx(best["lfw_disjoint_100"]["accuracy"])


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["--set", "model.name=resnet9000"], "resnet9000"),
        (["--set", "data.root=/does/not/exist"], "/does/not/exist"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tiny_dir, tmp_path, capsys, argv_tail, message):
    config = write_tiny_yaml(tiny_dir, tmp_path / "tiny.yaml", "train.max_steps=1")
    code = cli.main(["train", "--config", str(config), "--output", str(tmp_path / "o"), *argv_tail])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and message in err and err.startswith("plsc: error:")


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tiny_dir, tmp_path):
    config = write_tiny_yaml(tiny_dir, tmp_path / "tiny.yaml", "train.max_steps=200", "train.eval_interval=0")
    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "plsc.cli", "train", "--config", str(config), "--output", str(output)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = output / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    hint = err.strip().splitlines()[-1].split("; continue with: ")[1]
    assert hint == f"plsc train --output {output} --resume"
    latest = int((output / "checkpoints" / "latest").read_text())
    assert latest >= 2 and latest == read_log(output)[-1]["step"]
    # The hint as printed (plus a shorter run) continues from the checkpoint with the run's own settings.
    assert cli.main([*shlex.split(hint)[1:], "--set", f"train.max_steps={latest + 1}"]) == 0
    assert [r["step"] for r in read_log(output)] == list(range(1, latest + 2))

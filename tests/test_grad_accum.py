"""Gradient accumulation (``train.grad_accum``): with batch statistics frozen, an optimizer step of N
micro-batches of B equals one step of N x B; an inf in any micro-batch skips the whole step; the loop, its
log, its data position and a resume count optimizer steps.

The reference of each equality is the step of the whole batch, which the head's and the step's own tests hold
against numpy, finite differences and a direct loop.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from distributed_worker import lockstep_grad_accum, trained_state, use_running_batchnorm_statistics
from test_distributed import launch_worker
from tiny_run import TINY_RUN

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.config import load_config
from plsc.distributed import LocalComm, shard_classes
from plsc.engine.plan import make_plan, plan_rows
from plsc.engine.step import TrainStep
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError
from plsc.loss.sampling import num_sampled

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 40  # the bundled faces' identities
RATIO = 0.5  # the head samples: the centers of a step depend on every one of its labels
# Measured largest relative difference (max |a - b| / max(1, max |b|)) over the backbone, its velocities, the
# centers and theirs, 1 process after 3 steps: 1.1e-6 and 9.6e-7 (whole matrix, N=2 and 4), 1.3e-6 and
# 8.4e-7 (streaming), 1.1e-6 (static mode, N=2); 2 ranks after 2 steps: 4.7e-7. Summation order alone: the
# micro-batches' gradients are added one after the other. (The scratch of the first micro-batch's center
# gradient overwritten by the next, or the micro-batches' labels out of rank order, part them by 0.6-2.)
TOLERANCE = 1e-5


def tiny_overrides(tiny_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={tiny_dir}", "data.val_bins=[]", *TINY_RUN, "train.eval_interval=0",
            f"loss.sample_ratio={RATIO}", *extra]


def relative_difference(actual: np.ndarray, desired: np.ndarray) -> float:
    """``max |actual - desired| / max(1, max |desired|)``: center gradients and the centers themselves span
    orders of magnitude, and summation order moves the largest entries by a few ulps."""
    assert actual.shape == desired.shape
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    return float(np.abs(actual.astype(np.float64) - desired).max(initial=0.0)) / scale


def largest_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max((relative_difference(a[key], b[key]), key) for key in a)


def assert_same_states(states: dict[str, dict[str, np.ndarray]]) -> None:
    whole, accumulated = states["whole"], states["accumulated"]
    np.testing.assert_allclose(accumulated["losses"], whole["losses"], rtol=1e-6)
    difference, key = largest_difference(accumulated, whole)
    assert difference <= TOLERANCE, f"{key} differs by {difference:.3g}"
    # Momentum and velocity were taken: the step's centers and backbone moved, their velocities are not 0.
    assert np.abs(whole["center_velocity"]).max() > 0


@pytest.mark.parametrize("micro_batches, chunk_size, mode",
                         [(2, 0, "dynamic"), (4, 0, "dynamic"), (2, 7, "dynamic"), (4, 7, "dynamic"),
                          (2, 0, "static")])
def test_micro_batches_step_like_one_batch_of_all_of_them(tiny_dir, tmp_path, micro_batches, chunk_size,
                                                          mode):
    """N micro-batches of 4 against one batch of 4N, three optimizer steps (momentum in play), whole-matrix
    head and streaming head (chunks of 7 centers), clipped as the tiny run clips; in static mode the compiled
    loss's backward passes add into the same gathered centers."""
    batch = 4
    # Fewer classes in a step than the head samples: random negatives complete the centers, drawn once
    # per optimizer step from all of its labels.
    assert micro_batches * batch < num_sampled(CLASSES, RATIO)
    spec = {"overrides": tiny_overrides(tiny_dir, f"loss.chunk_size={chunk_size}", f"train.mode={mode}"),
            "micro_batches": micro_batches, "batch": batch, "steps": 3, "lr": 0.05}
    assert_same_states(lockstep_grad_accum(spec, tmp_path, LocalComm()))


def test_two_ranks_accumulate_like_one_batch_of_all_micro_batches(tiny_dir, tmp_path):
    """2 ranks, 2 micro-batches of 2 per rank against one batch of 4 per rank: the head samples from the
    labels of both micro-batches of both ranks (each rank owns 20 classes and samples 10), and each rank's
    micro-batch lands in its place of the all-gathered batch."""
    spec = {"overrides": tiny_overrides(tiny_dir, "loss.chunk_size=0"), "micro_batches": 2, "batch": 2,
            "steps": 2, "lr": 0.05}
    assert 2 * 2 * 2 < 2 * num_sampled(shard_classes(CLASSES, 0, 2).count, RATIO)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    out.mkdir()
    launch_worker(tmp_path, 2, "grad_accum", spec_path, out)
    for rank in range(2):
        states = {name: dict(np.load(out / f"{name}.rank{rank}.npz")) for name in ("whole", "accumulated")}
        assert_same_states(states)


# --- loss scaling ------------------------------------------------------------------------------------------


def loss_scaled_trainer(tiny_dir: Path, output: Path, scale: float, chunk_size: int) -> Trainer:
    """Precision fp16 on the CPU: loss scaling and its inf/nan check on float32 arithmetic."""
    overrides = tiny_overrides(tiny_dir, "train.precision=fp16", f"train.loss_scale_init={scale}",
                               "train.batch_size=4", "train.grad_accum=2", f"loss.chunk_size={chunk_size}")
    trainer = Trainer(load_config(overrides=overrides), output, comm=LocalComm())
    use_running_batchnorm_statistics(trainer.model)
    return trainer


@pytest.mark.parametrize("chunk_size", [0, 7])
def test_an_inf_in_one_micro_batch_skips_the_whole_step(tiny_dir, tmp_path, chunk_size):
    """The second micro-batch's loss is made inf: the step is skipped whole (the first micro-batch's
    gradients are not applied either), the loss scale backs off, and the next step equals a fresh trainer's
    first step at that scale: nothing of the skipped step is left behind."""
    trainer = loss_scaled_trainer(tiny_dir, tmp_path / "skipped", 1024.0, chunk_size)
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    first = [next(batches) for _ in range(2)]
    second = [next(batches) for _ in range(2)]
    calls = itertools.count()
    original = trainer.step.head_loss

    def head_loss(all_embeddings, micro):
        loss = original(all_embeddings, micro)
        return loss * math.inf if next(calls) == 1 else loss

    trainer.step.head_loss = head_loss
    before = trained_state(trainer)
    images, labels = (concatenated(first, part) for part in (0, 1))
    assert not math.isfinite(trainer.step(images, labels, 0, 0.05))
    assert next(calls) == 2  # both micro-batches ran before the check
    assert trainer.skipped_steps == 1 and trainer.scaler.scale == 512.0
    difference, key = largest_difference(trained_state(trainer), before)
    assert difference == 0.0, f"{key} changed by a skipped step"

    fresh = loss_scaled_trainer(tiny_dir, tmp_path / "fresh", 512.0, chunk_size)
    images, labels = (concatenated(second, part) for part in (0, 1))
    losses = [t.step(images, labels, 1, 0.05) for t in (trainer, fresh)]
    assert losses[0] == losses[1]
    # Loss scales are powers of 2: scaling and unscaling are exact, the two steps compute the same numbers.
    difference, key = largest_difference(trained_state(trainer), trained_state(fresh))
    assert difference == 0.0, f"{key} differs by {difference:.3g}"


def concatenated(batches: list, part: int):
    import paddle

    return paddle.concat([batch[part] for batch in batches])


# --- the loop ----------------------------------------------------------------------------------------------


def read_log(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [record for record in records if "loss" in record]


def test_plsc_train_with_grad_accum_logs_optimizer_steps(project_root, tmp_path, monkeypatch, caplog):
    """The bundled mini run with 2 micro-batches of 32: 3 optimizer steps logged, each of 64 images. Its 240
    images make 7 loader batches of 32, so 3 steps are the whole epoch (the 7th batch left out): the
    checkpoint stands at the start of epoch 1."""
    monkeypatch.chdir(project_root)
    output = tmp_path / "run"
    smaller = ["--set", "model.width=0.0625", "--set", "data.image_size=32"]  # the counts are the config's
    code = cli.main(["train", "--config", "configs/cpu/mini.yaml", "--set", "train.grad_accum=2", *smaller,
                     "--set", "train.max_steps=3", "--set", "train.log_interval=1", "--output", str(output)])
    assert code == 0
    assert [record["step"] for record in read_log(output)] == [1, 2, 3]
    assert "global batch 64 (1 x 32 x 2 micro-batches, train.grad_accum)" in caplog.text
    manifest = ckpt.read_manifest(output / "checkpoints" / "3")
    assert (manifest["step"], manifest["epoch"], manifest["step_in_epoch"]) == (3, 1, 0)


def step_labels(monkeypatch) -> list[np.ndarray]:
    """The labels of every step the trainer's loop takes (recorded at the step it calls, ``TrainStep``)."""
    seen, train_step = [], TrainStep.__call__

    def recording(step_self, images, labels, step, lr):
        seen.append(labels.numpy())
        return train_step(step_self, images, labels, step, lr)

    monkeypatch.setattr(TrainStep, "__call__", recording)
    return seen


def test_resume_with_grad_accum_continues_the_same_trajectory(tiny_dir, tmp_path, monkeypatch):
    """Batches of 16 on 240 images: 15 loader batches an epoch, 7 optimizer steps of 2, one batch left out.
    3 steps, then a resume to 9 (across the epoch's end) == 9 steps in one go; each step takes the sampler's
    next two batches of its epoch (the reference: the sampler's own permutation and the data set's labels)."""
    settings = ["train.batch_size=16", "train.grad_accum=2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    trainer = Trainer(load_config(overrides=tiny_overrides(tiny_dir, *settings, "train.max_steps=9")), whole)
    assert (trainer.sampler.batches_per_epoch, trainer.steps_per_epoch) == (15, 7)
    seen = step_labels(monkeypatch)
    trainer.run()
    expected = []
    for epoch, steps in ((0, 7), (1, 2)):
        trainer.sampler.set_epoch(epoch)
        batches = trainer.sampler.rank_batches()
        expected += [trainer.dataset.labels[batches[2 * k : 2 * k + 2].reshape(-1)] for k in range(steps)]
    assert len(seen) == 9
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_array_equal(got, want)

    Trainer(load_config(overrides=tiny_overrides(tiny_dir, *settings, "train.max_steps=3")), split).run()
    resumed = Trainer(load_config(overrides=tiny_overrides(tiny_dir, *settings, "train.max_steps=9")), split,
                      resume=True)
    assert (resumed.state.step, resumed.state.epoch, resumed.state.step_in_epoch) == (3, 0, 6)
    resumed.run()
    np.testing.assert_allclose([r["loss"] for r in read_log(split)], [r["loss"] for r in read_log(whole)],
                               rtol=1e-6)
    a, b = (ckpt.read_manifest(d / "checkpoints" / "9") for d in (whole, split))
    assert a["epoch"] == b["epoch"] == 1 and a["step_in_epoch"] == b["step_in_epoch"] == 4
    for kind in ("weight", "velocity"):
        np.testing.assert_allclose(np.load(split / "checkpoints/9" / ckpt.shard_file(0, kind)),
                                   np.load(whole / "checkpoints/9" / ckpt.shard_file(0, kind)),
                                   rtol=1e-5, atol=1e-7)


def test_resume_refuses_another_grad_accum(tiny_dir, tmp_path):
    settings = ["train.batch_size=16", "train.max_steps=2"]
    Trainer(load_config(overrides=tiny_overrides(tiny_dir, *settings)), tmp_path).run()
    config = load_config(overrides=tiny_overrides(tiny_dir, *settings, "train.grad_accum=2"))
    with pytest.raises(PlscError, match=r"train.grad_accum is 1 in the checkpoint, 2 here"):
        Trainer(config, tmp_path, resume=True)


def test_an_epoch_shorter_than_one_optimizer_step_is_one_line(tiny_dir, tmp_path):
    config = load_config(overrides=tiny_overrides(tiny_dir, "train.batch_size=48", "train.grad_accum=6"))
    expected = r"^an epoch has 5 batches of train.batch_size, fewer than the 6 of one optimizer step"
    with pytest.raises(PlscError, match=expected) as info:
        Trainer(config, tmp_path)
    assert "\n" not in str(info.value)


def test_plan_of_two_gpus_accumulating_four_batches_is_plscs_eight_gpu_plan():
    """PLSC v2.2's r50 config on 8 GPUs x 128 and on 2 GPUs x 128 x 4 micro-batches: the same global batch
    of 1024, steps per epoch (images // 1024, PLSC's dynamic/train.py:84), total steps, decay steps and
    rates (base lr = 1024 x lr / 512)."""
    config = ROOT / "configs" / "ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml"
    images = 5_179_510
    eight = make_plan(load_config(config, reads_data=False), 8, images, "--images", 93431)
    two = make_plan(load_config(config, ["train.grad_accum=4"], reads_data=False), 2, images, "--images",
                    93431)
    assert two.global_batch == eight.global_batch == 1024
    assert two.steps_per_epoch == eight.steps_per_epoch == images // 1024
    assert two.schedule == eight.schedule
    assert two.schedule.base_lr == pytest.approx(1024 * load_config(config, reads_data=False).optim.lr / 512)
    assert "1,024 (2 x 128 x 4 micro-batches, train.grad_accum)" in dict(plan_rows(two))["global batch"]
    assert two.to_dict()["grad_accum"] == 4

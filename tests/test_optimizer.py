"""``optim.name: sgd | adamw`` (plsc/engine/optimizer.py): Paddle's AdamW against numpy's AdamW formulas (as
torch.optim.AdamW, which arcface_torch trains with, writes them), the class centers' rate and decay, short
training runs on the bundled faces (whole-matrix and streaming heads), resume, and the FP16 O2 path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
from o2_emulation import create_step_state, decorate_as_on_gpu, master_weights, state_after_steps, velocities

from plsc import checkpoint as ckpt
from plsc import cli
from plsc.config import OptimConfig, load_config
from plsc.engine.optimizer import build_optimizer
from plsc.engine.schedule import Schedule
from plsc.engine.step import center_update
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError
from plsc.models import precision

MINI = Path(__file__).resolve().parent.parent / "configs" / "cpu" / "mini.yaml"
# The centers' SGD settings an AdamW run must give (plsc.config refuses adamw without them).
ADAMW = ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.1", "optim.center_lr=0.05",
         "optim.center_weight_decay=5e-4"]


def numpy_adamw(weights: dict, grads: list[dict], lrs: list[float], betas, eps: float, decay: float,
                coupled: bool = False) -> dict:
    """torch.optim.AdamW's update (decoupled decay, then bias-corrected moments), float64, every parameter.
    ``coupled``: Adam with L2 instead (decay * weight added to the gradient before the moments), the update
    AdamW's decoupling replaces."""
    beta1, beta2 = betas
    weights = {name: value.astype(np.float64) for name, value in weights.items()}
    first = {name: np.zeros_like(value) for name, value in weights.items()}
    second = {name: np.zeros_like(value) for name, value in weights.items()}
    for t, (grad, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        for name, g in grad.items():
            if coupled:
                g = g + decay * weights[name]
            else:
                weights[name] *= 1 - lr * decay
            first[name] = beta1 * first[name] + (1 - beta1) * g
            second[name] = beta2 * second[name] + (1 - beta2) * g * g
            m_hat, v_hat = first[name] / (1 - beta1**t), second[name] / (1 - beta2**t)
            weights[name] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return weights


def test_paddles_adamw_is_numpys_adamw_with_decoupled_decay_on_every_parameter():
    paddle.seed(3)
    layer = paddle.nn.Sequential(paddle.nn.Linear(6, 4), paddle.nn.LayerNorm(4))  # weights, biases, a norm
    optim = OptimConfig(name="adamw", lr=0.01, weight_decay=0.3, betas=[0.8, 0.99], eps=1e-6, center_lr=0.1,
                        center_weight_decay=0.0)
    optimizer = build_optimizer(optim, layer.parameters())
    assert isinstance(optimizer, paddle.optimizer.AdamW)
    start = {p.name: p.numpy() for p in layer.parameters()}
    rng = np.random.default_rng(0)
    lrs, grads = [0.01, 0.03, 0.005, 0.02, 0.01], []
    for lr in lrs:
        inputs = paddle.to_tensor(rng.standard_normal((5, 6)).astype(np.float32))
        target = paddle.to_tensor(rng.standard_normal((5, 4)).astype(np.float32))
        ((layer(inputs) - target) ** 2).sum().backward()
        grads.append({p.name: p.grad.numpy().astype(np.float64) for p in layer.parameters()})
        optimizer.set_lr(lr)
        optimizer.step()
        optimizer.clear_grad()
    expected = numpy_adamw(start, grads, lrs, optim.betas, optim.eps, optim.weight_decay)
    for param in layer.parameters():
        # float32 arithmetic against float64 over 5 steps: measured at most 9.4e-8 absolute on weights of
        # magnitude ~1 (Paddle 3.3.1); 1e-6 leaves room, far below the smallest change here (6e-2).
        np.testing.assert_allclose(param.numpy(), expected[param.name], rtol=0, atol=1e-6)
        assert np.abs(param.numpy() - start[param.name]).max() > 1e-3  # every parameter moved
    # The decay is decoupled: Adam with the same decay as L2 in the gradient ends elsewhere, by far more than
    # the tolerance above (measured: 2.2e-2 at the largest element).
    coupled = numpy_adamw(start, grads, lrs, optim.betas, optim.eps, optim.weight_decay, coupled=True)
    assert max(np.abs(p.numpy() - coupled[p.name]).max() for p in layer.parameters()) > 1e-3


def test_sgd_stays_paddles_momentum_with_l2_decay():
    layer = paddle.nn.Linear(3, 2)
    optimizer = build_optimizer(OptimConfig(momentum=0.8, weight_decay=1e-3), layer.parameters())
    assert isinstance(optimizer, paddle.optimizer.Momentum)
    weight = layer.weight.numpy().astype(np.float64)
    (layer(paddle.ones([1, 3])).sum()).backward()
    grad = layer.weight.grad.numpy().astype(np.float64)
    optimizer.set_lr(0.5)
    optimizer.step()
    # float32 against float64 on weights of magnitude ~1: one float32 rounding, ~1e-7 absolute
    np.testing.assert_allclose(layer.weight.numpy(), weight - 0.5 * (grad + 1e-3 * weight), rtol=0, atol=1e-6)


def test_class_centers_follow_the_schedule_at_their_own_rate_and_decay():
    """center_lr 0: the backbone's rate; > 0: the same warmup and decay around their base rate."""
    sgd = OptimConfig(lr=0.1, weight_decay=5e-4, momentum=0.9)
    assert center_update(sgd, 0.037, 0.5) == center_update(sgd, 0.037, 0.5)
    update = center_update(sgd, 0.037, 0.5)
    assert (update.lr, update.momentum, update.weight_decay, update.grad_scale) == (0.037, 0.9, 5e-4, 0.5)
    adamw = OptimConfig(name="adamw", lr=0.001, weight_decay=0.1, center_lr=0.2, center_weight_decay=5e-4,
                        schedule="poly", warmup_epochs=2)
    schedule = Schedule.from_config(adamw, steps_per_epoch=10, total_steps=100, global_batch=64)
    assert schedule.warmup_steps == 20
    for step in (0, 5, 20, 60, 99):
        rate = 0.2 * step / 20 if step < 20 else 0.2 * (1 - (step - 20) / 80)  # by hand, power 1
        update = center_update(adamw, schedule.lr(step), 1.0)
        assert update.lr == pytest.approx(rate, rel=1e-12, abs=1e-15)
        assert update.weight_decay == 5e-4


def polynomial_lr_warmup(base_lr: float, warmup: int, total: int, power: float, steps: int) -> list[float]:
    """The rate of each of ``steps`` optimizer steps under arcface_torch's PolynomialLRWarmup as train_v2.py
    drives it (lr_scheduler.py:14-29): the rate the optimizer holds, then one scheduler step, which sets it
    to ``base * k / warmup`` in the warmup and afterwards multiplies it by the ratio of successive decay
    factors (the chained form, not a closed one); past ``total`` it stays."""
    rates, held = [], base_lr  # construction steps the scheduler to 0, which keeps the initial rate
    for k in range(1, steps + 1):
        rates.append(held)
        if k > total:
            continue
        if k <= warmup:
            held = base_lr * k / warmup
        else:
            span = total - warmup
            held *= ((1.0 - (k - warmup) / span) / (1.0 - (k - 1 - warmup) / span)) ** power
    return rates


@pytest.mark.parametrize("warmup_epochs, power", [(0, 1.0), (2, 1.0), (2, 2.0)])
def test_poly_schedule_with_warmup_epochs_is_arcface_torchs(warmup_epochs, power):
    """``optim.warmup_epochs`` counts as train_v2.py:137-138 does (``num_image // total_batch_size`` steps per
    epoch); every step's rate equals PolynomialLRWarmup's but step 0 of a warmup, where plsc trains at 0
    (Paddle's LinearWarmup) and arcface_torch at the full rate (docs/design.md, "Training semantics")."""
    images, global_batch, epochs = 1000, 64, 10
    steps_per_epoch = images // global_batch
    optim = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, center_lr=0.2, center_weight_decay=5e-4,
                        schedule="poly", poly_power=power, warmup_epochs=warmup_epochs)
    schedule = Schedule.from_config(optim, steps_per_epoch, steps_per_epoch * epochs, global_batch)
    total, warmup = steps_per_epoch * epochs, steps_per_epoch * warmup_epochs
    assert (schedule.total_steps, schedule.warmup_steps) == (150, 15 * warmup_epochs)
    expected = polynomial_lr_warmup(1e-3, warmup, total, power, total)
    mine = [schedule.lr(k) for k in range(total)]
    # The chained product accumulates float64 roundings over 150 steps: measured at most 1.3e-15 relative.
    np.testing.assert_allclose(mine[1:], expected[1:], rtol=1e-13, atol=0)
    assert mine[0] == (0.0 if warmup else 1e-3) and expected[0] == 1e-3
    assert mine[-1] > 0 and schedule.lr(total) == 0.0  # 0 only after the last step, as arcface_torch's


# --- training on the bundled faces -------------------------------------------------------------------------


def tiny(tiny_dir: Path, tiny_run: list[str], *extra: str):
    bins = f"data.val_bins=[{tiny_dir / 'lfw_disjoint_100.bin'}]"
    return load_config(overrides=[f"data.root={tiny_dir}", bins, *tiny_run, "train.eval_interval=0",
                                  "train.eval_batch_size=50", *extra])


def read_losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


@pytest.mark.parametrize("head", ["loss.chunk_size=0", "loss.chunk_size=8"])
def test_plsc_train_runs_adamw_and_steps_the_backbone_by_it(tiny_dir, tiny_run, tmp_path, head):
    """``plsc train`` on the bundled config (configs/cpu/mini.yaml) with optim.name=adamw set on the command
    line, fp32, whole-matrix and streaming heads: the saved optimizer state is AdamW's (two moments per
    backbone parameter, beta powers at beta^(steps+1)) and the loss is finite."""
    settings = [f"data.root={tiny_dir}", f"data.val_bins=[{tiny_dir / 'lfw_disjoint_100.bin'}]", *tiny_run,
                *ADAMW, head, "train.max_steps=3", "train.eval_interval=0", "train.eval_batch_size=50"]
    arguments = ["train", "--config", str(MINI), "--output", str(tmp_path / "run")]
    assert cli.main([*arguments, *[arg for item in settings for arg in ("--set", item)]]) == 0
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    state = paddle.load(str(tmp_path / "run" / "checkpoints" / "3" / ckpt.OPTIMIZER))
    backbone = ckpt.load_backbone_state(tmp_path / "run" / "checkpoints" / "3")
    trained = [key for key in backbone if not key.endswith(("_mean", "_variance"))]  # BatchNorm statistics
    assert sum(name.endswith("_moment1_0") for name in state) == len(trained)
    assert sum(name.endswith("_moment2_0") for name in state) == len(trained)
    beta1 = [value.numpy() for name, value in state.items() if name.endswith("_beta1_pow_acc_0")]
    np.testing.assert_allclose(np.concatenate(beta1), 0.9**4, rtol=1e-6)  # Paddle starts them at beta


@pytest.mark.cpu_slow(reason="three AdamW runs of 3 to 8 steps (~15 s); the SGD resume test stays "
                              "fast")
def test_adamw_resume_continues_the_same_trajectory(tiny_dir, tiny_run, tmp_path):
    """3 steps, stop, resume to 8 (crossing an epoch end) == 8 steps in one go, bit for bit (measured: equal
    losses, AdamW state, backbone and class centers, Paddle 3.3 on the CPU): AdamW's moments and beta powers
    come back from the checkpoint (a restart from zero moments updates otherwise at step 4)."""
    whole, split, restarted = tmp_path / "whole", tmp_path / "split", tmp_path / "restarted"
    Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=8"), whole).run()
    Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=3"), split).run()
    shutil.copytree(split, restarted)
    resumed = Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=8"), split, resume=True)
    assert resumed.state.step == 3
    resumed.run()
    assert len(read_losses(whole)) == 8
    np.testing.assert_array_equal(read_losses(split), read_losses(whole))
    # The same weights with fresh moments (--resume-weights-only): step 4's loss is still that of the same
    # weights, step 5's follows an update from zero moments (measured: 0.52 apart on a loss of ~14).
    Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=5"), restarted, resume=True,
            weights_only=True).run()
    assert read_losses(restarted)[:4] == read_losses(whole)[:4]
    assert abs(read_losses(restarted)[4] - read_losses(whole)[4]) > 0.05
    ends = [paddle.load(str(run / "checkpoints" / "8" / ckpt.OPTIMIZER)) for run in (whole, split)]
    assert ends[0].keys() == ends[1].keys() and any(name.endswith("_moment2_0") for name in ends[0])
    for name in ends[0]:
        np.testing.assert_array_equal(ends[1][name].numpy(), ends[0][name].numpy(), err_msg=name)
    weights = [ckpt.load_backbone_state(run / "checkpoints" / "8") for run in (whole, split)]
    for name, value in weights[0].items():
        np.testing.assert_array_equal(np.asarray(weights[1][name]), np.asarray(value), err_msg=name)
    for kind in ("weight", "velocity"):
        np.testing.assert_array_equal(np.load(split / "checkpoints/8" / ckpt.shard_file(0, kind)),
                                      np.load(whole / "checkpoints/8" / ckpt.shard_file(0, kind)))


def test_resume_keeps_the_optimizer_or_takes_the_weights_alone(tiny_dir, tiny_run, tmp_path):
    Trainer(tiny(tiny_dir, tiny_run, "train.max_steps=2"), tmp_path).run()  # sgd
    with pytest.raises(PlscError, match=r"optim.name is 'sgd' in the checkpoint, 'adamw' here"):
        Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=4"), tmp_path, resume=True)
    restarted = Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=4"), tmp_path, resume=True,
                        weights_only=True)
    assert restarted.state.step == 2 and isinstance(restarted.optimizer, paddle.optimizer.AdamW)


def test_a_run_refuses_data_of_another_size_than_its_config_states(tiny_dir, tiny_run, tmp_path):
    with pytest.raises(PlscError, match=r"data.num_images is 1,000 but .* holds 240 images"):
        Trainer(tiny(tiny_dir, tiny_run, "data.num_images=1000"), tmp_path)
    assert Trainer(tiny(tiny_dir, tiny_run, "data.num_images=240"), tmp_path).total_steps > 0


# --- FP16 O2 (emulated on the CPU, tests/o2_emulation.py) -----------------------------------------------


def o2_adamw(monkeypatch, tiny_dir, tiny_run, output, *extra, **kwargs) -> Trainer:
    config = tiny(tiny_dir, tiny_run, *ADAMW, "train.precision=fp16", "train.max_steps=4", *extra)
    with decorate_as_on_gpu(monkeypatch):
        trainer = Trainer(config, output, **kwargs)
    assert trainer.amp_level == "O2" and isinstance(trainer.optimizer, paddle.optimizer.AdamW)
    return trainer


def test_fp16_master_weights_and_adamw_moments_survive_a_resume(tiny_dir, tiny_run, tmp_path, monkeypatch):
    first = o2_adamw(monkeypatch, tiny_dir, tiny_run, tmp_path)
    assert first.optimizer._multi_precision
    state_after_steps(first.optimizer)
    first.state.step = 3
    first.save_step_checkpoint()
    masters, moments = master_weights(first.optimizer), velocities(first.optimizer)
    assert masters and any(name.endswith("_moment2_0") for name in moments)
    second = o2_adamw(monkeypatch, tiny_dir, tiny_run, tmp_path, resume=True)
    create_step_state(second.optimizer)  # the first step after resuming binds the restored state by name
    for saved, restored in zip((masters, moments), (master_weights(second.optimizer),
                                                    velocities(second.optimizer)), strict=True):
        assert restored.keys() == saved.keys()
        for name, value in saved.items():
            np.testing.assert_array_equal(restored[name], value)


# Paddle warns that float16 parameters without master weights train poorly: the setting under test.
@pytest.mark.filterwarnings("ignore:Accumulating with FP16")
def test_a_float32_adamw_checkpoint_resumes_into_fp16_without_master_weights(tiny_dir, tiny_run, tmp_path,
                                                                             monkeypatch):
    """Paddle's AdamW keeps float32 moments for float16 parameters even without master weights: the restored
    moments stay float32 (Momentum's velocity there is float16)."""
    Trainer(tiny(tiny_dir, tiny_run, *ADAMW, "train.max_steps=2"), tmp_path).run()
    saved = {name: value.numpy() for name, value in
             paddle.load(str(tmp_path / "checkpoints" / "2" / ckpt.OPTIMIZER)).items()}
    trainer = o2_adamw(monkeypatch, tiny_dir, tiny_run, tmp_path, "train.fp16_master_weights=false",
                       resume=True)
    assert not trainer.optimizer._multi_precision and precision.holds_float16(trainer.model)
    create_step_state(trainer.optimizer)
    restored = velocities(trainer.optimizer)
    assert restored.keys() == saved.keys()
    for name, value in restored.items():
        assert value.dtype == np.float32, name
        np.testing.assert_array_equal(value, saved[name])

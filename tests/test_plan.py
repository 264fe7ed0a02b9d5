"""``plsc plan``: the run's numbers against independent references (PLSC v2.2's formulas, Paddle's own
scheduler and model summary, the data sets' own sizes, the trainer's attributes), the departures from PLSC
v2.2, the image counts, and the command's JSON and errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from plsc import cli
from plsc.config import Config, load_config
from plsc.data import FolderDataset, count_samples
from plsc.data.folder import count_label_lines
from plsc.data.recordio import RecordDataset, count_record_images
from plsc.engine import plan as plan_module
from plsc.engine.plan import (
    PLSC_V22,
    PlscValue,
    UnknownSetting,
    departures,
    make_plan,
    planned_data,
    setting_value,
)
from plsc.errors import PlscError
from plsc.models import build_model
from plsc.models.cost import _backbone_cost, backbone_cost, multiply_adds, trainable_parameters

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "configs" / "cpu" / "mini.yaml"
PUBLISHED = ROOT / "configs" / "ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml"
TINY_MODEL = ["model.name=iresnet18", "model.width=0.125", "model.embedding_size=16", "data.image_size=32"]
REQUIRED_KEYS = {
    "world_size", "global_batch", "steps_per_epoch", "total_steps", "warmup_steps", "decay_steps", "base_lr",
    "optimizer", "center_update",
    "lr_phases", "momentum_mode", "precision", "data_format", "mode", "num_classes", "memory_per_gpu_mib",
    "backbone_params", "backbone_flops", "departures",
}
# Settings PLSC_V22 names that plsc's config does not have yet; once they exist, remove them here.


def tiny_config(*overrides: str) -> Config:
    return load_config(MINI, [*TINY_MODEL, "data.num_workers=0", *overrides])


# --- the schedule ------------------------------------------------------------------------------------------


def test_plan_numbers_are_plsc_v22s_formulas_and_paddles_scheduler():
    """PLSC v2.2 dynamic/train.py:82-112 written out here: steps per epoch = images // global batch, epoch
    boundaries times it, base lr = global batch * lr / 512; the rates from Paddle's own PiecewiseDecay."""
    config = tiny_config("optim.schedule=step", "optim.warmup_steps=0", "optim.decay_boundaries=[2, 4]",
                         "optim.lr_reference_batch=512", "train.batch_size=16", "train.epochs=5")
    images, world = 10_007, 4
    plan = make_plan(config, world, images, "--images", 1000)
    global_batch = 16 * world
    steps = images // global_batch
    assert (plan.global_batch, plan.steps_per_epoch, plan.schedule.total_steps) == (64, steps, 5 * steps)
    assert plan.decay_steps() == [2 * steps, 4 * steps]
    base_lr = global_batch * 0.1 / 512
    assert plan.schedule.base_lr == pytest.approx(base_lr, rel=1e-12)
    paddle_lr = paddle.optimizer.lr.PiecewiseDecay(plan.decay_steps(), [base_lr * 0.1**i for i in range(3)])
    rates = []
    for _ in range(plan.schedule.total_steps):
        rates.append(paddle_lr.get_lr())
        paddle_lr.step()
    phases = plan.lr_phases()
    assert [phase["first_step"] for phase in phases] == [0, 2 * steps, 4 * steps]
    for phase in phases:  # the phase's rate, which the step before it does not have yet
        assert phase["lr"] == pytest.approx(rates[phase["first_step"]], rel=1e-9)
        if phase["first_step"]:
            assert not math.isclose(rates[phase["first_step"] - 1], phase["lr"])


def test_a_polynomial_schedule_has_one_phase_after_its_warmup_or_none():
    plan = make_plan(tiny_config("optim.warmup_steps=3", "train.max_steps=10"), 1, 240, "--images", 40)
    assert plan.decay_steps() == [] and plan.schedule.kind == "poly"
    assert [(p["first_step"], p["lr"]) for p in plan.lr_phases()] == [(3, pytest.approx(0.1))]
    assert plan.notes == ["train.max_steps 10 ends the run, not train.epochs"]
    whole_run_warmup = make_plan(tiny_config("optim.warmup_steps=30", "train.max_steps=10"), 1, 240, "x", 40)
    assert whole_run_warmup.lr_phases() == []


def test_the_plan_is_the_trainers_own_numbers(tmp_path, tiny_run, caplog):
    from plsc.engine.trainer import Trainer

    config = load_config(MINI, [*tiny_run, "train.epochs=3", "optim.schedule=step"])
    with caplog.at_level(logging.INFO, logger="plsc.train"):
        trainer = Trainer(config, tmp_path / "run")
    plan = make_plan(config, 1, len(trainer.dataset), "data", trainer.num_classes)
    assert (plan.steps_per_epoch, plan.schedule) == (trainer.steps_per_epoch, trainer.schedule)
    assert plan.schedule.total_steps == trainer.total_steps
    logged = [record.getMessage() for record in caplog.records if record.getMessage().startswith("plan: ")]
    assert len(logged) == 4  # three lines of numbers, one of departures
    assert f"; steps per epoch {trainer.steps_per_epoch} (images // global batch)" in logged[0]
    assert f"images {len(trainer.dataset)} (the training data)" in logged[0]
    assert "optimizer sgd, momentum 0.9" in logged[2] and "class-center update sparse momentum" in logged[2]
    assert "optim.lr_reference_batch 0 (PLSC 512)" in logged[3]


# --- the backbone ------------------------------------------------------------------------------------------


def test_multiply_adds_of_convolutions_and_linear_layers_by_hand():
    model = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, stride=2, padding=1),  # 16 px -> 8 px: 8 * 8 * 8 outputs x 3 * 9
        paddle.nn.Conv2D(8, 8, 3, padding=1, groups=4),  # 512 outputs x (8 / 4) * 9
        paddle.nn.Flatten(),
        paddle.nn.Linear(512, 10),  # 10 outputs x 512
    )
    assert multiply_adds(model, 16) == 512 * 27 + 512 * 18 + 10 * 512
    assert model.training  # the mode it had


def test_trainable_parameters_match_paddles_summary():
    model = build_model(dataclasses.replace(tiny_config().model), image_size=32)
    summary = paddle.summary(model, (1, 3, 32, 32))
    assert trainable_parameters(model) == summary["trainable_params"]
    assert trainable_parameters(model) < summary["total_params"]  # BatchNorm's statistics are not trained


def test_multiply_adds_are_the_same_in_either_layout():
    config = tiny_config()
    counts = {fmt: multiply_adds(build_model(dataclasses.replace(config.model, data_format=fmt), 32), 32, fmt)
              for fmt in ("NCHW", "NHWC")}
    assert counts["NCHW"] == counts["NHWC"] > 0


def test_measuring_the_backbone_changes_no_later_random_draw_or_name():
    _backbone_cost.cache_clear()
    paddle.seed(5)
    expected = paddle.rand([6]).numpy()
    with paddle.utils.unique_name.guard():
        expected_name = paddle.utils.unique_name.generate("conv2d")
    paddle.seed(5)
    with paddle.utils.unique_name.guard():
        backbone_cost(tiny_config().model, 32)
        name = paddle.utils.unique_name.generate("conv2d")
    assert np.array_equal(paddle.rand([6]).numpy(), expected) and name == expected_name


# --- departures from PLSC v2.2 -----------------------------------------------------------------------------


def plsc_like(config: Config, world: int) -> Config:
    """``config`` with every PLSC_V22 setting that plsc has set to PLSC's value."""
    config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name))
                                            for name in ("data", "model", "loss", "optim", "train")})
    for row in PLSC_V22:
        value = row.value(config, world)
        section, name = row.key.split(".")
        if value is not None:
            setattr(getattr(config, section), name, value)
    return config


def test_every_plsc_setting_is_a_plsc_setting():
    missing = set()
    for row in PLSC_V22:
        try:
            setting_value(Config(), row.key)
        except UnknownSetting:
            missing.add(row.key)
    assert missing == set()


def test_departures_name_each_differing_setting_with_both_values():
    config = plsc_like(load_config(PUBLISHED, reads_data=False), 8)
    assert departures(config, 8) == []
    config.loss.momentum_mode = "lazy"
    config.optim.lr_reference_batch = 0
    config.loss.interclass_filtering_threshold = 0.2  # PLSC v2.2 filters nothing
    differs = {d.setting: (d.plsc, d.ours) for d in departures(config, 8) if d.status == "differs"}
    assert differs == {"loss.momentum_mode": ("dense", "lazy"), "optim.lr_reference_batch": (512, 0),
                       "loss.interclass_filtering_threshold": (0.0, 0.2)}


def test_settings_that_change_nothing_in_the_run_are_not_departures():
    config = plsc_like(load_config(PUBLISHED, reads_data=False), 8)
    config.train.precision, config.loss.center_dtype = "fp32", "float32"
    config.loss.sample_ratio, config.loss.momentum_mode = 1.0, "lazy"  # every row sampled: lazy is dense
    config.train.loss_scale_init = 1.0  # no loss scaling in fp32
    config.train.mode, config.optim.clip_norm = "static", 0.0  # PLSC's static mode does not clip
    assert departures(config, 8) == []


def test_a_setting_plsc_does_not_have_is_listed_as_unknown(monkeypatch):
    rows = (PlscValue("optim.not_a_setting", lambda config, world: 3, "nowhere"),
            PlscValue("optim.momentum", lambda config, world: 0.9, "configs/ms1mv3_r50.py:29"))
    monkeypatch.setattr(plan_module, "PLSC_V22", rows)
    found = departures(tiny_config(), 1)
    listed = [(d.setting, d.plsc, d.ours, d.status) for d in found]
    assert listed == [("optim.not_a_setting", 3, None, "unknown")]
    with pytest.raises(UnknownSetting):
        setting_value(Config(), "optim.not_a_setting")


# --- images and classes ------------------------------------------------------------------------------------


def test_label_line_count_is_the_strict_data_sets_size(tiny_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(tiny_dir / "images")
    lines = (tiny_dir / "label.txt").read_text().splitlines()
    text = ["# a comment", "", *lines[:50], "  ", *lines[50:]]
    (root / "label.txt").write_text("\n".join(text))
    assert count_label_lines(root) == len(FolderDataset(root)) == len(lines)


@pytest.mark.parametrize("name", ["faces_tiny", "faces_tiny_multilabel", "flat"])
def test_record_image_count_is_the_record_data_sets_size(shared_dir, tmp_path, monkeypatch, name):
    """Files written by MXNet: its manifest lists every record; images are the ones with a payload."""
    monkeypatch.setenv("PLSC_CACHE_DIR", str(tmp_path / "index-cache"))  # ../shared is read-only
    folder = shared_dir / "data" / "recordio"
    manifest = json.loads((folder / "manifest.json").read_text())[name]
    images = sum(record["payload_len"] > 0 for record in manifest.values())
    assert count_record_images(folder / f"{name}.rec") == len(RecordDataset(folder / f"{name}.rec")) == images
    shutil.copyfile(folder / f"{name}.rec", tmp_path / f"{name}.rec")  # without its .idx: a scan
    assert count_record_images(tmp_path / f"{name}.rec") == images


def test_counted_images_by_source(tiny_dir):
    config = tiny_config()
    assert count_samples(config.data) == (len(FolderDataset(tiny_dir)), "label file")
    config.data.source, config.data.synthetic_samples = "synthetic", 77
    assert count_samples(config.data) == (77, "data.synthetic_samples")


def test_planned_data_counts_reads_labels_or_takes_the_given_count(tiny_dir):
    config = tiny_config()  # data.num_classes 0: the labels decide
    assert planned_data(config, None) == (240, "data set, labels read", 40)
    assert planned_data(config, 5000) == (5000, "--images", 40)
    config.data.num_classes = 100
    assert planned_data(config, None) == (240, "label file", 100)
    config.data.root = "/nowhere"  # a given count with a given class count reads nothing
    assert planned_data(config, 5000) == (5000, "--images", 100)


def test_an_unset_data_root_variable_asks_for_the_image_count(monkeypatch):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    config = load_config(PUBLISHED, reads_data=False)
    with pytest.raises(PlscError, match=r"PLSC_DATA_ROOT.*pass --images N"):
        planned_data(config, None)
    config.data.num_classes = 0
    with pytest.raises(PlscError, match=r"to count the classes .*--set data.num_classes=N"):
        planned_data(config, 1000)


# --- the command -------------------------------------------------------------------------------------------


def _reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def test_plan_command_prints_the_table_and_writes_strict_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "plan.json"
    sets = [arg for item in TINY_MODEL for arg in ("--set", item)]
    options = ["--gpus", "2", "--device", "cpu", "--json", str(out)]
    assert cli.main(["plan", "--config", str(MINI), *sets, *options]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text(), parse_constant=_reject_constant)
    assert REQUIRED_KEYS <= plan.keys()
    images = len(FolderDataset(ROOT / "data" / "tiny"))
    assert (plan["world_size"], plan["global_batch"], plan["images"]) == (2, 64, images)
    assert plan["steps_per_epoch"] == images // 64 and plan["total_steps"] == 15 * (images // 64)
    assert plan["images_source"] == "data set, labels read" and plan["num_classes"] == 40  # num_classes 0
    assert plan["memory_per_gpu_mib"] > 0 and plan["memory_device"] == "cpu"
    # mini.yaml sets no optimizer: OptimConfig's and LossConfig's defaults
    assert plan["optimizer"] == "sgd, momentum 0.9, L2 weight decay 0.0005, every parameter"
    assert plan["center_update"] == "sparse momentum 0.9 (lazy), the backbone's rate, L2 weight decay 0.0005"
    assert "steps per epoch" in printed and "departs from PLSC v2.2" in printed
    assert f"{plan['steps_per_epoch']:,} (images // global batch)" in printed


@pytest.mark.parametrize("arguments, message", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--images", "100", "--gpus", "8"], "fewer than one global batch"),
    (["--images", "0"], "--images must be >= 1"),
])
def test_plan_command_refuses_bad_input_in_one_line(capsys, arguments, message):
    config = ["--config", str(PUBLISHED), "--set", "data.root=/nowhere"]
    assert cli.main(["plan", *config, *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("plsc: error: ") and message in error and "\n" not in error


def test_world_size_defaults_to_the_launchers(monkeypatch, capsys):
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "3")
    monkeypatch.setattr(plan_module, "make_plan", _stop_with_world_size)
    assert cli.main(["plan", "--config", str(MINI), "--images", "1000", "--set", "data.num_classes=40",
                     "--device", "cpu", *[arg for item in TINY_MODEL for arg in ("--set", item)]]) == 2
    assert "world size 3" in capsys.readouterr().err


def _stop_with_world_size(config, world_size, *args, **kwargs):
    raise PlscError(f"world size {world_size}")


def test_the_docs_name_every_json_key():
    text = (ROOT / "docs" / "training.md").read_text()
    assert all(f"`{key}`" in text for key in REQUIRED_KEYS)


# --- arcface_torch's settings (configs/arcface_torch/) ------------------------------------------------------

# Typed in from arcface_torch (recognition/arcface_torch of deepinsight/insightface): each configs/<name>.py
# over configs/base.py, and the GPU count its README trains it on. (gpus, batch_size, lr, num_epoch,
# warmup_epoch, sample_rate, embedding_size, margin_list, weight_decay, optimizer, num_classes, num_image,
# plsc's name for the network)
MS1MV3, GLINT, WF42M = (93431, 5179510), (360232, 17091657), (2059906, 42474557)
ARC, COS = [1.0, 0.5, 0.0], [1.0, 0.0, 0.4]
ARCFACE_TORCH = {
    "ms1mv3_r50": (8, 128, 0.1, 20, 0, 1.0, 512, ARC, 5e-4, "sgd", *MS1MV3, "iresnet50"),
    "ms1mv3_r100": (8, 128, 0.1, 20, 0, 1.0, 512, ARC, 5e-4, "sgd", *MS1MV3, "iresnet100"),
    "glint360k_r100": (8, 128, 0.1, 20, 0, 1.0, 512, COS, 1e-4, "sgd", *GLINT, "iresnet100"),
    "wf42m_pfc02_r100": (8, 128, 0.1, 20, 0, 0.2, 512, COS, 5e-4, "sgd", *WF42M, "iresnet100"),
    "wf42m_pfc02_8gpus_r50_bs4k": (8, 512, 0.4, 20, 2, 0.2, 512, COS, 5e-4, "sgd", *WF42M, "iresnet50"),
    "wf42m_pfc03_32gpu_r50": (32, 128, 0.4, 20, 2, 0.3, 512, COS, 5e-4, "sgd", *WF42M, "iresnet50"),
    "wf42m_pfc03_32gpu_r100": (32, 128, 0.4, 20, 2, 0.3, 512, COS, 5e-4, "sgd", *WF42M, "iresnet100"),
    "wf42m_pfc03_40epoch_8gpu_vit_b": (8, 256, 0.001, 40, 4, 0.3, 512, COS, 0.1, "adamw", *WF42M, "vit_b"),
    "wf42m_pfc03_40epoch_64gpu_vit_b": (64, 384, 0.001, 40, 4, 0.3, 512, COS, 0.1, "adamw", *WF42M, "vit_b"),
}
ARCFACE_TORCH_GRADIENT_ACC = {"wf42m_pfc03_40epoch_8gpu_vit_b": 12}  # configs/<name>.py:17; base.py:44: 1
ARCFACE_TORCH_DIR = ROOT / "configs" / "arcface_torch"


def test_the_arcface_torch_folder_holds_exactly_these_configs():
    assert sorted(p.stem for p in ARCFACE_TORCH_DIR.glob("*.yaml")) == sorted(ARCFACE_TORCH)


def arcface_torch_param(name: str):
    # A ViT-B plan probes the backbone's activations with a forward pass (~7 s each); the plan command's ViT-B
    # test keeps one in the fast tier.
    slow = pytest.mark.cpu_slow(reason="a ViT-B forward to measure its activations (~7 s)")
    return pytest.param(name, marks=[slow] if name.endswith("vit_b") else [])


@pytest.mark.parametrize("name", [arcface_torch_param(name) for name in sorted(ARCFACE_TORCH)])
def test_arcface_torch_config_loads_and_plans_as_arcface_torch_trains_it(name, monkeypatch):
    """The plan on the README's GPU count, without the data: steps as train_v2.py:136-138 counts them
    (``num_image // total_batch_size * num_epoch``, the warmup likewise), rates as lr_scheduler.py:14-42."""
    gpus, batch, lr, epochs, warmup, ratio, embedding, margins, decay, optimizer, classes, images, model = (
        ARCFACE_TORCH[name])
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    config = load_config(f"arcface_torch/{name}", reads_data=False)  # found under the repository's configs/
    assert planned_data(config, None) == (images, "data.num_images", classes)
    plan = make_plan(config, gpus, images, "data.num_images", classes)
    accumulated = ARCFACE_TORCH_GRADIENT_ACC.get(name, 1)  # an optimizer step takes this many batches
    assert config.train.grad_accum == accumulated
    steps_per_epoch = images // (batch * gpus * accumulated)
    assert (plan.batch_per_rank, plan.steps_per_epoch) == (batch, steps_per_epoch)
    assert (plan.schedule.total_steps, plan.schedule.warmup_steps) == (steps_per_epoch * epochs,
                                                                       steps_per_epoch * warmup)
    assert plan.schedule.base_lr == lr and config.optim.lr_reference_batch == 0
    assert (config.loss.sample_ratio, config.model.embedding_size, config.loss.margins) == (ratio, embedding,
                                                                                            margins)
    assert (config.loss.scale, config.optim.clip_norm, config.optim.clip_max_factor) == (64.0, 5.0, 1.0)
    assert (config.optim.name, config.optim.weight_decay, config.model.name) == (optimizer, decay, model)
    assert (config.train.seed, config.train.precision, config.optim.grad_divisor) == (2048, "amp", 1.0)
    t, w = plan.schedule.total_steps, plan.schedule.warmup_steps
    for k in (w + 1, (w + t) // 2, t - 1):  # PolynomialLRWarmup's closed form (lr_scheduler.py:38-40)
        assert plan.schedule.lr(k) == pytest.approx(lr * (1 - (k - w) / (t - w)), rel=1e-12)
    if warmup:
        assert plan.schedule.lr(w // 2) == pytest.approx(lr * (w // 2) / w, rel=1e-12)
    assert plan.optimizer.startswith(optimizer + ",")


def test_plan_command_builds_the_backbone_once(tmp_path, monkeypatch):
    """The memory model's probe and the plan's cost read one build of the backbone; outside the command a
    scratch build is made anew each time (nothing kept)."""
    from plsc import capacity
    from plsc.models import cost

    builds = []
    monkeypatch.setattr(cost, "build_model", lambda *a, **k: builds.append(a) or build_model(*a, **k))
    capacity._probe_backbone.cache_clear()
    _backbone_cost.cache_clear()
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    overrides = ["--set", "model.width=0.125", "--set", "data.image_size=32"]
    assert cli.main(["plan", "--config", "cpu/mini", *overrides, "--json", str(tmp_path / "p.json")]) == 0
    assert len(builds) == 1
    config = load_config("configs/cpu/mini.yaml", ["model.width=0.125", "data.image_size=32"])
    first = cost.scratch_backbone(config.model, 32)
    assert cost.scratch_backbone(config.model, 32) is not first and len(builds) == 3


def test_plan_command_reports_the_optimizer_of_an_arcface_torch_vit_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PLSC_DATA_ROOT", raising=False)
    out = tmp_path / "plan.json"
    name = "arcface_torch/wf42m_pfc03_40epoch_8gpu_vit_b"
    # The optimizer's report is the config's, whatever the ViT's size: ViT-T builds 8x faster than ViT-B.
    smaller = ["--set", "model.name=vit_t"]
    assert cli.main(["plan", "--config", name, *smaller, "--gpus", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text(), parse_constant=_reject_constant)
    assert plan["optimizer"].startswith("adamw, betas 0.9 0.999, eps 1e-08, decoupled weight decay 0.1")
    assert plan["center_update"] == ("sparse momentum 0.9 (dense), base rate 0.2 on the schedule, "
                                     "L2 weight decay 0.0005")
    assert (plan["images_source"], plan["global_batch"], plan["backbone_params"] > 0) == (
        "data.num_images", 8 * 256 * 12, True)  # 12 batches of 8 x 256 per optimizer step
    assert plan["memory_per_gpu_mib"] > 0 and "optimizer" in printed and "optim.name" in printed

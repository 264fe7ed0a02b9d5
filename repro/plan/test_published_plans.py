"""``plsc plan`` for PLSC v2.2's published configs against PLSC's own numbers (plsc22_schedules.yaml beside
this file): what its published training logs print and the rates they log, for the four runs with a log;
PLSC's formulas (dynamic/train.py:82-104) over its own config files, for the other published runs. And the
backbones' multiply-adds per image against insightface's published figures (insightface_flops.yaml).

Tier cpu: neither data nor a GPU is needed, the image count is MS1MV3's as the logs read it, at 8 GPUs as
the published runs. The logged runs go through the command itself (``plsc plan --json``); the others through
:func:`plsc.engine.plan.make_plan`, the function the command calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from plsc import cli
from plsc.config import load_config
from plsc.engine.plan import make_plan
from repro.claims import load_claims

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[2]
PLSC = yaml.safe_load((Path(__file__).parent / "plsc22_schedules.yaml").read_text())
LOGS = {entry["config"]: entry for entry in PLSC["logs"]}
ROWS = load_claims().accuracy.rows
UNLOGGED = [row for row in ROWS if row.config not in LOGS]
LOGGED_LR_TOLERANCE = 5e-7  # the logs print rates with 6 decimals


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict[str, dict]:
    """``plsc plan --json`` of every logged config at PLSC's world size and image count."""
    plans = {}
    for config in LOGS:
        out = tmp_path_factory.mktemp("plan") / "plan.json"
        arguments = ["plan", "--config", str(ROOT / config), "--gpus", str(PLSC["world_size"]),
                     "--images", str(PLSC["images"]), "--json", str(out)]
        assert cli.main(arguments) == 0
        plans[config] = json.loads(out.read_text())
    return plans


def rate_at(plan: dict, step: int) -> float:
    """The rate the plan gives 0-based step ``step``: that of the last phase begun by then."""
    return [phase["lr"] for phase in plan["lr_phases"] if phase["first_step"] <= step][-1]


@pytest.mark.parametrize("config", list(LOGS))
def test_plan_prints_plscs_logged_schedule(planned, config):
    plan, log = planned[config], LOGS[config]
    assert plan["images"] == PLSC["images"] and plan["images_source"] == "--images"
    assert (plan["world_size"], plan["global_batch"]) == (log["world_size"], log["total_batch_size"])
    assert (plan["warmup_steps"], plan["steps_per_epoch"]) == (log["warmup_steps"], log["steps_per_epoch"])
    assert (plan["total_steps"], plan["decay_steps"]) == (log["total_steps"], log["decay_steps"])


@pytest.mark.parametrize("config", list(LOGS))
def test_plan_trains_at_plscs_logged_rates(planned, config):
    """PLSC logs after the step, 1-based: its step ``s`` trained at the plan's rate of 0-based step s - 1."""
    plan, log = planned[config], LOGS[config]
    first_step, first_lr = log["logged_lr"][0]
    assert plan["base_lr"] == pytest.approx(first_lr, abs=LOGGED_LR_TOLERANCE)
    for step, lr in log["logged_lr"]:
        assert rate_at(plan, step - 1) == pytest.approx(lr, abs=LOGGED_LR_TOLERANCE), f"step {step}"


@pytest.mark.parametrize("config", list(LOGS))
def test_published_partial_fc_configs_update_centers_with_dense_momentum(planned, config):
    """PLSC v2.2's sparse_momentum works on the whole shard (dynamic/utils/hybrid_optimizer.py:85-99)."""
    plan = planned[config]
    assert "loss.momentum_mode" not in {departure["setting"] for departure in plan["departures"]}
    if load_config(ROOT / config, reads_data=False).loss.sample_ratio < 1:
        assert plan["momentum_mode"] == "dense"


def plsc_schedule(files: dict, images: int, world_size: int) -> dict:
    """PLSC v2.2's schedule from its config file's values (dynamic/train.py:82-104, epoch units)."""
    assert files["train_unit"] == "epoch"
    total_batch_size = files["batch_size"] * world_size
    steps_per_epoch = images // total_batch_size
    return {
        "global_batch": total_batch_size,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * files["train_num"],
        "warmup_steps": steps_per_epoch * files["warmup_num"],
        "decay_steps": [boundary * steps_per_epoch for boundary in files["decay_boundaries"]],
        "base_lr": total_batch_size * files["lr"] / 512,
    }


def test_plscs_formulas_give_its_logged_schedule():
    """The formulas above, written out from PLSC's code, give what PLSC's logs print."""
    expected = plsc_schedule(PLSC["config_files"]["Res50"], PLSC["images"], PLSC["world_size"])
    for log in LOGS.values():
        assert expected["global_batch"] == log["total_batch_size"]
        keys = ("steps_per_epoch", "total_steps", "warmup_steps", "decay_steps")
        assert [expected[key] for key in keys] == [log[key] for key in keys]
        assert expected["base_lr"] == pytest.approx(log["logged_lr"][0][1], abs=LOGGED_LR_TOLERANCE)


def plan_of(row):
    config = load_config(ROOT / row.config, reads_data=False)
    return make_plan(config, PLSC["world_size"], PLSC["images"], "--images", config.data.num_classes)


@pytest.mark.parametrize("row", UNLOGGED, ids=lambda row: row.id)
def test_plan_follows_plscs_formulas_for_runs_without_a_log(row):
    expected = plsc_schedule(PLSC["config_files"][row.backbone], PLSC["images"], PLSC["world_size"])
    plan = plan_of(row)
    assert plan.global_batch == expected["global_batch"]
    assert plan.steps_per_epoch == expected["steps_per_epoch"]
    assert (plan.schedule.total_steps, plan.schedule.warmup_steps) == (
        expected["total_steps"], expected["warmup_steps"])
    assert plan.decay_steps() == expected["decay_steps"]


@pytest.mark.parametrize("row", UNLOGGED, ids=lambda row: row.id)
def test_plan_has_plscs_rate_and_momentum_for_runs_without_a_log(row):
    expected = plsc_schedule(PLSC["config_files"][row.backbone], PLSC["images"], PLSC["world_size"])
    plan = plan_of(row)
    assert plan.schedule.base_lr == pytest.approx(expected["base_lr"], rel=1e-12)
    if row.ratio < 1:
        assert plan.momentum_mode == "dense"


INSIGHTFACE = yaml.safe_load((Path(__file__).parent / "insightface_flops.yaml").read_text())


@pytest.mark.parametrize("name", list(INSIGHTFACE["gflops"]))
def test_backbone_multiply_adds_match_insightfaces_published_flops(name):
    overrides = [f"model.name={name}", f"data.image_size={INSIGHTFACE['image_size']}"]
    published = ROOT / "configs" / "ms1mv3_r50_dynamic_fp32_nchw_r0.1.yaml"
    config = load_config(published, overrides, reads_data=False)
    plan = make_plan(config, PLSC["world_size"], PLSC["images"], "--images", config.data.num_classes)
    rounding = 0.5 * 10 ** -INSIGHTFACE["decimals"]
    assert plan.backbone.multiply_adds / 1e9 == pytest.approx(INSIGHTFACE["gflops"][name], abs=rounding)

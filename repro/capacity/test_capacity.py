"""Seed README 9.2, maximum number of classes: measured by bisection, and predicted by plsc's memory model.

- ``cpu``: bisection over the class count under a cap on peak resident memory (repro/capacity/trials.py),
  each trial a ``plsc train`` subprocess (repro/capacity/cpu_capacity.yaml); the memory model, its fixed
  overhead measured by a 1000-class trial on this machine, is checked against the trials' peak RSS: bytes
  per class and peak. Five trials (the 1000-class one, then four around the model's maximum).
- ``cpu``: the model's prediction for each published Paddle row on 8 x V100-32G (recorded beside it).
- ``gpu8``: the published Paddle rows, trials launched on 8 GPUs (``plsc train --nproc 8``), the device's
  out-of-memory error ending a trial. On GPUs other than 32 GiB ones the class counts scale with the device
  memory.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import pytest

from plsc.capacity import MIB, memory_model, predict, setting_from_config
from plsc.config import load_config
from repro.capacity.trials import GPU_CAPACITY_FLAGS, Bracket, Trial, bisect_max_classes, run_trial
from repro.claims import PASS, CapacityClaim, CpuCapacityClaim, ModelCapacityClaim, load_claims
from repro.plsc_runs import ROOT, last_step_logged, run_environment, train_command

CLAIMS = load_claims()
BASELINE_CLASSES = 1000  # the trial that measures the fixed overhead and the low end of the slope
# The CPU trials' first bracket, as fractions of the model's maximum (the class count whose predicted peak
# RSS reaches the cap, the fixed overhead measured): the cap is on peak RSS, what the model predicts, so the
# largest count that fits lies off the model's maximum by about the model's error, which the tolerance bounds
# at 10%. Widened by CPU_WIDEN (up to 4 times, 46%) until it brackets: a model further off fails on its
# numbers instead of leaving no bracket. Two bisections leave a bracket of 2.5%.
CPU_BRACKET = (0.95, 1.05)
CPU_WIDEN = 1.1
CPU_BISECTIONS = 2
GPU_BISECTIONS = 2
GPU_STEPS = 5
PUBLISHED_DEVICE_MIB = 32510  # 8 x V100-32G as the README states it
BACKBONE_SHORT = {"Res50": "r50", "Res100": "r100"}


@pytest.fixture
def scratch_dir(tmp_path):
    """Where trials write their checkpoints: memory-backed /dev/shm when there is one (no disk waits)."""
    shm = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="plsc-capacity-", dir=shm if shm.is_dir() else tmp_path))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def trial_runner(tmp_path, scratch_dir):
    """``run(config, classes, overrides, **run_trial options)``: one ``plsc train`` trial, output removed."""

    def run(config: Path, classes: int, overrides: dict, nproc: int | None = None, **options) -> Trial:
        output = scratch_dir / str(classes)
        command = train_command(config, output, {"data.num_classes": classes, **overrides}, nproc)
        try:
            return run_trial(
                classes, command, tmp_path / f"trial-{classes}.log", worker_logs=output / "log", **options
            )
        finally:
            shutil.rmtree(output, ignore_errors=True)

    return run


# --- CPU: the model against measured memory


def model_errors(model, baseline: Trial, bracket: Bracket) -> dict[str, float]:
    """Relative errors of the model (predicted / measured - 1): bytes per class, and the worst trial peak."""
    top = bracket.fitted[-1]
    span = top.classes - baseline.classes
    measured_slope = (top.peak_rss_bytes - baseline.peak_rss_bytes) / span
    predicted_slope = (model.peak(top.classes) - model.peak(baseline.classes)) / span
    peaks = [model.peak(trial.classes) / trial.peak_rss_bytes - 1 for trial in bracket.fitted]
    return {
        "bytes_per_class": measured_slope,
        "predicted_bytes_per_class": predicted_slope,
        "bytes_per_class_error": predicted_slope / measured_slope - 1,
        "peak_error": max(peaks, key=abs),
    }


def trial_rows(trials) -> list[dict]:
    return [
        {
            "classes": t.classes,
            "fits": t.fits,
            "reason": t.reason,
            "peak_rss_mib": round(t.peak_rss_bytes / MIB, 1),
            "seconds": round(t.seconds, 1),
        }
        for t in sorted(trials, key=lambda trial: trial.classes)
    ]


@pytest.mark.cpu
@pytest.mark.parametrize("claim", CLAIMS.cpu_capacity.rows, ids=lambda claim: claim.id)
def test_memory_model_matches_cpu_trials_under_a_memory_cap(
    claim: CpuCapacityClaim, trial_runner, record_result
):
    config_path = ROOT / claim.config
    cap = claim.memory_cap_mib * MIB
    env = run_environment()

    def trial(classes: int) -> Trial:
        return trial_runner(config_path, classes, {}, memory_cap_bytes=cap, env=env)

    baseline = trial(BASELINE_CLASSES)
    assert baseline.fits, f"{BASELINE_CLASSES} classes do not fit {claim.memory_cap_mib} MiB"
    config = load_config(config_path)
    unmeasured = memory_model(config, setting_from_config(config, cap, 1, "cpu", fixed_overhead_bytes=0))
    overhead = baseline.peak_rss_bytes - unmeasured.peak(BASELINE_CLASSES)
    model = dataclasses.replace(
        unmeasured, setting=dataclasses.replace(unmeasured.setting, fixed_overhead_bytes=overhead)
    )
    guess = model.max_classes()
    low, high = CPU_BRACKET
    bracket = bisect_max_classes(trial, int(guess * low), int(guess * high), CPU_BISECTIONS, widen=CPU_WIDEN)

    errors = model_errors(model, baseline, bracket)
    measured = {"classes": bracket.fits.classes, **{key: errors[key] for key in claim.published}}
    details = {
        **errors,
        "memory_cap_mib": claim.memory_cap_mib,
        "fails_at_classes": bracket.fails.classes,
        "predicted_classes": guess,
        "classes_error": guess / bracket.fits.classes - 1,  # the model's maximum against the largest fitted
        "binding_phase": model.binding_phase(bracket.fits.classes),
        "fixed_overhead_mib": round(overhead / MIB, 1),
        "trials": trial_rows((baseline, *bracket.trials)),
        "head_profile": dataclasses.asdict(model.head),
    }
    result = record_result(claim, measured, config=claim.config, details=details)
    assert result.verdict == PASS, result.explain()


# --- the model's predictions for the published rows


@pytest.mark.cpu
@pytest.mark.parametrize("claim", CLAIMS.capacity_model.rows, ids=lambda claim: claim.id)
def test_memory_model_predicts_the_published_rows(claim: ModelCapacityClaim, record_result):
    group = CLAIMS.capacity_model
    overrides = [f"train.batch_size={group.batch_per_rank}", f"loss.sample_ratio={group.ratio}"]
    config = load_config(ROOT / claim.config, overrides, reads_data=False)  # a prediction reads no data
    setting = setting_from_config(config, group.device_memory_mib * MIB, group.world_size, "gpu")
    prediction = predict(memory_model(config, setting))
    int8 = load_config(ROOT / claim.config, [*overrides, "loss.velocity_dtype=int8"], reads_data=False)
    details = {
        "ratio_to_published": prediction.max_classes / claim.published["classes"],
        # the same setting with int8 velocity (codes and a float32 scale per row): the README's summary
        "int8_velocity_classes": predict(memory_model(int8, setting_from_config(
            int8, group.device_memory_mib * MIB, group.world_size, "gpu"))).max_classes,
        "max_classes_per_rank": prediction.max_classes_per_rank,
        "bytes_per_class": prediction.bytes_per_class,
        "binding_phase": prediction.binding_phase,
        "per_rank_mib": {
            term: round(value / MIB, 1) for term, value in prediction.phases[prediction.binding_phase].items()
        },
        "host_gib_per_rank": round(prediction.host_bytes_per_rank / 2**30, 2),
        "assumptions": prediction.assumptions,
        "overrides": overrides,
        "head_profile": dataclasses.asdict(prediction.head),
        "backbone_profile": dataclasses.asdict(prediction.backbone),
    }
    record_result(claim, {"classes": float(prediction.max_classes)}, config=claim.config, details=details)
    assert prediction.max_classes > 0


# --- 8 GPUs: the published rows


def published_config(claim: CapacityClaim) -> Path:
    return ROOT / f"configs/ms1mv3_{BACKBONE_SHORT[claim.backbone]}_{claim.mode}_fp16_nhwc_r0.1.yaml"


def gpu_overrides(claim: CapacityClaim) -> dict:
    """PLSC v2.2's capacity runs: synthetic data, batch 64 per GPU, ratio 0.1, FP16, no validation."""
    group = CLAIMS.capacity
    return {
        "data.source": "synthetic",
        "data.synthetic_samples": 64 * 8 * (GPU_STEPS + 1),
        "data.val_bins": [],
        "train.batch_size": 64,
        "train.max_steps": GPU_STEPS,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.mode": claim.mode,
        "train.precision": "fp16",
        "loss.sample_ratio": group.ratio,
        "loss.center_dtype": "float16",
    }


@pytest.mark.gpu8
@pytest.mark.parametrize(
    "claim", [row for row in CLAIMS.capacity.rows if not row.reference], ids=lambda claim: claim.id
)
def test_published_capacity_on_eight_gpus(
    claim: CapacityClaim, machine, scratch_dir, trial_runner, record_result
):
    device_mib = machine.gpus[0].memory_mib
    per_gib = device_mib / PUBLISHED_DEVICE_MIB  # other GPUs: the published count scaled to their memory
    target = claim.published["classes"] * per_gib
    env = run_environment(**GPU_CAPACITY_FLAGS)

    def trial(classes: int) -> Trial:
        done = lambda: last_step_logged(scratch_dir / str(classes), GPU_STEPS)  # noqa: E731
        return trial_runner(
            published_config(claim), classes, gpu_overrides(claim), nproc=8, env=env, done=done
        )

    bracket = bisect_max_classes(trial, int(target * 0.95), int(target * 1.2), GPU_BISECTIONS)
    details = {
        "device_memory_mib": device_mib,
        "classes_on_this_hardware": bracket.fits.classes,
        "fails_at_classes": bracket.fails.classes,
        "scaled_to_mib": PUBLISHED_DEVICE_MIB,
        "trials": trial_rows(bracket.trials),
        "flags": GPU_CAPACITY_FLAGS,
    }
    measured = {"classes": bracket.fits.classes / per_gib}
    result = record_result(
        claim, measured, config=str(published_config(claim).relative_to(ROOT)), details=details
    )
    assert result.verdict == PASS, result.explain()

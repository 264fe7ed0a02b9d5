"""Training throughput: seed README 9.3 (tier gpu8), the FP16 NHWC claims of section 2 (tier gpu), this CPU.

Every case runs ``plsc train`` in a subprocess and reads the steady-state images/s from its train_log.jsonl
(:mod:`repro.throughput.measure`): warm-up windows left out, median over the rest, min and max recorded.
A run that fails (static mode included) fails its case: a speed means nothing for a run that does not train.
"""

from __future__ import annotations

import pytest

from repro.claims import PASS, CpuThroughputClaim, ThroughputClaim, load_claims
from repro.plsc_runs import ROOT, run_environment, train_command
from repro.throughput.measure import GpuMemoryPeak, run_training, steady_state

CLAIMS = load_claims()
CPU_STEPS, CPU_WINDOW, CPU_WARMUP_WINDOWS = 15, 3, 1
GPU_STEPS, GPU_WINDOW, GPU_WARMUP_WINDOWS = 100, 10, 3
MS1MV3_CLASSES = 93431
BACKBONE_SHORT = {"Res50": "r50", "Res100": "r100", "MobileFaceNet": "mfn"}


def measured_run(command, output, tmp_path, env, warmup_windows: int):
    """(Throughput, records) of one run; a run that fails raises :class:`RunFailed` with its reason."""
    records = run_training(command, output, tmp_path / f"{output.name}.log", env)
    return steady_state(records, warmup_windows), records


def synthetic_overrides(batch: int, steps: int, window: int) -> dict:
    """Synthetic MS1MV3-sized data, no evaluation, one checkpoint at the end."""
    return {
        "data.source": "synthetic",
        "data.num_classes": MS1MV3_CLASSES,
        "data.synthetic_samples": batch * 8 * (steps + 1),
        "data.val_bins": [],
        "train.batch_size": batch,
        "train.max_steps": steps,
        "train.log_interval": window,
        "train.eval_interval": 0,
        "train.save_interval": 10 * steps,
    }


# --- this CPU


def cpu_params():
    group = CLAIMS.cpu_throughput
    return [
        pytest.param(row, marks=getattr(pytest.mark, group.tier_for(row)), id=row.id) for row in group.rows
    ]


@pytest.mark.parametrize("claim", cpu_params())
def test_cpu_training_throughput(claim: CpuThroughputClaim, tmp_path, record_result):
    overrides = {
        "train.mode": claim.mode,
        "train.max_steps": CPU_STEPS,
        "train.log_interval": CPU_WINDOW,
        "train.eval_interval": 0,
        "train.save_interval": 10 * CPU_STEPS,  # no checkpoint at each (7-step) epoch's end
        "data.val_bins": [],
    }
    output = tmp_path / claim.mode
    command = train_command(ROOT / claim.config, output, overrides)
    throughput, records = measured_run(
        command, output, tmp_path, run_environment(), CPU_WARMUP_WINDOWS
    )
    details = {**throughput.to_dict(), "overrides": overrides, "window_ips": [r["ips"] for r in records]}
    record_result(claim, {"images_per_s": throughput.images_per_s}, config=claim.config, details=details)
    assert throughput.images_per_s > 0


# --- one GPU: FP16 NHWC against FP16 NCHW


NHWC_CONFIG = "configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml"


@pytest.mark.gpu
def test_fp16_nhwc_against_nchw_on_one_gpu(tmp_path, record_result):
    """Res50, FP16, batch 128, ratio 0.1, one GPU: the two layouts back to back, same everything else."""
    runs = {}
    for layout in ("NHWC", "NCHW"):
        output = tmp_path / layout
        overrides = {**synthetic_overrides(128, GPU_STEPS, GPU_WINDOW), "model.data_format": layout}
        command = train_command(ROOT / NHWC_CONFIG, output, overrides)
        with GpuMemoryPeak() as memory:
            throughput, _ = measured_run(
                command, output, tmp_path, run_environment(), GPU_WARMUP_WINDOWS
            )
        runs[layout] = {"throughput": throughput.to_dict(), "gpu_memory_mib": memory.peak_mib}
    changes = {
        "throughput": runs["NHWC"]["throughput"]["images_per_s"] / runs["NCHW"]["throughput"]["images_per_s"]
        - 1,
        "gpu_memory": runs["NHWC"]["gpu_memory_mib"] / runs["NCHW"]["gpu_memory_mib"] - 1,
    }
    verdicts = []
    for claim in CLAIMS.nhwc.rows:
        result = record_result(claim, {"change": changes[claim.quantity]}, config=NHWC_CONFIG, details=runs)
        verdicts.append(result)
    assert all(result.verdict == PASS for result in verdicts), [result.explain() for result in verdicts]


# --- 8 GPUs: the throughput chart's configurations


def throughput_config(claim: ThroughputClaim) -> str:
    setting = f"{claim.precision.lower()}_{claim.format.lower()}_r{CLAIMS.throughput.ratio}"
    return f"configs/ms1mv3_{BACKBONE_SHORT[claim.backbone]}_{claim.mode}_{setting}.yaml"


@pytest.mark.gpu8
@pytest.mark.parametrize("claim", CLAIMS.throughput.rows, ids=lambda claim: claim.id)
def test_throughput_on_eight_gpus(claim: ThroughputClaim, tmp_path, record_result):
    """Batch 128 per GPU (1024 global), ratio 0.1, synthetic MS1MV3-sized data, 8 ranks."""
    config = throughput_config(claim)
    output = tmp_path / claim.id
    command = train_command(ROOT / config, output, synthetic_overrides(128, GPU_STEPS, GPU_WINDOW), nproc=8)
    throughput, records = measured_run(
        command, output, tmp_path, run_environment(), GPU_WARMUP_WINDOWS
    )
    details = {**throughput.to_dict(), "window_ips": [r["ips"] for r in records], "ranks": 8}
    record_result(claim, {"images_per_s": throughput.images_per_s}, config=config, details=details)
    assert throughput.images_per_s > 0

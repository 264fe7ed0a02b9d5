"""plsc's memory model (plsc/capacity.py): its arithmetic on hand-made profiles, its probes on plsc's
own code, and ``plsc capacity --predict``. Tiny sizes only; the model is checked against measured memory by
the reproduction harness (repro/capacity).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from plsc import capacity
from plsc.capacity import (
    FUSED_MARGIN_LOSS_BUFFERS,
    MIB,
    BackboneProfile,
    HeadProfile,
    MemoryModel,
    Setting,
    has_allocator_counters,
    probe_backbone,
    probe_head,
)
from plsc.cli import main
from plsc.config import ModelConfig

HEAD = HeadProfile(
    init_device_per_element=4.0,
    init_host_per_element=0.0,
    storage_per_element=4.0,
    save_copies_per_element=4.0,
    step_rows=2.0,
    step_logits=4.0,
    margin_loss_logits=3.0,
    update_rows=3.0,
)
BACKBONE = BackboneProfile("tiny", 16, parameters=1000, activation_bytes_per_sample=1000.0)


def a_setting(**changes) -> Setting:
    base = Setting(
        world_size=1,
        batch_per_rank=8,
        embedding_size=128,
        sample_ratio=0.1,
        center_dtype="float16",
        precision="fp32",
        device="cpu",
        device_memory_bytes=256 * MIB,
        fixed_overhead_bytes=16 * MIB,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def cpu_model() -> MemoryModel:
    return MemoryModel(a_setting(), HEAD, BACKBONE)


# By hand for a_setting() on the CPU: the checkpoint phase binds at 16 MiB fixed + 12 B x 1000 backbone
# parameters + (4 storage + 4 copies) B x 128 per class, against 256 MiB:
# C <= (240 x 1_048_576 - 12_000) / 1024 = 245_748.3.
CPU_MAX_CLASSES = 245_748


def test_the_largest_fitting_class_count_fits_and_one_rank_more_does_not(cpu_model):
    classes = cpu_model.max_classes()
    assert classes == CPU_MAX_CLASSES
    assert cpu_model.peak(classes) <= cpu_model.setting.device_memory_bytes < cpu_model.peak(classes + 1)


def test_adamw_keeps_two_float32_moments_per_backbone_parameter(cpu_model):
    """optim.name adamw: a second float32 moment where Momentum keeps one velocity, 16 B per backbone
    parameter instead of 12. By hand for a_setting(): C <= (240 x 1_048_576 - 16_000) / 1024 = 245_744.4."""
    adamw = MemoryModel(a_setting(optimizer="adamw"), HEAD, BACKBONE)
    assert adamw.peak(1000) - cpu_model.peak(1000) == 4 * BACKBONE.parameters
    assert adamw.max_classes() == 245_744


def test_on_the_cpu_the_checkpoint_copies_bind_at_storage_plus_copies_per_element(cpu_model):
    classes = cpu_model.max_classes()
    assert cpu_model.binding_phase(classes) == "checkpoint"
    # (4 storage + 4 checkpoint copies) bytes per element x 128 elements per class
    assert cpu_model.bytes_per_class(classes) == pytest.approx(1024.0, rel=1e-3)


def test_on_a_gpu_checkpoint_copies_are_host_memory_and_the_fused_loss_is_counted():
    model = MemoryModel(a_setting(device="gpu"), HEAD, BACKBONE)
    phases = model.phases(100_000)
    assert "checkpoint" not in phases
    # (4 step - 3 composed margin + 2 fused) buffers x [8 batch, 10_000 sampled] x 4 bytes = 960_000
    assert FUSED_MARGIN_LOSS_BUFFERS == 2.0
    assert phases["forward/backward"]["logits/softmax + gradients"] == 960_000
    # checkpoint copies: 4 bytes x 100_000 classes x 128
    assert model.host_bytes_per_rank(100_000) == 51_200_000


def test_the_inf_nan_check_holds_one_byte_per_center_element_up_to_one_block_on_any_device():
    from plsc.engine.loss_scaler import FINITE_CHECK_BLOCK

    checked = dataclasses.replace(HEAD, check_per_element=1.0)
    for device in ("cpu", "gpu"):
        model = MemoryModel(a_setting(device=device), checked, BACKBONE)
        terms = model.phases(100_000)["inf/nan check"]
        # 1 byte x 100_000 classes x 128 elements (under one block), beside the centers' 4 bytes per element
        assert terms["inf/nan check"] == 12_800_000 and terms["class centers + velocity"] == 51_200_000
        large = model.phases(10_000_000)["inf/nan check"]
        assert large["inf/nan check"] == FINITE_CHECK_BLOCK  # a block at most, whatever the shard
    # With the streaming head the check costs the capacity at most one block's worth of classes (4 bytes of
    # storage per element), where a byte per element would cost a fifth of it.
    streaming = dataclasses.replace(checked, chunked=True, sampled_bytes=8.0, update_logits=2.0)
    setting = a_setting(device="gpu", chunk_size=256)
    with_check = MemoryModel(setting, streaming, BACKBONE).max_classes()
    unchecked = dataclasses.replace(streaming, check_per_element=0.0)
    without = MemoryModel(setting, unchecked, BACKBONE).max_classes()
    assert without - FINITE_CHECK_BLOCK / (4 * 128) <= with_check <= without
    assert "inf/nan check" not in MemoryModel(a_setting(), HEAD, BACKBONE).phases(1000)  # not probed: none


def test_more_ranks_share_the_classes():
    one = MemoryModel(a_setting(), HEAD, BACKBONE).max_classes()
    eight = MemoryModel(a_setting(world_size=8, batch_per_rank=1), HEAD, BACKBONE).max_classes()
    # Each rank holds ceil(C / 8) classes under the same per-rank budget: C <= 8 x 245_748.
    assert (one, eight) == (CPU_MAX_CLASSES, 1_965_984)


def test_a_device_too_small_for_the_overhead_fits_no_class():
    assert MemoryModel(a_setting(device_memory_bytes=MIB), HEAD, BACKBONE).max_classes() == 0


def test_fp16_activations_are_halved_on_a_gpu_only():
    gpu = MemoryModel(a_setting(device="gpu", precision="fp16"), HEAD, BACKBONE)
    cpu = MemoryModel(a_setting(device="cpu", precision="fp16"), HEAD, BACKBONE)
    assert gpu.activation_bytes() == cpu.activation_bytes() / 2 == 4000


needs_allocator_counters = pytest.mark.skipif(
    not has_allocator_counters(), reason="this Paddle lacks the host allocator counters the probes read"
)


@needs_allocator_counters
@pytest.mark.parametrize("reset_peak", [True, False], ids=["reset", "ballast"])
def test_the_peak_meter_measures_a_block_below_an_earlier_larger_peak(reset_peak, monkeypatch):
    import paddle

    current, peak, reset = capacity._allocator()
    if reset_peak and reset is None:
        pytest.skip("this Paddle cannot reset its peak counter (2.6): the ballast case measures without it")
    if not reset_peak:  # Paddle 2.6's counters, whatever this Paddle has
        monkeypatch.setattr(capacity, "_allocator", lambda: (current, peak, None))
    earlier = paddle.ones([4_000_000], dtype="float32")  # 16 MB: the process's peak is far above the block's
    del earlier
    with capacity._PeakMeter() as meter:
        first = paddle.ones([250_000], dtype="float32")  # 1 MB
        second = paddle.ones([500_000], dtype="float32")  # 2 MB, both alive
        del first
    assert (meter.device, meter.retained) == (3_000_000, 2_000_000)
    del second


@needs_allocator_counters
@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2)])
def test_the_head_probe_measures_weight_and_velocity_storage(dtype, itemsize):
    profile = probe_head(dtype, "lazy", (1.0, 0.5, 0.0), 64.0)
    assert profile.storage_per_element == pytest.approx(2 * itemsize)
    assert profile.save_copies_per_element < 0.01  # checkpoints stream the shard: no copy of it
    assert profile.step_rows >= 1.0 and profile.step_logits >= 1.0  # the sampled rows' gradient, the logits


@needs_allocator_counters
@pytest.mark.parametrize("chunked", [False, True], ids=["whole-matrix", "streaming"])
@pytest.mark.parametrize("center_dtype", ["float32", "float16"])
def test_the_head_probe_measures_the_inf_nan_check_of_the_centers(center_dtype, chunked):
    profile = probe_head(center_dtype, "lazy", (1.0, 0.5, 0.0), 64.0, chunked=chunked)
    # The check (plsc.engine.loss_scaler.all_finite) takes paddle.isfinite of one center matrix at a time:
    # a bool per element, numpy's bool size, whatever the centers' dtype.
    assert profile.check_per_element == pytest.approx(np.dtype(bool).itemsize, rel=0.01)


@needs_allocator_counters
def test_the_inf_nan_check_of_a_large_shard_costs_one_block(monkeypatch):
    import paddle

    from plsc.capacity import _PeakMeter
    from plsc.engine import loss_scaler

    monkeypatch.setattr(loss_scaler, "FINITE_CHECK_BLOCK", 4096 * 16)
    centers = paddle.zeros([4096 * 8, 64], dtype="float16")  # 32 blocks of 2^16 elements
    with _PeakMeter() as whole:
        paddle.isfinite(centers).all()
    with _PeakMeter() as blocks:
        assert loss_scaler.all_finite([centers])
    assert whole.device >= centers.size  # a bool per element at once
    assert blocks.device <= 2 * 4096 * 16  # one block's bools (and the next, being formed) at most


@needs_allocator_counters
def test_the_streaming_head_probe_counts_one_chunk_and_an_id_per_sampled_center():
    # The code a GPU runs: the host's kept buffers and in-place update would blur the per-center slope.
    profile = probe_head("float16", "lazy", (1.0, 0.5, 0.0), 64.0, chunked=True, device="gpu")
    assert profile.chunked and profile.storage_per_element == pytest.approx(4.0)
    # Per sampled center: its int64 id, its float32 inverse norm and norm-liveness flag (kept for the walks).
    assert profile.sampled_bytes == pytest.approx(16.0, rel=0.05)
    # At least the chunk's cosines and their gradient, and the gathered rows (counts of chunk buffers).
    assert profile.step_logits >= 1.0 and profile.update_rows >= 1.0


@needs_allocator_counters
def test_the_streaming_head_probe_measures_the_filtering_mask():
    """Inter-class filtering keeps a bool per [G, chunk] entry for the backward, alive at the streaming
    head's peak: at least a quarter of a float32 buffer more. (The whole-matrix head's peak is the cosine
    layer's backward, after the margin layer's has freed its mask: the probe measures what is alive.)"""
    plain = probe_head("float32", "lazy", (1.0, 0.5, 0.0), 64.0, chunked=True)
    filtered = probe_head("float32", "lazy", (1.0, 0.5, 0.0), 64.0, chunked=True,
                          interclass_filtering_threshold=0.2)
    assert filtered.step_logits - plain.step_logits >= np.dtype(bool).itemsize / 4 - 0.01


def test_the_streaming_head_model_counts_the_chunk_not_the_sampled_rows():
    chunked_head = dataclasses.replace(HEAD, chunked=True, sampled_bytes=8.0, update_logits=2.0)
    model = MemoryModel(a_setting(device="gpu", chunk_size=256), chunked_head, BACKBONE)
    for classes in (100_000, 1_000_000):
        terms = model.phases(classes)["forward/backward"]
        assert terms["one chunk: rows + gradients"] == 262_144  # 2 buffers x [256, 128] x 4 bytes
        assert terms["one chunk: logits/softmax + gradients"] == 32_768  # 4 buffers x [8, 256] x 4 bytes
    # 8 bytes x a tenth of the classes sampled
    assert model.phases(100_000)["forward/backward"]["sampled ids"] == 80_000
    assert model.phases(1_000_000)["forward/backward"]["sampled ids"] == 800_000
    # One more class costs its weight and velocity (4 bytes x 128 = 512) and a tenth of an 8-byte id (0.8).
    assert model.bytes_per_class(model.max_classes()) == pytest.approx(512.8, rel=1e-3)
    with pytest.raises(ValueError, match="disagree"):
        MemoryModel(a_setting(chunk_size=256), HEAD, BACKBONE).peak(1000)


@needs_allocator_counters
def test_the_backbone_probe_counts_parameters_and_activations():
    profile = probe_backbone(ModelConfig(name="iresnet18", width=0.0625, embedding_size=16), 16)
    assert profile.parameters > 0 and profile.activation_bytes_per_sample > 0


@needs_allocator_counters
def test_capacity_predict_prints_and_writes_the_prediction(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {name: iresnet18, width: 0.0625, embedding_size: 32}\ndata: {image_size: 16}\n")
    out = tmp_path / "prediction.json"
    argv = ["capacity", "--predict", "--config", str(config), "--set", "loss.sample_ratio=0.1"]
    argv += ["--device-memory-gib", "0.5", "--device", "cpu", "--json", str(out)]
    assert main(argv) == 0
    assert "max classes:" in capsys.readouterr().out
    prediction = json.loads(out.read_text())
    assert prediction["max_classes"] > 0 and prediction["setting"]["device"] == "cpu"

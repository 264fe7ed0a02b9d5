"""Velocity in 8 bits (loss.velocity_dtype: int8) against a numpy reference of the quantised momentum step.

The reference: a row's velocity is ``codes * scale``; a step computes ``v' = mu * v + g + wd * w`` and
``w' = w - lr * v'`` from the dequantised rows, then requantises ``v'`` to ``rint(v' / s')`` with
``s' = max |v'| / 127``. Codes may differ from numpy's only where ``v' / s'`` lies within a hair of a
half-integer (float32 against float64 arithmetic; ties round differently), and must then differ by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest
from tiny_run import TINY_RUN

from plsc import checkpoint as ckpt
from plsc.config import Config, ConfigError, load_config
from plsc.distributed import LocalComm, shard_classes
from plsc.engine.trainer import Trainer
from plsc.loss.int8_rows import Int8Rows, dequantize, quantize
from plsc.loss.margin import ARCFACE, Margin
from plsc.loss.partial_fc import CenterUpdate, build_head
from plsc.loss.rows import dense_update, lazy_update, row_store

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
COMBINED = Margin(0.9, 0.4, 0.15, 64.0)
NEAR_HALF = 1e-3  # how close to a half-integer a reference code's argument must be for a mismatch to pass


def reference_quantize(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scales [n, 1], the unrounded v / s) in float64."""
    rows = rows.astype(np.float64)
    scale = np.abs(rows).max(axis=1, keepdims=True) / 127
    unrounded = np.divide(rows, scale, out=np.zeros_like(rows), where=scale > 0)
    return np.rint(unrounded), scale, unrounded


def assert_codes_match(codes: np.ndarray, reference: np.ndarray, unrounded: np.ndarray) -> None:
    mismatch = codes != reference
    near_half = np.abs(np.abs(unrounded - np.floor(unrounded)) - 0.5) < NEAR_HALF
    assert np.all(np.abs(codes[mismatch] - reference[mismatch]) == 1), "a code off by more than one"
    assert np.all(near_half[mismatch]), "a code differs where the reference is not near a tie"
    assert np.abs(codes).max() <= 127


def random_rows(rng, n: int, width: int) -> np.ndarray:
    """Rows of very different magnitudes (one scale per row must follow each), one of them all zero."""
    magnitudes = np.float32(10.0) ** rng.integers(-6, 2, (n, 1))
    rows = rng.standard_normal((n, width)).astype(np.float32) * magnitudes
    rows[n // 2] = 0
    return rows.astype(np.float32)


def test_quantize_matches_numpy():
    rows = random_rows(np.random.default_rng(0), 300, 64)
    container, scale = quantize(paddle.to_tensor(rows))
    codes = paddle.view(container, "int8").numpy()
    reference, reference_scale, unrounded = reference_quantize(rows)
    np.testing.assert_allclose(scale.numpy(), reference_scale, rtol=1e-6)
    assert_codes_match(codes, reference, unrounded)
    assert np.all(np.abs(codes).max(axis=1)[np.any(rows != 0, axis=1)] == 127)  # each row's largest -> +-127
    assert not codes[150].any() and scale.numpy()[150] == 0  # the zero row
    error = np.abs(dequantize(container, scale).numpy() - rows)
    assert np.all(error <= reference_scale / 2 * (1 + 1e-5))  # half a step at most


def test_host_quantisation_gives_the_codes_of_paddles_own_ops(monkeypatch):
    """On the CPU quantize/dequantize run numpy on the tensors' memory; elsewhere Paddle's ops. Both do the
    same float32 operations, so the codes and rows must be identical, ties (x.5 before the floor) included."""
    from plsc.loss import int8_rows

    rng = np.random.default_rng(11)
    scales = rng.uniform(1e-4, 30, (64, 1)).astype(np.float32)
    rows = rng.standard_normal((64, 16)).astype(np.float32) * scales
    rows[3] = 0.0
    rows[5] = np.float32([127, 2.5, -2.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 2)  # scale 1: every code a tie
    on_host = quantize(paddle.to_tensor(rows))
    host_rows = dequantize(*on_host).numpy()
    monkeypatch.setattr(int8_rows, "is_cpu_and_contiguous", lambda tensor: False)
    by_paddle = quantize(paddle.to_tensor(rows))
    for host, device in zip(on_host, by_paddle, strict=True):
        np.testing.assert_array_equal(host.numpy().view(np.uint16), device.numpy().view(np.uint16))
    np.testing.assert_array_equal(host_rows, dequantize(*by_paddle).numpy())
    assert on_host[0].numpy().view(np.int8)[5, :8].tolist() == [127, 3, -2, 1, 0, 2, 127, -126]


def test_rows_gathered_and_scattered_by_index():
    rng = np.random.default_rng(1)
    store, rows = Int8Rows(50, 16), random_rows(rng, 10, 16)
    index = rng.permutation(50)[:10]
    store.scatter_(paddle.to_tensor(index), paddle.to_tensor(rows))
    reference, scale, _ = reference_quantize(rows)
    np.testing.assert_allclose(store.gather(paddle.to_tensor(index)).numpy(), reference * scale, rtol=1e-6,
                               atol=1e-30)
    untouched = np.setdiff1d(np.arange(50), index)
    assert not store.read_block(0, 50).numpy()[untouched].any()
    with pytest.raises(ValueError, match="even width"):
        Int8Rows(4, 7)


def int8_state(rng, rows: int, width: int) -> tuple[np.ndarray, Int8Rows, np.ndarray, np.ndarray]:
    """Random weight and a random int8 velocity: (weight, the store, its codes, its scales)."""
    weight = rng.standard_normal((rows, width)).astype(np.float32)
    codes = rng.integers(-127, 128, (rows, width)).astype(np.int8)
    scales = (rng.uniform(0.1, 2.0, (rows, 1)) * 1e-3).astype(np.float32)
    store = Int8Rows(rows, width)
    store.set_codes(codes, scales)
    return weight, store, codes, scales


def reference_step(weight, codes, scales, grad, rows) -> tuple[np.ndarray, ...]:
    """The numpy reference of one momentum step of ``rows``: (weight, codes, scales, unrounded codes)."""
    weight = weight.astype(np.float64).copy()
    velocity = codes.astype(np.float64) * scales
    velocity[rows] = MOMENTUM * velocity[rows] + grad + WEIGHT_DECAY * weight[rows]
    weight[rows] -= LR * velocity[rows]
    new_codes, new_scales, unrounded = codes.astype(np.float64), scales.astype(np.float64), \
        codes.astype(np.float64)
    new_codes[rows], new_scales[rows], unrounded[rows] = reference_quantize(velocity[rows])
    return weight, new_codes, new_scales, unrounded


def assert_state(weight_tensor, store: Int8Rows, expected) -> None:
    weight, codes, scales, unrounded = expected
    np.testing.assert_allclose(weight_tensor.numpy(), weight, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(store.scale.numpy(), scales, rtol=1e-6)
    assert_codes_match(paddle.view(store.codes, "int8").numpy(), codes, unrounded)


def test_lazy_update_matches_the_numpy_reference(monkeypatch):
    monkeypatch.setattr("plsc.loss.rows.UPDATE_BLOCK_ROWS", 7)  # several blocks, the last one short
    rng = np.random.default_rng(2)
    weight, store, codes, scales = int8_state(rng, 120, 32)
    index = np.sort(rng.permutation(120)[:40])
    grad = rng.standard_normal((40, 32)).astype(np.float32) * np.float32(1e-3)
    weight_tensor = paddle.to_tensor(weight)
    lazy_update(row_store(weight_tensor), store, paddle.to_tensor(index), paddle.to_tensor(grad), LR,
                MOMENTUM, WEIGHT_DECAY)
    assert_state(weight_tensor, store, reference_step(weight, codes, scales, grad, index))


def test_dense_update_matches_the_numpy_reference(monkeypatch):
    """Every row steps: the sampled ones with their gradient, the others with zero (PLSC v2.2's semantics)."""
    monkeypatch.setattr("plsc.loss.rows.DENSE_BLOCK_ROWS", 50)
    rng = np.random.default_rng(3)
    weight, store, codes, scales = int8_state(rng, 120, 32)
    index = np.sort(rng.permutation(120)[:40])
    grad = rng.standard_normal((40, 32)).astype(np.float32) * np.float32(1e-3)
    full_grad = np.zeros((120, 32), np.float32)
    full_grad[index] = grad
    weight_tensor = paddle.to_tensor(weight)
    dense_update(row_store(weight_tensor), store, paddle.to_tensor(index), paddle.to_tensor(grad), LR,
                 MOMENTUM, WEIGHT_DECAY)
    assert_state(weight_tensor, store, reference_step(weight, codes, scales, full_grad, np.arange(120)))


@pytest.mark.parametrize("planned", [False, True], ids=["update-walk", "in-backward"])
@pytest.mark.parametrize("momentum_mode", ["lazy", "dense"])
@pytest.mark.parametrize("center_dtype", ["float32", "float16"])
def test_streaming_head_with_int8_velocity_equals_the_whole_matrix_head(center_dtype, momentum_mode, planned):
    """Both heads keep int8 velocity; three steps from the same state each time."""
    options = dict(num_classes=60, embedding_size=16, margin=COMBINED, sample_ratio=0.3,
                   momentum_mode=momentum_mode, center_dtype=center_dtype, velocity_dtype="int8", seed=3)
    streaming, whole = build_head(7, **options), build_head(0, **options)
    rng = np.random.default_rng(4)
    for step in range(3):
        embeddings = rng.standard_normal((12, 16)).astype(np.float32)
        labels = paddle.to_tensor(rng.integers(0, 60, 12))
        for head in (streaming, whole):
            x = paddle.to_tensor(embeddings, stop_gradient=False)
            update = CenterUpdate(LR, MOMENTUM, WEIGHT_DECAY)
            pending = head.prepare(labels, step, update_in_backward=update if planned else None)
            loss = head.loss(x, pending)
            loss.backward()
            head.apply(pending, update)
        # Relative to the largest weight, as in tests/test_streaming_head.py; float16: one rounding at most.
        tolerance = 1e-5 if center_dtype == "float32" else 2.0**-10
        weights = [h.weight.astype("float32").numpy() for h in (streaming, whole)]
        assert np.abs(weights[0] - weights[1]).max() <= tolerance * np.abs(weights[1]).max()
        codes = [paddle.view(h.velocity.codes, "int8").numpy().astype(int) for h in (streaming, whole)]
        assert np.abs(codes[0] - codes[1]).max() <= 1 and np.mean(codes[0] != codes[1]) < 0.01
        np.testing.assert_allclose(streaming.velocity.scale.numpy(), whole.velocity.scale.numpy(), rtol=1e-5)
        state = [whole.weight.numpy(), paddle.view(whole.velocity.codes, "int8").numpy(),
                 whole.velocity.scale.numpy()]
        streaming.set_state(state[0], state[1], state[2])  # the next step starts from the same state


# --- checkpoints -------------------------------------------------------------------------------------------


def head_with_state(velocity_dtype: str, center_dtype: str = "float16", classes: int = 9000, seed: int = 0):
    head = build_head(0, num_classes=classes, embedding_size=32, margin=ARCFACE, center_dtype=center_dtype,
                      velocity_dtype=velocity_dtype, seed=seed)
    rng = np.random.default_rng(seed)
    velocity = random_rows(rng, classes, 32)
    head.set_state(rng.standard_normal((classes, 32)).astype(center_dtype), velocity)
    return head, velocity


def save(head, path: Path) -> dict:
    ckpt.save_checkpoint(path, comm=LocalComm(), state=ckpt.TrainingState(), config=Config().to_dict(),
                         model=paddle.nn.Linear(2, 2), optimizer=None, head=head)
    return ckpt.read_manifest(path)


def test_int8_checkpoint_round_trip_is_exact_and_reshards(tmp_path):
    head, _ = head_with_state("int8")  # 9000 rows: three blocks of 4096, the last one short
    manifest = save(head, tmp_path / "ckpt")
    assert (manifest["format_version"], manifest["velocity_dtype"]) == (2, "int8")
    codes = np.load(tmp_path / "ckpt" / ckpt.shard_file(0, "velocity"))
    scales = np.load(tmp_path / "ckpt" / ckpt.shard_file(0, "velocity_scale"))
    assert codes.dtype == np.int8 and scales.shape == (9000, 1)
    np.testing.assert_array_equal(codes, paddle.view(head.velocity.codes, "int8").numpy())
    restored, _ = head_with_state("int8", seed=1)
    restored.set_state(**ckpt.read_center_rows(tmp_path / "ckpt", manifest, restored.shard))
    for a, b in zip(restored.state_tensors(), head.state_tensors(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    second_half = ckpt.read_center_rows(tmp_path / "ckpt", manifest, shard_classes(9000, 1, 2))
    np.testing.assert_array_equal(np.asarray(second_half["velocity"]), codes[4500:])
    np.testing.assert_array_equal(np.asarray(second_half["velocity_scale"]), scales[4500:])


def test_velocity_converts_between_float_and_int8_on_load(tmp_path):
    int8_head, _ = head_with_state("int8")
    float_head, float_velocity = head_with_state("same")
    save(int8_head, tmp_path / "int8")
    save(float_head, tmp_path / "float")
    into_float, _ = head_with_state("same", seed=2)
    into_float.set_state(**ckpt.read_center_rows(tmp_path / "int8", ckpt.read_manifest(tmp_path / "int8"),
                                                 into_float.shard))
    codes = paddle.view(int8_head.velocity.codes, "int8").numpy()
    dequantized = (codes.astype(np.float32) * int8_head.velocity.scale.numpy()).astype(np.float16)
    np.testing.assert_array_equal(into_float.velocity.numpy(), dequantized)
    into_int8, _ = head_with_state("int8", seed=2)
    into_int8.set_state(**ckpt.read_center_rows(tmp_path / "float", ckpt.read_manifest(tmp_path / "float"),
                                                into_int8.shard))
    reference, scale, unrounded = reference_quantize(float_velocity.astype(np.float16))
    np.testing.assert_allclose(into_int8.velocity.scale.numpy(), scale, rtol=1e-6)
    assert_codes_match(paddle.view(into_int8.velocity.codes, "int8").numpy(), reference, unrounded)


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Float velocity is written as format 1 (without velocity_dtype, readers of format 1 load it)."""
    head, velocity = head_with_state("same", center_dtype="float32")
    manifest = save(head, tmp_path / "ckpt")
    assert manifest["format_version"] == 1
    manifest.pop("velocity_dtype")
    rows = ckpt.read_center_rows(tmp_path / "ckpt", manifest, head.shard)
    np.testing.assert_array_equal(np.asarray(rows["velocity"]), velocity)


# --- in training -------------------------------------------------------------------------------------------


def tiny_config(tiny_dir: Path, *extra: str):
    return load_config(overrides=[f"data.root={tiny_dir}", "data.val_bins=[]", *TINY_RUN,
                                  "train.eval_interval=0", "loss.center_dtype=float16",
                                  "loss.velocity_dtype=int8", *extra])


def logged_losses(output: Path) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("chunk_size", [0, 7], ids=["whole-matrix", "streaming"])
def test_training_with_int8_velocity_resumes_exactly(tiny_dir, tmp_path, chunk_size):
    common = ["train.max_steps=8", f"loss.chunk_size={chunk_size}"]
    Trainer(tiny_config(tiny_dir, *common), tmp_path / "whole").run()
    Trainer(tiny_config(tiny_dir, *common, "train.max_steps=4"), tmp_path / "split").run()
    Trainer(tiny_config(tiny_dir, *common), tmp_path / "split", resume=True).run()
    assert logged_losses(tmp_path / "split") == logged_losses(tmp_path / "whole")
    runs = (tmp_path / "whole" / "checkpoints/8", tmp_path / "split" / "checkpoints/8")
    final = [ckpt.read_center_rows(run, ckpt.read_manifest(run), shard_classes(40, 0, 1)) for run in runs]
    for kind in ("weight", "velocity", "velocity_scale"):
        np.testing.assert_array_equal(np.asarray(final[0][kind]), np.asarray(final[1][kind]))


def test_int8_velocity_needs_an_even_embedding_size(tiny_dir):
    with pytest.raises(ConfigError, match="loss.velocity_dtype int8 needs an even model.embedding_size"):
        tiny_config(tiny_dir, "model.embedding_size=15")


def test_start_up_check_passes_here_and_a_broken_store_ends_the_run_in_one_line(tiny_dir, tmp_path,
                                                                                 monkeypatch):
    from plsc.errors import PlscError
    from plsc.loss import int8_rows

    assert int8_rows.self_check() is None
    monkeypatch.setattr(int8_rows, "dequantize", lambda container, scale: int8_rows.paddle.zeros(
        [container.shape[0], container.shape[1] * 2]))
    assert int8_rows.self_check() == "gather after scatter differs from numpy's quantisation"
    with pytest.raises(PlscError, match="velocity_dtype int8 does not work on cpu: gather after scatter"):
        Trainer(tiny_config(tiny_dir), tmp_path / "run")


def test_capacity_model_counts_one_byte_per_velocity_element():
    """float16 weight (2 bytes) + int8 codes (1) + a float32 scale per row (4 / E), measured by the probe."""
    from plsc.capacity import PROBE_EMBEDDING, probe_head

    profile = probe_head("float16", "lazy", (1.0, 0.5, 0.0), 64.0, chunked=True, velocity_dtype="int8")
    assert profile.storage_per_element == pytest.approx(2 + 1 + 4 / PROBE_EMBEDDING, rel=0.02)


def test_a_manifest_without_the_scales_file_is_a_one_line_error(tmp_path):
    import json

    from plsc.errors import PlscError

    head, _ = head_with_state("int8", classes=100)
    save(head, tmp_path / "ckpt")
    manifest_path = tmp_path / "ckpt" / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["shards"][0]["velocity_scale"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(PlscError, match=r"corrupt manifest, no shards\[0\]\.velocity_scale"):
        ckpt.read_manifest(tmp_path / "ckpt")

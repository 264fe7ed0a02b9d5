"""Streamed class-center shards: the files are np.save's, reading them back copies one block at a time."""

from __future__ import annotations

import tracemalloc

import numpy as np
import paddle
import pytest

from plsc import checkpoint as ckpt
from plsc.checkpoint import shards
from plsc.config import Config
from plsc.distributed import LocalComm
from plsc.errors import PlscError
from plsc.loss.margin import ARCFACE
from plsc.loss.partial_fc import PartialFC


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block_rows", [7, 100, 1000])
def test_streamed_file_is_byte_for_byte_np_save(tmp_path, dtype, block_rows):
    rows = np.random.default_rng(0).standard_normal((100, 12)).astype(dtype)
    np.save(tmp_path / "reference.npy", rows)
    blocks = (rows[start : start + block_rows] for start in range(0, len(rows), block_rows))
    shards.write_npy(tmp_path / "streamed.npy", rows.shape, dtype, blocks)
    assert (tmp_path / "streamed.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
    pieces = shards.RowPieces([shards.FileRows(tmp_path / "streamed.npy", 13, 57)], 12, dtype)
    np.testing.assert_array_equal(np.asarray(pieces), rows[13:57])
    blocks = [(start, rows.copy()) for start, rows in pieces.blocks(block_rows)]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), rows[13:57])
    assert [start for start, _ in blocks] == list(range(0, 44, block_rows))


def test_short_or_mistyped_blocks_are_refused(tmp_path):
    rows = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="9 rows written, 10 expected"):
        shards.write_npy(tmp_path / "a.npy", (10, 4), "float32", [rows[:9]])
    with pytest.raises(ValueError, match="does not fit"):
        shards.write_npy(tmp_path / "b.npy", (10, 4), "float16", [rows])


def head_with_random_state(classes: int, dtype: str, seed: int = 0):
    """A head whose centers and velocities are random, with those arrays."""
    rng = np.random.default_rng(seed)
    weight, velocity = (rng.standard_normal((classes, 32)).astype(dtype) for _ in range(2))
    head = PartialFC(classes, 32, ARCFACE, center_dtype=dtype)
    head.set_state(weight, velocity)
    return head, weight, velocity


def save(head: PartialFC, path) -> None:
    ckpt.save_checkpoint(path, comm=LocalComm(), state=ckpt.TrainingState(), config=Config().to_dict(),
                         model=paddle.nn.Linear(2, 2), optimizer=None, head=head)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_checkpoint_round_trip_through_streamed_shards(tmp_path, dtype):
    head, weight, velocity = head_with_random_state(10_000, dtype)  # 3 blocks of 4096 rows, the last short
    save(head, tmp_path / "ckpt")
    manifest = ckpt.read_manifest(tmp_path / "ckpt")
    assert manifest["center_dtype"] == dtype
    np.testing.assert_array_equal(np.load(tmp_path / "ckpt" / ckpt.shard_file(0, "weight")), weight)
    restored = PartialFC(10_000, 32, ARCFACE, center_dtype=dtype, seed=1)
    restored.set_state(**ckpt.read_center_rows(tmp_path / "ckpt", manifest, restored.shard))
    np.testing.assert_array_equal(restored.weight.numpy(), weight)
    np.testing.assert_array_equal(restored.velocity.numpy(), velocity)


def test_float32_checkpoint_loads_into_float16_storage_with_numpy_rounding(tmp_path):
    head, weight, velocity = head_with_random_state(5000, "float32")
    save(head, tmp_path / "ckpt")
    manifest = ckpt.read_manifest(tmp_path / "ckpt")
    half = PartialFC(5000, 32, ARCFACE, center_dtype="float16")
    half.set_state(**ckpt.read_center_rows(tmp_path / "ckpt", manifest, half.shard))
    np.testing.assert_array_equal(half.weight.numpy(), weight.astype(np.float16))
    np.testing.assert_array_equal(half.velocity.numpy(), velocity.astype(np.float16))


def peak_rss_rise(action) -> int:
    """How far the process's peak resident set (VmHWM) rises above its current size while ``action`` runs
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here ({exc})")
    before = status_bytes("VmRSS")
    action()
    return status_bytes("VmHWM") - before


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))


def test_checkpoint_phase_needs_no_host_copy_of_the_shard(tmp_path):
    """A 64 MiB shard (weight + velocity, float32): saving writes views of the tensors' memory, loading
    reads one block (1 MiB here) at a time into the head's tensors; the whole-shard copies took 64 MiB each
    way. Peak RSS rises by less than 8 MiB, numpy allocates (tracemalloc) less than 2 MiB."""
    head, _, _ = head_with_random_state(262_144, "float32")
    tracemalloc.start()
    try:
        saving_rss = peak_rss_rise(lambda: save(head, tmp_path / "ckpt"))
        saving_numpy = tracemalloc.get_traced_memory()[1]
        manifest = ckpt.read_manifest(tmp_path / "ckpt")
        tracemalloc.reset_peak()
        loading_rss = peak_rss_rise(
            lambda: head.set_state(**ckpt.read_center_rows(tmp_path / "ckpt", manifest, head.shard)))
        loading_numpy = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(saving_rss, loading_rss) < 8 * 2**20, (saving_rss, loading_rss)
    assert max(saving_numpy, loading_numpy) < 2 * 2**20, (saving_numpy, loading_numpy)


def test_a_shard_file_that_does_not_match_the_manifest_is_a_clear_error(tmp_path):
    head, _, _ = head_with_random_state(100, "float32")
    save(head, tmp_path / "ckpt")
    manifest = ckpt.read_manifest(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / ckpt.shard_file(0, "velocity")
    np.save(shard, np.zeros((100, 32), np.float16))
    with pytest.raises(PlscError, match="holds float16"):
        ckpt.read_center_rows(tmp_path / "ckpt", manifest, head.shard)
    np.save(shard, np.zeros((100, 32), np.float32))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(PlscError, match="shorter than its header"):
        head.set_state(**ckpt.read_center_rows(tmp_path / "ckpt", manifest, head.shard))

"""plsc.atomic: a write that fails at any point leaves the previous file as it was and no temporary file."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from plsc import atomic
from plsc.errors import PlscError


def test_write_replaces_the_file_with_exactly_the_new_bytes(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    atomic.write_atomic(target, b"\x00new\xff")
    assert target.read_bytes() == b"\x00new\xff"
    atomic.write_atomic(target, "text \u00e9\n")
    assert target.read_bytes() == "text \u00e9\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_file_object_written_by_numpy_reads_back(tmp_path):
    target = tmp_path / "emb.npy"
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    with atomic.atomic_file(target) as f:
        np.save(f, values)
    np.testing.assert_array_equal(np.load(target), values)


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("failure", [Interrupted(), KeyboardInterrupt(), OSError(errno.EIO, "I/O error")])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, failure):
    target = tmp_path / "result.json"
    target.write_text("old")
    expected = PlscError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected):
        with atomic.atomic_file(target, "w") as f:
            f.write("half of the new")
            f.flush()
            raise failure
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_keeps_the_old_file(tmp_path, monkeypatch, call):
    target = tmp_path / "latest"
    target.write_text("2\n")

    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, call, fail)
    with pytest.raises(PlscError, match=f"^could not write {target}: Input/output error$"):
        atomic.write_atomic(target, "3\n")
    monkeypatch.undo()
    assert target.read_text() == "2\n"
    assert os.listdir(tmp_path) == ["latest"]


def test_a_full_disk_is_one_line_naming_the_target(tmp_path, monkeypatch):
    target = tmp_path / "index.npz"
    real_fsync = os.fsync

    def disk_full(fd):
        if os.fstat(fd).st_size:  # the data reaches the temp file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(PlscError) as caught:
        atomic.write_atomic(target, b"x" * 1000)
    assert str(caught.value) == f"no space left writing {target}"
    assert os.listdir(tmp_path) == []


def test_a_pending_file_stays_invisible_until_committed(tmp_path):
    target = tmp_path / "train.rec"
    pending = atomic.PendingFile(target)
    pending.file.write(b"records")
    assert not target.exists()
    pending.commit()
    assert target.read_bytes() == b"records"
    discarded = atomic.PendingFile(target)
    discarded.file.write(b"other")
    discarded.discard()
    assert target.read_bytes() == b"records" and os.listdir(tmp_path) == ["train.rec"]


def test_temp_names_are_distinct_and_found_as_stale(tmp_path):
    target = tmp_path / "img.jpg"
    names = {atomic.temp_path(target) for _ in range(50)}
    assert len(names) == 50 and all(p.parent == tmp_path and p.name.startswith(".img.jpg.") for p in names)
    for name in list(names)[:3]:
        name.write_bytes(b"partial")
    target.write_bytes(b"complete")
    atomic.remove_stale_temps(tmp_path)
    assert os.listdir(tmp_path) == ["img.jpg"]

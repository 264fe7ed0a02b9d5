"""The run folder keeps every run's results: one process at a time (a real second process holds the lock),
names from input never become other paths, every write is whole or appended whole under a full disk
(injected), restarts respect another run's results, and hand-edited manifests and ``latest`` pointers are
refused in one line before anything is trained or written."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpoint_safety import one_error_line, snapshot
from test_engine import read_log, tiny_config, write_tiny_yaml

from plsc import checkpoint as ckpt
from plsc import cli, run_lock
from plsc.config import load_config, save_config
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError
from plsc.names import distinct_names, path_component

QUIET = ("train.eval_interval=0",)
BIN = "lfw_disjoint_100.bin"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> Path:
    """A 2-step run with a best model (checkpoints/2, best_model/lfw_disjoint_100, config.yaml, log)."""
    output = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(tiny_dir, "train.max_steps=2", "train.eval_interval=2"), output).run()
    return output


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# --- one run per output folder ------------------------------------------------------------------------------


def wait_for_holder(folder: Path, pid: int, process: subprocess.Popen, timeout_s: float = 180.0) -> str:
    """The lock line of ``pid`` once it holds ``folder`` (it imports Paddle and builds the model first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = run_lock.holder(folder)
        if line is not None and line.split()[0] == str(pid):
            return line
        assert process.poll() is None, process.communicate()[0][-2000:]
        time.sleep(0.2)
    pytest.fail(f"process {pid} did not lock {folder} within {timeout_s} s")


def test_a_folder_in_use_refuses_a_second_run_a_resume_and_an_export_until_its_holder_dies(tiny_dir,
                                                                                            tmp_path, capsys):
    config = write_tiny_yaml(tiny_dir, tmp_path / "tiny.yaml", "train.max_steps=5000", *QUIET)
    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "plsc.cli", "train", "--config", str(config), "--output", str(output)]
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        wait_for_holder(output, first.pid, first)
        holder = f"{output} is in use by process {first.pid} ("
        second = ["train", "--config", str(config), "--output", str(output), "--set", "train.max_steps=1"]
        assert cli.main(second) == 2
        assert f"cannot train into it: {holder}" in one_error_line(capsys)
        assert cli.main([*second, "--nproc", "2"]) == 2  # refused before any process is started
        assert f"cannot train into it: {holder}" in one_error_line(capsys)
        assert not (output / "log").exists()
        assert cli.main(["train", "--output", str(output), "--resume"]) == 2
        assert holder in one_error_line(capsys)
        step = output / "checkpoints" / "4999"  # not written yet
        assert cli.main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "export")]) == 2
        err = one_error_line(capsys)
        assert f"checkpoint not found: {step}; {holder}" in err and "may still be writing it" in err
        assert first.poll() is None  # the first run went on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The kernel released the killed run's lock: nothing stale stops the next run.
    assert run_lock.holder(output) is None
    assert cli.main([*second, "--overwrite"]) == 0
    assert [r["step"] for r in read_log(output)] == [1]


def test_a_run_that_finished_while_another_was_starting_is_not_overwritten(tiny_dir, tmp_path):
    """Both checked an empty folder; the second takes it only after the first's results are there, and the
    check under the lock refuses it."""
    output = tmp_path / "run"
    first = Trainer(tiny_config(tiny_dir, "train.max_steps=2", *QUIET), output)
    second = Trainer(tiny_config(tiny_dir, "train.max_steps=1", *QUIET), output)
    first.run()
    before = snapshot(output / "checkpoints")
    with pytest.raises(PlscError, match="holds another run's checkpoints, best_model, train_log"):
        second.run()
    assert snapshot(output / "checkpoints") == before
    assert [r["step"] for r in read_log(output)] == [1, 2]
    assert load_config(output / "config.yaml").train.max_steps == 2
    assert run_lock.holder(output) is None  # released after the refusal too


def test_the_lock_is_taken_only_while_free_and_shared_with_the_launchers_ranks(tmp_path, monkeypatch):
    program = (f"import time; from plsc import run_lock; run_lock.acquire({str(tmp_path)!r}); "
               "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PlscError, match=f"in use by process {holder.pid} "):
            run_lock.acquire(tmp_path)
        monkeypatch.setenv(run_lock.SHARED_BY, str(holder.pid))  # a rank the holder launched
        assert run_lock.holder(tmp_path) is None
        run_lock.acquire(tmp_path).release()
    finally:
        holder.kill()
        holder.wait()


def test_resuming_a_folder_held_before_its_config_is_written_names_the_holder(tmp_path, capsys):
    """A run takes the folder's lock, then writes config.yaml: in between, --resume without --config is
    refused for the run holding the folder, not for a folder that is no run."""
    program = (f"import time; from plsc import run_lock; run_lock.acquire({str(tmp_path)!r}); "
               "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["train", "--output", str(tmp_path), "--resume"]) == 2
        assert f"cannot resume it: {tmp_path} is in use by process {holder.pid} " in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["train", "--output", str(tmp_path), "--resume"]) == 2  # free now: no run folder
    assert "config.yaml not found" in one_error_line(capsys)


# --- names from input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b"])
def test_a_name_that_is_not_one_path_component_is_refused(name):
    with pytest.raises(PlscError, match="cannot name a file or folder"):
        path_component(name, "source")


def test_a_bin_named_dot_dot_bin_cannot_replace_best_model_itself(run_copy, tiny_dir, capsys):
    """``..bin``'s stem is ``.``: best_model/. is best_model, whose other best models the swap deleted."""
    dots = run_copy.parent / "..bin"
    shutil.copy(tiny_dir / BIN, dots)
    before = snapshot(run_copy / "best_model")
    bins = f"data.val_bins=[{tiny_dir / BIN},{dots}]"
    command = ["train", "--output", str(run_copy), "--resume", "--set", "train.max_steps=3", "--set", bins]
    assert cli.main(command) == 2
    err = one_error_line(capsys)
    assert f"{dots}: the name '.' cannot name a file or folder" in err
    assert snapshot(run_copy / "best_model") == before


def test_two_bins_of_one_name_are_refused_not_merged_into_one_result(run_copy, tiny_dir, tmp_path, capsys):
    copies = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        copies.append(str(shutil.copy(tiny_dir / BIN, tmp_path / folder / BIN)))
    checkpoint = run_copy / "checkpoints" / "2"
    command = ["eval", "--checkpoint", str(checkpoint), "--bin", copies[0], "--bin", copies[1]]
    assert cli.main(command) == 2
    assert f"--bin: {copies[0]} and {copies[1]} are both named 'lfw_disjoint_100'" in one_error_line(capsys)
    with pytest.raises(PlscError, match="data.val_bins: .* are both named"):
        Trainer(tiny_config(tiny_dir, f"data.val_bins=[{copies[0]},{copies[1]}]"), tmp_path / "fresh")


def test_an_export_name_cannot_leave_the_export_folder(run_copy, tmp_path, capsys):
    checkpoint = run_copy / "checkpoints" / "2"
    command = ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "export"), "--name",
               "../escaped"]
    assert cli.main(command) == 2
    assert "--name: the name '../escaped' cannot name a file or folder" in one_error_line(capsys)
    assert not list(tmp_path.glob("escaped*")) and not (tmp_path / "export").exists()


def test_demo_inputs_whose_results_share_a_file_are_refused(tmp_path):
    from plsc.demo.pipeline import output_names

    for name in ("a.jpg", "a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    paths = sorted(tmp_path.iterdir())
    with pytest.raises(PlscError, match=r"a.jpg and .*a.png are both named 'a.json'"):
        output_names(paths, tmp_path)
    assert output_names(paths[1:], tmp_path) == [Path("a.png"), Path("b.jpg")]
    assert distinct_names([("x", "1"), ("y", "2")], "what") == ["1", "2"]


# --- writes under a full disk -------------------------------------------------------------------------------


class FullDisk:
    """A file opened for writing that takes ``room`` more bytes, writes them and then fails with ENOSPC."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data):
        size = len(data.encode() if isinstance(data, str) else bytes(data))
        if size > self.room:
            self.handle.write(data[: self.room])  # ASCII text: characters are bytes
            self.handle.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_disk_when_writing(monkeypatch, name: str, room: int) -> None:
    """Every file opened for writing whose path holds ``name`` (the file itself or its temporary name) fails
    with ENOSPC after ``room`` bytes, written through open() (Path.write_text too) or os.write alike."""
    real_open, real_write = open, os.write

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if name in str(file) and any(flag in mode for flag in "wax+"):
            return FullDisk(handle, room)
        return handle

    def full_write(fd, data):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            real_write(fd, bytes(data)[:room])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("builtins.open", full_open)
    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(os, "write", full_write)


def test_config_cut_by_a_full_disk_on_resume_leaves_the_saved_one(run_copy, monkeypatch, capsys):
    """config.yaml used to be rewritten in place: cut short, the next resume trained with defaults."""
    config_file = run_copy / "config.yaml"
    saved = config_file.read_text()
    with monkeypatch.context() as patch:
        fill_disk_when_writing(patch, "config.yaml", room=len(saved) // 2)
        command = ["train", "--output", str(run_copy), "--resume", "--set", "train.max_steps=3"]
        assert cli.main(command) == 2
    assert f"no space left writing {config_file}" in one_error_line(capsys)
    assert config_file.read_text() == saved
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")]
    assert cli.main(["train", "--output", str(run_copy), "--resume", "--set", "train.max_steps=3"]) == 0
    assert ckpt.read_manifest(run_copy / "checkpoints" / "3")["config"] == load_config(config_file).to_dict()


def test_log_append_on_a_full_disk_is_one_line_and_leaves_whole_records(run_copy, monkeypatch, capsys):
    log_file = run_copy / "train_log.jsonl"
    before = log_file.read_text()
    checkpoints = snapshot(run_copy / "checkpoints")
    with monkeypatch.context() as patch:
        fill_disk_when_writing(patch, "train_log.jsonl", room=10)
        command = ["train", "--output", str(run_copy), "--resume", "--set", "train.max_steps=4"]
        assert cli.main(command) == 2
    assert f"no space left writing {log_file}" in one_error_line(capsys)
    assert log_file.read_text() == before  # the record cut at 10 bytes is gone: no partial line
    assert snapshot(run_copy / "checkpoints") == checkpoints
    assert cli.main(["train", "--output", str(run_copy), "--resume", "--set", "train.max_steps=3"]) == 0
    assert [r["step"] for r in read_log(run_copy)] == [1, 2, 3]


def test_save_config_and_bench_results_replace_the_file_whole(tmp_path, monkeypatch, tiny_dir):
    from plsc.bench import write_json

    config = tiny_config(tiny_dir)
    save_config(config, tmp_path / "config.yaml")
    write_json(tmp_path / "bench.json", {"old": 1})
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with monkeypatch.context() as patch:
        fill_disk_when_writing(patch, str(tmp_path), room=5)
        with pytest.raises(PlscError, match="no space left writing"):
            save_config(tiny_config(tiny_dir, "train.max_steps=7"), tmp_path / "config.yaml")
        with pytest.raises(PlscError, match="no space left writing"):
            write_json(tmp_path / "bench.json", {"new": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


# --- restarts respect another run's results -----------------------------------------------------------------


def test_restart_with_another_class_count_needs_overwrite_and_moves_the_old_run_aside(run_copy, tiny_dir,
                                                                                     capsys):
    """A restart at step 0 in the old run's folder used to prune its checkpoints and drop its log."""
    before = snapshot(run_copy)
    new_classes = ["--set", "data.num_classes=80", "--set", "train.max_steps=1", "--set", "data.val_bins=[]"]
    command = ["train", "--output", str(run_copy), "--resume-weights-only", *new_classes]
    assert cli.main(command) == 2
    err = one_error_line(capsys)
    assert "with another class count starts a new run at step 0" in err and "--overwrite" in err
    assert snapshot(run_copy) == before
    assert cli.main([*command, "--overwrite"]) == 0
    (aside,) = run_copy.glob("old-*")
    assert ckpt.read_manifest(aside / "checkpoints" / "2")["num_classes"] == 40
    assert [r["step"] for r in read_log(aside)] == [1, 2]
    assert (aside / "best_model" / "lfw_disjoint_100").is_dir()
    assert ckpt.read_manifest(run_copy / "checkpoints" / "1")["num_classes"] == 80
    assert [r["step"] for r in read_log(run_copy)] == [1]


# --- manifests and `latest` ---------------------------------------------------------------------------------


def edit_manifest(checkpoint: Path, change) -> None:
    path = checkpoint / ckpt.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def shard_twice(manifest):
    manifest["shards"] = [manifest["shards"][0], dict(manifest["shards"][0])]
    manifest["world_size"] = 2


def set_key(key, value):
    return lambda manifest: manifest.__setitem__(key, value)


@pytest.mark.parametrize("change,message", [
    (set_key("step", -3), "step must be a non-negative integer, got -3"),
    (set_key("step", "2"), "step must be a non-negative integer, got '2'"),
    (set_key("step", 2.0), "step must be a non-negative integer, got 2.0"),
    (set_key("epoch", [0]), "epoch must be a non-negative integer, got [0]"),
    (set_key("step_in_epoch", True), "step_in_epoch must be a non-negative integer, got True"),
    (set_key("num_classes", 0), "num_classes must be a positive integer, got 0"),
    (set_key("velocity_dtype", "bfloat99"), "velocity_dtype must be one of float32, float16, int8"),
    (set_key("center_dtype", "float64"), "center_dtype must be one of float32, float16, got 'float64'"),
    (shard_twice, "shards[1] must be rank 1"),
    (lambda m: m["shards"][0].update(count=39), "the shards hold 39 classes, num_classes is 40"),
    (lambda m: m["shards"][0].update(weight="../../backbone.pdparams"), "shards[0].weight must name a file"),
    (set_key("loss_scaler", {"scale": -1.0, "good_steps": 0}), "loss_scaler must hold a positive scale"),
    (set_key("best", {"lfw": {"accuracy": "high"}}), "best must map each verification set"),
    (set_key("config", {"train": 3}), "config must map sections to settings"),
])
def test_hand_edited_manifest_is_refused_in_one_line_before_anything_runs(run_copy, tiny_dir, capsys, change,
                                                                          message):
    checkpoint = run_copy / "checkpoints" / "2"
    edit_manifest(checkpoint, change)
    before = snapshot(run_copy)
    assert cli.main(["train", "--output", str(run_copy), "--resume", "--set", "train.max_steps=3"]) == 2
    assert f"{checkpoint / ckpt.MANIFEST}: corrupt manifest, {message}" in one_error_line(capsys)
    assert snapshot(run_copy) == before
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--bin", str(tiny_dir / BIN)]) == 2
    assert "corrupt manifest" in one_error_line(capsys)


@pytest.mark.parametrize("text,message", [
    ("２\n", "does not name a step (it holds '２')"),  # int() reads it as 2
    ("-2\n", "does not name a step"),
    ("5\n", "names step 5, but"),  # checkpoints/5 holds step 2: see below
])
def test_latest_names_an_existing_step_in_ascii_digits(run_copy, capsys, text, message):
    checkpoints = run_copy / "checkpoints"
    shutil.copytree(checkpoints / "2", checkpoints / "5")
    (checkpoints / "latest").write_text(text)
    assert cli.main(["train", "--output", str(run_copy), "--resume"]) == 2
    assert f"{checkpoints / 'latest'} {message}" in one_error_line(capsys)


def test_latest_is_written_only_for_a_saved_step(run_copy):
    checkpoints = ckpt.CheckpointDir(run_copy / "checkpoints")
    for step in (7, -1, "2"):
        with pytest.raises(PlscError, match="refusing to name"):
            checkpoints.mark_latest(step)
    checkpoints.mark_latest(2)
    assert checkpoints.latest() == run_copy / "checkpoints" / "2"

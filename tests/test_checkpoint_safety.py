"""Checkpoints that never run code, never lose work and are never restored into the wrong run.

Safe loading (crafted pickles refused on every path that reads a checkpoint), weights that must fit, the
settings a resume must keep, named errors for missing or corrupt parts, atomic saves under an injected failure
at every filesystem call, clean write failures, pruning and the training log after a resume.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
from test_engine import read_log, tiny_config, write_tiny_yaml

from plsc import checkpoint as ckpt
from plsc import cli, safe_pickle
from plsc.checkpoint import shards
from plsc.distributed import shard_classes
from plsc.engine.trainer import Trainer
from plsc.errors import PlscError

QUIET = ("train.eval_interval=0",)
BIN = "lfw_disjoint_100.bin"


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory) -> Path:
    """A 2-step run (checkpoints/2), its config.yaml and log: copy it before changing anything."""
    output = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(tiny_dir, "train.max_steps=2", *QUIET), output).run()
    return output


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: equal snapshots, nothing written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("plsc: error: "), err
    return err


# --- loading never executes code --------------------------------------------------------------------------


class SystemCall:
    """A pickle payload: unpickling it calls os.system (here: creates a marker file)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def plant_payload(path: Path, marker: Path) -> None:
    """Replace a state_dict file by one whose first tensor runs a shell command when unpickled."""
    path.write_bytes(pickle.dumps({"conv1.weight": SystemCall(f"touch {marker}")}, protocol=4))


def test_state_dicts_of_this_paddle_load_through_the_safe_loader(tmp_path):
    """What paddle.save writes for a model and a Momentum optimizer reads back equal to paddle.load's view."""
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    optimizer = paddle.optimizer.Momentum(0.1, 0.9, parameters=model.parameters(), weight_decay=1e-4)
    model(paddle.randn([2, 3, 5, 5])).mean().backward()
    optimizer.step()
    paddle.save(model.state_dict(), str(tmp_path / ckpt.BACKBONE))
    paddle.save(optimizer.state_dict(), str(tmp_path / ckpt.OPTIMIZER))
    for ours, path in ((ckpt.load_backbone_state(tmp_path), ckpt.BACKBONE),
                       (ckpt.load_optimizer_state(tmp_path), ckpt.OPTIMIZER)):
        reference = paddle.load(str(tmp_path / path))
        assert sorted(ours) == sorted(reference) and len(ours) >= 4
        for key, value in reference.items():
            np.testing.assert_array_equal(ours[key].numpy(), value.numpy())


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_arrays_pickled_by_numpy_1_and_2_both_load(tmp_path, numpy_module):
    """numpy 1 (Paddle 2.6's) names numpy.core in its pickles, numpy 2 numpy._core: either file loads."""
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.float32(2.5)}
    raw = pickle.dumps(state, protocol=2)  # text GLOBAL opcodes: the module name can be swapped in place
    for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        raw = raw.replace(name + b"\n", numpy_module.encode() + b"\n")
    assert numpy_module.encode() in raw
    (tmp_path / "state.pkl").write_bytes(raw)
    loaded = safe_pickle.load(tmp_path / "state.pkl", "state")
    np.testing.assert_array_equal(loaded["w"], state["w"])
    assert loaded["n"] == np.float32(2.5)


@pytest.mark.parametrize("command", ["eval", "export", "demo", "resume", "resume-optimizer"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(run_copy, tiny_dir, tmp_path, capsys, command):
    checkpoint = run_copy / "checkpoints" / "2"
    marker = tmp_path / "payload-ran"
    crafted = checkpoint / (ckpt.OPTIMIZER if command == "resume-optimizer" else ckpt.BACKBONE)
    plant_payload(crafted, marker)
    argv = {
        "eval": ["eval", "--checkpoint", str(checkpoint), "--bin", str(tiny_dir / BIN)],
        "export": ["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "export")],
        "demo": ["demo", "index", "--gallery", str(tiny_dir), "--index", str(tmp_path / "i.npz"),
                 "--model", str(checkpoint)],
        "resume": ["train", "--output", str(run_copy), "--resume"],
        "resume-optimizer": ["train", "--output", str(run_copy), "--resume"],
    }[command]
    assert cli.main(argv) == 2
    err = one_error_line(capsys)
    assert f"{crafted}: refusing to load the global posix.system" in err
    assert not marker.exists()


def test_pickled_code_in_a_verification_bin_is_refused(tmp_path):
    from plsc.data.verification_bin import load_bin

    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([SystemCall(f"touch {marker}")] * 2, [True])))
    with pytest.raises(PlscError, match="evil.bin: refusing to load the global posix.system"):
        load_bin(path)
    assert not marker.exists()


# --- weights must fit -------------------------------------------------------------------------------------


def test_backbone_that_does_not_fit_names_the_keys(run_copy, tiny_dir, capsys):
    checkpoint = run_copy / "checkpoints" / "2"
    state = {k: v.numpy() for k, v in paddle.load(str(checkpoint / ckpt.BACKBONE)).items()}
    first, second = list(state)[:2]
    del state[first]
    state["head.extra"] = np.zeros(3, np.float32)
    state[second] = np.zeros([7, 7], np.float32)
    paddle.save(state, str(checkpoint / ckpt.BACKBONE))
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--bin", str(tiny_dir / BIN)]) == 2
    err = one_error_line(capsys)
    expected = f"does not fit the model: missing {first}; unexpected head.extra; mis-shaped {second} [7, 7]"
    assert expected in err


@pytest.mark.parametrize(
    "change,key",
    [
        ("model.width=0.25", "model.width"),
        ("model.embedding_size=32", "model.embedding_size"),
        ("model.name=iresnet34", "model.name"),
        ("model.data_format=NHWC", "model.data_format"),
        ("train.seed=7", "train.seed"),
        ("loss.sample_ratio=1.0", "loss.sample_ratio"),
        ("train.batch_size=24", "the global batch (train.batch_size x ranks) is 48 x 1"),
    ],
)
def test_resume_refuses_settings_that_change_the_run(run_copy, capsys, change, key):
    before = snapshot(run_copy)
    assert cli.main(["train", "--output", str(run_copy), "--resume", "--set", change]) == 2
    err = one_error_line(capsys)
    assert f"cannot resume from {run_copy / 'checkpoints' / '2'}: {key}" in err
    assert snapshot(run_copy) == before  # nothing in the run folder was written


def test_resume_accepts_harmless_changes(run_copy, tiny_dir):
    harmless = ("train.max_steps=9", "train.log_interval=3", "train.eval_interval=5", "optim.lr=0.01")
    trainer = Trainer(tiny_config(tiny_dir, *harmless), run_copy, resume=True)
    assert trainer.state.step == 2


# --- missing or corrupt parts -----------------------------------------------------------------------------


def test_truncated_backbone_is_named(run_copy, tiny_dir, capsys):
    path = run_copy / "checkpoints" / "2" / ckpt.BACKBONE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cli.main(["eval", "--checkpoint", str(path.parent), "--bin", str(tiny_dir / BIN)]) == 2
    assert f"{path}: truncated or corrupt backbone state" in one_error_line(capsys)


def test_truncated_center_shard_is_named(run_copy, capsys):
    path = run_copy / "checkpoints" / "2" / ckpt.shard_file(0, "weight")
    path.write_bytes(path.read_bytes()[:200])
    assert cli.main(["train", "--output", str(run_copy), "--resume"]) == 2
    assert f"{path}: truncated or corrupt class-center shard" in one_error_line(capsys)


@pytest.mark.parametrize("key", ["step", "shards", "config"])
def test_manifest_without_a_key_is_named(run_copy, capsys, key):
    path = run_copy / "checkpoints" / "2" / ckpt.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))
    assert cli.main(["train", "--output", str(run_copy), "--resume"]) == 2
    assert f"{path}: corrupt manifest, no {key}" in one_error_line(capsys)


@pytest.mark.parametrize("text,message", [("two\n", "does not name a step (it holds 'two')"),
                                          ("9\n", "names step 9, but")])
def test_broken_latest_pointer_is_named(run_copy, capsys, text, message):
    pointer = run_copy / "checkpoints" / "latest"
    pointer.write_text(text)
    assert cli.main(["train", "--output", str(run_copy), "--resume"]) == 2
    assert f"{pointer} {message}" in one_error_line(capsys)


def test_missing_optimizer_state_needs_resume_weights_only(run_copy, tiny_dir, capsys, caplog):
    checkpoint = run_copy / "checkpoints" / "2"
    (checkpoint / ckpt.OPTIMIZER).unlink()
    assert cli.main(["train", "--output", str(run_copy), "--resume"]) == 2
    err = one_error_line(capsys)
    assert f"{checkpoint / ckpt.OPTIMIZER}: optimizer state not found; --resume-weights-only" in err
    config = tiny_config(tiny_dir, "train.max_steps=3", *QUIET)
    trainer = Trainer(config, run_copy, resume=True, weights_only=True)
    assert "momentum (backbone and class centers) restarts from zero at step 2" in caplog.text
    assert trainer.state.step == 2
    saved = ckpt.read_center_rows(checkpoint, ckpt.read_manifest(checkpoint), shard_classes(40, 0, 1))
    np.testing.assert_array_equal(trainer.head.weight.numpy(), np.asarray(saved["weight"]))
    assert not trainer.head.velocity.numpy().any()
    trainer.run()
    assert [r["step"] for r in read_log(run_copy)] == [1, 2, 3]


# --- the run folder ---------------------------------------------------------------------------------------


def test_fresh_run_into_another_runs_folder_is_refused_and_overwrite_moves_it_aside(run_copy, tiny_dir,
                                                                                     capsys):
    config = write_tiny_yaml(tiny_dir, run_copy.parent / "tiny.yaml", "train.max_steps=1", *QUIET)
    before = snapshot(run_copy)
    assert cli.main(["train", "--config", str(config), "--output", str(run_copy)]) == 2
    err = one_error_line(capsys)
    assert "holds another run's checkpoints, best_model, train_log.jsonl" in err
    assert "--resume" in err and "another --output" in err and "--overwrite" in err
    assert snapshot(run_copy) == before
    assert cli.main(["train", "--config", str(config), "--output", str(run_copy), "--overwrite"]) == 0
    (aside,) = run_copy.glob("old-*")
    assert ckpt.read_manifest(aside / "checkpoints" / "2")["step"] == 2
    assert [r["step"] for r in read_log(aside)] == [1, 2]
    assert [r["step"] for r in read_log(run_copy)] == [1]
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["1", "latest"]


def test_resume_from_this_runs_best_model_is_allowed_from_another_runs_checkpoint_not(run_copy, tiny_dir):
    config = tiny_config(tiny_dir, "train.max_steps=3", *QUIET)
    best = Trainer(config, run_copy, resume=run_copy / "best_model" / "lfw_disjoint_100")
    assert best.state.step == 2 and best.best["lfw_disjoint_100"]["step"] == 2
    other = Path(shutil.copytree(run_copy, run_copy.parent / "other"))
    with pytest.raises(PlscError, match="holds another run's checkpoints, best_model, train_log.jsonl"):
        Trainer(config, run_copy, resume=other / "checkpoints" / "2")


def test_resume_from_an_earlier_step_keeps_the_new_checkpoints_and_one_log(tiny_dir, tmp_path):
    """keep_checkpoints=1 used to keep the highest step number (4) and delete the step just saved (3)."""
    output = tmp_path / "run"
    Trainer(tiny_config(tiny_dir, "train.max_steps=4", "train.save_interval=2", "train.keep_checkpoints=2",
                        *QUIET), output).run()
    with open(output / "train_log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # a record cut short by a crash
    config = tiny_config(tiny_dir, "train.max_steps=3", *QUIET)
    resumed = Trainer(config, output, resume=output / "checkpoints" / "2")
    resumed.run()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["3", "latest"]
    assert resumed.checkpoints.latest() == output / "checkpoints" / "3"
    assert [r["step"] for r in read_log(output)] == [1, 2, 3]


def test_resume_without_config_continues_with_the_runs_saved_settings(tiny_dir, tmp_path, capsys):
    """The hint after an interruption, ``plsc train --output DIR --resume``, keeps the --set overrides."""
    config = write_tiny_yaml(tiny_dir, tmp_path / "tiny.yaml", "train.max_steps=2", *QUIET)
    output = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--output", str(output),
                     "--set", "loss.scale=32"]) == 0
    assert cli.main(["train", "--output", str(output), "--resume", "--set", "train.max_steps=3"]) == 0
    saved = ckpt.read_manifest(output / "checkpoints" / "3")["config"]
    assert saved["loss"]["scale"] == 32 and saved["train"]["max_steps"] == 3
    assert [r["step"] for r in read_log(output)] == [1, 2, 3]
    capsys.readouterr()
    assert cli.main(["train", "--resume"]) == 2
    assert "--config" in one_error_line(capsys)


def test_interrupt_hint_is_the_command_that_continues(tmp_path):
    expected = f"plsc train --output '{tmp_path}/my run' --resume"
    assert cli._continue_command(tmp_path / "my run", 1) == expected
    assert shlex.split(cli._continue_command(Path("out"), 2))[-2:] == ["--nproc", "2"]


# --- saves under failure ----------------------------------------------------------------------------------


class FailingCall(Exception):
    pass


def inject_failure(monkeypatch, k: int) -> list[str]:
    """Make the k-th filesystem call of a save raise OSError; returns the names of the calls made."""
    calls: list[str] = []
    real_renameat2 = ckpt._renameat2()

    def counted(name, function):
        def call(*args, **kwargs):
            calls.append(name)
            if len(calls) == k:
                raise OSError(errno.EIO, f"injected failure of {name}")
            return function(*args, **kwargs)
        return call

    for module, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (os, "mkdir"), (np, "save"),
                         (shards, "write_npy"), (paddle, "save"), (shutil, "rmtree"), (Path, "write_text")):
        monkeypatch.setattr(module, name, counted(f"{getattr(module, '__name__', 'Path')}.{name}",
                                                  getattr(module, name)))
    monkeypatch.setattr(ckpt, "_renameat2", lambda: counted("renameat2", real_renameat2))
    return calls


def assert_latest_is_complete(checkpoints: ckpt.CheckpointDir, resumer: Trainer, steps: set[int]) -> None:
    latest = checkpoints.latest()
    manifest = ckpt.read_manifest(latest)
    assert manifest["step"] in steps and latest.name == str(manifest["step"])
    resumer._resume(latest, weights_only=False)
    assert resumer.state.step == manifest["step"]


@pytest.mark.filterwarnings("ignore:The input state dict is empty")  # the optimizer has taken no step
@pytest.mark.parametrize("step", [3, 2], ids=["new-step", "same-step-again"])
def test_latest_names_a_complete_checkpoint_whichever_call_fails(trained, tiny_dir, tmp_path, monkeypatch,
                                                                  step):
    template = trained / "checkpoints"
    trainer = Trainer(tiny_config(tiny_dir, "train.max_steps=4", *QUIET), tmp_path / "saver")
    trainer.model.set_state_dict({k: v * 0.5 for k, v in trainer.model.state_dict().items()})  # not the saved
    resumer = Trainer(tiny_config(tiny_dir, "train.max_steps=4", *QUIET), tmp_path / "resumer")
    trainer.checkpoints = ckpt.CheckpointDir(tmp_path / "checkpoints", keep=1)
    trainer.state.step = step
    for k in range(1, 200):
        shutil.rmtree(trainer.checkpoints.root, ignore_errors=True)
        shutil.copytree(template, trainer.checkpoints.root)
        with monkeypatch.context() as patch:
            calls = inject_failure(patch, k)
            try:
                trainer.save_step_checkpoint()
                failed = False
            except PlscError as exc:
                assert "injected failure" in str(exc) and "\n" not in str(exc)
                failed = True
        if not failed and len(calls) < k:
            break  # the save made fewer than k calls: every one of them has failed once
        assert_latest_is_complete(trainer.checkpoints, resumer, {2, step})
        leftovers = [p.name for p in trainer.checkpoints.root.iterdir() if p.name.startswith(".")]
        assert not leftovers or calls[k - 1] == "shutil.rmtree", (k, calls[k - 1], leftovers)
    else:
        pytest.fail("a save made more than 200 filesystem calls")
    assert k > 20  # the saves were instrumented (each write, fsync and rename counted)
    saved = ckpt.load_backbone_state(trainer.checkpoints.path_for(step))
    for key, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(saved[key].numpy(), value.numpy())
    assert trainer.checkpoints.latest() == trainer.checkpoints.path_for(step)


def test_exchange_without_renameat2_still_replaces_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_renameat2", lambda: None)
    for name, text in (("a", "new"), ("b", "old")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    ckpt.exchange_dirs(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "f").read_text() == "new" and (tmp_path / "a" / "f").read_text() == "old"


def test_exchange_without_renameat2_puts_the_previous_directory_back_on_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_renameat2", lambda: None)
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected")
        real_replace(src, dst)

    for name, text in (("a", "new"), ("b", "old")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        ckpt.exchange_dirs(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "f").read_text() == "old" and (tmp_path / "a" / "f").read_text() == "new"


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(run_copy, monkeypatch, capsys):
    def disk_full(path, shape, dtype, blocks):
        with open(path, "wb") as f:  # a part of the shard reaches the disk, then it is full
            f.write(b"\x93NUMPY" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    before = snapshot(run_copy / "checkpoints")
    monkeypatch.setattr(shards, "write_npy", disk_full)
    overrides = ["--set", "train.max_steps=3", "--set", "data.val_bins=[]"]
    assert cli.main(["train", "--output", str(run_copy), "--resume", *overrides]) == 2
    err = one_error_line(capsys)
    assert err.startswith("plsc: error: no space left writing ") and "/checkpoints/.3.partial/centers/" in err
    assert snapshot(run_copy / "checkpoints") == before  # the partial checkpoint is gone, step 2 untouched

"""The run folder (``--output``): one run at a time, what a fresh start, a resume or a restart may do to the
results already there, and the training log's tail after a resume.

* One process at a time: :func:`lock` (``plsc.run_lock``) is held from the first write to the end of the run;
  a second run, resume or restart started meanwhile is refused naming the holder.
* Another run's results (checkpoints, best models, log) are never replaced unless ``--overwrite`` moves them
  aside first: a fresh start into a used folder and a restart at step 0 (``--resume-weights-only`` with
  another class count) are refused without it.
* A resume continues only a run its settings fit (:func:`resume_conflict`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from plsc import checkpoint as ckpt
from plsc import run_lock
from plsc.atomic import write_atomic, writing
from plsc.checkpoint import plsc22
from plsc.config import Config
from plsc.errors import PlscError
from plsc.models import MODELS

log = logging.getLogger("plsc.train")

# Settings a resumed run keeps. SHAPE_KEYS decide the tensors' shapes (the saved ones would not fit);
# TRAJECTORY_KEYS the data order, the sampled classes, the layout the numbers were computed in or the
# optimizer whose state the checkpoint holds (a changed value silently makes another run). Everything else
# (intervals, max_steps, epochs, lr, ...) may change. A key a checkpoint's config lacks (saved before the
# setting existed) had its default's behaviour.
SHAPE_KEYS = ("model.name", "model.width", "model.embedding_size", "data.image_size")
TRAJECTORY_KEYS = ("model.data_format", "train.seed", "loss.sample_ratio", "optim.name",
                   "train.grad_accum")
# visualdl: the VisualDL scalars plsc.engine.curves writes beside the log when VisualDL is installed
PREVIOUS_RUN_FILES = ("checkpoints", "best_model", "train_log.jsonl", "visualdl")


def _same_setting(key: str, saved, wanted) -> bool:
    if key == "model.name":  # FresResNet50 and iresnet50 are one architecture
        return saved == wanted or (MODELS.get(saved) is not None and MODELS.get(saved) is MODELS.get(wanted))
    return saved == wanted


def resume_conflict(manifest: dict, config: Config, world_size: int, num_classes: int | None,
                    weights_only: bool = False) -> str | None:
    """Why ``config`` cannot continue the run that saved ``manifest`` (None: it can).

    ``num_classes`` None skips the class count (not known before the data set is read). With ``weights_only``
    only the shapes must agree: the class count may change too (the backbone alone is taken then).
    """
    saved = manifest["config"]
    wanted = config.to_dict()
    defaults = Config().to_dict()
    for key in SHAPE_KEYS + ((), TRAJECTORY_KEYS)[not weights_only]:
        section, name = key.split(".")
        before, now = saved.get(section, {}).get(name, defaults[section][name]), wanted[section][name]
        if not _same_setting(key, before, now):
            why = "the saved tensors would not fit" if key in SHAPE_KEYS else (
                "it changes the run's trajectory; --resume-weights-only takes the weights anyway")
            return f"{key} is {before!r} in the checkpoint, {now!r} here ({why})"
    if weights_only:
        return None
    if num_classes is not None and manifest["num_classes"] != num_classes:
        return (f"the checkpoint has {manifest['num_classes']} classes, this run {num_classes} "
                "(--resume-weights-only takes the backbone alone)")
    saved_batch, saved_world = saved.get("train", {}).get("batch_size"), manifest["world_size"]
    batch = config.train.batch_size
    if saved_batch is None or saved_batch * saved_world != batch * world_size:
        return (f"the global batch (train.batch_size x ranks) is {saved_batch} x {saved_world} in the "
                f"checkpoint, {batch} x {world_size} here (it changes the data order)")
    return None


def of_this_run(checkpoint: Path, output: Path) -> bool:
    """Whether ``checkpoint`` is one of ``output``'s step or best_model checkpoints."""
    parents = Path(checkpoint).resolve().parents
    return any((Path(output) / name).resolve() in parents for name in ("checkpoints", "best_model"))


def check_output(config: Config, output: Path, resume: bool | str | Path, weights_only: bool, overwrite: bool,
                 world_size: int) -> Path | None:
    """Checks made before anything is written: no other process is using ``output``; the checkpoint to resume
    from (None: a fresh start) exists and fits ``config``; ``output`` holds no other run's results unless
    ``overwrite`` moves them aside. Reads only."""
    run_lock.require_free(output, "train into it")
    checkpoints = ckpt.CheckpointDir(output / "checkpoints")
    directory = None
    if resume is True:
        if overwrite and not weights_only:
            raise PlscError("--overwrite would move aside the checkpoints --resume continues: pass one")
        directory = checkpoints.latest()
        if directory is None:
            raise PlscError(f"--resume: no checkpoint under {checkpoints.root}")
    elif resume:
        directory = Path(resume)
        if not directory.is_dir():
            raise PlscError(f"--resume: checkpoint folder {directory} not found")
        if overwrite and not weights_only and of_this_run(directory, output):
            raise PlscError(f"--overwrite would move aside {directory}, the checkpoint to resume from")
    own = directory is not None and of_this_run(directory, output)
    previous = previous_results(output)
    if previous and not own and not overwrite:
        raise PlscError(f"{output} holds another run's {', '.join(previous)}: continue it with --resume, "
                        "choose another --output, or pass --overwrite to move them aside")
    if directory is not None and plsc22.is_plsc22_checkpoint(directory):
        if not weights_only:
            raise PlscError(f"{directory} is a PLSC v2.2 checkpoint: --resume-weights-only starts from its "
                            "backbone (--resume continues plsc checkpoints only)")
        return directory  # its backbone must fit the model: checked when it is loaded
    if directory is not None:
        manifest = ckpt.read_manifest(directory)
        conflict = resume_conflict(manifest, config, world_size, None, weights_only)
        if conflict:
            raise PlscError(f"cannot resume from {directory}: {conflict}")
    return directory


def previous_results(output: Path) -> list[str]:
    """The results of a run ``output`` holds (checkpoints, best models, log), by name."""
    return [name for name in PREVIOUS_RUN_FILES if (output / name).exists()]


def check_restart(directory: Path, output: Path, overwrite: bool) -> None:
    """A restart at step 0 from ``directory`` (``--resume-weights-only`` with another class count) is a new
    run: in the folder of the run it restarts from, it would prune that run's checkpoints and replace its log
    and best models, so it needs ``--overwrite`` to move them aside first."""
    previous = previous_results(output)
    if previous and of_this_run(directory, output) and not overwrite:
        raise PlscError(f"--resume-weights-only from {directory} with another class count starts a new run "
                        f"at step 0: it would replace the {', '.join(previous)} in {output}; pass "
                        "--overwrite to move them aside, or choose another --output")


def lock(config: Config, output: Path, resume: bool | str | Path, weights_only: bool, overwrite: bool,
         world_size: int, resuming_from: Path | None) -> run_lock.RunLock:
    """Take ``output`` for this run (created if missing) and check it again under the lock: a run that wrote
    into it since :func:`check_output` (then ``resuming_from``) makes this one start over."""
    held = run_lock.acquire(output)
    try:
        now = check_output(config, output, resume, weights_only, overwrite, world_size)
        if now != resuming_from:
            raise PlscError(f"{output} changed while this run started (it would now resume from {now}, not "
                            f"{resuming_from}): start it again")
    except BaseException:
        held.release()
        raise
    return held


def move_previous_run_aside(output: Path) -> Path | None:
    """Move another run's checkpoints, best models and log into ``output/old-<time>`` (--overwrite)."""
    previous = [output / name for name in previous_results(output)]
    if not previous:
        return None
    aside = output / time.strftime("old-%Y%m%d-%H%M%S")
    with writing(aside):
        aside.mkdir()
        for path in previous:
            os.replace(path, aside / path.name)
    log.warning("--overwrite: moved the previous run's %s to %s", ", ".join(p.name for p in previous), aside)
    return aside


def truncate_log(path: Path, step: int) -> None:
    """Drop the log records after ``step`` (the run continues from there), so no step is logged twice.

    Unreadable lines (a record cut by a crash) go too. The log is replaced atomically.
    """
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None

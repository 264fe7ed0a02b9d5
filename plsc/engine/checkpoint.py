"""Atomic, shardable checkpoints.

Layout of one checkpoint directory::

    manifest.json             step, epoch, class count, shards, resolved config, versions (written last)
    backbone.pdparams         backbone state_dict (paddle.save)
    optimizer.pdopt           backbone optimizer state (paddle.save)
    centers/rank00000.weight.npy, rank00000.velocity.npy, ...   one class-center shard per rank

Each rank writes its own shard; the class range of every shard is in the manifest, so a checkpoint saved on N
ranks loads on M ranks by reading exactly the rows each new shard needs. Shards are written and read a block
of rows at a time (plsc.engine.shard_io): the checkpoint phase holds no host copy of a shard.

A directory is written under a temporary name, fsynced and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never half of one. ``latest`` (a text file naming the newest step) is
replaced the same way.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

import plsc
from plsc.distributed import ClassShard
from plsc.engine import shard_io
from plsc.errors import PlscError

FORMAT = "plsc-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BACKBONE = "backbone.pdparams"
OPTIMIZER = "optimizer.pdopt"


@dataclass
class TrainingState:
    """What a checkpoint restores besides tensors: where training stood."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch the next step belongs to
    step_in_epoch: int = 0  # batches of that epoch already consumed


def versions() -> dict[str, str]:
    return {
        "plsc": plsc.__version__,
        "paddle": paddle.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(root)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def shard_file(rank: int, kind: str) -> str:
    return f"centers/rank{rank:05d}.{kind}.npy"


def save_checkpoint(
    target: Path,
    *,
    comm,
    state: TrainingState,
    config: dict,
    model,
    optimizer,
    head,
    extra: dict | None = None,
) -> Path:
    """Write a complete checkpoint at ``target`` (called on every rank; each writes its own part)."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    if comm.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "centers").mkdir(parents=True)
    comm.barrier()
    for kind in ("weight", "velocity"):  # streamed block by block: no host copy of the shard
        shard_io.write_center_shard(head, staging / shard_file(comm.rank, kind), kind)
    if comm.rank == 0:
        paddle.save(model.state_dict(), str(staging / BACKBONE))
        if optimizer is not None:
            paddle.save(optimizer.state_dict(), str(staging / OPTIMIZER))
    comm.barrier()
    if comm.rank == 0:
        world = comm.world_size
        shards = [_shard_entry(r, head.num_classes, world) for r in range(world)]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "num_classes": head.num_classes,
            "embedding_size": head.embedding_size,
            "center_dtype": head.storage_dtype,
            "world_size": world,
            "shards": shards,
            "config": config,
            "versions": versions(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(staging)
        _replace_dir(staging, target)
    comm.barrier()
    return target


def _shard_entry(rank: int, num_classes: int, world_size: int) -> dict:
    from plsc.distributed import shard_classes

    shard = shard_classes(num_classes, rank, world_size)
    return {
        "rank": rank,
        "start": shard.start,
        "count": shard.count,
        "weight": shard_file(rank, "weight"),
        "velocity": shard_file(rank, "velocity"),
    }


def _replace_dir(staging: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise PlscError(f"{directory} is not a plsc checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlscError(f"{path}: corrupt manifest ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise PlscError(f"{path}: not a plsc checkpoint manifest")
    missing = [name for name in _required_files(manifest) if not (directory / name).is_file()]
    if missing:
        raise PlscError(f"{directory}: checkpoint is incomplete, missing {', '.join(missing[:3])}")
    return manifest


def _required_files(manifest: dict) -> list[str]:
    files = [BACKBONE]
    for shard in manifest["shards"]:
        files += [shard["weight"], shard["velocity"]]
    return files


def read_center_rows(directory: Path, manifest: dict, shard: ClassShard
                     ) -> tuple[shard_io.RowPieces, shard_io.RowPieces]:
    """Rows ``[shard.start, shard.stop)`` of the saved centers and velocities, whatever the saved sharding:
    the pieces of the saved files, read a block at a time when the head copies them in (``set_state``)."""
    directory = Path(directory)
    parts: dict[str, list[shard_io.FileRows]] = {"weight": [], "velocity": []}
    for saved in manifest["shards"]:
        lo, hi = max(shard.start, saved["start"]), min(shard.stop, saved["start"] + saved["count"])
        if lo >= hi:
            continue
        for kind in parts:
            rows = shard_io.FileRows(directory / saved[kind], lo - saved["start"], hi - saved["start"])
            parts[kind].append(rows)
    emb, dtype = manifest["embedding_size"], manifest["center_dtype"]
    return shard_io.RowPieces(parts["weight"], emb, dtype), shard_io.RowPieces(parts["velocity"], emb, dtype)


def load_backbone_state(directory: Path) -> dict:
    return paddle.load(str(Path(directory) / BACKBONE))


def load_optimizer_state(directory: Path) -> dict | None:
    path = Path(directory) / OPTIMIZER
    return paddle.load(str(path)) if path.is_file() else None


class CheckpointDir:
    """``<output>/checkpoints``: numbered step directories, the ``latest`` pointer, pruning of old ones."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = Path(root)
        self.keep = max(1, keep)

    def path_for(self, step: int) -> Path:
        return self.root / str(step)

    def mark_latest(self, step: int) -> None:
        write_text_atomic(self.root / "latest", f"{step}\n")

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.path_for(int(pointer.read_text().strip()))
        return path if (path / MANIFEST).is_file() else None

    def prune(self) -> None:
        steps = sorted(int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit())
        for step in steps[: -self.keep]:
            shutil.rmtree(self.path_for(step), ignore_errors=True)

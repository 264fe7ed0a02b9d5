"""Atomic, shardable checkpoints: the format, written and read here.

The package also holds :mod:`~plsc.checkpoint.shards` (class-center shards streamed to and from ``.npy``),
:mod:`~plsc.checkpoint.plsc22` (PLSC v2.2 checkpoints imported) and :mod:`~plsc.checkpoint.restore` (a
backbone from either kind of folder, for eval, export and the demo).

Layout of one checkpoint directory::

    manifest.json             step, epoch, class count, shards, resolved config, versions (written last)
    backbone.pdparams         backbone state_dict (paddle.save)
    optimizer.pdopt           backbone optimizer state (paddle.save)
    centers/rank00000.weight.npy, rank00000.velocity.npy, ...   one class-center shard per rank
    centers/rank00000.velocity_scale.npy                         with int8 velocity: its per-row scales

Each rank writes its own shard; the class range of every shard is in the manifest, so a checkpoint saved on N
ranks loads on M ranks by reading exactly the rows each new shard needs. Shards are written and read a block
of rows at a time (plsc.checkpoint.shards): the checkpoint phase holds no host copy of a shard.

A directory is written under a temporary name, fsynced and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never half of one. Saving over an existing directory (the same step
again, best_model/<name>) swaps the two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so the
name always holds a complete checkpoint. ``latest`` (a text file naming the newest step) is replaced by
:mod:`plsc.atomic`. A failed write (a full disk) removes what it had written and leaves the previous
checkpoint as it was.

Tensor files are read by :mod:`plsc.safe_pickle` (data only, never code) and must fit the model they are
loaded into: :func:`load_backbone_into`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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
from plsc import safe_pickle, strict_json
from plsc.atomic import fsync_path, write_atomic, writing
from plsc.checkpoint import shards
from plsc.distributed import ClassShard
from plsc.errors import PlscError
from plsc.finite import require_finite_state
from plsc.models import precision

FORMAT = "plsc-checkpoint"
FORMAT_VERSION = 2  # 2: velocity may be int8 codes + per-row scales (``velocity_dtype`` in the manifest)
MANIFEST = "manifest.json"
BACKBONE = "backbone.pdparams"
OPTIMIZER = "optimizer.pdopt"
LATEST = "latest"
# Keys every manifest of this format has; a manifest without one is corrupt (or hand-edited).
MANIFEST_KEYS = ("format_version", "step", "epoch", "step_in_epoch", "num_classes", "embedding_size",
                 "center_dtype", "world_size", "shards", "config")
SHARD_KEYS = ("rank", "start", "count")  # and a file per saved kind (saved_kinds)
STRUCTURE_KEY = "StructuredToParameterName@@"  # paddle.save's record of parameter names: not a tensor


@dataclass
class TrainingState:
    """What a checkpoint restores besides tensors: where training stood."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch the next step belongs to
    step_in_epoch: int = 0  # loader batches of that epoch already consumed (train.grad_accum per step)


def versions() -> dict[str, str]:
    return {
        "plsc": plsc.__version__,
        "paddle": paddle.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(root)


def remove_tree(path: Path) -> None:
    """Best-effort removal of a partial or replaced directory: what is left is cleared by the next save."""
    try:
        shutil.rmtree(path)
    except OSError:
        pass


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
    try:
        _write_checkpoint(staging, target, comm=comm, state=state, config=config, model=model,
                          optimizer=optimizer, head=head, extra=extra)
    except BaseException:
        if comm.rank == 0:
            remove_tree(staging)
        raise
    comm.barrier()
    return target


def _write_checkpoint(staging: Path, target: Path, *, comm, state, config, model, optimizer, head, extra):
    if comm.rank == 0:
        remove_tree(staging)
        with writing(staging):
            (staging / "centers").mkdir(parents=True)
    comm.barrier()
    for kind in head.state_kinds():  # streamed block by block: no host copy of the shard
        path = staging / shard_file(comm.rank, kind)
        with writing(path):
            shards.write_center_shard(head, path, kind)
    if comm.rank == 0:
        with writing(staging / BACKBONE):
            paddle.save(precision.float32_state(model), str(staging / BACKBONE))
        if optimizer is not None:
            with writing(staging / OPTIMIZER):
                paddle.save(optimizer.state_dict(), str(staging / OPTIMIZER))
    comm.barrier()
    if comm.rank == 0:
        world = comm.world_size
        shard_entries = [_shard_entry(r, head.num_classes, world, head.state_kinds()) for r in range(world)]
        int8 = head.velocity_dtype == "int8"
        manifest = {
            "format": FORMAT,
            # Version 1 readers read everything but int8 velocity: they are given the version they can read.
            "format_version": FORMAT_VERSION if int8 else 1,
            "step": state.step,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "num_classes": head.num_classes,
            "embedding_size": head.embedding_size,
            "center_dtype": head.storage_dtype,
            "velocity_dtype": head.velocity_dtype,
            "world_size": world,
            "shards": shard_entries,
            "config": config,
            "versions": versions(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "saved_ns": time.time_ns(),  # orders checkpoints by when they were written (pruning)
            **(extra or {}),
        }
        with writing(staging / MANIFEST):
            (staging / MANIFEST).write_text(strict_json.dumps(manifest, indent=1))
        with writing(staging):
            _fsync_tree(staging)
        with writing(target):
            replace_dir(staging, target)


def _shard_entry(rank: int, num_classes: int, world_size: int, kinds) -> dict:
    from plsc.distributed import shard_classes

    shard = shard_classes(num_classes, rank, world_size)
    return {"rank": rank, "start": shard.start, "count": shard.count,
            **{kind: shard_file(rank, kind) for kind in kinds}}


def replace_dir(staging: Path, target: Path) -> None:
    """Move the complete ``staging`` to ``target``; an existing ``target`` is swapped out in one step (and
    removed). Used for checkpoints and exported models alike."""
    if target.exists():
        exchange_dirs(staging, target)
        fsync_path(target.parent)
        remove_tree(staging)  # now the previous checkpoint
    else:
        os.replace(staging, target)
        fsync_path(target.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it (glibc < 2.28)
        return None


def exchange_dirs(a: Path, b: Path) -> None:
    """Swap the directories ``a`` and ``b`` atomically where the system can (Linux, most filesystems).

    Elsewhere three renames, during which ``b`` is briefly absent (its contents sit at ``a``'s .swap name).
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(b))
    swap = a.with_name(f"{a.name}.swap")
    os.replace(b, swap)
    try:
        os.replace(a, b)
    except OSError:
        os.replace(swap, b)  # the previous directory back under its name
        raise
    os.replace(swap, a)


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise PlscError(f"{directory} is not a plsc checkpoint (no {MANIFEST})")
    try:
        manifest = strict_json.loads(path.read_text())
    except ValueError as exc:
        raise PlscError(f"{path}: corrupt manifest ({getattr(exc, 'msg', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlscError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PlscError(f"{path}: not a plsc checkpoint manifest")
    _check_manifest_keys(path, manifest)
    version = manifest["format_version"]
    if not _is_int(version) or version > FORMAT_VERSION:
        raise PlscError(f"{path}: checkpoint format {version!r}, this plsc reads up to {FORMAT_VERSION}")
    problem = manifest_problem(manifest)
    if problem:
        raise PlscError(f"{path}: corrupt manifest, {problem}")
    missing = [name for name in _required_files(manifest) if not (directory / name).is_file()]
    if missing:
        raise PlscError(f"{directory}: checkpoint is incomplete, missing {', '.join(missing[:3])}")
    return manifest


def _check_manifest_keys(path: Path, manifest: dict) -> None:
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if not missing and isinstance(manifest["shards"], list):
        keys = [*SHARD_KEYS, *saved_kinds(manifest)]
        missing = [f"shards[{i}].{key}" for i, shard in enumerate(manifest["shards"])
                   for key in keys if not isinstance(shard, dict) or key not in shard]
    elif not missing:
        missing = ["shards (a list)"]
    if missing:
        raise PlscError(f"{path}: corrupt manifest, no {', '.join(missing[:3])}")


CENTER_DTYPES = ("float32", "float16")
VELOCITY_DTYPES = ("float32", "float16", "int8")
# Values the loader, the trainer and the `latest` pointer take as they are: (key, test, what it must be).
_COUNTS = (("format_version", lambda v: v >= 1), ("step", lambda v: v >= 0), ("epoch", lambda v: v >= 0),
           ("step_in_epoch", lambda v: v >= 0), ("num_classes", lambda v: v >= 1),
           ("embedding_size", lambda v: v >= 1), ("world_size", lambda v: v >= 1))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's values (types and ranges), or None: a hand-edited or damaged manifest
    is refused at load rather than trained from (a negative step means a negative learning rate)."""
    for key, in_range in _COUNTS:
        value = manifest[key]
        if not _is_int(value) or not in_range(value):
            bound = "a positive integer" if key in ("format_version", "num_classes", "embedding_size",
                                                     "world_size") else "a non-negative integer"
            return f"{key} must be {bound}, got {_short(value)}"
    if manifest["center_dtype"] not in CENTER_DTYPES:
        return (f"center_dtype must be one of {', '.join(CENTER_DTYPES)}, "
                f"got {_short(manifest['center_dtype'])}")
    velocity = manifest.get("velocity_dtype", manifest["center_dtype"])
    if velocity not in VELOCITY_DTYPES:
        return f"velocity_dtype must be one of {', '.join(VELOCITY_DTYPES)}, got {_short(velocity)}"
    if velocity == "int8" and manifest["format_version"] < 2:
        return "velocity_dtype int8 needs format_version 2"
    config = manifest["config"]
    if not isinstance(config, dict) or not all(isinstance(section, dict) for section in config.values()):
        return "config must map sections to settings"
    return _shards_problem(manifest) or _extras_problem(manifest)


def _shards_problem(manifest: dict) -> str | None:
    """The shards must be ranks 0..world_size-1 in order, covering the classes once, each file inside the
    checkpoint."""
    shard_list = manifest["shards"]
    if len(shard_list) != manifest["world_size"]:
        return f"{len(shard_list)} shards for world_size {manifest['world_size']}"
    next_start = 0
    for index, shard in enumerate(shard_list):
        rank, start, count = shard["rank"], shard["start"], shard["count"]
        if not (_is_int(rank) and _is_int(start) and _is_int(count)) or rank != index or count < 0:
            return f"shards[{index}] must be rank {index} with a start and count (integers)"
        if start != next_start:
            return f"shards[{index}] starts at class {start}, not {next_start} (an overlap or a gap)"
        next_start = start + count
        for kind in saved_kinds(manifest):
            name = shard[kind]
            if not isinstance(name, str) or name.startswith("/") or {"", ".", ".."} & set(name.split("/")):
                return f"shards[{index}].{kind} must name a file inside the checkpoint, got {_short(name)}"
    if next_start != manifest["num_classes"]:
        return f"the shards hold {next_start} classes, num_classes is {manifest['num_classes']}"
    return None


def _extras_problem(manifest: dict) -> str | None:
    """Optional entries the trainer reads on a resume: the best accuracies so far and the loss scaler."""
    best = manifest.get("best", {})
    if not isinstance(best, dict) or not all(
            isinstance(m, dict) and _is_number(m.get("accuracy")) and _is_int(m.get("step", 0))
            for m in best.values()):
        return "best must map each verification set to its accuracy and step"
    scaler = manifest.get("loss_scaler", {"scale": 1.0, "good_steps": 0})
    if not isinstance(scaler, dict) or not (_is_number(scaler.get("scale")) and scaler["scale"] > 0
                                            and _is_int(scaler.get("good_steps"))
                                            and scaler["good_steps"] >= 0):
        return "loss_scaler must hold a positive scale and a count of good_steps"
    if "saved_ns" in manifest and not _is_int(manifest["saved_ns"]):
        return f"saved_ns must be an integer, got {_short(manifest['saved_ns'])}"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _required_files(manifest: dict) -> list[str]:
    files = [BACKBONE]
    for shard in manifest["shards"]:
        files += [shard[kind] for kind in saved_kinds(manifest)]
    return files


def saved_kinds(manifest: dict) -> dict[str, tuple[int, str]]:
    """``{kind: (columns, dtype)}`` of each shard's class-center files (see ``PartialFC.state_kinds``)."""
    emb, center_dtype = manifest["embedding_size"], manifest["center_dtype"]
    velocity_dtype = manifest.get("velocity_dtype", center_dtype)  # format 1 stored it as the centers
    kinds = {"weight": (emb, center_dtype), "velocity": (emb, velocity_dtype)}
    if velocity_dtype == "int8":
        kinds["velocity_scale"] = (1, "float32")
    return kinds


def read_center_rows(directory: Path, manifest: dict, shard: ClassShard) -> dict[str, shards.RowPieces]:
    """Rows ``[shard.start, shard.stop)`` of each saved kind (``weight``, ``velocity`` and, for int8
    velocity, ``velocity_scale``), whatever the saved sharding: the pieces of the saved files, read a block at
    a time when the head copies them in (``PartialFC.set_state(**rows)``)."""
    directory = Path(directory)
    kinds = saved_kinds(manifest)
    parts: dict[str, list[shards.FileRows]] = {kind: [] for kind in kinds}
    for saved in manifest["shards"]:
        lo, hi = max(shard.start, saved["start"]), min(shard.stop, saved["start"] + saved["count"])
        if lo >= hi:
            continue
        for kind, (columns, dtype) in kinds.items():
            path = directory / saved[kind]
            _check_shard(path, (saved["count"], columns), dtype)
            parts[kind].append(shards.FileRows(path, lo - saved["start"], hi - saved["start"]))
    return {kind: shards.RowPieces(parts[kind], columns, dtype) for kind, (columns, dtype) in kinds.items()}


def _check_shard(path: Path, shape: tuple[int, int], dtype: str) -> None:
    """A class-center shard whose header and length fit the manifest; else an error naming the file."""
    try:
        offset, stored_shape, stored_dtype = shards.npy_layout(path)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PlscError(f"{path}: truncated or corrupt class-center shard ({reason})") from None
    if tuple(stored_shape) != tuple(shape) or stored_dtype != np.dtype(dtype):
        found, expected = f"{stored_dtype} {list(stored_shape)}", f"{dtype} {list(shape)}"
        raise PlscError(f"{path}: holds {found}, the manifest says {expected}")
    if path.stat().st_size < offset + int(np.prod(shape)) * stored_dtype.itemsize:
        raise PlscError(f"{path}: truncated or corrupt class-center shard (shorter than its header says)")


def _load_state(path: Path, kind: str) -> dict:
    """A state_dict written by paddle.save, read as data only; arrays become Tensors, as paddle.load gives."""
    if not path.is_file():
        raise PlscError(f"{path}: {kind} not found")
    state = safe_pickle.load(path, kind)
    if not isinstance(state, dict):
        raise PlscError(f"{path}: not a {kind} (a pickled {type(state).__name__}, not a dict)")
    state.pop(STRUCTURE_KEY, None)
    require_finite_state(state, path)
    return _as_tensors(state)


def _as_tensors(value):
    if isinstance(value, np.ndarray):
        return paddle.to_tensor(value)
    if _is_named_array(value):
        # paddle.save pickles a tensor below the top level (the optimizer's float32 master weights under
        # fp16) as (name, array). The name matters: the optimizer finds each master weight's velocity by it.
        tensor = paddle.to_tensor(value[1])
        tensor.name = value[0]
        return tensor
    if isinstance(value, dict):
        return {key: _as_tensors(item) for key, item in value.items()}
    return value


def _is_named_array(value) -> bool:
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], np.ndarray))


def load_backbone_state(directory: Path) -> dict:
    return _load_state(Path(directory) / BACKBONE, "backbone state")


def load_optimizer_state(directory: Path) -> dict | None:
    """The backbone optimizer's state, or None when the checkpoint has none (saved without an optimizer)."""
    path = Path(directory) / OPTIMIZER
    return _load_state(path, "optimizer state") if path.is_file() else None


def load_backbone_into(model: paddle.nn.Layer, directory: Path) -> dict:
    """Restore ``model``'s weights from a checkpoint; every key must be there, with the model's shape. The
    saved float32 tensors are cast to the model's dtypes (float16 under fp16: see plsc.models.precision).
    Returns the saved state."""
    state = load_backbone_state(directory)
    check_state_fits(precision.own_state(model), state, Path(directory) / BACKBONE)
    model.set_state_dict(precision.fitted_state(model, state))
    return state


def check_state_fits(expected: dict, state: dict, path: Path) -> None:
    """PlscError naming up to three missing, unexpected or mis-shaped keys of ``state``."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    misshaped = [
        f"{key} {list(state[key].shape)} (model: {list(expected[key].shape)})"
        for key in expected
        if key in state and list(getattr(state[key], "shape", [])) != list(expected[key].shape)
    ]
    problems = [
        f"{what} {_first_three(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise PlscError(f"{path} does not fit the model: {'; '.join(problems)}")


def _first_three(items: list[str]) -> str:
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return ", ".join(items[:3]) + more


def run_folder_of(directory: Path) -> Path | None:
    """The run folder (``--output``) of a step checkpoint (``<output>/checkpoints/<step>``, or its staging
    name while it is written) or of a best model (``<output>/best_model/<name>``); None for another path."""
    directory = Path(directory).absolute()
    return directory.parent.parent if directory.parent.name in ("checkpoints", "best_model") else None


class CheckpointDir:
    """``<output>/checkpoints``: numbered step directories, the ``latest`` pointer, pruning of old ones."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = Path(root)
        self.keep = max(1, keep)

    def path_for(self, step: int) -> Path:
        return self.root / str(step)

    def mark_latest(self, step: int) -> None:
        """Point ``latest`` at ``step``, a complete checkpoint of that step (checked: plsc must be able to
        read back every ``latest`` it writes)."""
        saved = None
        if _is_int(step) and step >= 0:
            with contextlib.suppress(PlscError):
                saved = read_manifest(self.path_for(step))["step"]
        if saved != step:
            raise PlscError(f"{self.root / LATEST}: refusing to name {step!r}, not a saved step here")
        write_atomic(self.root / LATEST, f"{step}\n")

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; None when there is no ``latest``; an error when it is broken (it
        must name, in ASCII digits, the step of a complete checkpoint here)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        try:
            text = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PlscError(f"cannot read {pointer}: {getattr(exc, 'strerror', None) or exc}") from None
        if not is_step_name(text):
            raise PlscError(f"{pointer} does not name a step (it holds {text[:40]!r})")
        path = self.path_for(int(text))
        if not (path / MANIFEST).is_file():
            raise PlscError(f"{pointer} names step {text}, but {path} is not a complete checkpoint")
        step = read_manifest(path)["step"]
        if step != int(text):
            raise PlscError(f"{pointer} names step {text}, but {path} holds step {step}")
        return path

    def step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and is_step_name(p.name)]

    def holds_checkpoints(self) -> bool:
        return bool(self.step_dirs()) or (self.root / LATEST).exists()

    def prune(self) -> None:
        """Keep the ``keep`` most recently written checkpoints (and the one ``latest`` names), whatever their
        step numbers: a run resumed from an earlier step writes lower numbers than the ones it replaces."""
        try:
            latest = (self.root / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            latest = None
        by_age = sorted(self.step_dirs(), key=lambda path: (_written_ns(path), int(path.name)))
        for path in by_age[: -self.keep]:
            if path.name != latest:
                remove_tree(path)


def is_step_name(text: str) -> bool:
    """Whether ``text`` is a step number as plsc writes it: ASCII digits only (``int`` also takes "１２")."""
    return text.isascii() and text.isdigit()


def _written_ns(directory: Path) -> int:
    """When a checkpoint was written: its manifest's ``saved_ns`` (the file's time for older manifests)."""
    path = directory / MANIFEST
    try:
        saved = json.loads(path.read_text()).get("saved_ns")
        return int(saved) if isinstance(saved, int) else path.stat().st_mtime_ns
    except (OSError, ValueError, AttributeError):
        return -1  # not a complete checkpoint: the first to go

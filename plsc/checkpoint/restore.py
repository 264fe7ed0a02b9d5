"""A backbone restored from a checkpoint folder, whichever format: plsc's own or PLSC v2.2's."""

from __future__ import annotations

from pathlib import Path

import paddle

from plsc import checkpoint as ckpt
from plsc import run_lock
from plsc.checkpoint import plsc22
from plsc.config import Config, config_from_dict
from plsc.errors import PlscError
from plsc.models import MODELS, build_model

CHECKPOINT_KINDS = ("plsc", "plsc22")  # plsc's own format, PLSC v2.2's one-pickle-per-tensor folders


def checkpoint_kind(directory: str | Path) -> str:
    """What a checkpoint folder holds, ``plsc`` (a manifest) or ``plsc22`` (``*.pdparam`` tensor files),
    decided here once; an error naming the checkpoints inside a folder that is neither."""
    directory = Path(directory)
    if not directory.exists():
        raise PlscError(f"checkpoint not found: {directory}{_being_written(directory)}")
    if (directory / ckpt.MANIFEST).is_file():
        return "plsc"
    if plsc22.is_plsc22_checkpoint(directory):
        return "plsc22"
    raise PlscError(_not_a_checkpoint(directory) + _being_written(directory))


def restore_backbone(
    directory: str | Path,
    backbone: str | None = None,
    embedding_size: int | None = None,
    data_format: str | None = None,
) -> tuple[paddle.nn.Layer, Config]:
    """The backbone of a checkpoint directory in eval mode, and the Config it was built from.

    ``directory`` is a plsc checkpoint (a step directory or best_model/<name>) or a PLSC v2.2 one (an epoch
    directory or best_model/<val set>), whose backbone, embedding size and layout are detected from its
    tensors (see :mod:`plsc.checkpoint.plsc22`). ``backbone`` and ``embedding_size``, when given, must agree
    with the checkpoint; ``data_format`` builds the model in that layout (the weights fit either).
    """
    return restore_kind(checkpoint_kind(directory), directory, backbone, embedding_size, data_format)


def restore_kind(kind: str, directory: str | Path, backbone: str | None = None,
                 embedding_size: int | None = None, data_format: str | None = None
                 ) -> tuple[paddle.nn.Layer, Config]:
    """:func:`restore_backbone` for a folder whose kind (:func:`checkpoint_kind`) is already known."""
    restore = plsc22.restore_backbone if kind == "plsc22" else _restore_plsc
    return restore(Path(directory), backbone, embedding_size, data_format)


def _restore_plsc(directory: Path, backbone: str | None, embedding_size: int | None,
                  data_format: str | None) -> tuple[paddle.nn.Layer, Config]:
    manifest = ckpt.read_manifest(directory)
    config = config_from_dict(manifest["config"])
    _check_expected_model(directory, config, backbone, embedding_size)
    config.model.data_format = data_format or config.model.data_format
    with paddle.utils.unique_name.guard():
        model = build_model(config.model, image_size=config.data.image_size)
    ckpt.load_backbone_into(model, directory)
    model.eval()
    return model, config


def _being_written(directory: Path) -> str:
    """When ``directory`` is a step or best model of a run in progress: which process holds the run (the
    checkpoint may not be complete yet). Empty otherwise."""
    run = ckpt.run_folder_of(directory)
    line = run_lock.holder(run) if run is not None else None
    return f"; {run_lock.in_use(run, line)}, which may still be writing it" if line else ""


def _is_checkpoint(directory: Path) -> bool:
    return (directory / ckpt.MANIFEST).is_file() or plsc22.is_plsc22_checkpoint(directory)


def _not_a_checkpoint(directory: Path) -> str:
    """Names the checkpoints one or two levels down: users often pass <output> or <output>/<backbone>."""
    candidates = [*directory.glob("*"), *directory.glob("*/*")]
    inside = sorted(str(p.relative_to(directory)) for p in candidates if p.is_dir() and _is_checkpoint(p))
    found = f"; checkpoints inside: {', '.join(inside[:6])}" if inside else ""
    return f"{directory} is not a checkpoint (no manifest.json, no PLSC v2.2 *.pdparam files){found}"


def _check_expected_model(directory: Path, config: Config, backbone: str | None, embedding_size: int | None):
    if backbone is not None and MODELS.get(backbone) is not MODELS.get(config.model.name):
        raise PlscError(f"{directory} holds {config.model.name}, not {backbone}")
    if embedding_size is not None and embedding_size != config.model.embedding_size:
        raise PlscError(f"{directory} has embedding size {config.model.embedding_size}, not {embedding_size}")

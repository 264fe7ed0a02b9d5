"""What a model path is, decided once, and the embedder that runs it: what ``plsc eval`` (and the demo) open.

Four kinds of path (:data:`KINDS`):

- ``plsc``: a plsc checkpoint folder (a step folder or ``best_model/<set>``: it holds ``manifest.json``);
- ``plsc22``: a PLSC v2.2 checkpoint folder (``*.pdparam`` tensor files, see :mod:`plsc.checkpoint.plsc22`);
- ``paddle``: a Paddle Inference export: an export folder (``export.json``, from ``plsc export``) or its
  ``.json``/``.pdmodel`` graph file, with the ``.pdiparams`` beside it;
- ``onnx``: an ONNX export: an export folder holding one, or the ``.onnx`` file.

:func:`identify` decides the kind; :func:`open_model` then takes one path per kind: a checkpoint is restored
into a plsc model (:func:`plsc.checkpoint.restore.restore_kind`) and run by an embedder of
:mod:`plsc.eval.embedders` (engine ``auto``, ``paddle`` or ``dygraph``); an export runs its own files
(:class:`plsc.eval.embedders.ExportEmbedder`). The same weights give the same verification accuracy whichever
way they are run (tests/test_eval_any.py compares a checkpoint with its Paddle and ONNX exports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from plsc import checkpoint as ckpt
from plsc.checkpoint.restore import checkpoint_kind, restore_kind
from plsc.errors import PlscError
from plsc.eval.embedders import ExportEmbedder, open_embedder
from plsc.export.exporter import EXPORT_JSON
from plsc.export.infer import MODEL_SUFFIXES, ExportedModel, locate_model

KINDS = ("plsc", "plsc22", "paddle", "onnx")
# auto/paddle/dygraph run a checkpoint's model (plsc.eval.embedders); paddle/onnx pick an export's files.
ENGINES = ("auto", "paddle", "dygraph", "onnx")
HINT_FLAGS = {"backbone": "--backbone", "embedding_size": "--embedding-size", "data_format": "--data-format"}


@dataclass(frozen=True)
class ModelPath:
    """A path and what it holds."""

    kind: str  # one of KINDS
    path: Path
    exported: ExportedModel | None = None  # an export's files and input size (None for a checkpoint)


def is_export(path: Path) -> bool:
    """An exported model: a model file (or a name that can only be one), or a folder with export.json."""
    return path.is_file() or path.suffix in MODEL_SUFFIXES or (path / EXPORT_JSON).is_file()


def identify(path: str | Path, engine: str = "auto") -> ModelPath:
    """What ``path`` holds; a one-line error when it is none of :data:`KINDS` or ``engine`` cannot run it.

    ``engine`` ``paddle`` or ``onnx`` chooses between the two formats of an export folder holding both.
    """
    path = Path(path)
    if engine not in ENGINES:
        raise PlscError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if is_export(path):
        if engine == "dygraph":
            raise PlscError(f"--engine dygraph runs a checkpoint's model; {path} is an exported model")
        exported = locate_model(path, None if engine == "auto" else engine)
        return ModelPath(exported.engine, path, exported)
    kind = checkpoint_kind(path)
    if engine == "onnx":
        raise PlscError(f"--engine onnx runs an ONNX export; {path} is a checkpoint (see plsc export)")
    return ModelPath(kind, path)


def saved_val_bins(model: ModelPath) -> list[str]:
    """The verification files a plsc checkpoint was trained with: its saved config's ``data.val_bins``."""
    if model.kind != "plsc":
        raise PlscError(f"{model.path} records no verification sets ({model.kind} model): pass --bin")
    bins = ckpt.read_manifest(model.path)["config"].get("data", {}).get("val_bins") or []
    if not bins:
        raise PlscError(f"{model.path}: its saved config lists no data.val_bins: pass --bin")
    return [str(path) for path in bins]


def open_model(model: ModelPath, engine: str = "auto", threads: int | None = None, images: int = 0,
               **hints):
    """(embedder, input size) for ``model``; ``images``: how many it will embed, when known
    (:func:`plsc.eval.embedders.open_embedder`); ``hints`` (``backbone``, ``embedding_size``,
    ``data_format``) as for :func:`plsc.checkpoint.restore.restore_backbone`, for checkpoints only."""
    if model.exported is not None:
        given = [HINT_FLAGS.get(name, name) for name, value in hints.items() if value is not None]
        if given:
            raise PlscError(f"{', '.join(given)} apply to checkpoints; {model.path} is an exported model")
        return ExportEmbedder(model.exported, threads), model.exported.image_size
    backbone, config = restore_kind(model.kind, model.path, **hints)
    image_size = config.data.image_size
    return open_embedder(backbone, config.model, image_size, engine, threads, images), image_size

"""Evaluate a model on verification ``.bin`` files: what ``plsc eval`` runs.

The model is any path :func:`plsc.eval.sources.identify` knows (a plsc or PLSC v2.2 checkpoint, a Paddle or
ONNX export), or a run folder (:func:`evaluate_run`): each verification set is evaluated on the run's best
model for that set (``best_model/<set>``, the weights that scored best on it during training), and a set
without one on the run's latest checkpoint (``checkpoints/latest``). Without files given, a plsc checkpoint is
evaluated on its saved config's ``data.val_bins``, and a run on its ``config.yaml``'s.
"""

from __future__ import annotations

from pathlib import Path

from plsc import checkpoint as ckpt
from plsc.config import load_config
from plsc.data.verification_bin import EncodedSet, read_bin, verification_names
from plsc.errors import PlscError
from plsc.eval.sources import identify, open_model, saved_val_bins
from plsc.eval.verification import embedded_images, verify


def evaluate_model(
    path: str | Path,
    bins: list[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    engine: str = "auto",
    **model_hints,
) -> dict[str, dict]:
    """``{bin stem: metrics}`` for each file, metrics as returned by :func:`verify`.

    ``bins`` None or empty: a plsc checkpoint's own ``data.val_bins``. ``engine``: as for
    :func:`plsc.eval.sources.identify`; ``model_hints``: ``backbone``, ``embedding_size``, ``data_format`` as
    for :func:`plsc.checkpoint.restore.restore_backbone` (checkpoints only).
    """
    model = identify(path, engine)
    bins = list(bins or saved_val_bins(model))
    verification_names(bins, "--bin")  # results are keyed by name: before minutes of loading
    sets = [read_bin(path) for path in bins]
    embed, image_size = open_model(model, engine, images=embedded_images(images_in(sets)), **model_hints)
    return evaluate_sets(embed, image_size, sets, batch_size, progress)


def images_in(sets: list[EncodedSet]) -> int:
    """How many images ``sets`` hold: what decides, with their mirrors, whether the job is small enough for
    dygraph (as training's verification does: plsc.eval.embedders)."""
    return sum(encoded.images for encoded in sets)


def evaluate_sets(embed, image_size: int, sets: list[EncodedSet], batch_size: int, progress: bool
                  ) -> dict[str, dict]:
    """``{set name: metrics}`` of ``embed`` (an embedder for input size ``image_size``) on each set, decoded
    one at a time."""
    results = {}
    for encoded in sets:
        vset = encoded.decode(image_size)
        results[vset.name] = verify(embed, vset, batch_size, embed.data_format, progress=progress)
    return results


def evaluate_run(
    run: str | Path,
    bins: list[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    engine: str = "auto",
    **model_hints,
) -> dict[str, dict]:
    """``{set: metrics and "model", the checkpoint that was evaluated}`` for a run folder (see the module), in
    the order of the sets; each model is opened once."""
    picks = run_models(run, bins)
    by_model: dict[Path, list[str]] = {}
    for path, model_dir in picks.items():
        by_model.setdefault(model_dir, []).append(path)
    results = {}
    for model_dir, its_bins in by_model.items():
        sets = [read_bin(path) for path in its_bins]
        embed, image_size = open_model(identify(model_dir, engine), engine,
                                       images=embedded_images(images_in(sets)), **model_hints)
        for name, metrics in evaluate_sets(embed, image_size, sets, batch_size, progress).items():
            results[name] = {**metrics, "model": str(model_dir)}
    return {name: results[name] for name in verification_names(list(picks), "--bin")}


def run_models(run: str | Path, bins: list[str] | None = None) -> dict[str, Path]:
    """``{.bin file: the checkpoint folder to evaluate it on}`` for a run folder (see the module)."""
    run = Path(run)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise PlscError(f"{run} is not a run folder (no config.yaml): pass --checkpoint or --model instead")
    bins = list(bins or load_config(config_file, reads_data=False).data.val_bins)
    if not bins:
        raise PlscError(f"{config_file} lists no data.val_bins: pass --bin")
    names = verification_names(bins, "--bin")
    latest = ckpt.CheckpointDir(run / "checkpoints").latest()
    picks: dict[str, Path] = {}
    for path, name in zip(bins, names, strict=True):
        best = run / "best_model" / name
        model = best if (best / ckpt.MANIFEST).is_file() else latest
        if model is None:
            raise PlscError(f"{run}: no best_model/{name} and no checkpoints/latest to evaluate {name} with")
        picks[str(path)] = model
    return picks

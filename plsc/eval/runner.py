"""Evaluate a saved backbone on verification `.bin` files: what ``plsc eval`` runs."""

from __future__ import annotations

from pathlib import Path

from plsc.checkpoint.restore import restore_backbone
from plsc.data.verification_bin import load_bin, verification_names
from plsc.eval.embedders import open_embedder
from plsc.eval.verification import verify


def evaluate_checkpoint(
    directory: str | Path,
    bins: list[str],
    batch_size: int = 64,
    progress: bool = False,
    engine: str = "auto",
    **model_hints,
):
    """``{bin stem: metrics}`` for each file, metrics as returned by :func:`verify`.

    ``engine``: as for :func:`plsc.eval.embedders.open_embedder` (auto: Paddle Inference on the CPU);
    ``model_hints``: ``backbone``, ``embedding_size``, ``data_format`` as for :func:`restore_backbone`.
    """
    verification_names(bins, "--bin")  # results are keyed by name: before minutes of loading
    model, config = restore_backbone(directory, **model_hints)
    embed = open_embedder(model, config.model, config.data.image_size, engine)
    results = {}
    for path in bins:
        vset = load_bin(path, config.data.image_size)
        results[vset.name] = verify(embed, vset, batch_size, embed.data_format, progress=progress)
    return results

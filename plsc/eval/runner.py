"""Evaluate a saved backbone on verification `.bin` files: what ``plsc eval`` runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle

from plsc.config import Config, config_from_dict
from plsc.data.verification_bin import load_bin
from plsc.engine import checkpoint as ckpt
from plsc.eval.verification import verify
from plsc.models import build_model


def restore_backbone(directory: str | Path) -> tuple[paddle.nn.Layer, Config]:
    """The backbone of a plsc checkpoint (a step directory or a best_model/<name> directory), in eval mode."""
    directory = Path(directory)
    manifest = ckpt.read_manifest(directory)
    config = config_from_dict(manifest["config"])
    with paddle.utils.unique_name.guard():
        model = build_model(config.model, image_size=config.data.image_size)
    model.set_state_dict(ckpt.load_backbone_state(directory))
    model.eval()
    return model, config


def embedder(model: paddle.nn.Layer):
    """A numpy-in, numpy-out embedding function over ``model`` for :func:`plsc.eval.verification.verify`."""

    def embed(batch: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model(paddle.to_tensor(batch)).numpy()

    return embed


def evaluate_checkpoint(directory: str | Path, bins: list[str], batch_size: int = 64, progress: bool = False):
    """``{bin stem: metrics}`` for each file, metrics as returned by :func:`verify`."""
    model, config = restore_backbone(directory)
    results = {}
    for path in bins:
        vset = load_bin(path, config.data.image_size)
        results[vset.name] = verify(embedder(model), vset, batch_size, config.model.data_format, progress=progress)
    return results

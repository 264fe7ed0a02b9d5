"""The recognition model of the demo: an exported model (Paddle Inference or ONNX) or a checkpoint (run as
:func:`plsc.eval.embedders.open_embedder` runs it: Paddle Inference on the CPU).

Every face crop goes through :class:`plsc.data.transforms.EvalTransform`, the preprocessing of training and
verification (BGR -> RGB, ``(x / 255 - 0.5) / 0.5``, NCHW at the model's input size), for gallery and query
alike. Its embedding is that of the crop plus that of its mirror image, L2-normalised: the verification
protocol's flip test, so that the cosine threshold found by ``plsc eval`` carries over to the demo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plsc import strict_json
from plsc.data.transforms import EvalTransform
from plsc.errors import PlscError
from plsc.eval.verification import combine_flip

log = logging.getLogger("plsc.demo")

PROBE_SEED = 20220601  # the probe image identifies a model by its embedding: see FaceEmbedder.probe


@dataclass
class FaceEmbedder:
    """``run`` maps a float32 NCHW batch to raw embeddings; ``description`` says which model that is;
    ``threshold`` is the cosine equivalent of the model's verification threshold, when it is on record."""

    run: Callable[[np.ndarray], np.ndarray]
    image_size: int
    description: dict
    threshold: float | None = None
    probe: np.ndarray = field(init=False)

    def __post_init__(self):
        self.transform = EvalTransform(self.image_size, "NCHW")
        # What the model makes of a fixed random image: equal for the same weights whatever the engine
        # (exports match dygraph to ~1e-4), different for any other model. An index keeps it.
        self.probe = self.embed([probe_image(self.image_size)])[0]

    @property
    def embedding_size(self) -> int:
        return int(self.probe.shape[0])

    def embed(self, faces: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """L2-normalised flip-summed embeddings [len(faces), E] of BGR uint8 face crops."""
        chunks = []
        for start in range(0, len(faces), batch_size):
            batch = np.stack([self.transform(face) for face in faces[start : start + batch_size]])
            mirrored = np.ascontiguousarray(batch[:, :, :, ::-1])
            chunks.append(combine_flip(self.run(batch), self.run(mirrored)))
        if not chunks:
            return np.zeros((0, self.embedding_size), np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


def probe_image(size: int) -> np.ndarray:
    return np.random.default_rng(PROBE_SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)


def open_embedder(path: str | Path, engine: str | None = None, images: int = 0) -> FaceEmbedder:
    """An export folder / model file (.json, .pdmodel, .onnx), or a plsc / PLSC v2.2 checkpoint folder;
    ``images``: how many crops it will embed, when known (a checkpoint's small job runs in dygraph:
    :func:`plsc.eval.embedders.open_embedder`)."""
    path = Path(path)
    if not path.exists():
        raise PlscError(f"model not found: {path}")
    from plsc.eval.sources import is_export

    if is_export(path):
        return _exported(path, engine)
    if engine is not None:
        raise PlscError(f"--engine applies to exported models; {path} is a checkpoint folder")
    return _checkpoint(path, images)


def _exported(path: Path, engine: str | None) -> FaceEmbedder:
    from plsc.export import locate_model, open_engine, read_description

    model = locate_model(path, engine)
    described = read_description(model.model_file.parent) or {}
    source = described.get("source", {}).get("checkpoint")
    description = {
        "kind": f"export:{model.engine}",
        "name": described.get("model", {}).get("name", model.model_file.stem),
        "image_size": model.image_size,
        "path": str(model.model_file.resolve()),
    }
    threshold = verification_threshold(Path(source)) if source else None
    return FaceEmbedder(open_engine(model), model.image_size, description, threshold)


def _checkpoint(path: Path, images: int) -> FaceEmbedder:
    from plsc.checkpoint.restore import restore_backbone
    from plsc.eval.embedders import open_embedder

    model, config = restore_backbone(path, data_format="NCHW")  # same weights, fed NCHW like the exports
    description = {
        "kind": "checkpoint",
        "name": config.model.name,
        "image_size": config.data.image_size,
        "path": str(path.resolve()),
    }
    run = open_embedder(model, config.model, config.data.image_size, images=images)  # NCHW either way
    return FaceEmbedder(run, config.data.image_size, description, verification_threshold(path))


def verification_threshold(checkpoint: Path) -> float | None:
    """The cosine matching a best_model/<set> checkpoint's verification threshold, if it recorded one.

    ``plsc eval`` thresholds the squared distance of normalised embeddings, d = 2 - 2 cos.
    """
    from plsc.checkpoint import MANIFEST

    try:
        manifest = strict_json.loads((checkpoint / MANIFEST).read_text())
        distance = manifest["best_metric"][checkpoint.name]["threshold"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return round(1.0 - float(distance) / 2.0, 6)  # 1.499 -> 0.2505, not 0.25049999999999994

"""Embedders: what verification (``plsc eval``, training-time verification) and the demo run a backbone with.

An embedder maps a float32 batch in its ``data_format`` to raw embeddings, numpy in and out. Two kinds run a
model restored from a checkpoint:

- ``paddle``: Paddle Inference. The model's weights are ``paddle.jit.save``-d (as its NCHW twin) to a
  temporary folder and loaded by a predictor, whose default IR passes fold every conv + BatchNorm pair. On the
  CPU this is several times faster than a dygraph forward (``plsc bench eval``). The predictor holds a
  snapshot of the weights: a trainer builds a new one at each evaluation (see Trainer.evaluate).
- ``dygraph``: the model's own forward under ``paddle.no_grad``, in its own layout, always current.

``auto`` takes Paddle Inference on the CPU and dygraph on a GPU (where the forward runs on the device and the
engine's gain is small); if the engine cannot be built it falls back to dygraph with a warning. On the CPU a
job too small to pay for building the engine (see DYGRAPH_BELOW_MULTIPLY_ADDS) runs in dygraph too. Both
compute the same function: embeddings agree to ~1e-5 relative (tests/test_embedders.py).

A backbone trained in fp16 holds float16 weights (see :mod:`plsc.models.precision`), which compute only under
``paddle.amp.auto_cast`` and only on a GPU. Either engine embeds with a float32 copy of such a model: the same
numbers on every device, and the numbers ``plsc eval`` gives for the (float32) checkpoint saved from it.

An exported model (``plsc export``) runs as exported: :class:`ExportEmbedder`, Paddle Inference or onnxruntime
over its files, fed NCHW.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import paddle

from plsc.errors import PlscError
from plsc.export.exporter import save_inference_model
from plsc.export.infer import ExportedModel, PaddleEngine, open_engine
from plsc.models import precision
from plsc.models.cost import backbone_cost
from plsc.runtime import first_line

log = logging.getLogger("plsc.eval")

ENGINES = ("auto", "paddle", "dygraph")

# ``auto`` on the CPU embeds in dygraph a job whose work (images to embed x the backbone's multiply-adds per
# image) is below this: building the engine (tracing and saving the model, then the predictor's passes) costs
# more than it saves. Break-even work measured on 2 cores (Paddle 3.3.1, batches of 50; engine build, then
# per image dygraph against the engine): IResNet-18 width 1/8 at 32 px (0.0035 G) 1.5 s, 1.5 against 0.55 ms:
# 5.5 G; width 1/4 at 112 px (0.17 G) 1.6 s, 39 against 12 ms: 10 G; MobileFaceNet (0.22 G) 3.3 s, 73
# against 21 ms: 14 G; IResNet-50 (6.3 G) 8.2 s, 936 against 227 ms: 73 G. Below the smallest of these
# with room to spare: a small verification set in training (data/tiny's 100 pairs, flipped too, with the
# bundled tiny model: 1.4 G) runs in 0.6 s instead of 1.7-2.0 s.
DYGRAPH_BELOW_MULTIPLY_ADDS = 2e9


class DygraphEmbedder:
    """The model's forward in eval mode (the caller sets it), fed batches in the model's own layout."""

    engine = "dygraph"

    def __init__(self, model: paddle.nn.Layer, data_format: str):
        self.model = model
        self.data_format = data_format

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return self.model(paddle.to_tensor(batch)).numpy()


class InferenceEmbedder:
    """A Paddle Inference predictor over a snapshot of the model's weights, fed NCHW batches."""

    engine = "paddle"
    data_format = "NCHW"

    def __init__(self, model: paddle.nn.Layer, model_config, image_size: int, threads: int | None = None):
        twin = snapshot_twin(model, model_config, image_size)
        with tempfile.TemporaryDirectory(prefix="plsc-embedder-") as folder:
            files = save_inference_model(twin, Path(folder) / "backbone", image_size)
            graph = next(path for path in files if path.suffix in (".json", ".pdmodel"))
            # The predictor reads both files while it is created and keeps nothing open.
            self._engine = PaddleEngine(graph, graph.with_suffix(".pdiparams"), threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._engine(batch)


class ExportEmbedder:
    """An exported model's own files run by its engine (``paddle`` or ``onnx``), fed NCHW batches."""

    data_format = "NCHW"

    def __init__(self, exported: ExportedModel, threads: int | None = None):
        self.engine = exported.engine
        self._run = open_engine(exported, threads)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch)


def snapshot_twin(model: paddle.nn.Layer, model_config, image_size: int, data_format: str = "NCHW"
                  ) -> paddle.nn.Layer:
    """A separate float32 copy of ``model`` in eval mode and ``data_format``, with its current weights.

    Separate so that tracing it leaves the (possibly training) model untouched; NCHW by default because the
    exported graph takes NCHW whatever the training layout (see :mod:`plsc.export.exporter`). Building it
    neither shifts Paddle's parameter names nor draws from its random generator, so a training run that
    evaluates continues exactly as one that does not.
    """
    from plsc.models import build_model

    config = dataclasses.replace(model_config, data_format=data_format)
    with paddle.utils.unique_name.guard(), _rng_kept():
        twin = build_model(config, image_size=image_size)
    precision.copy_weights(model, twin)
    twin.eval()
    return twin


@contextlib.contextmanager
def _rng_kept():
    state = paddle.get_rng_state()
    try:
        yield
    finally:
        paddle.set_rng_state(state)


def open_embedder(
    model: paddle.nn.Layer, model_config, image_size: int, engine: str = "auto", threads: int | None = None,
    images: int = 0,
):
    """An embedder over ``model`` (in eval mode), built from ``model_config`` (plsc.config.ModelConfig).

    ``engine``: ``auto`` (Paddle Inference on the CPU, dygraph on a GPU, for a small job or when the engine
    fails), ``paddle`` or ``dygraph``. ``images``: how many images the embedder will embed, when known (0:
    not known, never a small job). The embedder's ``data_format`` is the layout it must be fed.
    """
    if engine not in ENGINES:
        raise PlscError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "dygraph" or (engine == "auto" and (_on_gpu() or
                                                     _small_job(model_config, image_size, images))):
        return dygraph_embedder(model, model_config, image_size)
    if engine == "paddle":
        return InferenceEmbedder(model, model_config, image_size, threads)
    try:
        return InferenceEmbedder(model, model_config, image_size, threads)
    except (PlscError, RuntimeError, ValueError, OSError) as exc:  # Paddle raises assorted error types
        log.warning("Paddle Inference unavailable (%s): embedding with the dygraph model instead",
                    first_line(exc))
        return dygraph_embedder(model, model_config, image_size)


def dygraph_embedder(model: paddle.nn.Layer, model_config, image_size: int) -> DygraphEmbedder:
    """The model's own forward; a float32 copy's (in the model's layout) when the model holds float16."""
    if precision.holds_float16(model):
        model = snapshot_twin(model, model_config, image_size, model_config.data_format)
    return DygraphEmbedder(model, model_config.data_format)


def _small_job(model_config, image_size: int, images: int) -> bool:
    """Whether embedding ``images`` images costs less in dygraph than building the engine would."""
    if images <= 0:
        return False
    # backbone_cost is cached per backbone (a training run's plan has computed it already)
    return images * backbone_cost(model_config, image_size).multiply_adds < DYGRAPH_BELOW_MULTIPLY_ADDS


def _on_gpu() -> bool:
    from plsc.parity import on_gpu

    return on_gpu()

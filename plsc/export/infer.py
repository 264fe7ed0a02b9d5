"""Embed images with an exported model, through Paddle Inference or onnxruntime: what ``plsc infer`` runs.

Images are read with OpenCV, resized to the model's input size and normalised exactly as in training and
verification (RGB, ``(x / 255 - 0.5) / 0.5``, NCHW). The embeddings are the model's raw output, one row per
image in sorted path order; an unreadable image stops the run before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plsc.atomic import atomic_file, write_atomic
from plsc.console import Progress
from plsc.data.folder import IMAGE_SUFFIXES, read_image
from plsc.data.transforms import EvalTransform
from plsc.errors import PlscError
from plsc.export.exporter import EXPORT_JSON, read_description
from plsc.finite import non_finite_count
from plsc.names import path_component
from plsc.runtime import default_threads, first_line

ENGINES = ("paddle", "onnx")
MODEL_SUFFIXES = {".json": "paddle", ".pdmodel": "paddle", ".onnx": "onnx"}
DEFAULT_IMAGE_SIZE = 112  # PLSC's input size, for a bare model file without export.json


@dataclass(frozen=True)
class ExportedModel:
    """Which engine runs which files, at which input size."""

    engine: str
    model_file: Path
    params_file: Path | None
    image_size: int


# ----------------------------------------------------------------------------------------------------
# Finding the model


def locate_model(path: str | Path, engine: str | None = None) -> ExportedModel:
    """An export folder (or its export.json), or a bare ``.json``/``.pdmodel``/``.onnx`` model file."""
    path = Path(path)
    if engine is not None and engine not in ENGINES:
        raise PlscError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if path.name == EXPORT_JSON:
        path = path.parent
    if path.is_dir():
        return _from_export_folder(path, engine)
    if not path.is_file():
        raise PlscError(f"model not found: {path}")
    return _from_model_file(path, engine)


def _from_export_folder(directory: Path, engine: str | None) -> ExportedModel:
    description = read_description(directory)
    if description is None:
        raise PlscError(f"{directory} has no {EXPORT_JSON}: pass the model file itself, or run plsc export")
    artifacts = description.get("artifacts", {})
    engine = engine or next((name for name in ENGINES if name in artifacts), None)
    if engine not in artifacts:
        present = ", ".join(artifacts) or "none"
        raise PlscError(f"{directory} holds no {engine or 'known'} export (exported: {present})")
    listed = f"{directory / EXPORT_JSON}: artifacts.{engine}.files"
    files = [directory / path_component(name, listed) for name in artifacts[engine]["files"]]
    image_size = int(description["input"]["shape"][-1])
    if engine == "onnx":
        return ExportedModel("onnx", files[0], None, image_size)
    graph = next(path for path in files if path.suffix in (".json", ".pdmodel"))
    return ExportedModel("paddle", graph, graph.with_suffix(".pdiparams"), image_size)


def _from_model_file(path: Path, engine: str | None) -> ExportedModel:
    own_engine = MODEL_SUFFIXES.get(path.suffix)
    if own_engine is None:
        raise PlscError(f"{path}: not a model file (.json, .pdmodel or .onnx)")
    if engine not in (None, own_engine):
        raise PlscError(f"{path} is a {own_engine} model, it cannot run with --engine {engine}")
    description = read_description(path.parent) or {}
    image_size = description.get("input", {}).get("shape", [DEFAULT_IMAGE_SIZE])[-1]
    params = path.with_suffix(".pdiparams") if own_engine == "paddle" else None
    return ExportedModel(own_engine, path, params, int(image_size))


# ----------------------------------------------------------------------------------------------------
# Engines: callables from a float32 NCHW batch to its embeddings


CPU = ["CPUExecutionProvider"]


class PaddleEngine:
    """Paddle Inference predictor (its default IR optimisation, which folds conv + BN, stays on)."""

    def __init__(self, model_file: Path, params_file: Path, threads: int | None = None):
        import paddle
        from paddle import inference

        if model_file.suffix == ".json" and int(paddle.__version__.split(".")[0]) < 3:
            raise PlscError(
                f"{model_file} was exported by Paddle 3 and Paddle {paddle.__version__} cannot read it: "
                "export again with this Paddle, or use the ONNX export"
            )
        config = inference.Config(str(model_file), str(params_file))
        config.set_cpu_math_library_num_threads(threads or default_threads())
        config.disable_glog_info()
        try:
            self.predictor = inference.create_predictor(config)
        except Exception as exc:  # Paddle raises assorted C++ error types here
            raise PlscError(f"Paddle Inference cannot load {model_file}: {first_line(exc)}") from None
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.input.reshape(list(batch.shape))
        self.input.copy_from_cpu(batch)
        self.predictor.run()
        return self.output.copy_to_cpu()


class OnnxEngine:
    """onnxruntime CPU session with its default (full) graph optimisation."""

    def __init__(self, model_file: Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise PlscError("ONNX inference needs onnxruntime: pip install 'plsc[export]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        try:
            self.session = onnxruntime.InferenceSession(str(model_file), options, providers=CPU)
        except Exception as exc:  # onnxruntime's Fail/InvalidGraph/... share no useful base class
            raise PlscError(f"onnxruntime cannot load {model_file}: {first_line(exc)}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def open_engine(model: ExportedModel, threads: int | None = None):
    if model.engine == "onnx":
        return OnnxEngine(model.model_file, threads)
    return PaddleEngine(model.model_file, model.params_file, threads)


# ----------------------------------------------------------------------------------------------------
# Images


def list_images(path: str | Path) -> list[Path]:
    """One file (whatever its suffix), or every image file under a folder, recursively, in sorted order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PlscError(f"images not found: {path}")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PlscError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return images


def load_batch(paths: list[Path], transform: EvalTransform) -> np.ndarray:
    return np.stack([transform(read_image(path)) for path in paths])


def embed_images(
    engine, paths: list[Path], image_size: int, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Embeddings [len(paths), E] of the images, batch by batch (``progress``: report images done)."""
    if batch_size < 1:
        raise PlscError(f"batch size must be >= 1, got {batch_size}")
    transform = EvalTransform(image_size, "NCHW")
    batches = []
    with Progress(len(paths), "embed", "images", enabled=progress) as bar:
        for start in range(0, len(paths), batch_size):
            batches.append(engine(load_batch(paths[start : start + batch_size], transform)))
            if non_finite_count(batches[-1]):
                raise PlscError(f"the model gives nan or inf embeddings (first batch: {paths[start]}): its "
                                "weights hold non-finite numbers")
            bar.update(len(batches[-1]))
    return np.concatenate(batches).astype(np.float32, copy=False)


def run_inference(
    model_path: str | Path,
    images: str | Path,
    engine: str | None = None,
    batch_size: int = 32,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[list[Path], np.ndarray]:
    """(image paths, their embeddings) for ``plsc infer``."""
    model = locate_model(model_path, engine)
    paths = list_images(images)
    return paths, embed_images(open_engine(model, threads), paths, model.image_size, batch_size, progress)


def embeddings_path(output: str | Path) -> Path:
    """``output`` as the .npy to write; checked before any work is done."""
    output = Path(output)
    if output.suffix != ".npy":
        raise PlscError(f"the embeddings file must end in .npy, got {output}")
    return output


def save_embeddings(output: str | Path, paths: list[Path], embeddings: np.ndarray, root: str | Path) -> Path:
    """Write the embeddings to ``output`` (.npy) and the image list to the .txt beside it, each atomically.

    The list is written first: a complete .npy therefore always has its list.
    """
    output = embeddings_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    root = Path(root)
    names = [str(path.relative_to(root)) if root.is_dir() else str(path) for path in paths]
    write_atomic(output.with_suffix(".txt"), "\n".join(names) + "\n")
    with atomic_file(output) as f:
        np.save(f, embeddings)
    return output

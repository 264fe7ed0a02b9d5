"""Export a checkpoint's backbone for deployment: Paddle Inference (``paddle.jit.save``) or ONNX (paddle2onnx)

What the exported graph takes and gives, whatever the checkpoint:

* input ``images``: float32 [N, 3, S, S], N dynamic, RGB, ``(x / 255 - 0.5) / 0.5`` (as in training);
* output: raw (not L2-normalised) embeddings [N, E].

NHWC-trained backbones are exported as their NCHW twin: plsc's tensors have the same shapes in both layouts,
so the NCHW model with the same weights computes the same function. We do not put a transpose in front of the
NHWC graph instead, because Paddle Inference on CPU mis-runs that graph (3.3.1's oneDNN conv and 2.6.2's IR
passes both reject it), and NCHW is the faster layout on CPU anyway.

BatchNorm is exported as eval-mode BatchNorm ops. Folding is left to the inference engines, as in Paddle's own
deployment: Paddle Inference's IR passes (``conv2d_bn_fuse_pass`` and its oneDNN variant) fold every BN that
follows a conv, and onnxruntime's default graph optimisation does the same (Conv + BatchNormalization fusion).
BNs that precede a conv (IResNet's pre-activation BN) or follow the embedding Linear stay as cheap affine ops.

Files, named like PLSC's ``<backbone>.*``: what ``paddle.jit.save`` writes (Paddle 3: ``<name>.json`` +
``<name>.pdiparams``; Paddle 2.6: ``<name>.pdmodel`` + ``<name>.pdiparams``), or ``<name>.onnx``; plus
``export.json`` describing input, output, model and source. Exporting both formats into one folder keeps both
in export.json.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import os
import shutil
from pathlib import Path

import paddle

import plsc
from plsc import strict_json
from plsc.atomic import temp_path, write_atomic
from plsc.checkpoint import replace_dir
from plsc.checkpoint.restore import checkpoint_kind, restore_kind
from plsc.console import captured_output
from plsc.errors import PlscError
from plsc.models import build_model, precision
from plsc.names import path_component
from plsc.runtime import first_line

EXPORT_JSON = "export.json"
FORMATS = ("paddle", "onnx")
INPUT_NAME = "images"
ONNX_OPSET = 11
NORMALIZATION = "RGB, (x / 255 - 0.5) / 0.5"
SOURCE_FORMATS = {"plsc": "plsc", "plsc22": "plsc-v2.2"}  # export.json's source.format per checkpoint kind


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    export_format: str = "paddle",
    name: str | None = None,
    opset: int = ONNX_OPSET,
    **model_hints,
) -> dict:
    """Export the backbone of ``checkpoint`` into ``output``; returns the export.json description.

    ``checkpoint``: a plsc checkpoint, a best_model/<name> folder or a PLSC v2.2 checkpoint folder;
    ``model_hints``: ``backbone``, ``embedding_size``, ``data_format`` as for ``restore_backbone``.

    The new export is assembled in a folder beside ``output`` (with the files ``output`` already holds) and
    renamed into place: an export that fails or is interrupted leaves the previous one as it was.
    """
    if export_format not in FORMATS:
        raise PlscError(f"export format must be one of {', '.join(FORMATS)}, got {export_format!r}")
    output = Path(output)
    previous = check_output(output)
    if name is not None:
        path_component(name, "--name")  # the exported files' stem: before any work
    kind = checkpoint_kind(checkpoint)
    model, config = restore_kind(kind, checkpoint, **model_hints)
    if config.model.data_format != "NCHW":
        model = nchw_twin(model, config)
    name = path_component(name or config.model.name, "--name (default: the checkpoint's model.name)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = temp_path(output)
        staging.mkdir()
    except OSError as exc:
        raise PlscError(f"cannot write the export to {output}: {exc.strerror or exc}") from None
    try:
        artifact = _export_files(model, staging, name, config.data.image_size, export_format, opset)
        _carry_over(output, staging)
        description = merge_description(previous, describe(checkpoint, config, kind), export_format, artifact)
        write_atomic(staging / EXPORT_JSON, strict_json.dumps(description, indent=1) + "\n")
        replace_dir(staging, output)
    except OSError as exc:
        raise PlscError(f"cannot write the export to {output}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return description


def check_output(output: Path) -> dict | None:
    """Refuse an output that cannot hold an export before any work is done; the description of the export
    already there (None when there is none)."""
    if output.exists() and not output.is_dir():
        raise PlscError(f"export output {output} is a file; name a folder (new, or holding an export)")
    return read_description(output) if output.is_dir() else None


def _export_files(model, staging: Path, name: str, image_size: int, export_format: str, opset: int) -> dict:
    """Write one format's files into ``staging``; the export.json entry describing them."""
    files = save_inference_model(model, staging / name, image_size)
    artifact = {"files": [path.name for path in files], "paddle": paddle.__version__}
    if export_format == "onnx":
        onnx_file = convert_to_onnx(files, staging / f"{name}.onnx", opset)
        for path in files:  # the Paddle files were only the converter's input
            path.unlink()
        artifact = {"files": [onnx_file.name], "opset": opset, **onnx_versions()}
    return artifact


def _carry_over(output: Path, staging: Path) -> None:
    """Hard-link (or copy) what ``output`` holds into ``staging``, except what the new export replaces."""
    if not output.is_dir():
        return
    for entry in output.iterdir():
        target = staging / entry.name
        if entry.name == EXPORT_JSON or target.exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def nchw_twin(model: paddle.nn.Layer, config) -> paddle.nn.Layer:
    """The same backbone built channels-first with the same weights (their shapes do not depend on layout)."""
    model_config = dataclasses.replace(config.model, data_format="NCHW")
    with paddle.utils.unique_name.guard():
        twin = build_model(model_config, image_size=config.data.image_size)
    precision.copy_weights(model, twin)
    twin.eval()
    return twin


def input_spec(image_size: int) -> paddle.static.InputSpec:
    return paddle.static.InputSpec([None, 3, image_size, image_size], "float32", name=INPUT_NAME)


def save_inference_model(model: paddle.nn.Layer, prefix: Path, image_size: int) -> list[Path]:
    """``paddle.jit.save`` the eval-mode model; returns the files written (their names depend on Paddle)."""
    model.eval()
    paddle.jit.save(model, str(prefix), input_spec=[input_spec(image_size)])
    return sorted(path for path in prefix.parent.iterdir() if path.name.startswith(f"{prefix.name}."))


def _graph_file(files: list[Path]) -> Path:
    return next(path for path in files if path.suffix in (".json", ".pdmodel"))


def _params_file(files: list[Path]) -> Path:
    return next(path for path in files if path.suffix == ".pdiparams")


def _import_paddle2onnx():
    try:
        import paddle2onnx
    except ImportError:
        raise PlscError("ONNX export needs paddle2onnx: pip install 'plsc[export]'") from None
    except ValueError:  # paddle2onnx 2.x refuses to import under Paddle < 3
        version = importlib.metadata.version("paddle2onnx")
        raise PlscError(
            f"paddle2onnx {version} needs Paddle 3, this is Paddle {paddle.__version__}: "
            "pip install 'paddle2onnx==1.3.1'"
        ) from None
    return paddle2onnx


def convert_to_onnx(files: list[Path], onnx_file: Path, opset: int = ONNX_OPSET) -> Path:
    """Convert a ``paddle.jit.save`` output to ONNX with paddle2onnx (no optimisation pass)."""
    paddle2onnx = _import_paddle2onnx()
    options = {"opset_version": opset, "enable_optimize": False, "verbose": False}
    if "optimize_tool" in inspect.signature(paddle2onnx.export).parameters:
        # paddle2onnx 2.x folds constants with polygraphy even when enable_optimize is False, and polygraphy
        # pip-installs packages at run time; any other tool name skips that step.
        options["optimize_tool"] = "none"
    with captured_output() as said:  # its C++ part prints progress lines straight to stdout
        paddle2onnx.export(str(_graph_file(files)), str(_params_file(files)), str(onnx_file), **options)
    if not onnx_file.is_file():
        last = (said.getvalue().strip().splitlines() or ["no output"])[-1]
        raise PlscError(f"paddle2onnx could not convert {_graph_file(files).name}: {last}")
    return onnx_file


def onnx_versions() -> dict[str, str]:
    return {"paddle": paddle.__version__, "paddle2onnx": importlib.metadata.version("paddle2onnx")}


def describe(checkpoint: str | Path, config, kind: str = "plsc") -> dict:
    """The format-independent part of export.json; ``kind`` as :func:`checkpoint_kind` names it."""
    size, embedding = config.data.image_size, config.model.embedding_size
    return {
        "model": {
            "name": config.model.name,
            "embedding_size": embedding,
            "width": config.model.width,
            "trained_data_format": config.model.data_format,
        },
        "input": {
            "name": INPUT_NAME,
            "shape": [None, 3, size, size],
            "dtype": "float32",
            "layout": "NCHW",
            "normalization": NORMALIZATION,
        },
        "output": {"shape": [None, embedding], "dtype": "float32", "embedding": "raw, not L2-normalised"},
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "format": SOURCE_FORMATS[kind]},
    }


def read_description(directory: str | Path) -> dict | None:
    path = Path(directory) / EXPORT_JSON
    if not path.is_file():
        return None
    try:
        description = strict_json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlscError(f"{path}: corrupt export description ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlscError(f"{path}: unreadable export description ({getattr(exc, 'strerror', None) or exc})") \
            from None
    except ValueError as exc:  # NaN, nesting deeper than Python's recursion limit
        raise PlscError(f"{path}: corrupt export description ({first_line(exc)[:80]})") from None
    if not isinstance(description, dict):
        raise PlscError(f"{path}: corrupt export description (not a JSON object)")
    return description


def merge_description(previous: dict | None, description: dict, export_format: str, artifact: dict) -> dict:
    """export.json's content: the other format's entry is kept when it was exported from the same model."""
    previous = previous or {}
    same_model = all(previous.get(key) == description[key] for key in ("model", "input", "source"))
    artifacts = dict(previous.get("artifacts", {})) if same_model else {}
    artifacts[export_format] = artifact
    return {**description, "artifacts": artifacts, "plsc": plsc.__version__}

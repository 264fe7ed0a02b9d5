"""Import PLSC v2.2 checkpoints: backbone weights into plsc models, classifier shards into one center matrix.

A PLSC v2.2 checkpoint directory (``<output>/<backbone>/<epoch>/`` or ``.../best_model/<val set>/``) holds one
pickle per tensor, ``<tensor name>.pdparam``, optimizer state in ``*.pdopt`` and ``meta.json``:

* dynamic mode pickles ``(tensor name, ndarray)``; static mode pickles ``eval('data', {'data': ndarray})``,
  a bare array once unpickled. We unpickle with an allow-list and emulate that ``eval``, never run it.
* file stems are Paddle tensor names, mapped onto plsc's state_dict keys by ``plsc22_names``
  (``ckpt_name`` for dynamic, ``static_name`` for static checkpoints).
* FP16 runs store conv/PReLU/FC tensors as float16 (BatchNorm stays float32): everything is cast to float32.
* NHWC only changes static PReLU alphas ([1, 1, 1, C] instead of [1, C, 1, 1]); plsc's alphas are [C].
* the classifier is ``dist@fc@rank@NNNNN.w`` shards of shape [emb, num_local]: column c of rank r is class
  ``r * ceil(C / W) + c``.

Neither meta.json nor the file names record the backbone's name or data format, so both are detected from the
tensors (and can be overridden): the family from its naming scheme, the depth from the PReLU count, the width
from the stem, the input size from the head, the layout from static PReLU shapes (dynamic: NCHW, which loads
the same weights whatever layout the run trained in).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle

from plsc import safe_pickle, strict_json
from plsc.config import MAX_CLASSES, MAX_EMBEDDING_SIZE, Config, config_from_dict
from plsc.errors import PlscError
from plsc.finite import require_finite
from plsc.models import MODELS, build_model, plsc22_names
from plsc.models.iresnet import STAGE_BLOCKS, STAGE_CHANNELS
from plsc.models.layers import scaled_channels
from plsc.models.mobilefacenet import NUM_HALVINGS
from plsc.runtime import first_line

PARAM_SUFFIX = ".pdparam"
META = "meta.json"
SHARD_NAME = "dist@fc@rank@{rank:05d}.w"
SHARD_PATTERN = re.compile(r"^dist@fc@rank@(\d{5})\.w$")
GENERAL_CLASSIFIER = "gfc.w"  # GeneralScaleClassifier: one [emb, num_classes] tensor
STEM_CHANNELS = 64  # both families start with 64 channels at width 1
# depth of an IResNet from its number of residual units (stage blocks summed; all distinct)
DEPTH_BY_UNITS = {sum(blocks): depth for depth, blocks in STAGE_BLOCKS.items()}
PLSC22_IRESNET_NAMES = {50: "FresResNet50", 100: "FresResNet100"}


# ----------------------------------------------------------------------------------------------------
# Reading one tensor file without running arbitrary pickled code


def _static_payload(expression, namespace=None, *_):
    """Stands in for the ``builtins.eval`` that static-mode payloads call: returns the array, runs nothing."""
    if expression == "data" and isinstance(namespace, dict) and isinstance(namespace.get("data"), np.ndarray):
        return namespace["data"]
    raise pickle.UnpicklingError("unexpected eval payload")


def read_tensor_file(path: str | Path) -> np.ndarray:
    """The array in one PLSC v2.2 ``.pdparam``/``.pdopt`` tensor file (dynamic or static payload)."""
    path = Path(path)
    static_eval = {("builtins", "eval"): _static_payload}
    payload = safe_pickle.load(path, "PLSC v2.2 tensor file", substitutes=static_eval)
    if isinstance(payload, tuple) and len(payload) == 2 and isinstance(payload[1], np.ndarray):
        payload = payload[1]
    if not isinstance(payload, np.ndarray):
        raise PlscError(f"{path} holds no tensor (a {type(payload).__name__})")
    require_finite(path.stem, payload, path.parent)
    return payload


# ----------------------------------------------------------------------------------------------------
# What a directory holds


def is_plsc22_checkpoint(directory: str | Path) -> bool:
    """True for a directory with PLSC v2.2 tensor files (``*.pdparam``) and no plsc manifest."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / "manifest.json").exists():
        return False
    return any(directory.glob(f"*{PARAM_SUFFIX}"))


# meta.json keys plsc reads: whole numbers, as PLSC v2.2 writes them (dynamic/utils/io.py:99-104), with the
# least and largest value each may take.
META_INTEGERS = {
    "num_classes": (1, MAX_CLASSES),
    "embedding_size": (1, MAX_EMBEDDING_SIZE),
    "pretrain_world_size": (1, 1 << 20),
}


def read_meta(directory: str | Path) -> dict:
    """meta.json ({} when absent: parameter-only copies of a checkpoint have none), checked to be a JSON
    object whose META_INTEGERS are integers in range."""
    path = Path(directory) / META
    if not path.is_file():
        return {}
    try:
        meta = strict_json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlscError(f"{path}: corrupt meta.json ({exc.msg})") from None
    except ValueError as exc:  # NaN, 5000-digit numbers, deep nesting, bytes that are not UTF-8
        raise PlscError(f"{path}: corrupt meta.json ({first_line(exc)[:80]})") from None
    if not isinstance(meta, dict):
        raise PlscError(f"{path}: expected a JSON object of checkpoint facts, found a {type(meta).__name__}")
    meta = {key: value for key, value in meta.items() if value is not None}  # null: not recorded
    for key, (least, most) in META_INTEGERS.items():
        value = meta.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
            raise PlscError(f"{path}: {key} must be an integer in [{least}, {most}], found {str(value)[:40]}")
    return meta


def _param_stems(directory: Path) -> set[str]:
    return {path.name[: -len(PARAM_SUFFIX)] for path in directory.glob(f"*{PARAM_SUFFIX}")}


def _is_classifier(stem: str) -> bool:
    return stem == GENERAL_CLASSIFIER or SHARD_PATTERN.match(stem) is not None


@dataclass(frozen=True)
class Plsc22Checkpoint:
    """A PLSC v2.2 checkpoint directory and the backbone its tensors describe."""

    directory: Path
    mode: str  # "dynamic" or "static" (which tensor names the files use)
    backbone: str  # a plsc MODELS name: FresResNet50, FresResNet100, MobileFaceNet_128, iresnet<depth>
    embedding_size: int
    width: float
    image_size: int
    data_format: str  # the layout the backbone is built in
    meta: dict = field(default_factory=dict)

    def tensor_path(self, stem: str) -> Path:
        return self.directory / f"{stem}{PARAM_SUFFIX}"

    def config(self) -> Config:
        """A plsc Config describing this backbone (model and input size; the rest are defaults)."""
        model = {
            "name": self.backbone,
            "embedding_size": self.embedding_size,
            "width": self.width,
            "data_format": self.data_format,
        }
        data = {"image_size": self.image_size, "num_classes": int(self.meta.get("num_classes", 0))}
        return config_from_dict({"model": model, "data": data})


def _shape(checkpoint_dir: Path, stem: str) -> tuple[int, ...]:
    path = checkpoint_dir / f"{stem}{PARAM_SUFFIX}"
    if not path.is_file():
        raise PlscError(f"{checkpoint_dir}: PLSC v2.2 checkpoint is incomplete, missing {path.name}")
    return read_tensor_file(path).shape


def _detect_family(directory: Path, stems: set[str]) -> tuple[str, str]:
    """(mode, family) from the naming scheme of the stem convolution's weight."""
    if "create_parameter_0.w_0" in stems:
        return "dynamic", "mobilefacenet"
    if "conv1_weights" in stems:
        return "dynamic", "iresnet"
    if "conv2d_0.w_0" in stems:
        return "static", "iresnet"
    raise PlscError(
        f"{directory}: not a PLSC v2.2 backbone checkpoint "
        "(no conv1_weights, create_parameter_0.w_0 or conv2d_0.w_0 .pdparam file)"
    )


def _iresnet_name(directory: Path, stems: set[str], mode: str) -> str:
    prelu = "p_re_lu" if mode == "dynamic" else "prelu"
    units = sum(1 for stem in stems if re.fullmatch(rf"{prelu}_\d+\.w_0", stem)) - 1  # minus the stem's
    if units not in DEPTH_BY_UNITS:
        raise PlscError(f"{directory}: {units} residual units match no IResNet depth {sorted(STAGE_BLOCKS)}")
    depth = DEPTH_BY_UNITS[units]
    return PLSC22_IRESNET_NAMES.get(depth, f"iresnet{depth}")


def _detect_backbone(directory: Path, backbone: str | None) -> tuple[str, str, str]:
    """(mode, family, plsc model name); ``backbone``, when given, must name the same architecture."""
    stems = {stem for stem in _param_stems(directory) if not _is_classifier(stem)}
    mode, family = _detect_family(directory, stems)
    name = "MobileFaceNet_128" if family == "mobilefacenet" else _iresnet_name(directory, stems, mode)
    if backbone is not None and MODELS.get(backbone) is not MODELS[name]:
        raise PlscError(f"{directory}: the checkpoint holds {name}, not {backbone}")
    return mode, family, name


def _geometry(directory: Path, mode: str, family: str) -> tuple[float, int, int]:
    """(width multiplier, embedding size, final feature-map side) from the stem's and the head's tensors."""
    stem_conv = {"mobilefacenet": "create_parameter_0.w_0", "iresnet": "conv1_weights"}[family]
    width = _shape(directory, stem_conv if mode == "dynamic" else "conv2d_0.w_0")[0] / STEM_CHANNELS
    if family == "mobilefacenet":
        # The last create_parameter is the embedding BN's beta [E]. Five before it (embedding BN gamma and
        # conv, GDC BN beta and gamma) comes the global depthwise conv's kernel [C, 1, side, side].
        numbers = (re.fullmatch(r"create_parameter_(\d+)\.w_0", stem) for stem in _param_stems(directory))
        last = max(int(match.group(1)) for match in numbers if match)
        embedding = _shape(directory, f"create_parameter_{last}.w_0")[0]
        return width, embedding, _shape(directory, f"create_parameter_{last - 5}.w_0")[-1]
    in_features, embedding = _shape(directory, "fc.w_0" if mode == "dynamic" else "fc_0.w_0")
    last_channels = scaled_channels(STAGE_CHANNELS[-1], width)
    return width, embedding, math.isqrt(in_features // last_channels)


def _check_embedding_size(directory: Path, embedding: int, meta: dict, expected: int | None) -> None:
    saved = meta.get("embedding_size", embedding)
    if saved != embedding:
        raise PlscError(f"{directory}: meta.json has embedding_size {saved}, the tensors {embedding}")
    if expected is not None and expected != embedding:
        raise PlscError(f"{directory}: the checkpoint's embedding size is {embedding}, not {expected}")


def inspect_checkpoint(
    directory: str | Path,
    backbone: str | None = None,
    embedding_size: int | None = None,
    data_format: str | None = None,
) -> Plsc22Checkpoint:
    """Detect what a PLSC v2.2 checkpoint directory holds; given values must agree with the tensors.

    ``backbone`` may be any name of the same architecture (FresResNet50 or iresnet50). ``data_format`` only
    chooses the layout to build in (the weights fit either); the default is the checkpoint's own for static
    checkpoints and NCHW for dynamic ones (which do not record it).
    """
    directory = Path(directory)
    mode, family, name = _detect_backbone(directory, backbone)
    width, embedding, side = _geometry(directory, mode, family)
    meta = read_meta(directory)
    _check_embedding_size(directory, embedding, meta, embedding_size)
    return Plsc22Checkpoint(
        directory=directory,
        mode=mode,
        backbone=name,
        embedding_size=embedding,
        width=width,
        image_size=_image_size(side),
        data_format=data_format or _saved_data_format(directory, mode),
        meta=meta,
    )


def _image_size(side: int) -> int:
    """The input size whose final feature map has this side: 112 px -> 7 (both families halve 4 times)."""
    return 2**NUM_HALVINGS * side


def _saved_data_format(directory: Path, mode: str) -> str:
    if mode == "static" and _shape(directory, "prelu_0.w_0")[-1] > 1:
        return "NHWC"  # static NHWC alphas are [1, 1, 1, C], NCHW ones [1, C, 1, 1]
    return "NCHW"


# ----------------------------------------------------------------------------------------------------
# Backbone weights


def _fit(value: np.ndarray, shape: list[int], path: Path) -> np.ndarray:
    """Cast to float32 and take static PReLU alphas ([1, C, 1, 1] or [1, 1, 1, C]) to plsc's [C]."""
    value = np.asarray(value, dtype=np.float32)
    if list(value.shape) != list(shape):
        if len(shape) == 1 and value.size == shape[0] and value.ndim == 4:
            return value.reshape(shape)
        raise PlscError(f"{path}: shape {list(value.shape)}, but the model expects {list(shape)}")
    return value


def backbone_state(checkpoint: Plsc22Checkpoint, model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    """``model``'s state_dict filled from the checkpoint's tensor files, as float32 arrays."""
    expected = model.state_dict()
    names = plsc22_names(model)
    static = checkpoint.mode == "static"
    stems = {key: name.static_name if static else name.ckpt_name for key, name in names.items()}
    missing = [stem for stem in stems.values() if not checkpoint.tensor_path(stem).is_file()]
    if missing:
        raise PlscError(
            f"{checkpoint.directory}: PLSC v2.2 checkpoint is incomplete, {len(missing)} of {len(stems)} "
            f"{checkpoint.backbone} tensors missing (first: {missing[0]}{PARAM_SUFFIX})"
        )
    paths = {key: checkpoint.tensor_path(stem) for key, stem in stems.items()}
    return {key: _fit(read_tensor_file(path), expected[key].shape, path) for key, path in paths.items()}


def load_backbone_into(model: paddle.nn.Layer, directory: str | Path, backbone: str,
                       embedding_size: int) -> None:
    """Fill a training model (``backbone``, ``embedding_size``: the run's) with a checkpoint's backbone;
    PlscError when the checkpoint holds another architecture, width or embedding size."""
    checkpoint = inspect_checkpoint(directory, backbone, embedding_size)
    model.set_state_dict(backbone_state(checkpoint, model))


def restore_backbone(
    directory: str | Path,
    backbone: str | None = None,
    embedding_size: int | None = None,
    data_format: str | None = None,
) -> tuple[paddle.nn.Layer, Config]:
    """The backbone of a PLSC v2.2 checkpoint as a plsc model in eval mode, and a Config describing it."""
    checkpoint = inspect_checkpoint(directory, backbone, embedding_size, data_format)
    config = checkpoint.config()
    with paddle.utils.unique_name.guard():
        model = build_model(config.model, image_size=config.data.image_size)
    model.set_state_dict(backbone_state(checkpoint, model))
    model.eval()
    return model, config


# ----------------------------------------------------------------------------------------------------
# Classifier


def shard_columns(num_classes: int, world_size: int) -> int:
    """Classes per rank in PLSC v2.2's LargeScaleClassifier: ceil(C / W) (the last rank has the rest)."""
    return -(-num_classes // world_size)


def class_centers(directory: str | Path) -> np.ndarray:
    """The classifier of a PLSC v2.2 checkpoint as plsc's full center matrix [num_classes, emb], float32.

    Joins the ``dist@fc@rank@NNNNN.w`` shards ([emb, num_local] each; meta.json gives the class count and
    the saving world size), or reads a GeneralScaleClassifier's single ``gfc.w``.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if "num_classes" not in meta:
        raise PlscError(f"{directory}: no meta.json with num_classes, cannot import the classifier")
    num_classes = int(meta["num_classes"])
    general = directory / f"{GENERAL_CLASSIFIER}{PARAM_SUFFIX}"
    weight = read_tensor_file(general) if general.is_file() else _joined_shards(directory, meta)
    if weight.shape[1] < num_classes:
        raise PlscError(f"{directory}: the classifier has {weight.shape[1]} columns, {num_classes} classes")
    return np.ascontiguousarray(weight[:, :num_classes].T, dtype=np.float32)


def _joined_shards(directory: Path, meta: dict) -> np.ndarray:
    world_size = int(meta.get("pretrain_world_size") or 0)
    if world_size < 1:
        raise PlscError(f"{directory}/meta.json: no pretrain_world_size, cannot join the classifier shards")
    per_rank = shard_columns(int(meta["num_classes"]), world_size)
    shards = []
    for rank in range(world_size):
        path = directory / f"{SHARD_NAME.format(rank=rank)}{PARAM_SUFFIX}"
        if not path.is_file():
            raise PlscError(f"{directory}: classifier shard {path.name} is missing ({world_size} ranks)")
        shard = read_tensor_file(path)
        if shard.ndim == 2 and rank < world_size - 1 and shard.shape[1] != per_rank:
            raise PlscError(f"{path}: {shard.shape[1]} classes; PLSC puts {per_rank} on all but the last")
        if shard.ndim != 2 or (shards and shard.shape[0] != shards[0].shape[0]):
            raise PlscError(f"{path}: shape {list(shard.shape)} does not match rank 0's [emb, num_local]")
        shards.append(shard)
    return np.concatenate(shards, axis=1)

"""Typed configuration: dataclasses loaded from YAML, overridable with ``section.key=value`` strings.

Unknown sections or keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from plsc.atomic import write_atomic
from plsc.errors import PlscError

log = logging.getLogger("plsc")

# The folder holding the data sets on this machine: a config writes ``${PLSC_DATA_ROOT}/faces-mini`` in
# data.root and data.val_bins, so it names its data once and runs wherever the variable points.
DATA_ROOT_VARIABLE = "PLSC_DATA_ROOT"
DATA_ROOT_REFERENCE = "${" + DATA_ROOT_VARIABLE + "}"

# Class labels are integers in [0, MAX_CLASSES). The largest public face sets have ~10^7 identities; 2**31
# classes of even 128 float16 values are 512 GiB of centers, so a label beyond is a damaged label, not data.
MAX_CLASSES = 2**31
# Largest sizes that can run. Embeddings: PLSC and insightface use 128-512; the backbone's last layer is
# [channels x 7 x 7, E] and every class center holds E values, so E = 8192 already makes both 16x the usual.
MAX_EMBEDDING_SIZE = 8192
# Input side: the models are built for 112 px; at 1024 px (84x the pixels) one IResNet-50 image keeps GiBs
# of activations for the backward pass.
MAX_IMAGE_SIZE = 1024
# Paddle's random generator keeps the low 32 bits of a seed: seed 2**32 initialises as seed 0.
SEED_LIMIT = 2**32


class ConfigError(PlscError):
    """A configuration file or override that cannot be used; the message is one line for the user."""


# A config is a few dozen settings, but YAML aliases let a few hundred bytes describe billions of nodes (each
# alias repeats its anchor's whole subtree, and anchors can hold aliases). Files are refused by the size they
# expand to, counted on the parsed node graph before anything is built from it.
MAX_CONFIG_NODES = 10_000

# Values shown in error messages: a few items and characters, however large the value.
_shown = reprlib.Repr()
_shown.maxlist = _shown.maxtuple = _shown.maxdict = 6
_shown.maxstring = _shown.maxother = 60
_shown.maxlevel = 3


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)
    and a document that expands to more than MAX_CONFIG_NODES nodes: ConfigError (without the file name)."""

    def construct_document(self, node):
        _count_expanded_nodes(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep)


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> None:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" then overriding keys is intended
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: PyYAML's own error names it
            continue
        if duplicate:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {_shown.repr(key)} is given twice")
        seen.add(key)


def _count_expanded_nodes(node: yaml.Node, counted: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes in the document with every alias expanded; each distinct node is visited once."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_nodes:
        raise ConfigError(f"line {node.start_mark.line + 1}: an alias refers to a node containing it")
    open_nodes.add(id(node))
    children = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    total = 1
    for child in children:
        total += _count_expanded_nodes(child, counted, open_nodes)
        if total > MAX_CONFIG_NODES:
            raise ConfigError(f"expands to more than {MAX_CONFIG_NODES} values (YAML aliases repeat their "
                              "anchor's whole content); write the settings out")
    open_nodes.discard(id(node))
    counted[id(node)] = total
    return total


def _read_yaml(text: str):
    """The YAML document in ``text`` read by _ConfigLoader; yaml.YAMLError or ConfigError when unusable."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise ConfigError("nested too deeply") from None


@dataclass
class DataConfig:
    source: typing.Literal["folder", "rec", "synthetic"] = "folder"
    root: str = "data/tiny"
    label_file: str = "label.txt"
    rec_file: str = "train.rec"  # for source=rec, relative to root; the .idx sits beside it
    val_bins: list[str] = field(default_factory=lambda: ["data/tiny/lfw_disjoint_100.bin"])
    num_classes: int = 0  # 0: read from the labels
    # > 0: the training set's image count, as arcface_torch's configs state it (cfg.num_image): `plsc plan`
    # uses it when the data is not at hand, and training stops in one line when the data holds another
    # count (a wrong data.root). 0: counted from the data.
    num_images: int = 0
    image_size: int = 112  # images are resized to this square size when it differs from the files
    num_workers: int = 2
    skip_bad_samples: bool = False  # True: skip and count unreadable samples instead of stopping
    synthetic_samples: int = 1024  # for source=synthetic


@dataclass
class ModelConfig:
    name: str = "iresnet50"
    embedding_size: int = 512
    width: float = 1.0  # multiplier on every stage's channel count; tests use tiny models
    data_format: typing.Literal["NCHW", "NHWC"] = "NCHW"
    dropout: float = 0.0
    # ViT models only. Fraction of each image's patches a training step hides from the transformer blocks
    # (a learned mask token takes their place before the feature head); none in evaluation. None: the
    # model's arcface_torch value (0.1 for every size).
    patch_mask_ratio: float | None = None
    # ViT models only. Stochastic-depth rate of the last block (rising linearly from 0 at the first), in
    # training. None: the model's arcface_torch value (0.1; vit_l 0.05).
    drop_path: float | None = None


@dataclass
class LossConfig:
    margins: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])  # (m1, m2, m3): ArcFace
    # Margins [1, 0, 0] leave the logits unchanged: a plain softmax, refused unless asked for here.
    plain_softmax: bool = False
    scale: float = 64.0
    # > 0: inter-class filtering (arcface_torch's interclass_filtering_threshold, the PartialFC paper): a
    # non-target cosine above this counts as 0 before the margin and gets no gradient, so that an identity
    # present under two labels does not push its own centers apart. 0: off (arcface_torch's default).
    interclass_filtering_threshold: float = 0.0
    sample_ratio: float = 1.0  # PartialFC: fraction of each rank's class centers used per step
    momentum_mode: typing.Literal["lazy", "dense"] = "lazy"
    center_dtype: typing.Literal["float32", "float16"] = "float32"  # storage dtype of class centers
    # Storage of their momentum velocity: "same" as the centers, or int8 codes with a float32 scale per row
    # (1 byte per element instead of 2 or 4: plsc.loss.int8_rows).
    velocity_dtype: typing.Literal["same", "float32", "float16", "int8"] = "same"
    chunk_size: int = 0  # sampled centers per chunk of the streaming head; 0: the whole-matrix head
    # Initial centers N(0, std^2), drawn per (train.seed, class) whatever the sharding. 0: std 0.01
    # (arcface_torch). N > 0: PLSC v2.2's std, sqrt(2 / (embedding_size + ceil(classes / N))), that of a run
    # on N ranks (it counts one rank's classes: dynamic/classifiers/lsc.py:53,66).
    center_init_ranks: int = 0


@dataclass
class OptimConfig:
    # The backbone's optimizer (plsc.engine.optimizer builds it). sgd: Paddle's Momentum, weight_decay as L2
    # added to the gradient; adamw: Paddle's AdamW with `betas` and `eps`, weight_decay decoupled (each step
    # multiplies the weights by 1 - lr * weight_decay), as torch.optim.AdamW that arcface_torch's ViT
    # configs use (train_v2.py:130-132). Either applies weight decay to every backbone parameter
    # (arcface_torch: train_v2.py:121-123,130-132 pass one group, norms and biases included).
    name: typing.Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    # > 0: optim.lr is the rate for a global batch of this size, and a run trains at
    # lr * global_batch / lr_reference_batch (PLSC v2.2's linear scaling rule, with 512); 0: lr as it is.
    lr_reference_batch: int = 0
    momentum: float = 0.9  # sgd's, and the class centers' under either optimizer
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only (torch's defaults)
    eps: float = 1e-8  # adamw only (torch's default)
    # The class centers are always stepped by sparse momentum SGD (plsc.loss.rows), at
    # optim.momentum, also under adamw (arcface_torch's AdamW steps them too: docs/design.md, "Training
    # semantics"). center_lr > 0: their base rate, following the schedule's warmup and decay like the
    # backbone's (scaled by lr_reference_batch alike); 0: the backbone's rate itself. center_weight_decay:
    # their L2 decay; null: optim.weight_decay. Under adamw both must be given.
    center_lr: float = 0.0
    center_weight_decay: float | None = None
    # Linear warmup from 0, in optimizer steps, or in epochs of this run (arcface_torch's warmup_epoch:
    # train_v2.py:137 makes it steps per epoch times the epochs); at most one of the two.
    warmup_steps: int = 0
    warmup_epochs: int = 0
    schedule: typing.Literal["step", "poly"] = "step"
    decay_unit: typing.Literal["epoch", "step"] = "epoch"
    decay_boundaries: list[int] = field(default_factory=lambda: [10, 16, 22])
    decay_factor: float = 0.1
    # schedule poly: lr * (1 - progress)^poly_power after the warmup. arcface_torch's PolynomialLRWarmup
    # has power 1.0 (lr_scheduler.py:7; train_v2.py passes none); its PolyScheduler before April 2023, 2.
    poly_power: float = 1.0
    # > 0: the backbone's gradient is multiplied by min(clip_norm / (norm + 1e-6), clip_max_factor), norm
    # being its global norm (after the all-reduce, unscaling and grad_divisor); the class centers are never
    # clipped. PLSC v2.2 dynamic: 2.0 and 2.0 (dynamic/utils/parallel_grad_scaler.py:21-62, so a small
    # gradient is amplified up to 2x); arcface_torch: clip_grad_norm_ at 5 on the backbone (factor at most 1).
    clip_norm: float = 0.0  # 0: no clipping
    clip_max_factor: float = 1.0
    # Every gradient (backbone and class centers) is divided by this before clipping and the update. PLSC
    # v2.2 divides each rank's loss, already the global batch's mean, by its rank count (dynamic:
    # parallel_grad_scaler.py:86-88; static: fleet's 1/nranks loss-gradient scale), then sums the backbone's
    # gradients over ranks: its run of N ranks trained on (1/N) d(loss). 1: the gradient of the loss itself.
    grad_divisor: float = 1.0


@dataclass
class TrainConfig:
    batch_size: int = 128  # per rank, as in PLSC
    # Gradient accumulation (arcface_torch's gradient_acc): the optimizer steps once per this many batches
    # of batch_size, as one step of a batch this many times larger (with batch statistics frozen: BatchNorm
    # normalises each micro-batch by its own). Steps, epochs, the schedule and logs count optimizer steps.
    grad_accum: int = 1
    epochs: int = 25
    max_steps: int = 0  # > 0 stops after this many steps, whatever epochs says
    seed: int = 42
    log_interval: int = 100
    eval_interval: int = 2000  # 0: verify at the end of training only
    save_interval: int = 0  # 0: save at the end of every epoch only
    keep_checkpoints: int = 1
    mode: typing.Literal["dynamic", "static"] = "dynamic"
    precision: typing.Literal["fp32", "fp16", "amp"] = "fp32"
    fp16_master_weights: bool = True  # precision fp16 on a GPU: float32 copies of the backbone's weights
    # Under loss scaling, the class centers' gradient is divided by the loss scale before their update.
    # false: it keeps the scale, as in PLSC v2.2's FP16 runs (dynamic: parallel_grad_scaler.py:148-157
    # checks it for inf but unscales only the backbone's; static: optimization_pass.py amp_pass takes it out
    # of check_finite_and_unscale).
    unscale_center_grads: bool = True
    eval_batch_size: int = 64
    # Dynamic loss scaling, active for precision fp16 and amp (PLSC v2.2's values).
    loss_scale_init: float = 27648.0
    loss_scale_growth_interval: int = 2000  # good steps before the scale grows
    loss_scale_growth_factor: float = 2.0
    loss_scale_backoff_factor: float = 0.5  # after a step with an inf/nan gradient (that step is skipped)
    max_skipped_steps: int = 20  # this many skipped steps in a row end the run as diverged
    # Backbone gradients are summed over ranks in buckets of at most this many MiB, one all-reduce each
    # (PLSC v2.2: 128); fewer, larger messages cost less latency. 0: one all-reduce per parameter.
    allreduce_bucket_mb: int = 128
    # Several nodes (plsc train --nodes): how long the first node waits for the others to join, and the
    # others for it, before the run ends with one line naming the nodes missing (no rank has started yet).
    node_wait_s: float = 120.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, annotation, where: str):
    """Convert a YAML value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {_shown.repr(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_shown.repr(value)}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        # None first, so a wrong value is reported against the real type ("expected a number").
        for option in sorted(typing.get_args(annotation), key=lambda option: option is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    if annotation is type(None):  # the None of an optional setting: YAML null
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {_shown.repr(value)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_shown.repr(value)}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {_shown.repr(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads 5e-4 (no decimal point) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_shown.repr(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown.repr(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _section_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _merge(config: Config, raw: dict, origin: str) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    sections = _section_types(Config)
    for section_name, values in raw.items():
        if section_name not in sections:
            raise ConfigError(f"{origin}: unknown section '{section_name}' (known: {', '.join(sections)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section '{section_name}' must be a mapping")
        section = getattr(config, section_name)
        hints = _section_types(type(section))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"{origin}: unknown key '{section_name}.{key}'")
            setattr(section, key, _coerce(value, hints[key], f"{origin}: {section_name}.{key}"))
    return config


def parse_override(text: str) -> dict:
    """``section.key=value`` -> ``{section: {key: value}}``; the value is read as YAML (0.1, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    path, raw_value = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{text}': the key must be section.key, e.g. train.batch_size")
    try:
        value = _read_yaml(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    except ConfigError as exc:
        raise ConfigError(f"override {_shown.repr(text)}: {exc}") from None
    return {parts[0]: {parts[1]: value}}


def finite_float(text: str) -> float:
    """argparse type of plsc's number flags: a float, but not nan or inf (which pass every ``<``/``>`` check
    unnoticed or overflow an integer conversion later)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def load_config(
    path: str | Path | None = None, overrides: typing.Iterable[str] = (), *, reads_data: bool = True
) -> Config:
    """The file's settings over the defaults, then the overrides (``section.key=value``), validated.

    ``reads_data=False`` is for callers that read no data (a capacity prediction, a look at the settings): a
    ``${PLSC_DATA_ROOT}`` that the environment does not set then stays in the data paths as written.
    """
    config = Config()
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = _read_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        _merge(config, raw, str(path))
    file_data = copy.deepcopy(config.data)
    for text in overrides:
        _merge(config, parse_override(text), f"--set {text}")
    _move_val_bins_with_root(config.data, file_data)
    _expand_data_root(config.data, str(path) if path is not None else "config", reads_data)
    validate(config)
    return config


# The repository's configs/ (beside the plsc package in a source checkout): `--config cpu/mini` finds
# configs/cpu/mini.yaml from any folder. An installed package has none; names then resolve as given.
REPOSITORY_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_candidates(name: str | Path) -> list[Path]:
    """Where ``--config NAME`` may be, in order: NAME, NAME.yaml, and both under the repository's configs/."""
    name = Path(name)
    with_suffix = [name] if name.suffix in (".yaml", ".yml") else [name, Path(f"{name}.yaml")]
    under_repository = [] if name.is_absolute() else [REPOSITORY_CONFIGS / path for path in with_suffix]
    return with_suffix + under_repository


def resolve_config_path(name: str | Path) -> Path:
    """The first of :func:`config_candidates` that is a file; ConfigError listing what was tried."""
    candidates = config_candidates(name)
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"config file not found: {name} (tried {', '.join(map(str, candidates))})")


def _expand_data_root(data: DataConfig, source: str, reads_data: bool) -> None:
    """``${PLSC_DATA_ROOT}`` in data.root and data.val_bins -> the variable's value. Unset, it is an error
    when a path the run reads names it (data.val_bins, and data.root unless the data is synthetic); paths
    nothing reads keep it as written. Runs after the overrides, so ``--set data.root=...`` alone makes the
    variable unnecessary."""
    if not any(DATA_ROOT_REFERENCE in path for path in (data.root, *data.val_bins)):
        return
    value = os.environ.get(DATA_ROOT_VARIABLE)
    if value:
        data.root = data.root.replace(DATA_ROOT_REFERENCE, value)
        data.val_bins = [path.replace(DATA_ROOT_REFERENCE, value) for path in data.val_bins]
        return
    read = [*data.val_bins, *([data.root] if data.source != "synthetic" else [])] if reads_data else []
    if any(DATA_ROOT_REFERENCE in path for path in read):
        raise ConfigError(
            f"{source}: data paths use {DATA_ROOT_REFERENCE}, which is not set: "
            f"export {DATA_ROOT_VARIABLE}=/folder/holding/the/data sets, or --set data.root=..."
        )


def _move_val_bins_with_root(data: DataConfig, before: DataConfig) -> None:
    """A config pointed at other data (``--set data.root=...``) takes the verification files under its
    old root along (``old_root/lfw.bin`` -> ``new_root/lfw.bin``), unless ``data.val_bins`` was set too."""
    if data.root == before.root or data.val_bins != before.val_bins:
        return
    old_root = Path(before.root)
    moved = []
    for path in data.val_bins:
        if Path(path).is_relative_to(old_root):
            path = str(Path(data.root) / Path(path).relative_to(old_root))
        moved.append(path)
    if moved != data.val_bins:
        log.info("data.val_bins follow data.root: %s", ", ".join(moved))
        data.val_bins = moved


def config_from_dict(raw: dict) -> Config:
    config = _merge(Config(), raw, "config")
    validate(config)
    return config


_NEUTRAL_MARGINS = [1.0, 0.0, 0.0]

# (key, check, allowed range as the message says it). Float keys must also be finite (checked first).
_RULES: list[tuple[str, typing.Callable[[typing.Any], bool], str]] = [
    ("data.num_classes", lambda v: v >= 0, ">= 0 (0: read from the labels)"),
    ("data.num_classes", lambda v: v <= MAX_CLASSES, f"<= {MAX_CLASSES}"),
    ("data.num_images", lambda v: v >= 0, ">= 0 (0: counted from the data)"),
    ("data.image_size", lambda v: v >= 1, ">= 1"),
    ("data.image_size", lambda v: v <= MAX_IMAGE_SIZE, f"<= {MAX_IMAGE_SIZE}"),
    ("data.num_workers", lambda v: v >= 0, ">= 0 (0: load in the training process)"),
    # Each worker is a process holding a copy of the batch buffers; more than 512 is a typo, not a setting.
    ("data.num_workers", lambda v: v <= 512, "<= 512"),
    ("data.synthetic_samples", lambda v: v >= 1, ">= 1"),
    ("model.embedding_size", lambda v: v >= 1, ">= 1"),
    ("model.embedding_size", lambda v: v <= MAX_EMBEDDING_SIZE, f"<= {MAX_EMBEDDING_SIZE}"),
    ("model.width", lambda v: v > 0, "> 0"),
    # Parameters grow with width squared: width 8 is an IResNet-50 of ~2 G parameters (8 GiB float32).
    ("model.width", lambda v: v <= 8, "<= 8"),
    ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.patch_mask_ratio", lambda v: v is None or 0 <= v < 1, "in [0, 1) or null (the model's own)"),
    ("model.drop_path", lambda v: v is None or 0 <= v < 1, "in [0, 1) or null (the model's own)"),
    ("loss.scale", lambda v: v > 0, "> 0"),
    ("loss.sample_ratio", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("loss.interclass_filtering_threshold", lambda v: 0 <= v < 1, "in [0, 1) (0: no filtering)"),
    ("loss.chunk_size", lambda v: v >= 0, ">= 0 (0: the whole-matrix head)"),
    ("loss.center_init_ranks", lambda v: v >= 0, ">= 0 (0: std 0.01; N: PLSC v2.2's std on N ranks)"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.lr_reference_batch", lambda v: v >= 0, ">= 0 (0: optim.lr is not scaled by the global batch)"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "[beta1, beta2], each in [0, 1)"),
    ("optim.eps", lambda v: v > 0, "> 0"),
    ("optim.center_lr", lambda v: v >= 0, ">= 0 (0: the backbone's rate)"),
    ("optim.center_weight_decay", lambda v: v is None or v >= 0, ">= 0 or null (optim.weight_decay)"),
    ("optim.decay_boundaries", lambda v: all(b >= 0 for b in v), "a list of numbers >= 0"),
    ("optim.decay_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("optim.poly_power", lambda v: v >= 0, ">= 0"),
    ("optim.clip_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("optim.clip_max_factor", lambda v: v > 0, "> 0 (1: clipping only ever shrinks the gradient)"),
    ("optim.grad_divisor", lambda v: v > 0, "> 0 (1: the loss's own gradient)"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    # Per rank: PLSC v2.2's configs use 64-512; 65536 images of 112 px are 2.3 GiB of uint8 input alone.
    ("train.batch_size", lambda v: v <= 65536, "<= 65536"),
    ("train.grad_accum", lambda v: v >= 1, ">= 1 (1: no accumulation)"),
    ("train.epochs", lambda v: v >= 0, ">= 0"),
    ("train.max_steps", lambda v: v >= 0, ">= 0 (0: train.epochs decides)"),
    ("train.seed", lambda v: v >= 0, ">= 0"),
    ("train.seed", lambda v: v < SEED_LIMIT, f"< {SEED_LIMIT} (Paddle keeps a seed's low 32 bits)"),
    ("train.log_interval", lambda v: v >= 1, ">= 1"),
    ("train.eval_interval", lambda v: v >= 0, ">= 0 (0: verify at the end only)"),
    ("train.save_interval", lambda v: v >= 0, ">= 0 (0: save at the end of every epoch only)"),
    ("train.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("train.node_wait_s", lambda v: v > 0, "> 0"),
    # A day: longer is a node that will never come, not a slow start.
    ("train.node_wait_s", lambda v: v <= 86400, "<= 86400"),
    ("train.eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("train.eval_batch_size", lambda v: v <= 65536, "<= 65536"),
    ("train.loss_scale_init", lambda v: v > 0, "> 0"),
    ("train.loss_scale_growth_interval", lambda v: v >= 1, ">= 1"),
    ("train.loss_scale_growth_factor", lambda v: v >= 1, ">= 1"),
    ("train.loss_scale_backoff_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("train.max_skipped_steps", lambda v: v >= 1, ">= 1"),
    ("train.allreduce_bucket_mb", lambda v: v >= 0, ">= 0 (0: one all-reduce per parameter)"),
]


def validate(config: Config) -> None:
    """Refuse values outside their allowed range: one ConfigError line naming the key and the range."""
    _check_finite(config)
    for key, allowed, text in _RULES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not allowed(value):
            raise ConfigError(f"{key} must be {text}, got {_shown.repr(value)}")
    _check_margins(config.loss)
    _check_optimizer(config.optim)
    if config.loss.velocity_dtype == "int8" and config.model.embedding_size % 2:
        raise ConfigError("loss.velocity_dtype int8 needs an even model.embedding_size (two codes per "
                          f"float16 of storage), got {config.model.embedding_size}")


def _check_optimizer(optim: OptimConfig) -> None:
    if optim.warmup_steps and optim.warmup_epochs:
        raise ConfigError(f"optim.warmup_steps ({optim.warmup_steps}) and optim.warmup_epochs "
                          f"({optim.warmup_epochs}) both set: give the warmup in one unit")
    if optim.name == "adamw" and (optim.center_lr <= 0 or optim.center_weight_decay is None):
        # An AdamW rate (1e-3) or decay (0.1) taken over by the centers' SGD would barely move them or
        # shrink them fast: their settings are asked for rather than inherited.
        raise ConfigError("optim.name adamw steps the backbone only; the class centers keep sparse momentum "
                          "SGD: set optim.center_lr and optim.center_weight_decay (e.g. 0.1 and 5e-4, "
                          "arcface_torch's SGD values)")


def _check_finite(config: Config) -> None:
    """nan and inf would slip through the range checks (``inf > 0``) or fail them with a misleading range."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for key, value in dataclasses.asdict(values).items():
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
                raise ConfigError(f"{section.name}.{key} must be a finite number, got {_shown.repr(value)}")


def _check_margins(loss: LossConfig) -> None:
    """The target logit cos(m1 * theta + m2) - m3 must stay a margin: smaller than cos(theta) for every
    angle the loss meets, and a decreasing function of the angle."""
    if len(loss.margins) != 3:
        raise ConfigError(f"loss.margins must be [m1, m2, m3], got {loss.margins}")
    m1, m2, m3 = loss.margins
    if not m1 > 0:
        raise ConfigError(f"loss.margins: m1 must be > 0, got {m1!r}")
    if not 0 <= m2 < math.pi / 2:
        raise ConfigError(f"loss.margins: m2 must be in [0, pi/2), got {m2!r}")
    if not 0 <= m3 < 1:
        raise ConfigError(f"loss.margins: m3 must be in [0, 1), got {m3!r}")
    neutral = loss.margins == _NEUTRAL_MARGINS
    if neutral and not loss.plain_softmax:
        raise ConfigError(
            "loss.margins [1, 0, 0] add no margin (a plain softmax): set loss.plain_softmax=true if that is "
            "intended, else e.g. [1.0, 0.5, 0.0] (ArcFace) or [1.0, 0.0, 0.35] (CosFace)"
        )
    if loss.plain_softmax and not neutral:
        raise ConfigError(f"loss.plain_softmax=true needs loss.margins [1.0, 0.0, 0.0], got {loss.margins}")


def save_config(config: Config, path: str | Path) -> None:
    # Replaced whole: a resume reads it back, and a file cut short (a full disk) would silently mean defaults.
    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

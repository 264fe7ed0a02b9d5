"""What a run will do, read from its config and its data before it starts: ``plsc plan``, and the first
lines of ``plsc train``'s log.

Every number comes from the code the run uses: steps per epoch from the sampler
(:class:`plsc.data.loader.DistributedShuffleSampler`, ``images // global batch``, the global batch of an
optimizer step: ranks x ``train.batch_size`` x ``train.grad_accum``), the learning rates from
:class:`plsc.engine.schedule.Schedule`, the backbone's trainable parameters and multiply-adds from the built
model (:mod:`plsc.models.cost`). The memory prediction is plsc.capacity's model; it sits a layer above the
trainer, so ``plsc plan`` passes it in and the training log leaves it out.

The plan lists the settings in which the run departs from PLSC v2.2's published runs: :data:`PLSC_V22`
holds PLSC's value of each setting, keyed by plsc's setting name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from plsc.config import DATA_ROOT_REFERENCE, DATA_ROOT_VARIABLE, Config
from plsc.data import build_dataset, count_samples
from plsc.data.loader import DistributedShuffleSampler
from plsc.distributed import require_classes_per_rank
from plsc.engine.optimizer import describe_center_update, describe_optimizer
from plsc.engine.schedule import Schedule, run_steps, step_batch, steps_per_epoch
from plsc.errors import PlscError
from plsc.models.cost import BackboneCost, backbone_cost

log = logging.getLogger("plsc.train")

MIB = 2**20


# --- PLSC v2.2's published runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlscValue:
    """A plsc setting as PLSC v2.2's published runs had it.

    ``value(config, world_size)``: PLSC's value for a run like this one, or None where the setting changes
    nothing in such a run (loss scaling in FP32, the sampled count at ratio 1.0, ...).
    ``source``: where PLSC v2.2 (tag v2.2.0) sets it.
    """

    key: str
    value: Callable[[Config, int], Any]
    source: str


def _dynamic(value):
    return lambda config, world: value if config.train.mode == "dynamic" else None


def _sampled(value):
    return lambda config, world: value if config.loss.sample_ratio < 1 else None


def _scaled(value):
    return lambda config, world: value if config.train.precision != "fp32" else None


PLSC_V22: tuple[PlscValue, ...] = (
    PlscValue("optim.name", lambda config, world: "sgd",
              "dynamic/train.py:138-146, static/static_model.py:105-109: Momentum"),
    PlscValue("optim.lr_reference_batch", lambda config, world: 512,
              "dynamic/train.py:104, static/train.py:101: base_lr = total_batch_size * lr / 512"),
    PlscValue("optim.clip_norm", lambda config, world: 2.0 if config.train.mode == "dynamic" else 0.0,
              "configs/config.py:49 into dynamic/train.py:204; static/train.py clips nothing"),
    PlscValue("optim.clip_max_factor", _dynamic(2.0),
              "configs/config.py:50; dynamic/utils/parallel_grad_scaler.py:52-53"),
    PlscValue("optim.grad_divisor", lambda config, world: float(world),
              "dynamic/utils/parallel_grad_scaler.py:86-88: the loss times 1 / world_size"),
    PlscValue("loss.momentum_mode", _sampled("dense"),
              "dynamic/utils/hybrid_optimizer.py:85-99: sparse_momentum over the whole shard"),
    PlscValue("loss.interclass_filtering_threshold", lambda config, world: 0.0,
              "dynamic/classifiers/lsc.py, forward: margin_cross_entropy over every sampled column"),
    PlscValue("loss.center_init_ranks", lambda config, world: world,
              "configs/config.py:29, dynamic/classifiers/lsc.py:65-71: normal, std sqrt(2 / (emb + local)) "
              "with local = ceil(classes / world_size)"),
    PlscValue("loss.center_dtype", lambda config, world: "float32" if config.train.precision == "fp32"
              else "float16", "dynamic/classifiers/lsc.py:87: float16 when fp16"),
    PlscValue("train.fp16_master_weights", _scaled(False),
              "dynamic/train.py:114-146: float16 parameters, Momentum without multi_precision"),
    PlscValue("train.unscale_center_grads", _scaled(False),
              "dynamic/utils/parallel_grad_scaler.py:148-157, static/utils/optimization_pass.py:89"),
    PlscValue("train.loss_scale_init", _scaled(27648.0), "configs/config.py:32"),
    PlscValue("train.loss_scale_growth_interval", _scaled(2000), "configs/config.py:33"),
    PlscValue("train.loss_scale_growth_factor", _scaled(2.0), "configs/config.py:35"),
    PlscValue("train.loss_scale_backoff_factor", _scaled(0.5), "configs/config.py:36"),
)


class UnknownSetting(KeyError):
    """A setting :data:`PLSC_V22` names that this plsc's config does not have."""


def setting_value(config: Config, key: str):
    """The value of ``section.key`` in ``config``; UnknownSetting when plsc has no such setting."""
    section_name, name = key.split(".")
    section = getattr(config, section_name)
    if name not in {f.name for f in dataclasses.fields(section)}:
        raise UnknownSetting(key)
    return getattr(section, name)


def _same(ours, theirs) -> bool:
    if isinstance(theirs, float) and isinstance(ours, (int, float)) and not isinstance(ours, bool):
        return math.isclose(ours, theirs, rel_tol=1e-9)
    return ours == theirs


@dataclass(frozen=True)
class Departure:
    setting: str
    plsc: Any  # PLSC v2.2's value
    ours: Any  # None when status is "unknown"
    status: str  # "differs", or "unknown": plsc has no such setting
    source: str


def departures(config: Config, world_size: int) -> list[Departure]:
    """The settings of ``config`` that differ from PLSC v2.2's published runs, in :data:`PLSC_V22` order."""
    found = []
    for row in PLSC_V22:
        theirs = row.value(config, world_size)
        if theirs is None:
            continue
        try:
            ours = setting_value(config, row.key)
        except UnknownSetting:
            found.append(Departure(row.key, theirs, None, "unknown", row.source))
            continue
        if not _same(ours, theirs):
            found.append(Departure(row.key, theirs, ours, "differs", row.source))
    return found


# --- the plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPrediction:
    """plsc.capacity's prediction of the busiest rank's peak, handed to :func:`make_plan`."""

    peak_bytes: float
    phase: str  # the phase that peaks
    device: str  # gpu | cpu
    device_memory_bytes: int


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    batch_per_rank: int  # of one micro-batch (train.batch_size)
    grad_accum: int  # micro-batches per optimizer step
    images: int
    images_source: str
    steps_per_epoch: int
    schedule: Schedule
    optimizer: str  # the backbone's, in words
    center_update: str  # the class centers', in words
    momentum_mode: str
    precision: str
    data_format: str
    mode: str
    num_classes: int
    model: str
    image_size: int
    backbone: BackboneCost
    departures: list[Departure]
    memory: MemoryPrediction | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        """Images of one optimizer step over every rank."""
        return self.batch_per_rank * self.world_size * self.grad_accum

    def lr_phases(self) -> list[dict]:
        """The constant-rate phases after the warmup, or for a polynomial decay its start."""
        s = self.schedule
        if s.kind == "step":
            return [{"first_step": step, "lr": lr} for step, lr in s.phases()]
        if s.warmup_steps >= s.total_steps:
            return []
        return [{"first_step": s.warmup_steps, "lr": s.base_lr,
                 "decay": f"poly power {s.poly_power:g} to 0 at step {s.total_steps}"}]

    def decay_steps(self) -> list[int]:
        """Decay boundaries in global steps, PLSC's convention (its log's ``decay_steps``)."""
        return list(self.schedule.decay_steps) if self.schedule.kind == "step" else []

    def to_dict(self) -> dict:
        """The plan as JSON-ready values (the keys ``plsc plan --json`` writes)."""
        memory = self.memory
        return {
            "world_size": self.world_size,
            "batch_per_rank": self.batch_per_rank,
            "grad_accum": self.grad_accum,
            "global_batch": self.global_batch,
            "images": self.images,
            "images_source": self.images_source,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.schedule.total_steps,
            "warmup_steps": self.schedule.warmup_steps,
            "schedule": self.schedule.kind,
            "decay_steps": self.decay_steps(),
            "base_lr": self.schedule.base_lr,
            "lr_phases": self.lr_phases(),
            "optimizer": self.optimizer,
            "center_update": self.center_update,
            "momentum_mode": self.momentum_mode,
            "precision": self.precision,
            "data_format": self.data_format,
            "mode": self.mode,
            "num_classes": self.num_classes,
            "memory_per_gpu_mib": None if memory is None else memory.peak_bytes / MIB,
            "memory_phase": None if memory is None else memory.phase,
            "memory_device": None if memory is None else memory.device,
            "device_memory_mib": None if memory is None else memory.device_memory_bytes / MIB,
            "fits": None if memory is None else memory.peak_bytes <= memory.device_memory_bytes,
            "model": self.model,
            "image_size": self.image_size,
            "backbone_params": self.backbone.parameters,
            "backbone_flops": self.backbone.multiply_adds,
            "departures": [dataclasses.asdict(d) for d in self.departures],
            "notes": list(self.notes),
        }


def make_plan(config: Config, world_size: int, images: int, images_source: str, num_classes: int,
              memory: MemoryPrediction | None = None) -> RunPlan:
    """The plan of ``config`` on ``world_size`` ranks over ``images`` training images (the same numbers the
    trainer computes: its sampler, :func:`run_steps`, :meth:`Schedule.from_config`)."""
    require_classes_per_rank(num_classes, world_size)
    batch, grad_accum = config.train.batch_size, config.train.grad_accum
    batches = DistributedShuffleSampler(images, batch, 0, world_size).batches_per_epoch
    epoch_steps = steps_per_epoch(batches, grad_accum)
    total = run_steps(config.train, epoch_steps)
    schedule = Schedule.from_config(config.optim, epoch_steps, total, step_batch(config.train, world_size))
    notes = []
    if config.train.max_steps > 0:
        notes.append(f"train.max_steps {config.train.max_steps} ends the run, not train.epochs")
    return RunPlan(
        world_size=world_size,
        batch_per_rank=batch,
        grad_accum=grad_accum,
        images=images,
        images_source=images_source,
        steps_per_epoch=epoch_steps,
        schedule=schedule,
        optimizer=describe_optimizer(config.optim),
        center_update=describe_center_update(config.optim, config.loss.momentum_mode),
        momentum_mode=config.loss.momentum_mode,
        precision=config.train.precision,
        data_format=config.model.data_format,
        mode=config.train.mode,
        num_classes=num_classes,
        model=config.model.name,
        image_size=config.data.image_size,
        backbone=backbone_cost(config.model, config.data.image_size),
        departures=departures(config, world_size),
        memory=memory,
        notes=notes,
    )


def _global_batch_text(plan: RunPlan) -> str:
    """The optimizer step's global batch and its factors: ranks x batch per rank (x micro-batches)."""
    factors = f"{plan.world_size} x {plan.batch_per_rank}"
    if plan.grad_accum > 1:
        factors += f" x {plan.grad_accum} micro-batches, train.grad_accum"
    return f"{plan.global_batch:,} ({factors})"


def _lr_text(plan: RunPlan) -> str:
    phases = []
    for phase in plan.lr_phases():
        decay = f", {phase['decay']}" if "decay" in phase else ""
        phases.append(f"{phase['lr']:g} from step {phase['first_step']:,}{decay}")
    return "; ".join(phases) or "- (the warmup lasts the whole run)"


def _memory_text(memory: MemoryPrediction | None) -> str:
    if memory is None:
        return "not predicted here (plsc plan predicts it)"
    fits = "fits" if memory.peak_bytes <= memory.device_memory_bytes else "does NOT fit"
    device = f"{memory.device_memory_bytes / MIB:,.0f} MiB per {memory.device}"
    return f"{memory.peak_bytes / MIB:,.0f} MiB at {memory.phase} ({fits} {device})"


def plan_rows(plan: RunPlan) -> list[tuple[str, str]]:
    """The plan as (item, value) rows of text."""
    s = plan.schedule
    flops = f"{plan.backbone.multiply_adds / 1e9:.3g} G multiply-adds per {plan.image_size} px image"
    rows = [
        ("world size", f"{plan.world_size}"),
        ("global batch", _global_batch_text(plan)),
        ("images", f"{plan.images:,} ({plan.images_source})"),
        ("steps per epoch", f"{plan.steps_per_epoch:,} (images // global batch)"),
        ("total steps", f"{s.total_steps:,}"),
        ("warmup steps", f"{s.warmup_steps:,}"),
        ("decay steps", ", ".join(f"{step:,}" for step in plan.decay_steps()) or "-"),
        ("base lr", f"{s.base_lr:g}"),
        ("lr phases", _lr_text(plan)),
        ("optimizer", plan.optimizer),
        ("class-center update", plan.center_update),
        ("precision / layout / mode", f"{plan.precision} / {plan.data_format} / {plan.mode}"),
        ("classes", f"{plan.num_classes:,}"),
        ("memory per device", _memory_text(plan.memory)),
        ("backbone", f"{plan.model}: {plan.backbone.parameters:,} trainable parameters, {flops}"),
    ]
    rows += [("note", note) for note in plan.notes]
    return rows


def departure_rows(plan: RunPlan) -> list[tuple[str, str, str, str]]:
    """(setting, PLSC v2.2, plsc, where PLSC sets it) for every departure."""
    return [(d.setting, f"{d.plsc}", "unknown: not a plsc setting" if d.status == "unknown" else f"{d.ours}",
             d.source) for d in plan.departures]


def describe_plan(plan: RunPlan) -> str:
    """The plan as the tables ``plsc plan`` prints."""
    from tabulate import tabulate

    text = tabulate(plan_rows(plan), tablefmt="plain")
    if not plan.departures:
        return text + "\n\nno departures from PLSC v2.2's published runs"
    headers = ["departs from PLSC v2.2", "PLSC v2.2", "plsc", "PLSC source"]
    table = tabulate(departure_rows(plan), headers=headers, tablefmt="simple")
    return f"{text}\n\n{table}"


# The training log's lines: these items of plan_rows() each, the notes, then the departures on one line.
LOG_LINES = (
    ("world size", "global batch", "images", "steps per epoch"),
    ("total steps", "warmup steps", "decay steps", "base lr", "lr phases"),
    ("optimizer", "class-center update", "precision / layout / mode", "classes", "backbone"),
)


def log_plan(config: Config, comm, images: int, num_classes: int) -> None:
    """Rank 0 logs the run's plan in a few lines, departures from PLSC v2.2 included (without the memory
    prediction, which plsc.capacity makes above this layer)."""
    if comm.rank != 0:
        return
    plan = make_plan(config, comm.world_size, images, "the training data", num_classes)
    rows = dict(plan_rows(plan))
    for items in LOG_LINES:
        log.info("plan: %s", "; ".join(f"{item} {rows[item]}" for item in items))
    for note in plan.notes:
        log.info("plan: note: %s", note)
    if plan.departures:
        listed = [f"{setting} {ours} (PLSC {plsc})" for setting, plsc, ours, _ in departure_rows(plan)]
        log.info("plan: departs from PLSC v2.2 (plsc plan names the sources): %s", ", ".join(listed))


# --- the images and classes of a planned run ---------------------------------------------------------------


def planned_data(config: Config, images: int | None) -> tuple[int, str, int]:
    """(images, where the count comes from, classes) of ``config``'s run: ``images`` when given, else
    data.num_images when set, else counted from the data (label file, .rec index); classes from
    data.num_classes, else the labels."""
    data = config.data
    given = "--images"
    if images is None and data.num_images > 0 and data.source != "synthetic":
        images, given = data.num_images, "data.num_images"
    if images is not None and data.num_classes > 0:
        if images < 1:
            raise PlscError(f"--images must be >= 1, got {images}")
        return images, given, data.num_classes
    if DATA_ROOT_REFERENCE in data.root and data.source != "synthetic":
        need = "the images" if images is None else "the classes (data.num_classes is 0)"
        flag = "--images N" if images is None else "--set data.num_classes=N"
        raise PlscError(f"data.root {data.root} names {DATA_ROOT_REFERENCE}, which is not set: to count "
                        f"{need} export {DATA_ROOT_VARIABLE}, or --set data.root=..., or pass {flag}")
    if data.num_classes > 0:
        counted, source = count_samples(data)
        return counted, source, data.num_classes
    dataset = build_dataset(data, seed=config.train.seed)  # the labels decide the class count
    if images is not None:
        return images, given, dataset.num_classes
    return len(dataset), "data set, labels read", dataset.num_classes

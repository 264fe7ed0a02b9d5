"""``plsc capacity --predict``: plsc's memory model, and the largest class count that fits a device.

Per rank, plsc's memory goes through phases; the peak of the busiest one must fit the device:

==============  ==========================================================================================
init            backbone parameters + the class-center shard being built (``PartialFC.__init__``)
forward/back    backbone parameters, gradients, momentum + activations of the rank's batch + class centers
                and their velocity + the sampled rows and their gradients ([sampled, emb], float32) + the
                logits, softmax and their gradients ([global batch, sampled], float32)
center update   the same without activations and logits, plus the rows the momentum step works on
inf/nan check   class centers + the check's own buffers: before every save or verification the trainer
                checks that the centers are finite (plsc.engine.loss_scaler.all_finite): Paddle's
                ``isfinite`` returns one bool per element, so it reads blocks of at most
                ``FINITE_CHECK_BLOCK`` elements
checkpoint      class centers + what writing them costs (streamed block by block: one block, not a copy)
==============  ==========================================================================================

With the streaming head (``loss.chunk_size`` > 0, :mod:`plsc.loss.streaming`), the sampled rows and the
logits exist for one chunk at a time: their terms count [chunk, emb] and [global batch, chunk] buffers, plus
a few bytes per sampled center (its id), and the center update recomputes one chunk's logits too.

plus a fixed overhead (CUDA context and workspaces, or the Python process with Paddle). With ``L`` classes
on a rank (``ceil(C / world)``), ``S = floor(ratio * L)`` sampled, ``G`` the global batch and ``E`` the
embedding size, every term is a count times a known size: ``L * E`` center elements, ``S * E`` and ``G * S``
float32 elements, ``P`` backbone parameters, ``B`` samples.

Where the counts come from (nothing is fitted to a capacity run):

- class-center and head terms: :func:`probe_head` builds plsc's own :class:`~plsc.loss.partial_fc.PartialFC`
  at two small sizes on the CPU and reads Paddle's allocator counters around each phase (init, forward and
  backward, center update, the inf/nan check, writing a checkpoint), so the counts follow the code as it
  changes: e.g. 2 bytes x 2 (weight + velocity) per element in float16 (2 + 1 + 4 / E with int8 velocity,
  ``loss.velocity_dtype``), about 2 float32 [S, E] buffers and 4 [G, S] buffers at the backward peak
  with the composed (CPU) margin softmax; for the streaming head, buffers of one chunk, measured at
  :data:`PROBE_CHUNK` (two shard sizes give the bytes per sampled center);
- on a GPU, the fused ``margin_cross_entropy`` replaces the composed margin softmax (plsc.loss.fast_paths):
  its share of the [G, S] buffers, measured by the probe, is swapped for :data:`FUSED_MARGIN_LOSS_BUFFERS`
  (its softmax, kept for backward, and the gradient it returns);
- backbone: ``P`` counted from the built model; 12 bytes per parameter (float32 weight, gradient and
  momentum; FP16 O2 has float16 weight and gradient plus float32 master weight and momentum, also 12), 16
  with ``optim.name: adamw`` (two float32 moments instead of one velocity);
  activations per sample measured once on the CPU (Paddle's allocator after a training-mode forward of one
  sample, float32, NCHW: the layout changes no tensor's size) and scaled linearly with the batch; times
  :data:`FP16_ACTIVATION_FACTOR` for FP16/AMP on a GPU (an estimate: float16 activations, the CPU has no
  float16 kernels to measure them);
- fixed overhead: :data:`FIXED_OVERHEAD_MIB` per device kind, estimates (pass a measured value when you have
  one: the CPU capacity test measures it with a tiny class count).

The model predicts allocated bytes; allocator fragmentation and caching are not modelled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from plsc.config import Config
from plsc.errors import PlscError
from plsc.loss.sampling import num_sampled

MIB, GIB = 2**20, 2**30
FLOAT32 = 4
CENTER_ITEMSIZE = {"float32": 4, "float16": 2}
BACKBONE_BYTES_PER_PARAMETER = 12  # weight + gradient + momentum (FP16 O2: 2 + 2 + 4 master + 4 momentum)
# optim.name adamw keeps two float32 moments where Momentum keeps one velocity (plsc.engine.optimizer).
ADAMW_EXTRA_BYTES_PER_PARAMETER = FLOAT32
FUSED_MARGIN_LOSS_BUFFERS = 2.0  # Paddle's margin_cross_entropy: softmax kept for backward + its gradient
FP16_ACTIVATION_FACTOR = 0.5  # estimate: FP16/AMP activations on a GPU, relative to the float32 measurement
FIXED_OVERHEAD_MIB = {
    # CUDA context, cuBLAS/cuDNN workspaces and Paddle's own buffers on one GPU: an estimate.
    "gpu": 1024,
    # A `plsc train` process (Python, Paddle, plsc, a tiny model, 1000 classes): 350-485 MiB VmHWM with
    # Paddle 3.3.1 (about 300 with 2.6.2). Most of the spread is the library pages it maps (RssFile: 205-330
    # MiB for the same files), which depend on how the page cache holds them; the CPU capacity tier
    # (repro/capacity) measures the overhead on its machine.
    "cpu": 480,
}
DEVICES = tuple(FIXED_OVERHEAD_MIB)

# Probe sizes: whole initialisation blocks (plsc.loss.partial_fc.INIT_BLOCK) so that only the slope between
# the two sizes is used and per-block scratch cancels out.
PROBE_EMBEDDING = 64
PROBE_ROWS = (16 * 4096, 32 * 4096)
PROBE_RATIO = 0.25
PROBE_BATCHES = (32, 256)
PROBE_CHUNK = 512  # sampled centers per chunk when the streaming head is probed


# --- what the probes measure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadProfile:
    """PartialFC's memory per unit, measured from plsc's code (:func:`probe_head`).

    ``*_per_element``: bytes per class-center element (``L * E`` of them); ``*_rows``: float32 buffers of
    [sampled, emb]; ``*_logits``: float32 buffers of [global batch, sampled].
    """

    init_device_per_element: float  # Paddle allocations while the shard is built (peak)
    init_host_per_element: float  # numpy staging on the host while it is built (peak)
    storage_per_element: float  # weight + velocity
    save_copies_per_element: float  # state_dict()'s copies (host memory; the device's too when it is the CPU)
    step_rows: float  # at the forward/backward peak
    step_logits: float  # at the forward/backward peak, with the composed margin softmax
    margin_loss_logits: float  # the composed margin softmax's share of step_logits
    update_rows: float  # at the center update's peak (the sampled rows and their gradient included)
    # The trainer's inf/nan check of the centers before a save or verification (peak, per element).
    check_per_element: float = 0.0
    # The streaming head: rows and logits above count [chunk, emb] and [G, chunk] buffers instead.
    chunked: bool = False
    sampled_bytes: float = 0.0  # bytes per sampled center besides the chunk's buffers (its id)
    update_logits: float = 0.0  # [G, chunk] buffers at the center update's peak (it recomputes them)

    def logits_on(self, device: str) -> float:
        """[G, S] buffers at the backward peak with the margin softmax plsc uses on ``device``."""
        if device == "gpu" and not self.chunked:  # the streaming head never uses the fused kernel
            return self.step_logits - self.margin_loss_logits + FUSED_MARGIN_LOSS_BUFFERS
        return self.step_logits


@dataclass(frozen=True)
class BackboneProfile:
    name: str
    image_size: int
    parameters: int
    activation_bytes_per_sample: float  # float32, retained by a training-mode forward for the backward


# --- the model ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What the model needs to know about a run (see :func:`setting_from_config`)."""

    world_size: int
    batch_per_rank: int
    embedding_size: int
    sample_ratio: float
    center_dtype: str
    precision: str  # fp32 | fp16 | amp
    device: str  # gpu | cpu
    device_memory_bytes: int
    fixed_overhead_bytes: int
    chunk_size: int = 0  # loss.chunk_size: 0, the whole-matrix head
    velocity_dtype: str = "same"  # loss.velocity_dtype
    optimizer: str = "sgd"  # optim.name: the backbone's optimizer state

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world_size

    def local_classes(self, num_classes: int) -> int:
        """Classes on the busiest rank (plsc.distributed.shard_classes gives the first ranks one more)."""
        return -(-num_classes // self.world_size)


@dataclass(frozen=True)
class MemoryModel:
    setting: Setting
    head: HeadProfile
    backbone: BackboneProfile

    def sampled(self, num_classes: int) -> int:
        local = self.setting.local_classes(num_classes)
        return num_sampled(local, self.setting.sample_ratio)

    def sizes(self, num_classes: int) -> tuple[int, int, int]:
        """On the busiest rank: (class-center elements, bytes of one float32 [sampled, emb], bytes of one
        float32 [global batch, sampled]); with the streaming head, ``chunk`` in place of ``sampled``."""
        s = self.setting
        if self.head.chunked != (s.chunk_size > 0):
            raise ValueError("the head profile and the setting disagree on the streaming head")
        transient = self.sampled(num_classes)
        if s.chunk_size:
            transient = min(transient, s.chunk_size)
        return (
            s.local_classes(num_classes) * s.embedding_size,
            transient * s.embedding_size * FLOAT32,
            s.global_batch * transient * FLOAT32,
        )

    def phases(self, num_classes: int) -> dict[str, dict[str, float]]:
        """``{phase: {term: bytes}}`` on the busiest rank's device."""
        s, head = self.setting, self.head
        elements, rows, logits = self.sizes(num_classes)
        fixed = {"fixed overhead": float(s.fixed_overhead_bytes)}
        parameters = self.backbone.parameters
        per_parameter = BACKBONE_BYTES_PER_PARAMETER
        if s.optimizer == "adamw":
            per_parameter += ADAMW_EXTRA_BYTES_PER_PARAMETER
        backbone_state = {"backbone params + grads + optimizer state": float(per_parameter * parameters)}
        centers = {"class centers + velocity": head.storage_per_element * elements}
        init_centers = head.init_device_per_element * elements
        if s.device == "cpu":
            init_centers += head.init_host_per_element * elements
        phases = {
            "init": {
                **fixed,
                "backbone params": float(FLOAT32 * parameters),
                "class centers (building)": init_centers,
            },
            "forward/backward": {
                **fixed,
                **backbone_state,
                "activations": self.activation_bytes(),
                **centers,
                "sampled rows + gradients": head.step_rows * rows,
                "logits/softmax + gradients": head.logits_on(s.device) * logits,
            },
            "center update": {
                **fixed,
                **backbone_state,
                **centers,
                "rows being updated": head.update_rows * rows,
            },
        }
        if head.chunked:
            ids = {"sampled ids": head.sampled_bytes * self.sampled(num_classes)}
            phases["forward/backward"] = {
                **fixed, **backbone_state, "activations": self.activation_bytes(), **centers, **ids,
                "one chunk: rows + gradients": head.step_rows * rows,
                "one chunk: logits/softmax + gradients": head.step_logits * logits,
            }
            phases["center update"] = {
                **fixed, **backbone_state, **centers, **ids,
                "one chunk: rows being updated": head.update_rows * rows,
                "one chunk: logits recomputed": head.update_logits * logits,
            }
        if head.check_per_element:  # on the device that holds the centers, a GPU's too
            from plsc.engine.loss_scaler import FINITE_CHECK_BLOCK  # imports Paddle: only when needed

            phases["inf/nan check"] = {
                **fixed, **backbone_state, **centers,
                "inf/nan check": head.check_per_element * min(elements, FINITE_CHECK_BLOCK),
            }
        if s.device == "cpu":
            copies = {"checkpoint writing": head.save_copies_per_element * elements}
            phases["checkpoint"] = {**fixed, **backbone_state, **centers, **copies}
        return phases

    def activation_bytes(self) -> float:
        factor = (
            FP16_ACTIVATION_FACTOR if self.setting.device == "gpu" and self.setting.precision != "fp32" else 1
        )
        return self.backbone.activation_bytes_per_sample * self.setting.batch_per_rank * factor

    def peak(self, num_classes: int) -> float:
        return max(sum(terms.values()) for terms in self.phases(num_classes).values())

    def binding_phase(self, num_classes: int) -> str:
        phases = self.phases(num_classes)
        return max(phases, key=lambda name: sum(phases[name].values()))

    def host_bytes_per_rank(self, num_classes: int) -> float:
        """On a GPU: host memory per rank for the class centers (numpy staging at init, checkpoint copies)."""
        elements = self.setting.local_classes(num_classes) * self.setting.embedding_size
        return max(self.head.init_host_per_element, self.head.save_copies_per_element) * elements

    def bytes_per_class(self, num_classes: int, step: int = 10_000) -> float:
        """Marginal bytes one more class costs the rank that owns it, at ``num_classes`` (binding phase)."""
        more = num_classes + step * self.setting.world_size
        return (self.peak(more) - self.peak(num_classes)) / step

    def max_classes(self) -> int:
        """The largest class count whose peak fits ``device_memory_bytes`` (0: not one class per rank)."""
        budget, world = self.setting.device_memory_bytes, self.setting.world_size
        if self.peak(world) > budget:
            return 0
        low, high = world, 2 * world
        while self.peak(high) <= budget:
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.peak(middle) <= budget else (low, middle)
        return low


# --- probes ------------------------------------------------------------------------------------------------


def _allocator():
    """Paddle's host allocator counters (private API): (current, peak, reset_peak) callables; reset_peak is
    None where Paddle has none (2.6)."""
    import paddle

    core = getattr(getattr(paddle, "base", None), "core", None) or paddle.fluid.core
    try:
        current, peak = core.host_memory_stat_current_value, core.host_memory_stat_peak_value
    except AttributeError:
        raise PlscError("the memory probes need Paddle's host allocator counters (Paddle >= 2.6)") from None
    reset = getattr(core, "host_memory_stat_reset_peak_value", None)
    counters = (current, peak, reset)
    return tuple(functools.partial(function, "Allocated", 0) if function else None for function in counters)


def has_allocator_counters() -> bool:
    try:
        _allocator()
    except PlscError:
        return False
    return True


@contextlib.contextmanager
def on_cpu():
    """Paddle on the CPU inside the block, whatever the default device: the probes read host counters."""
    import paddle

    previous = paddle.device.get_device()
    paddle.device.set_device("cpu")
    try:
        yield
    finally:
        paddle.device.set_device(previous)


class _PeakMeter:
    """Peak Paddle allocation (and numpy allocation, through tracemalloc) above the level at entry.

    Paddle's peak counter is reset at entry; where it cannot be (Paddle 2.6) a ballast fills the gap between
    the current level and the process's peak so far, held (never written, so never resident) through the
    block: the block's first allocated byte is then a new peak, and the peak's rise is the block's.
    """

    def __enter__(self):
        import paddle

        self._current, self._peak, reset = _allocator()
        self._ballast = None
        if reset is not None:
            reset()
        elif self._peak() > self._current():
            self._ballast = paddle.empty([self._peak() - self._current()], dtype="uint8")
        self._base = self._current()
        self._started_tracing = not tracemalloc.is_tracing()
        if self._started_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._host_base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        self.device = self._peak() - self._base
        self.host = tracemalloc.get_traced_memory()[1] - self._host_base
        if self._started_tracing:
            tracemalloc.stop()
        self.retained = self._current() - self._base
        self._ballast = None
        return False


@functools.cache
def probe_head(
    center_dtype: str, momentum_mode: str, margins: tuple[float, ...], scale: float, chunked: bool = False,
    velocity_dtype: str = "same", interclass_filtering_threshold: float = 0.0, device: str = "cpu",
) -> HeadProfile:
    """Measure :class:`HeadProfile` from plsc's PartialFC (``chunked``: the streaming head) on the CPU
    (a few seconds), running the code it runs on ``device``: for a GPU without the host's fast paths
    (:func:`plsc.loss.row_backend.device_code_paths`). With inter-class filtering on, the margin softmax
    keeps its [G, S] mask (one byte per entry) for the backward: measured with the rest."""
    from plsc.loss.row_backend import device_code_paths

    code_paths = device_code_paths() if device == "gpu" else contextlib.nullcontext()
    with code_paths:
        return _probe_head(center_dtype, momentum_mode, margins, scale, chunked, velocity_dtype,
                           interclass_filtering_threshold)


def _probe_head(center_dtype: str, momentum_mode: str, margins: tuple[float, ...], scale: float,
                chunked: bool, velocity_dtype: str, interclass_filtering_threshold: float) -> HeadProfile:
    import paddle

    from plsc.loss.margin import Margin
    from plsc.loss.partial_fc import build_head

    margin = Margin.from_list(margins, scale, interclass_filtering_threshold)
    emb = PROBE_EMBEDDING

    def build(rows: int):
        with _PeakMeter() as meter:
            head = build_head(PROBE_CHUNK if chunked else 0, num_classes=rows, embedding_size=emb,
                              margin=margin, sample_ratio=PROBE_RATIO, momentum_mode=momentum_mode,
                              center_dtype=center_dtype, velocity_dtype=velocity_dtype, seed=0)
        return head, meter

    if chunked:
        return _probe_streaming_head(build)

    small_rows, large_rows = PROBE_ROWS
    with on_cpu():
        small = build(small_rows)[1]
        head, large = build(large_rows)
        sampled = num_sampled(large_rows, PROBE_RATIO)
        rng = np.random.default_rng(0)
        steps = [_probe_step(head, batch, large_rows, rng) for batch in PROBE_BATCHES]
        logits = (
            _slope([PROBE_BATCHES[0] * sampled, PROBE_BATCHES[1] * sampled], [s[0] for s in steps]) / FLOAT32
        )
        row_bytes = sampled * emb * FLOAT32
        step_rows = (steps[0][0] - logits * FLOAT32 * PROBE_BATCHES[0] * sampled) / row_bytes
        cosine = paddle.to_tensor(rng.uniform(-1, 1, (PROBE_BATCHES[1], sampled)).astype(np.float32))
        cosine.stop_gradient = False
        labels = paddle.to_tensor(rng.integers(0, sampled, PROBE_BATCHES[1]))
        with _PeakMeter() as loss_meter:
            head.margin_loss(cosine, labels, head.margin, head.comm).backward()  # the one plsc trains with
        storage = _storage_profile(small, large, head)
    return HeadProfile(
        **storage,
        step_rows=step_rows,
        step_logits=logits,
        margin_loss_logits=loss_meter.device / cosine.size / FLOAT32,
        update_rows=max(s[1] for s in steps) / row_bytes,
    )


def _storage_profile(small: _PeakMeter, large: _PeakMeter, head) -> dict[str, float]:
    """HeadProfile's per-element storage fields: heads of PROBE_ROWS rows built, the larger one checked and
    saved."""
    small_rows, large_rows = PROBE_ROWS
    elements = (large_rows - small_rows) * PROBE_EMBEDDING
    check, save = _probe_check(head), _probe_save(head)
    return {
        "init_device_per_element": (large.device - small.device) / elements,
        "init_host_per_element": max(0.0, (large.host - small.host) / elements),
        "storage_per_element": (large.retained - small.retained) / elements,
        "save_copies_per_element": (save.device + save.host) / (large_rows * PROBE_EMBEDDING),
        "check_per_element": check.device / (large_rows * PROBE_EMBEDDING),
    }


def _probe_check(head) -> _PeakMeter:
    """What the trainer's inf/nan check of the class centers allocates (it runs before every save and
    verification: plsc.engine.trainer, ``_require_finite_weights``)."""
    from plsc.engine.loss_scaler import all_finite

    with _PeakMeter() as check:
        all_finite(head.float_tensors())
    return check


def _probe_save(head) -> _PeakMeter:
    """What writing the head's shards into a checkpoint allocates (plsc.checkpoint.shards, as checkpoints)."""
    import tempfile
    from pathlib import Path

    from plsc.checkpoint import shards

    with tempfile.TemporaryDirectory() as scratch, _PeakMeter() as save:
        for kind in head.state_kinds():
            shards.write_center_shard(head, Path(scratch) / f"{kind}.npy", kind)
    return save


def _probe_streaming_head(build) -> HeadProfile:
    """The streaming head's profile: at a fixed chunk, the peak's slope over the shard size is the bytes per
    sampled center, its slope over the batch the [G, chunk] buffers, and the rest [chunk, emb] buffers."""
    small_rows, large_rows = PROBE_ROWS
    emb, batch = PROBE_EMBEDDING, PROBE_BATCHES
    rng = np.random.default_rng(0)
    with on_cpu():
        small_head, small = build(small_rows)
        small_step = _probe_step(small_head, batch[0], small_rows, rng)
        del small_head
        head, large = build(large_rows)
        steps = [_probe_step(head, b, large_rows, rng) for b in batch]
        storage = _storage_profile(small, large, head)
    sampled = [num_sampled(rows, PROBE_RATIO) for rows in PROBE_ROWS]
    sampled_bytes = (steps[0][0] - small_step[0]) / (sampled[1] - sampled[0])
    chunk_logit_bytes, chunk_row_bytes = PROBE_CHUNK * FLOAT32, PROBE_CHUNK * emb * FLOAT32

    def logits_and_rows(phase: int) -> tuple[float, float]:
        logits = _slope(list(batch), [s[phase] for s in steps]) / chunk_logit_bytes
        rest = steps[0][phase] - sampled_bytes * sampled[1] - logits * batch[0] * chunk_logit_bytes
        return logits, rest / chunk_row_bytes

    step_logits, step_rows = logits_and_rows(0)
    update_logits, update_rows = logits_and_rows(1)
    return HeadProfile(
        **storage,
        step_rows=step_rows,
        step_logits=step_logits,
        margin_loss_logits=0.0,  # the streaming head walks its own softmax, never the fused kernel
        update_rows=update_rows,
        chunked=True,
        sampled_bytes=sampled_bytes,
        update_logits=update_logits,
    )


def _probe_step(head, batch: int, classes: int, rng) -> tuple[float, float]:
    """(peak bytes of forward + backward, peak bytes of the center update), above the class centers."""
    import paddle

    from plsc.loss.partial_fc import CenterUpdate

    embeddings = paddle.to_tensor(rng.standard_normal((batch, head.embedding_size), dtype=np.float32))
    embeddings.stop_gradient = False
    labels = paddle.to_tensor(rng.integers(0, classes, batch))
    with _PeakMeter() as forward_backward:
        loss, pending = head(embeddings, labels, step=0)
        loss.backward()
    with _PeakMeter() as update:
        head.apply(pending, CenterUpdate(0.1, 0.9, 5e-4))
    return forward_backward.device, update.device + forward_backward.retained


def _slope(xs: list[float], ys: list[float]) -> float:
    return (ys[1] - ys[0]) / (xs[1] - xs[0])


def probe_backbone(model_config, image_size: int) -> BackboneProfile:
    """Parameters of the backbone and the activations a training-mode forward keeps per sample (CPU, NCHW:
    the layout changes no tensor's size)."""
    nchw = dataclasses.replace(model_config, data_format="NCHW")
    return _probe_backbone(tuple(sorted(dataclasses.asdict(nchw).items())), image_size)


@functools.cache
def _probe_backbone(model_fields: tuple, image_size: int) -> BackboneProfile:
    import paddle

    from plsc.config import ModelConfig
    from plsc.models.cost import scratch_backbone, scratch_on_cpu

    nchw = ModelConfig(**dict(model_fields))
    model = scratch_backbone(nchw, image_size)
    with scratch_on_cpu():
        model.train()
        images = paddle.to_tensor(np.zeros((1, 3, image_size, image_size), dtype=np.float32))
        with _PeakMeter() as meter:
            embeddings = model(images)  # held until the meter closes: its graph keeps the activations
        del embeddings
        parameters = sum(int(np.prod(p.shape)) for p in model.parameters())
    return BackboneProfile(nchw.name, image_size, parameters, float(meter.retained))


# --- from a config to a prediction -------------------------------------------------------------------------


def setting_from_config(
    config: Config,
    device_memory_bytes: int,
    world_size: int = 1,
    device: str = "gpu",
    fixed_overhead_bytes: int | None = None,
) -> Setting:
    if device not in DEVICES:
        raise PlscError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if world_size < 1 or device_memory_bytes <= 0:
        raise PlscError("world size and device memory must be positive")
    overhead = FIXED_OVERHEAD_MIB[device] * MIB if fixed_overhead_bytes is None else fixed_overhead_bytes
    return Setting(
        world_size=world_size,
        batch_per_rank=config.train.batch_size,
        embedding_size=config.model.embedding_size,
        sample_ratio=config.loss.sample_ratio,
        center_dtype=config.loss.center_dtype,
        precision=config.train.precision,
        device=device,
        device_memory_bytes=int(device_memory_bytes),
        fixed_overhead_bytes=int(overhead),
        chunk_size=config.loss.chunk_size,
        velocity_dtype=config.loss.velocity_dtype,
        optimizer=config.optim.name,
    )


def memory_model(config: Config, setting: Setting) -> MemoryModel:
    """The model of ``config``'s runs, its head and backbone profiles probed on this machine's CPU."""
    head = probe_head(
        config.loss.center_dtype, config.loss.momentum_mode, tuple(config.loss.margins), config.loss.scale,
        chunked=config.loss.chunk_size > 0, velocity_dtype=config.loss.velocity_dtype,
        interclass_filtering_threshold=config.loss.interclass_filtering_threshold, device=setting.device,
    )
    backbone = probe_backbone(config.model, config.data.image_size)
    return MemoryModel(setting, head, backbone)


@dataclass(frozen=True)
class Prediction:
    setting: Setting
    max_classes: int
    max_classes_per_rank: int
    binding_phase: str
    bytes_per_class: float
    peak_bytes: float
    host_bytes_per_rank: float
    phases: dict[str, dict[str, float]]
    head: HeadProfile
    backbone: BackboneProfile
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def predict(model: MemoryModel) -> Prediction:
    classes = model.max_classes()
    setting = model.setting
    notes = [f"fixed overhead {setting.fixed_overhead_bytes / MIB:.0f} MiB"]
    if setting.chunk_size:
        notes.append(f"streaming head: {setting.chunk_size} sampled centers per chunk")
    if setting.velocity_dtype == "int8":
        notes.append("velocity in int8 with a float32 scale per row")
    if setting.device == "gpu":
        if not setting.chunk_size:
            notes.append(
                f"fused margin_cross_entropy: {FUSED_MARGIN_LOSS_BUFFERS:g} [global batch, sampled] buffers"
            )
        notes.append(
            "head buffer counts measured with Paddle's CPU kernels; GPU kernels may allocate otherwise"
        )
        if setting.precision != "fp32":
            notes.append(f"activations x {FP16_ACTIVATION_FACTOR:g} for {setting.precision} (estimate)")
    return Prediction(
        setting=setting,
        max_classes=classes,
        max_classes_per_rank=setting.local_classes(classes),
        binding_phase=model.binding_phase(classes),
        bytes_per_class=model.bytes_per_class(classes),
        peak_bytes=model.peak(classes),
        host_bytes_per_rank=model.host_bytes_per_rank(classes) if setting.device == "gpu" else 0.0,
        phases=model.phases(classes),
        head=model.head,
        backbone=model.backbone,
        assumptions=notes,
    )


def describe(prediction: Prediction) -> str:
    """The prediction as text: the answer, then the binding phase's terms per rank."""
    s = prediction.setting
    lines = [
        f"max classes: {prediction.max_classes:,} ({prediction.max_classes_per_rank:,} per rank) on "
        f"{s.world_size} x {s.device} with {s.device_memory_bytes / MIB:,.0f} MiB each",
        f"bytes per class: {prediction.bytes_per_class:,.0f} (on the rank that owns it; binding phase: "
        f"{prediction.binding_phase})",
        f"per rank at the maximum, phase {prediction.binding_phase}:",
    ]
    for term, value in prediction.phases[prediction.binding_phase].items():
        lines.append(f"  {term:<36} {value / MIB:>12,.1f} MiB")
    lines.append(f"  {'total':<36} {prediction.peak_bytes / MIB:>12,.1f} MiB")
    if prediction.host_bytes_per_rank:
        lines.append(
            f"host memory per rank for the class centers: {prediction.host_bytes_per_rank / GIB:,.1f} GiB"
        )
    lines += [f"assumption: {note}" for note in prediction.assumptions]
    return "\n".join(lines)

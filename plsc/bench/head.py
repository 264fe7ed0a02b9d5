"""``plsc bench head``: the classifier head's step against the bare matmul floor, on one rank.

What one timed step is (all on this process, CPU):

- sample: the sampled class ids of this step (numpy) and their tensors;
- gather: those rows of the class centers, as the float32 leaf that collects their gradient;
- forward: normalisation, cosine logits, margin softmax cross entropy;
- backward: ``loss.backward()`` down to the embeddings and the sampled rows;
- update: the class-center momentum step (``PartialFC.apply``).

With ``chunk_size`` > 0 the head's streaming strategy (plsc.loss.streaming) runs instead: it gathers each
chunk's rows inside its walks (the gather phase is then empty), and the floor's [k, emb] rows are gathered
outside the timed step. The update is committed to before the backward (``update_in_backward``), as the
training step does without loss scaling: the streaming head then applies it inside the backward walk (the
update phase is then nearly empty); with loss scaling it walks the chunks once more in ``apply()``, two
matmuls per chunk more (``update_in_backward=False``).

The floor is the three matmuls any such head must do, timed in the same process on the same shapes right after
each step: ``logits = E Ws^T`` [B, k], ``dE = dL Ws`` [B, emb] and ``dWs = dL^T E`` [k, emb].

``world_size n`` simulates rank 0 of n ranks: it owns ``C / n`` classes (``shard_classes``), samples
``floor(ratio * C / n)`` of them, and sees the global batch of ``n * batch`` embeddings (``batch`` is per
rank, as PLSC's ``batch_size``), whose labels are uniform over all C classes. Its collectives are identities:
the communication itself is not timed.

Timing and memory figures come from fresh subprocesses (``python -m plsc.bench.head``), so that the thread
count is set before Paddle is imported and each peak-RSS figure (VmHWM) belongs to one head alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from plsc import strict_json
from plsc.malloc import MALLOC_SETTINGS

PRECISIONS = {"fp32": "float32", "fp16": "float16"}
PHASES = ("sample", "gather", "forward", "backward", "update")
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
RSS_STEPS = 2  # steps a peak-RSS probe runs after initialisation: the step's own buffers count too
# glibc malloc settings of the measuring process (GLIBC_TUNABLES, read at process start; see plsc.malloc).
# "hugepages" is what the plsc command runs with; "default" is glibc's own (4 KiB pages); "keep" serves large
# blocks from the heap and never returns freed memory, so pages fault only once (fastest, more peak RSS).
MALLOC_TUNABLES = {
    "hugepages": MALLOC_SETTINGS,
    "default": None,
    "keep": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000000",
}


@dataclass(frozen=True)
class HeadBenchSpec:
    classes: int
    ratio: float
    batch: int
    emb: int
    world_size: int = 1
    precision: str = "fp32"
    steps: int = 10
    warmup: int = 2
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    momentum_mode: str = "lazy"
    seed: int = 0
    malloc: str = "hugepages"  # a key of MALLOC_TUNABLES
    chunk_size: int = 0  # > 0: the streaming head (loss.chunk_size)
    velocity_dtype: str = "same"  # loss.velocity_dtype: "same" as the centers, or int8
    update_in_backward: bool = True  # False: as with loss scaling (the update after the backward)

    @property
    def global_batch(self) -> int:
        return self.batch * self.world_size

    def with_classes(self, classes: int) -> HeadBenchSpec:
        return HeadBenchSpec(**{**asdict(self), "classes": classes})


# --- in the measuring subprocess ---------------------------------------------------------------------------


def simulated_rank(world_size: int):
    """Rank 0 of ``world_size`` ranks whose collectives are identities (see the module docstring)."""
    from plsc.distributed import LocalComm

    class SimulatedRank(LocalComm):
        rank = 0

    comm = SimulatedRank()
    comm.world_size = world_size
    return comm


def build_head(spec: HeadBenchSpec):
    from plsc.loss.margin import ARCFACE
    from plsc.loss.partial_fc import build_head as build_partial_fc

    return build_partial_fc(
        spec.chunk_size, num_classes=spec.classes, embedding_size=spec.emb, margin=ARCFACE,
        sample_ratio=spec.ratio, momentum_mode=spec.momentum_mode, center_dtype=PRECISIONS[spec.precision],
        velocity_dtype=spec.velocity_dtype, seed=spec.seed, comm=simulated_rank(spec.world_size),
    )


def state_bytes(head) -> int:
    """Exact bytes of the class-center state: numel x element size of the weight and the velocity (int8
    velocity: its codes and per-row scales)."""
    return sum(int(t.numel()) * t.element_size() for t in head.state_tensors())


def make_batch(spec: HeadBenchSpec, rng: np.random.Generator):
    """The global batch the simulated rank sees: embeddings that need a gradient, labels over all classes."""
    import paddle

    embeddings = rng.standard_normal((spec.global_batch, spec.emb), dtype=np.float32)
    labels = rng.integers(0, spec.classes, spec.global_batch)
    return paddle.to_tensor(embeddings, stop_gradient=False), paddle.to_tensor(labels)


class PhaseClock:
    """Wall and CPU seconds between successive marks; Paddle's CPU ops are synchronous, so a mark after an op
    means the op is done."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._last = (time.perf_counter(), time.process_time())

    def mark(self, phase: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[phase] = self.wall.get(phase, 0.0) + now[0] - self._last[0]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + now[1] - self._last[1]
        self._last = now


def timed_gather(head, clock: PhaseClock):
    """``head.strategy.prepare`` that first marks the end of the sample phase: ``head.prepare`` samples, then
    hands the step to its strategy, which gathers what the loss reads."""
    prepare = head.strategy.prepare

    def mark_and_prepare(owner, pending):
        clock.mark("sample")
        prepare(owner, pending)

    return mark_and_prepare


def head_step(head, embeddings, labels, step: int, clock: PhaseClock, update_in_backward: bool = True):
    """One whole step of the head, phase by phase; returns the sampled rows, or with the streaming head
    their index (for the floor's shapes)."""
    from plsc.loss.partial_fc import CenterUpdate

    head.strategy.prepare = timed_gather(head, clock)
    try:
        update = CenterUpdate(LR, MOMENTUM, WEIGHT_DECAY)
        pending = head.prepare(labels, step, update if update_in_backward else None)
    finally:  # unwrapped again: wrappers piling up across steps would mark old clocks
        del head.strategy.prepare
    clock.mark("gather")
    loss = head.loss(head.comm.all_gather_with_grad(embeddings), pending)
    clock.mark("forward")
    loss.backward()
    clock.mark("backward")
    head.apply(pending, update)
    clock.mark("update")
    return pending.index if pending.rows is None else pending.rows


def matmul_floor(embeddings, rows, grad_logits) -> tuple[float, float]:
    """Wall and CPU seconds of the three matmuls of a head step: logits, dE and dWs."""
    import paddle

    clock = PhaseClock()
    paddle.matmul(embeddings, rows, transpose_y=True)
    paddle.matmul(grad_logits, rows)
    paddle.matmul(grad_logits, embeddings, transpose_x=True)
    clock.mark("floor")
    return clock.wall["floor"], clock.cpu["floor"]


def allocator_bytes() -> int | None:
    """Paddle's CPU allocator counter (private API, present in 2.6 and 3.x); None where it is missing."""
    import paddle

    try:
        return int(paddle.base.core.host_memory_stat_current_value("Allocated", 0))
    except AttributeError:
        return None


def measure_time(spec: HeadBenchSpec) -> dict:
    """Build the head, then time ``warmup + steps`` steps, each followed by the floor on its shapes."""
    import paddle

    from plsc.loss.rows import gather_rows

    before = allocator_bytes()
    head = build_head(spec)
    after = allocator_bytes()
    rng = np.random.default_rng(spec.seed)
    steps, floors = [], []
    for step in range(spec.warmup + spec.steps):
        embeddings, labels = make_batch(spec, rng)
        clock = PhaseClock()
        rows = head_step(head, embeddings, labels, step, clock, spec.update_in_backward)
        if rows.ndim == 1:  # the streaming head's sampled ids: the floor still multiplies whole matrices
            rows = gather_rows(head.weight, rows)
        grad_logits = paddle.randn([spec.global_batch, rows.shape[0]])
        floor = matmul_floor(embeddings.detach(), rows.detach(), grad_logits)
        if step >= spec.warmup:
            steps.append(clock)
            floors.append(floor)
    return summarise_time(spec, head, steps, floors, rows.shape[0], before, after)


def median(values) -> float:
    return float(np.median(np.asarray(list(values), dtype=np.float64)))


def summarise_time(spec, head, steps, floors, sampled, allocated_before, allocated_after) -> dict:
    import paddle

    step_s = [sum(clock.wall.values()) for clock in steps]
    floor_s = [wall for wall, _ in floors]
    local = head.shard.count
    allocated = None if allocated_before is None else (allocated_after - allocated_before) / local
    return {
        "step_s": median(step_s),
        "floor_s": median(floor_s),
        "ratio": median(step_s) / median(floor_s),
        # Each step over the floor run right after it: steadier than the ratio of medians on a shared machine.
        "ratio_paired": median(step / floor for step, floor in zip(step_s, floor_s, strict=True)),
        "phases": {phase: median(clock.wall[phase] for clock in steps) for phase in PHASES},
        "step_cpu_s": median(sum(clock.cpu.values()) for clock in steps),
        "floor_cpu_s": median(cpu for _, cpu in floors),
        "phases_cpu": {phase: median(clock.cpu[phase] for clock in steps) for phase in PHASES},
        "step_s_all": step_s,
        "floor_s_all": floor_s,
        "bytes_per_class": state_bytes(head) / local,
        "bytes_per_class_method": "numel x element_size of PartialFC.state_tensors(), / local classes",
        "allocator_bytes_per_class": allocated,
        "local_classes": local,
        "sampled": int(sampled),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "paddle_version": paddle.__version__,
    }


def vm_status() -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def measure_rss(spec: HeadBenchSpec) -> dict:
    """Peak RSS of a process that builds the head and runs RSS_STEPS steps (nothing else allocated)."""
    head = build_head(spec)
    after_init = vm_status()
    rng = np.random.default_rng(spec.seed)
    for step in range(RSS_STEPS):
        embeddings, labels = make_batch(spec, rng)
        head_step(head, embeddings, labels, step, PhaseClock(), spec.update_in_backward)
    return {"classes": spec.classes, "local_classes": head.shard.count, "vmhwm_bytes": vm_status()["VmHWM"],
            "vmhwm_after_init_bytes": after_init["VmHWM"]}


# --- in the calling process (no Paddle import) ------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """How to start a measuring process: the interpreter, extra environment, and the entry module (one
    whose ``main`` is this module's)."""

    python: str = sys.executable
    env: tuple[tuple[str, str], ...] = ()
    entry: str = "plsc.bench.head"


def run_measurement(kind: str, spec: HeadBenchSpec, runner: Runner = Runner()) -> dict:
    """``measure_time`` or ``measure_rss`` in a fresh process with ``spec.threads`` threads."""
    child_env = {**os.environ, **dict(runner.env), "OMP_NUM_THREADS": str(spec.threads)}
    child_env.pop("GLIBC_TUNABLES", None)  # this process's own (the plsc command sets one) must not leak
    if MALLOC_TUNABLES[spec.malloc]:
        child_env["GLIBC_TUNABLES"] = MALLOC_TUNABLES[spec.malloc]
    command = [runner.python, "-m", runner.entry, kind, strict_json.dumps(asdict(spec))]
    proc = subprocess.run(command, env=child_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_slope(points: list[dict]) -> float:
    """Peak-RSS bytes per local class: the slope between the two probes (fixed costs cancel)."""
    low, high = sorted(points, key=lambda p: p["local_classes"])
    return (high["vmhwm_bytes"] - low["vmhwm_bytes"]) / (high["local_classes"] - low["local_classes"])


def bench_head(
    spec: HeadBenchSpec, rss_classes: tuple[int, int] | None = None, runner: Runner = Runner()
) -> dict:
    """The whole benchmark: peak-RSS probes first (one head in memory at a time), then the timed run."""
    result: dict = {"shape": shape_of(spec), "threads": spec.threads}
    result.update(steps=spec.steps, warmup=spec.warmup)
    if rss_classes:
        points = [run_measurement("rss", spec.with_classes(c), runner) for c in rss_classes]
        result["rss_points"] = points
        result["rss_bytes_per_class"] = rss_slope(points)
        result["rss_method"] = "slope of VmHWM between fresh processes at two class counts (init + steps)"
    else:
        result["rss_bytes_per_class"] = None
    result["load_average_before"] = os.getloadavg()
    result.update(run_measurement("time", spec, runner))
    result["load_average_after"] = os.getloadavg()
    result["shape"].update(local_classes=result["local_classes"], sampled=result["sampled"])
    result["numpy_version"] = np.__version__
    result["python"] = sys.version.split()[0]
    return result


def shape_of(spec: HeadBenchSpec) -> dict:
    return {"classes": spec.classes, "ratio": spec.ratio, "batch_per_rank": spec.batch,
            "global_batch": spec.global_batch, "emb": spec.emb, "world_size": spec.world_size,
            "precision": spec.precision, "momentum_mode": spec.momentum_mode, "malloc": spec.malloc,
            "chunk_size": spec.chunk_size, "update_in_backward": spec.update_in_backward,
            "velocity_dtype": spec.velocity_dtype}


def table(result: dict) -> str:
    from tabulate import tabulate

    shape = result["shape"]
    rows = [
        ["shape", f"C={shape['classes']:,} (local {shape['local_classes']:,}), k={shape['sampled']:,}, "
                  f"B={shape['global_batch']}, emb={shape['emb']}, {shape['precision']}, "
                  f"n={shape['world_size']}, velocity {shape.get('velocity_dtype', 'same')}, "
                  f"chunk {shape.get('chunk_size') or 'none (whole matrix)'}"],
        ["step (median)", f"{result['step_s']:.4f} s"],
        ["floor: 3 matmuls", f"{result['floor_s']:.4f} s"],
        ["step / floor", f"{result['ratio']:.2f} (paired {result['ratio_paired']:.2f})"],
        *[[f"  {phase}", f"{seconds:.4f} s"] for phase, seconds in result["phases"].items()],
        ["state bytes / class", f"{result['bytes_per_class']:,.0f}"],
        ["peak RSS bytes / class", "-" if result["rss_bytes_per_class"] is None
         else f"{result['rss_bytes_per_class']:,.0f}"],
        ["threads, malloc, paddle", f"{result['threads']}, {shape['malloc']}, {result['paddle_version']}"],
    ]
    return tabulate(rows, tablefmt="simple")


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m plsc.bench.head {time,rss} SPEC_JSON``; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m plsc.bench.head")
    parser.add_argument("kind", choices=["time", "rss"])
    parser.add_argument("spec", help="HeadBenchSpec as JSON")
    args = parser.parse_args(argv)
    import plsc  # noqa: F401  (sets OMP_NUM_THREADS before Paddle is imported, should it be unset)

    spec = HeadBenchSpec(**json.loads(args.spec))
    measure = measure_time if args.kind == "time" else measure_rss
    print(strict_json.dumps(measure(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

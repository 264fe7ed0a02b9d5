"""``plsc bench train``: steady-state images/s of the real Trainer, and where each step's time goes.

The measuring process builds ``plsc.engine.trainer.Trainer`` from the config (validation sets dropped: nothing
is evaluated, nothing checkpointed) and calls its step (``trainer.step``) on batches from its own loader, as
``Trainer._train_epoch`` does. Each step is cut into four phases by marks placed from outside, on the
trainer's instance (``trainer.py`` is not changed; its methods run unmodified in between):

- data: waiting for the loader's next batch (``next(loader)``), plus the learning-rate lookup;
- backbone: the backbone's forward (``trainer.step.backbone``) and its share of ``loss.backward()``: from the
  moment the embeddings' gradient arrives (a gradient hook on them) to the gradient all-reduce;
- head: ``PartialFC.prepare`` (labels, sampling, gathering centers), the margin-softmax loss
  (``trainer.step.head_loss``), the backward from the loss down to the embeddings, and ``PartialFC.apply``;
- optimizer: gradient all-reduce, inf/nan check, clipping, the backbone's momentum step, loss-scale update.

The marks are consecutive, so the four phases add up to the step's wall time. The loader is rebuilt by the
same function (``build_train_loader_from_config``) over the data set repeated as often as the timed steps
need, so no epoch boundary (worker start-up) falls inside the measurement.

The measurement runs in a fresh process (``python -m plsc.bench.train SPEC_JSON``) whose OMP_NUM_THREADS is
set before Paddle is imported.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from plsc.bench.head import PhaseClock
from plsc.errors import PlscError

PHASES = ("data", "backbone", "head", "optimizer")
OUTSIDE = ("data", "optimizer")  # the share of a step spent outside backbone and head
PHASE_METHOD = {
    "data": "waiting on next(loader) (+ the learning-rate lookup)",
    "backbone": "trainer.step.backbone forward + loss.backward() from the embeddings' gradient hook to "
                "the backbone gradients' all-reduce",
    "head": "PartialFC.prepare + trainer.step.head_loss + loss.backward() until the embeddings' gradient "
            "arrives + PartialFC.apply",
    "optimizer": "gradient all-reduce, inf/nan check, clip factor, optimizer.step, clear_grad, loss-scale "
                 "update",
}


@dataclass(frozen=True)
class TrainBenchSpec:
    config: str
    overrides: tuple[str, ...] = ()
    steps: int = 20
    warmup: int = 3
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def load_bench_config(spec: TrainBenchSpec):
    """The run's config, validation sets dropped (the benchmark never evaluates)."""
    from plsc.config import load_config

    if spec.steps < 1 or spec.warmup < 0 or spec.threads < 1:
        raise PlscError(f"--steps and --threads must be >= 1 and --warmup >= 0, got "
                        f"{spec.steps}, {spec.threads} and {spec.warmup}")
    config = load_config(spec.config, spec.overrides)
    config.data.val_bins = []
    return config


# --- in the measuring process ------------------------------------------------------------------------------


class StepPhaseTimer:
    """Marks ``clock`` at the phase boundaries of ``trainer.step`` (see the module doc) through wrappers
    set on the trainer's instance; the wrapped callables run unchanged."""

    def __init__(self, trainer):
        self.clock = PhaseClock()
        self.hooks_fired = 0
        self._wrap_backbone(trainer)
        self._wrap_head(trainer)
        self._wrap_grad_all_reduce(trainer)

    def start_step(self) -> PhaseClock:
        self.clock = PhaseClock()
        return self.clock

    def _wrap_backbone(self, trainer) -> None:
        backbone = trainer.step.backbone

        def timed_backbone(images):
            embeddings = backbone(images)
            self.clock.mark("backbone")
            if not embeddings.stop_gradient:
                embeddings.register_hook(self._embedding_grad_arrived)
            return embeddings

        trainer.step.backbone = timed_backbone

    def _embedding_grad_arrived(self, grad) -> None:
        # Backward has gone from the loss through the head down to the embeddings: the backbone's part begins.
        self.hooks_fired += 1
        self.clock.mark("head")

    def _wrap_head(self, trainer) -> None:
        head, head_loss = trainer.head, trainer.step.head_loss
        prepare, apply = head.prepare, head.apply

        def timed_prepare(*args):
            result = prepare(*args)
            self.clock.mark("head")
            return result

        def timed_loss(*args):
            loss = head_loss(*args)
            self.clock.mark("head")
            return loss

        def timed_apply(*args):
            self.clock.mark("optimizer")
            apply(*args)
            self.clock.mark("head")

        head.prepare, head.apply, trainer.step.head_loss = timed_prepare, timed_apply, timed_loss

    def _wrap_grad_all_reduce(self, trainer) -> None:
        comm = trainer.step.comm
        all_reduce = comm.all_reduce_sum_coalesced_

        def timed_all_reduce(*args):
            self.clock.mark("backbone")  # loss.backward() has returned
            return all_reduce(*args)

        comm.all_reduce_sum_coalesced_ = timed_all_reduce


def build_trainer(config, output: str):
    """The Trainer of ``config``; ``output`` is a scratch folder (the benchmark saves nothing there)."""
    from plsc.engine.trainer import Trainer

    return Trainer(config, output)


def repeat_loader(trainer, steps: int) -> None:
    """Replace the trainer's loader by the same loader over the data set repeated to hold ``steps``
    optimizer steps' batches in one epoch (no worker start-up between epochs inside the measurement)."""
    from plsc.bench.data import RepeatedDataset, repeats_needed
    from plsc.data.loader import build_train_loader_from_config

    global_batch = trainer.config.train.batch_size * trainer.comm.world_size
    batches = steps * trainer.config.train.grad_accum
    repeated = RepeatedDataset(trainer.dataset, repeats_needed(len(trainer.dataset), batches, global_batch))
    trainer.loader, trainer.sampler = build_train_loader_from_config(
        trainer.config, repeated, trainer.rank, trainer.comm.world_size
    )


def run_steps(trainer, steps: int, timer: StepPhaseTimer | None = None) -> tuple[list[float], list]:
    """``steps`` calls of ``trainer.step`` as ``Trainer._train_epoch`` makes them, from the current
    epoch's start; returns (losses, one PhaseClock per step, or [] without a timer)."""
    from plsc.engine.trainer import step_batches

    trainer.sampler.set_epoch(trainer.state.epoch)
    batches = step_batches(iter(trainer.loader), trainer.config.train.grad_accum)
    losses, clocks = [], []
    for _ in range(steps):
        clock = timer.start_step() if timer else PhaseClock()
        lr = trainer.schedule.lr(trainer.state.step)
        images, labels = next(batches)
        clock.mark("data")
        losses.append(trainer.step(images, labels, trainer.state.step, lr))
        trainer.state.step += 1
        clock.mark("optimizer")
        clocks.append(clock)
    return losses, clocks if timer else []


def summarise(clocks: list, batch: int) -> dict:
    totals = {phase: sum(clock.wall.get(phase, 0.0) for clock in clocks) for phase in PHASES}
    step_s = [sum(clock.wall.values()) for clock in clocks]
    elapsed = sum(step_s)
    return {
        "images_per_s": batch * len(clocks) / elapsed,
        "step_s": float(np.median(step_s)),
        "step_s_all": step_s,
        "phases_s": {phase: total / len(clocks) for phase, total in totals.items()},
        "phase_shares": {phase: total / elapsed for phase, total in totals.items()},
        "outside_share": sum(totals[phase] for phase in OUTSIDE) / elapsed,
    }


def measure(spec: TrainBenchSpec) -> dict:
    import paddle

    from plsc.engine.schedule import step_batch

    config = load_bench_config(spec)
    with tempfile.TemporaryDirectory(prefix="plsc-bench-train-") as output:
        trainer = build_trainer(config, output)
        repeat_loader(trainer, spec.warmup + spec.steps)
        timer = StepPhaseTimer(trainer)
        losses, clocks = run_steps(trainer, spec.warmup + spec.steps, timer)
    result = summarise(clocks[spec.warmup:], step_batch(config.train, trainer.comm.world_size))
    result.update(
        losses=losses,
        gradient_hook_fired_steps=timer.hooks_fired,
        dataset_images=len(trainer.dataset),
        compiled=trainer.compiled,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
        paddle_version=paddle.__version__,
    )
    return result


# --- the whole benchmark (calling process) -----------------------------------------------------------------


def setting_of(config) -> dict:
    return {
        "model": config.model.name, "width": config.model.width,
        "embedding_size": config.model.embedding_size, "data_format": config.model.data_format,
        "image_size": config.data.image_size,
        "batch_size": config.train.batch_size, "num_workers": config.data.num_workers,
        "data_source": config.data.source, "data_root": config.data.root,
        "sample_ratio": config.loss.sample_ratio, "mode": config.train.mode,
        "precision": config.train.precision, "center_dtype": config.loss.center_dtype,
    }


def bench_train(spec: TrainBenchSpec) -> dict:
    from plsc.bench import measure_in_fresh_process

    config = load_bench_config(spec)  # a bad config or override fails here, before a process starts
    result = {"config": spec.config, "overrides": list(spec.overrides), "setting": setting_of(config),
              "threads": spec.threads, "steps": spec.steps, "warmup": spec.warmup,
              "load_average_before": os.getloadavg()}
    result.update(measure_in_fresh_process("plsc.bench.train", asdict(spec), spec.threads))
    result["load_average_after"] = os.getloadavg()
    result["method"] = (f"Trainer.step x {spec.steps} after {spec.warmup} untimed, on the trainer's "
                        "own loader over its data set repeated within one epoch; images_per_s = batch x "
                        "steps / summed step wall time; phases marked from wrappers on the trainer instance")
    result["phase_method"] = PHASE_METHOD
    result["python"] = sys.version.split()[0]
    return result


def table(result: dict) -> str:
    from tabulate import tabulate

    setting = result["setting"]
    rows = [
        ["setting", f"{setting['model']} x{setting['width']:g}, {setting['image_size']}px, batch "
                    f"{setting['batch_size']}, {setting['num_workers']} workers, ratio "
                    f"{setting['sample_ratio']:g}, {setting['mode']} {setting['precision']}"],
        ["throughput", f"{result['images_per_s']:,.1f} images/s"],
        ["step (median)", f"{result['step_s']:.4f} s"],
        *[[f"  {phase}", f"{result['phases_s'][phase]:.4f} s ({result['phase_shares'][phase]:.1%})"]
          for phase in PHASES],
        ["outside backbone + head", f"{result['outside_share']:.1%}"],
        ["threads, paddle", f"{result['threads']}, {result['paddle_version']}"],
    ]
    return tabulate(rows, tablefmt="simple")


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``python -m plsc.bench.train SPEC_JSON``; prints one JSON line."""
    from plsc.bench import child_main

    def measure_json(text: str) -> dict:
        raw = json.loads(text)
        return measure(TrainBenchSpec(**{**raw, "overrides": tuple(raw["overrides"])}))

    return child_main(measure_json, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The per-rank side of the multi-process tests in tests/test_modes.py, run under paddle.distributed.launch.

``python modes_worker.py modes OUT OVERRIDE...``: the same Trainer run in dynamic mode (``OUT/dynamic``) and
  then in static mode (``OUT/static``) in one process group; each writes its ``train_log.jsonl``.
``python modes_worker.py poison RESULTS OUTPUT STEP OVERRIDE...``: a Trainer run in which rank 1 alone finds a
  nan in its class-center gradient at step STEP (1-based); ``RESULTS/rank<r>.json`` records, per rank, the
  loss scale and skip count after every step, and whether that step left class centers and backbone alone.

Nothing here asserts; the test reads the files.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
warnings.filterwarnings("ignore", message="No ccache found")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from plsc.config import load_config  # noqa: E402
from plsc.engine.step import TrainStep  # noqa: E402
from plsc.engine.trainer import Trainer  # noqa: E402


def run_modes(out: str, *overrides: str) -> None:
    for mode in ("dynamic", "static"):
        config = load_config(overrides=[*overrides, f"train.mode={mode}"])
        Trainer(config, Path(out) / mode).run()


def snapshot(trainer: Trainer) -> list[np.ndarray]:
    # Trainable tensors only: BatchNorm's running statistics (parameters too, in Paddle) have seen the batch
    # in the forward pass, as with any skipped step.
    backbone = [p.numpy().copy() for p in trainer.model.parameters() if not p.stop_gradient]
    return [trainer.head.weight.numpy().copy(), trainer.head.velocity.numpy().copy(), *backbone]


def unchanged(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def run_poison(results: str, output: str, poison_step: str, *overrides: str) -> None:
    trainer = Trainer(load_config(overrides=list(overrides)), Path(output))
    poison_step = int(poison_step)
    center_grads, train_step = trainer.head.center_grads, TrainStep.__call__
    steps: list[dict] = []

    def poisoned_center_grads(pending):
        grads = center_grads(pending)
        # Rank 1's own center gradient only: it never crosses ranks, so rank 0 learns of it from the
        # collective overflow decision alone.
        if trainer.rank == 1 and trainer.state.step + 1 == poison_step:
            with paddle.no_grad():
                grads[0].scale_(float("nan"))
        return grads

    def recording_step(step_self, images, labels, step, lr):
        before = snapshot(trainer)
        loss = train_step(step_self, images, labels, step, lr)
        after = snapshot(trainer)
        steps.append({
            "step": trainer.state.step + 1,
            "loss": loss,
            "loss_scale": trainer.scaler.scale,
            "skipped_steps": trainer.skipped_steps,
            "centers_untouched": unchanged(before[:2], after[:2]),
            "backbone_untouched": unchanged(before[2:], after[2:]),
        })
        return loss

    trainer.head.center_grads = poisoned_center_grads
    TrainStep.__call__ = recording_step  # this worker process runs the one trainer
    trainer.run()
    record = {"rank": trainer.rank, "steps": steps, "scaler": trainer.scaler.state_dict()}
    (Path(results) / f"rank{trainer.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"modes": run_modes, "poison": run_poison}[command](*arguments)

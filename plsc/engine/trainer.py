"""The training loop: data-parallel backbone, class-sharded PartialFC head, checkpoints, verification.

One code path for one process and for N: with a single process the collectives in ``comm`` are identities.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paddle

from plsc.config import Config, save_config
from plsc.data import build_dataset, build_train_loader_from_config
from plsc.data.verification_bin import load_bin
from plsc.distributed import (
    make_comm,
    require_classes_per_rank,
    share_statistics_from_rank0,
    verify_across_ranks,
)
from plsc.engine import checkpoint as ckpt
from plsc.engine.schedule import learning_rate
from plsc.errors import PlscError
from plsc.eval.runner import embedder
from plsc.loss.margin import Margin
from plsc.loss.partial_fc import PartialFC
from plsc.models import build_model

log = logging.getLogger("plsc.train")


class TrainingInterrupted(Exception):
    """Raised after a SIGINT/SIGTERM checkpoint was written; carries the signal number."""

    def __init__(self, signum: int, checkpoint_dir: Path):
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {checkpoint_dir}")
        self.signum = signum
        self.checkpoint_dir = checkpoint_dir


@dataclass
class TrainResult:
    steps: int
    last_checkpoint: Path | None
    best: dict[str, dict] = field(default_factory=dict)  # bin stem -> metrics of its best evaluation
    last_eval: dict[str, dict] = field(default_factory=dict)
    wall_time_s: float = 0.0


def build_backbone(config: Config, seed: int):
    """The backbone, with deterministic initial weights and parameter names given the seed."""
    paddle.seed(seed)
    # Fixed names: optimizer state is keyed by parameter name, so a resumed run (or a second model in the same
    # process) must name its parameters exactly as the run that saved them.
    with paddle.utils.unique_name.guard():
        return build_model(config.model, image_size=config.data.image_size)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Trainer:
    def __init__(self, config: Config, output: str | Path, resume: bool | str | Path = False, comm=None):
        self.config = config
        self.output = Path(output)
        self.comm = comm or make_comm()
        self.rank = self.comm.rank
        self.dataset = build_dataset(config.data, seed=config.train.seed)
        self.num_classes = config.data.num_classes or self.dataset.num_classes
        require_classes_per_rank(self.num_classes, self.comm.world_size)
        self.model = build_backbone(config, config.train.seed)
        self.head = PartialFC(
            num_classes=self.num_classes,
            embedding_size=config.model.embedding_size,
            margin=Margin.from_list(config.loss.margins, config.loss.scale),
            sample_ratio=config.loss.sample_ratio,
            momentum_mode=config.loss.momentum_mode,
            center_dtype=config.loss.center_dtype,
            seed=config.train.seed,
            comm=self.comm,
        )
        optim = config.optim
        self.optimizer = paddle.optimizer.Momentum(
            learning_rate=optim.lr,
            momentum=optim.momentum,
            parameters=self.model.parameters(),
            weight_decay=optim.weight_decay or None,
        )
        world = self.comm.world_size
        self.loader, self.sampler = build_train_loader_from_config(config, self.dataset, self.rank, world)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        by_epochs = config.train.epochs * self.steps_per_epoch
        self.total_steps = config.train.max_steps if config.train.max_steps > 0 else by_epochs
        self.val_sets = [load_bin(path, config.data.image_size) for path in config.data.val_bins]
        self.checkpoints = ckpt.CheckpointDir(self.output / "checkpoints", config.train.keep_checkpoints)
        self.state = ckpt.TrainingState()
        self.best: dict[str, dict] = {}
        self._signal: int | None = None
        self._last_eval: dict[str, dict] = {}
        self._last_eval_step = -1
        self._last_checkpoint: Path | None = None
        if resume:
            self._resume(resume)

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _resume(self, resume: bool | str | Path) -> None:
        directory = self.checkpoints.latest() if resume is True else Path(resume)
        if directory is None:
            raise PlscError(f"--resume: no checkpoint under {self.checkpoints.root}")
        manifest = ckpt.read_manifest(directory)
        self.model.set_state_dict(ckpt.load_backbone_state(directory))
        if manifest["num_classes"] != self.num_classes:
            log.warning(
                "checkpoint %s has %d classes, this run %d: reusing the backbone only, class centers start fresh",
                directory,
                manifest["num_classes"],
                self.num_classes,
            )
            return
        weight, velocity = ckpt.read_center_rows(directory, manifest, self.head.shard)
        self.head.set_state(weight, velocity)
        optimizer_state = ckpt.load_optimizer_state(directory)
        if optimizer_state is not None:
            self.optimizer.set_state_dict(optimizer_state)
        self.state = ckpt.TrainingState(manifest["step"], manifest["epoch"], manifest["step_in_epoch"])
        self.best = manifest.get("best", {})
        log.info("resumed from %s at step %d (epoch %d)", directory, self.state.step, self.state.epoch)

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        return ckpt.save_checkpoint(
            directory,
            comm=self.comm,
            state=self.state,
            config=self.config.to_dict(),
            model=self.model,
            optimizer=self.optimizer,
            head=self.head,
            extra={"best": self.best, **(extra or {})},
        )

    def save_step_checkpoint(self) -> Path:
        path = self.save(self.checkpoints.path_for(self.state.step))
        if self.rank == 0:
            self.checkpoints.mark_latest(self.state.step)
            self.checkpoints.prune()
        self.comm.barrier()
        return path

    # --- one step ------------------------------------------------------------------------------------------

    def train_step(self, images: paddle.Tensor, labels: paddle.Tensor, lr: float) -> float:
        self.model.train()
        loss = self.head(self.model(images), labels, self.state.step)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        for p in params:
            # Each rank's backbone gradient covers its own samples of the global-mean loss: sum, not average.
            self.comm.all_reduce_sum_(p.grad)
        factor = self._clip_factor(params)
        if factor != 1.0:
            with paddle.no_grad():
                for p in params:
                    p.grad.scale_(factor)
        self.optimizer.set_lr(lr)
        # The optimizer names its velocity tensors on its first step from the process-wide name counter, and
        # restores saved state by those names: a fresh name scope makes them the same in every run.
        with paddle.utils.unique_name.guard():
            self.optimizer.step()
        self.optimizer.clear_grad()
        optim = self.config.optim
        self.head.step(lr, optim.momentum, optim.weight_decay, grad_scale=factor)
        return float(loss)

    def _clip_factor(self, params) -> float:
        """Clip-by-global-norm over every gradient of the step: backbone and (all ranks') sampled centers."""
        clip = self.config.optim.clip_norm
        if clip <= 0:
            return 1.0
        backbone_sq = paddle.add_n([paddle.square(p.grad.astype("float32")).sum() for p in params])
        # Backbone gradients are identical on every rank after their all-reduce; center gradients are per shard.
        centers_sq = self.comm.all_reduce_sum_(paddle.square(self.head.sampled_grad).sum().reshape([1]))
        total = math.sqrt(backbone_sq.item() + centers_sq.item())
        return min(1.0, clip / (total + 1e-6))

    # --- verification --------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, dict]:
        """Verification of rank 0's model (the one checkpoints hold), the work split across the ranks."""
        share_statistics_from_rank0(self.model, self.comm)
        self.model.eval()
        results = {}
        for vset in self.val_sets:
            results[vset.name] = verify_across_ranks(
                embedder(self.model),
                vset,
                self.config.train.eval_batch_size,
                self.config.model.data_format,
                self.config.model.embedding_size,
                self.comm,
            )
        self.model.train()
        return results

    def _evaluate_and_keep_best(self) -> dict[str, dict]:
        results = self.evaluate()
        self._last_eval, self._last_eval_step = results, self.state.step
        for name, metrics in results.items():
            line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "pairs")
            log.info("step %d verification %s: %s", self.state.step, name, line)
            # Saving is collective: the ranks must agree, whatever rounding a rank's own comparison saw.
            if self.comm.any_true(metrics["accuracy"] > self.best.get(name, {}).get("accuracy", -1.0)):
                self.best[name] = {**metrics, "step": self.state.step}
                self.save(self.output / "best_model" / name, extra={"best_metric": {name: metrics}})
        return results

    # --- the loop ------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def _install_signal_handlers(self) -> dict:
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return previous

    def run(self) -> TrainResult:
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output / "config.yaml")
        started = time.time()
        previous_handlers = self._install_signal_handlers()
        try:
            while self.state.step < self.total_steps:
                self._train_epoch()
                if self.state.step_in_epoch == self.steps_per_epoch:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    if self.config.train.save_interval == 0:
                        self._last_checkpoint = self.save_step_checkpoint()
            if self.val_sets and self._last_eval_step != self.state.step:
                self._evaluate_and_keep_best()
            if self._last_checkpoint is None or self._last_checkpoint.name != str(self.state.step):
                self._last_checkpoint = self.save_step_checkpoint()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        return TrainResult(self.state.step, self._last_checkpoint, self.best, self._last_eval, time.time() - started)

    def _train_epoch(self) -> None:
        """Train from the current position to the end of the epoch or of training, whichever comes first."""
        train = self.config.train
        self.sampler.set_epoch(self.state.epoch, start_batch=self.state.step_in_epoch)
        window = _LogWindow(time.time(), self.state.step)
        for batch_index, (images, labels) in enumerate(self.loader, start=self.state.step_in_epoch):
            lr = learning_rate(self.config.optim, self.state.step, self.steps_per_epoch, self.total_steps)
            window.add(self.train_step(images, labels, lr))
            self.state.step += 1
            self.state.step_in_epoch = batch_index + 1
            step = self.state.step
            if step % train.log_interval == 0 or step == self.total_steps:
                self._log(window, lr)
                window = _LogWindow(time.time(), step)
            if train.eval_interval > 0 and step % train.eval_interval == 0 and self.val_sets:
                self._evaluate_and_keep_best()
                window.exclude_since(time.time())
            if train.save_interval > 0 and step % train.save_interval == 0:
                self._last_checkpoint = self.save_step_checkpoint()
            if self.comm.any_true(self._signal is not None):
                self._stop_on_signal()
            if step >= self.total_steps:
                return

    def _stop_on_signal(self) -> None:
        signum = self._signal or signal.SIGTERM
        path = self.save_step_checkpoint()
        log.warning("signal %d: saved %s; continue with --resume", signum, path)
        raise TrainingInterrupted(signum, path)

    def _log(self, window: _LogWindow, lr: float) -> None:
        elapsed = max(window.elapsed(time.time()), 1e-9)
        steps = self.state.step - window.first_step
        global_batch = self.config.train.batch_size * self.comm.world_size
        ips = steps * global_batch / elapsed
        eta = (self.total_steps - self.state.step) * elapsed / max(steps, 1)
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": window.mean_loss(),
            "lr": lr,
            "ips": ips,
            "eta_s": eta,
            "mem_mb": peak_rss_mb(),
        }
        if self.rank == 0:
            with open(self.output / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info(
                "step %d/%d epoch %d loss %.4f lr %.5f %.1f img/s eta %s mem %.0f MB",
                self.state.step,
                self.total_steps,
                self.state.epoch,
                record["loss"],
                lr,
                ips,
                _format_duration(eta),
                record["mem_mb"],
            )


class _LogWindow:
    """Losses and time since the last log line, with evaluation time taken out of the throughput."""

    def __init__(self, start: float, first_step: int):
        self.start = start
        self.first_step = first_step
        self.losses: list[float] = []
        self.excluded = 0.0
        self._last_step_end = start

    def add(self, loss: float) -> None:
        self.losses.append(loss)
        self._last_step_end = time.time()

    def exclude_since(self, now: float) -> None:
        self.excluded += now - self._last_step_end
        self._last_step_end = now

    def elapsed(self, now: float) -> float:
        return now - self.start - self.excluded

    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

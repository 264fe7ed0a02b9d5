"""The trainer wires a run together: it builds the parts (data, backbone, head, optimizer, the step), resumes
from a checkpoint, and runs the loop (steps, log lines, verification, checkpoints, stop signals). Each part is
a module of its own: the step in :mod:`plsc.engine.step`, its log in :mod:`plsc.engine.train_log`,
verification in :mod:`plsc.engine.verification`, signals in :mod:`plsc.engine.signals`, the output folder's
policy in :mod:`plsc.engine.run_folder`.

One code path for one process and for N: with a single process the collectives in ``comm`` are identities.
One code path for both graph modes (``train.mode``): static mode compiles the same backbone and loss code
with ``paddle.jit.to_static`` (:mod:`plsc.engine.modes` decides what compiles and in which precision);
everything else (sampling, optimizer steps, checkpoints) is shared eager code.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import paddle

from plsc import checkpoint as ckpt
from plsc.checkpoint import plsc22
from plsc.config import Config, save_config
from plsc.data import build_dataset, build_train_loader_from_config
from plsc.data.verification_bin import load_bin, verification_names
from plsc.distributed import make_comm, require_classes_per_rank
from plsc.engine import run_folder, verification
from plsc.engine.curves import CurveWriter
from plsc.engine.loss_scaler import DynamicLossScaler, all_finite
from plsc.engine.modes import (
    backbone_amp_level,
    compile_backbone,
    compile_head_loss,
    is_compiled,
    log_modes,
)
from plsc.engine.optimizer import build_optimizer
from plsc.engine.plan import log_plan
from plsc.engine.schedule import Schedule, run_steps, step_batch, steps_per_epoch
from plsc.engine.signals import StopSignals, TrainingInterrupted
from plsc.engine.step import TrainingDiverged, TrainStep, diverged
from plsc.engine.train_log import LogWindow, TrainLog
from plsc.errors import PlscError, memory_hint
from plsc.loss import fast_paths, int8_rows
from plsc.loss.margin import Margin
from plsc.loss.partial_fc import build_head, center_init_std
from plsc.models import build_model
from plsc.models.layout_check import check_cudnn_nhwc
from plsc.models.precision import restore_optimizer_state
from plsc.parity import agreed

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "build_backbone"]

log = logging.getLogger("plsc.train")


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


def require_data_root(data) -> None:
    """PlscError naming data.root when it is not a folder: checked before the verification files, which
    usually sit under it (a wrong root would otherwise be reported as a missing .bin)."""
    if data.source != "synthetic" and not Path(data.root).is_dir():
        raise PlscError(f"data.root: {data.root} is not a folder (--set data.root=... names the folder "
                        f"holding the training data)")


def require_files(paths: list[str], key: str) -> None:
    """PlscError naming the first of ``paths`` (the config's ``key``) that is not a file."""
    for path in paths:
        if not Path(path).is_file():
            raise PlscError(f"{key}: {path} not found (--set '{key}=[...]' names others, [] none)")


def require_image_count(data, images: int) -> None:
    """PlscError when ``data.num_images`` names another count than the data set holds (a config written for
    one data set, run on another)."""
    if data.source != "synthetic" and data.num_images and data.num_images != images:
        raise PlscError(f"data.num_images is {data.num_images:,} but {data.root} holds {images:,} images "
                        "(--set data.num_images=0 trains on what it holds)")


def require_int8_velocity(comm) -> None:
    """int8 velocity has no other path to fall back on: its start-up check failing on any rank ends the run
    before anything is built, in one line."""
    problem = int8_rows.self_check()
    if comm.any_true(problem is not None):
        reason = problem or "it failed on another rank"
        raise PlscError(f"loss.velocity_dtype int8 does not work on {paddle.get_device()}: {reason}; "
                        "use loss.velocity_dtype same")


def step_batches(batches, count: int):
    """Loader batches ``(images, labels)`` ``count`` at a time (``train.grad_accum``), each group one
    optimizer step's rank batch: the micro-batches one after the other (:class:`plsc.engine.step.TrainStep`
    splits them again). A last incomplete group is left out. ``count`` 1: the batches themselves."""
    return batches if count == 1 else _concatenated_groups(batches, count)


def _concatenated_groups(batches, count: int):
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == count:
            images, labels = zip(*group, strict=True)
            yield paddle.concat(images), paddle.concat(labels)
            group = []


class Trainer:
    """``resume``: True (``<output>``'s latest checkpoint) or a checkpoint folder. ``weights_only``: take the
    checkpoint's weights and step but restart the optimizer (with another class count: the backbone alone,
    from step 0). ``overwrite``: move another run's results in ``output`` aside instead of refusing to start.
    Nothing is written before :meth:`run`."""

    def __init__(self, config: Config, output: str | Path, resume: bool | str | Path = False, comm=None,
                 weights_only: bool = False, overwrite: bool = False):
        self.config = config
        self.output = Path(output)
        self.comm = comm or make_comm()
        self.rank = self.comm.rank
        self.checkpoints = ckpt.CheckpointDir(self.output / "checkpoints", config.train.keep_checkpoints)
        self.curves = CurveWriter(self.output)  # rank 0 writes the log (and VisualDL scalars) through it
        self.overwrite = overwrite
        self._restart = (resume, weights_only)  # checked again under the run folder's lock (run)
        self._resume_from = run_folder.check_output(config, self.output, resume, weights_only, overwrite,
                                                    self.comm.world_size)
        require_data_root(config.data)
        require_files(config.data.val_bins, "data.val_bins")  # before minutes of loading and building
        verification_names(config.data.val_bins, "data.val_bins")  # results and best_model/<name> by name
        self.dataset = build_dataset(config.data, seed=config.train.seed)
        require_image_count(config.data, len(self.dataset))
        self.num_classes = config.data.num_classes or self.dataset.num_classes
        require_classes_per_rank(self.num_classes, self.comm.world_size)
        with memory_hint("building the backbone", "model.width, model.embedding_size or data.image_size"):
            self.model = build_backbone(config, config.train.seed)
        self.optimizer = build_optimizer(config.optim, self.model.parameters())
        self._check_layout()
        self.amp_level = backbone_amp_level(config.train.precision)
        if self.amp_level == "O2":
            self.model, self.optimizer = paddle.amp.decorate(
                self.model, self.optimizer, level="O2", master_weight=config.train.fp16_master_weights,
                save_dtype="float32",
            )
        self.scaler = DynamicLossScaler.from_config(config.train, enabled=config.train.precision != "fp32")
        margin = Margin.from_list(config.loss.margins, config.loss.scale,
                                  config.loss.interclass_filtering_threshold)
        chosen = fast_paths.select_fast_paths(margin, self.num_classes, config.loss.sample_ratio, self.comm,
                                              config.train.seed)
        self.fast_paths = chosen.results
        if config.loss.velocity_dtype == "int8":
            require_int8_velocity(self.comm)
        with memory_hint(f"allocating the centers of {self.num_classes} classes", "the class count "
                         "(data.num_classes, the labels) or model.embedding_size, or train on more ranks"):
            self.head = build_head(
                config.loss.chunk_size,
                num_classes=self.num_classes,
                embedding_size=config.model.embedding_size,
                margin=margin,
                sample_ratio=config.loss.sample_ratio,
                momentum_mode=config.loss.momentum_mode,
                center_dtype=config.loss.center_dtype,
                velocity_dtype=config.loss.velocity_dtype,
                seed=config.train.seed,
                comm=self.comm,
                init_std=center_init_std(config.loss.center_init_ranks, self.num_classes,
                                         config.model.embedding_size),
                **chosen.head_kwargs(),
            )
        # Compiled after the fast paths are chosen: the head's loss is traced with the kernel it will use.
        backbone = compile_backbone(self.model, config.train.mode)
        head_loss = compile_head_loss(self.head, config.train.mode, self.comm,
                                      config.train.batch_size * self.comm.world_size, self.num_classes)
        self.compiled = {"backbone": is_compiled(backbone), "loss": is_compiled(head_loss)}
        log_modes(config, self.compiled, self.amp_level, self.scaler)
        self.step = TrainStep(config, self.model, backbone, self.head, head_loss, self.optimizer, self.scaler,
                              self.comm, self.amp_level, self.checkpoints)
        world = self.comm.world_size
        self.loader, self.sampler = build_train_loader_from_config(config, self.dataset, self.rank, world)
        self.steps_per_epoch = steps_per_epoch(self.sampler.batches_per_epoch, config.train.grad_accum)
        # The loader batches an epoch trains on; the data position (state.step_in_epoch) counts them.
        self.batches_per_epoch = self.steps_per_epoch * config.train.grad_accum
        self.total_steps = run_steps(config.train, self.steps_per_epoch)
        global_batch = step_batch(config.train, world)
        self.schedule = Schedule.from_config(config.optim, self.steps_per_epoch, self.total_steps,
                                             global_batch)
        log_plan(config, self.comm, len(self.dataset), self.num_classes)
        self.train_log = TrainLog(self.curves, self.rank, global_batch, self.total_steps)
        self.val_sets = [load_bin(path, config.data.image_size) for path in config.data.val_bins]
        self.state = ckpt.TrainingState()
        self.best: dict[str, dict] = {}
        self.signals = StopSignals()
        self._last_eval: dict[str, dict] = {}
        self._last_eval_step = -1
        self._last_checkpoint: Path | None = None
        if self._resume_from is not None:
            self._resume(self._resume_from, weights_only)

    # --- modes ---------------------------------------------------------------------------------------------

    def _check_layout(self) -> None:
        """NHWC on a GPU uses cuDNN's channels-last kernels: only after they match NCHW on one batch."""

        def nchw_twin():
            model = dataclasses.replace(self.config.model, data_format="NCHW")
            twin = build_backbone(dataclasses.replace(self.config, model=model), self.config.train.seed)
            twin.set_state_dict(self.model.state_dict())
            return twin

        check = check_cudnn_nhwc(self.model, self.config.model.data_format, nchw_twin,
                                            self.config.data.image_size)
        result = agreed(check, self.comm)
        log.info("fast path %s: %s", result.name, result.status)
        if result.status.startswith(("failed", "disabled")):
            raise PlscError(f"cuDNN NHWC {result.status}; train with model.data_format=NCHW")

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _resume(self, directory: Path, weights_only: bool) -> None:
        if plsc22.is_plsc22_checkpoint(directory):  # with weights_only alone (run_folder.check_output)
            plsc22.load_backbone_into(self.model, directory, self.config.model.name,
                                      self.config.model.embedding_size)
            log.warning("backbone from the PLSC v2.2 checkpoint %s; class centers and momentum start fresh "
                        "at step 0", directory)
            return
        manifest = ckpt.read_manifest(directory)
        world = self.comm.world_size  # check_output compared the settings; the class count is known only now
        conflict = run_folder.resume_conflict(manifest, self.config, world, self.num_classes, weights_only)
        if conflict:
            raise PlscError(f"cannot resume from {directory}: {conflict}")
        optimizer_state = None if weights_only else ckpt.load_optimizer_state(directory)
        if optimizer_state is None and not weights_only:
            raise PlscError(f"{directory / ckpt.OPTIMIZER}: optimizer state not found; --resume-weights-only "
                            "continues without it (momentum restarts from zero)")
        weights = ckpt.load_backbone_into(self.model, directory)
        if manifest["num_classes"] != self.num_classes:  # only with weights_only (resume_conflict)
            run_folder.check_restart(directory, self.output, self.overwrite)
            log.warning("checkpoint %s has %d classes, this run %d: reusing the backbone only, class centers "
                        "start fresh at step 0", directory, manifest["num_classes"], self.num_classes)
            return
        rows = ckpt.read_center_rows(directory, manifest, self.head.shard)
        if weights_only:
            rows = {"weight": rows["weight"]}  # the new head's velocity is zero
            log.warning("--resume-weights-only: optimizer state not restored, momentum (backbone and class "
                        "centers) restarts from zero at step %d", manifest["step"])
        else:
            restore_optimizer_state(self.optimizer, self.model, optimizer_state, weights)
        self.head.set_state(**rows)
        if "loss_scaler" in manifest:
            self.scaler.load_state_dict(manifest["loss_scaler"])
        self.state = ckpt.TrainingState(manifest["step"], manifest["epoch"], manifest["step_in_epoch"])
        # best_model/ of another output is not this run's: its accuracies are not the bar to beat here.
        self.best = manifest.get("best", {}) if run_folder.of_this_run(directory, self.output) else {}
        if directory.resolve() == self.checkpoints.path_for(self.state.step).resolve():
            self._last_checkpoint = directory  # resuming a finished run does not save it again
        log.info("resumed from %s at step %d (epoch %d)", directory, self.state.step, self.state.epoch)

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        self.head.release_scratch()
        return ckpt.save_checkpoint(
            directory,
            comm=self.comm,
            state=self.state,
            config=self.config.to_dict(),
            model=self.model,
            optimizer=self.optimizer,
            head=self.head,
            extra={"best": self.best, "loss_scaler": self.scaler.state_dict(), **(extra or {})},
        )

    def save_step_checkpoint(self) -> Path:
        path = self.save(self.checkpoints.path_for(self.state.step))
        if self.rank == 0:
            self.checkpoints.mark_latest(self.state.step)
            self.checkpoints.prune()
        self.comm.barrier()
        return path

    # --- one step and verification ------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> int:
        return self.step.skipped_steps

    def _require_finite_weights(self) -> None:
        """Before anything is saved or evaluated: the backbone's weights and BatchNorm statistics (which see
        even a skipped step's batch) and this rank's class centers, agreed across ranks."""
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        finite = all_finite(tensors + self.head.float_tensors())
        if self.comm.any_true(not finite):
            raise diverged(self.state.step, "the weights hold inf or nan", self.checkpoints.latest())

    def evaluate(self) -> dict[str, dict]:
        return verification.evaluate(self.model, self.val_sets, self.config, self.comm)

    def _evaluate_and_keep_best(self) -> dict[str, dict]:
        results = self.evaluate()
        self._last_eval, self._last_eval_step = results, self.state.step
        for name in verification.improved(results, self.best, self.state.step, self.comm):
            self.save(self.output / "best_model" / name, extra={"best_metric": {name: results[name]}})
        if self.rank == 0:
            self.curves.evaluation(self.state.step, results)
        return results

    # --- the loop ------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        held = self._take_run_folder()
        try:
            return self._run()
        finally:
            self.curves.close()
            if held is not None:
                held.release()

    def _take_run_folder(self):
        """Rank 0 locks the output folder for the whole run (checked again under the lock), then prepares it;
        a refusal ends every rank."""
        held, problem = None, None
        if self.rank == 0:
            try:
                held = run_folder.lock(self.config, self.output, *self._restart, self.overwrite,
                                       self.comm.world_size, self._resume_from)
                if self.overwrite:
                    run_folder.move_previous_run_aside(self.output)
                save_config(self.config, self.output / "config.yaml")
                run_folder.truncate_log(self.output / "train_log.jsonl", self.state.step)
            except PlscError as exc:
                if held is not None:
                    held.release()
                problem = exc
        if self.comm.any_true(problem is not None):
            raise problem or PlscError(f"rank 0 could not take {self.output} for this run (see its log)")
        return held

    def _run(self) -> TrainResult:
        started = time.time()
        self._run_logged = False  # no step of this run logged yet
        with self.signals.caught():
            while self.state.step < self.total_steps:
                with memory_hint("training", "train.batch_size, data.image_size or loss.sample_ratio"):
                    self._train_epoch()
                if self.state.step_in_epoch == self.batches_per_epoch:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    if self.config.train.save_interval == 0:
                        self._last_checkpoint = self.save_step_checkpoint()
            if self.val_sets and self._last_eval_step != self.state.step:
                self._evaluate_and_keep_best()
            if self._last_checkpoint is None or self._last_checkpoint.name != str(self.state.step):
                self._last_checkpoint = self.save_step_checkpoint()
        elapsed = time.time() - started
        return TrainResult(self.state.step, self._last_checkpoint, self.best, self._last_eval, elapsed)

    def _train_epoch(self) -> None:
        """Train from the current position to the end of the epoch or of training, whichever comes first."""
        train = self.config.train
        self.sampler.set_epoch(self.state.epoch, start_batch=self.state.step_in_epoch)
        window = LogWindow(time.time(), self.state.step)
        remaining = itertools.islice(self.loader, self.batches_per_epoch - self.state.step_in_epoch)
        for images, labels in step_batches(remaining, train.grad_accum):
            lr = self.schedule.lr(self.state.step)
            window.losses.append(self.step(images, labels, self.state.step, lr))
            self.state.step += 1
            self.state.step_in_epoch += train.grad_accum
            step = self.state.step
            stopping = self.comm.any_true(self.signals.received is not None)
            evaluate = train.eval_interval > 0 and step % train.eval_interval == 0 and bool(self.val_sets)
            save = train.save_interval > 0 and step % train.save_interval == 0
            # run() saves at the end
            ends = step >= self.total_steps or self.state.step_in_epoch == self.batches_per_epoch
            if stopping or evaluate or save or ends:  # nothing is saved or verified from non-finite weights
                self._require_finite_weights()
            if step % train.log_interval == 0 or step == self.total_steps:
                self._log(window, lr)
                window = LogWindow(time.time(), step)
            elif not self._run_logged:  # a first line within seconds, not after a whole interval of silence
                self._log(window, lr, to_file=False)
            self._run_logged = True
            if evaluate:
                evaluation_started = time.time()
                self._evaluate_and_keep_best()
                window.excluded += time.time() - evaluation_started
            if save:
                self._last_checkpoint = self.save_step_checkpoint()
            if stopping:
                self._stop_on_signal()
            if step >= self.total_steps:
                return

    def _stop_on_signal(self) -> None:
        signum = self.signals.received or signal.SIGTERM
        path = self._last_checkpoint
        if path is None or path.name != str(self.state.step):  # not already saved at this step
            path = self.save_step_checkpoint()
        log.warning("signal %d: saved %s; continue with --resume", signum, path)
        raise TrainingInterrupted(signum, path)

    def _log(self, window: LogWindow, lr: float, to_file: bool = True) -> None:
        """The console line of the steps since ``window`` began, and (``to_file``) their train_log record."""
        record = self.train_log.record(window, self.state.step, self.state.epoch, lr, self.scaler,
                                       self.skipped_steps)
        self.train_log.write(record, to_file)

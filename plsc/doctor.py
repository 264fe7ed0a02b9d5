"""``plsc doctor``: will this machine train with plsc? Versions, Paddle's own check, fast paths, short runs.

It reports Paddle / CUDA / cuDNN / NCCL versions and the GPUs, then runs, each on its own so that one failure
does not hide the others:

- Paddle's install check (``paddle.utils.run_check``, its output captured into the doctor's folder);
- the parity check of each GPU fast path on one batch (:mod:`plsc.loss.fast_paths`: the fused margin loss,
  the on-device class-center sampler, cuDNN NHWC), the checks training runs at start-up;
- 5 training steps of a tiny synthetic config in a fresh ``plsc train`` process, in dynamic and static mode,
  fp32 and fp16, on one device and on all GPUs (``--nproc N``);
- fp16 end to end on one GPU: training, a verification, and a resumed run that verifies again (the float16
  backbone's checkpoints, verification and resume; tests/test_fp16_o2.py runs the same trainer code on the
  CPU under an emulation of the GPU's fp16 decoration).

Every check ends as pass, FAIL (with what to do), "needs a GPU" (on a machine without one: not a failure) or
skipped. The exit code is 1 when any check failed, else 0. Logs stay in the output folder.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PASS, FAIL, NEEDS_GPU, SKIPPED = "pass", "FAIL", "needs a GPU", "skipped"
STEPS = 5
RESUMED_STEPS = 2  # steps the resumed run of the fp16 end-to-end check adds
TRAIN_TIMEOUT_S = 900
FP16_RESUME = "fp16 train, verify, resume, verify"

# Synthetic data, a 1/16-width IResNet-18 at 32 px: every phase of a real step, in seconds.
TINY_CONFIG = {
    "data": {"source": "synthetic", "synthetic_samples": 256, "num_classes": 64, "image_size": 32,
             "num_workers": 0, "val_bins": []},
    "model": {"name": "iresnet18", "width": 0.0625, "embedding_size": 32},
    "loss": {"sample_ratio": 0.5},
    "train": {"batch_size": 16, "max_steps": STEPS, "log_interval": 1, "eval_interval": 0},
}

ADVICE = {
    "install": "Paddle itself does not work here: install the paddlepaddle-gpu build matching this machine's "
               "CUDA and cuDNN (PyPI's 2.6.2 is built for CUDA 11.8 + cuDNN 8.6), put libcudnn and libcublas "
               "on LD_LIBRARY_PATH, and check the driver with nvidia-smi",
    "fast_path": "training still runs, on the portable path (slower), since plsc runs this check itself at "
                 "start-up; upgrade Paddle / CUDA to get the fused path back",
    "int8_velocity": "train with loss.velocity_dtype same (float velocity, 1 byte more per element): a run "
                     "with int8 velocity stops at start-up on this device with the same message",
    "train": "read the log; a CUDA or cuDNN error points at the Paddle build (see the install check), "
             "'out of memory' at another process on the GPU (nvidia-smi)",
    "static": "train in dynamic mode (train.mode=dynamic, the *_dynamic_* configs) meanwhile",
    "fp16": "train with train.precision=fp32 meanwhile; fast fp16 needs a GPU of compute capability >= 7.0",
    "multi": "the ranks could not work together: run with NCCL_DEBUG=INFO and read the per-rank logs in the "
             "run's log/ folder; on machines without GPU peer-to-peer try NCCL_P2P_DISABLE=1",
}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS, FAIL, NEEDS_GPU or SKIPPED
    detail: str = ""
    advice: str = ""


# ----------------------------------------------------------------------------------------------------
# The machine


def gpu_count() -> int:
    import paddle

    return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0


def environment() -> list[tuple[str, str]]:
    """(what, version or description) rows: Paddle, CUDA, cuDNN, NCCL, each GPU."""
    import paddle

    import plsc

    rows = [("plsc", plsc.__version__), ("Python", sys.version.split()[0]), ("Paddle", paddle.__version__)]
    if not paddle.is_compiled_with_cuda():
        return [*rows, ("CUDA", "not compiled with CUDA (a CPU build)"), ("GPUs", "none")]
    rows += [("CUDA", str(paddle.version.cuda())), ("cuDNN", str(paddle.version.cudnn())),
             ("NCCL", nccl_version())]
    count = gpu_count()
    for index in range(count):
        props = paddle.device.cuda.get_device_properties(index)
        rows.append((f"GPU {index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                     f"compute capability {props.major}.{props.minor}"))
    return rows if count else [*rows, ("GPUs", "none visible (CUDA_VISIBLE_DEVICES? nvidia-smi?)")]


def nccl_version() -> str:
    import paddle

    version = getattr(paddle.version, "nccl", None)
    if callable(version):
        return str(version())
    core = getattr(paddle.base, "core", None) if hasattr(paddle, "base") else None
    number = getattr(core, "nccl_version", None)
    if callable(number):
        value = int(number())  # e.g. 21303 for 2.13.3
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"
    return "unknown (this Paddle does not say)"


# ----------------------------------------------------------------------------------------------------
# Checks


@contextlib.contextmanager
def output_to(path: Path):
    """Python and C++ output (sys.stdout/err and file descriptors 1, 2) into ``path`` while the block runs.

    Both handles append, so their lines interleave instead of overwriting each other.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "ab") as raw, open(path, "a") as text:
            os.dup2(raw.fileno(), 1)
            os.dup2(raw.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def check_install(folder: Path) -> Check:
    import paddle

    log = folder / "run_check.log"
    log.unlink(missing_ok=True)
    try:
        with output_to(log):
            paddle.utils.run_check()
    except Exception as exc:  # run_check raises whatever the broken part raises
        message = str(exc).strip().splitlines()
        return Check("Paddle install check", FAIL, f"{message[0] if message else type(exc).__name__} ({log})",
                     ADVICE["install"])
    lines = [line for line in log.read_text(errors="replace").splitlines() if "works well" in line]
    detail = lines[-1].strip() if lines else "paddle.utils.run_check passed"
    return Check("Paddle install check", PASS, detail)


def check_fast_paths() -> list[Check]:
    """Each fast path's own parity check on one batch, as training runs it at start-up."""
    import paddle

    from plsc.config import load_config
    from plsc.distributed import LocalComm
    from plsc.eval.embedders import snapshot_twin
    from plsc.loss import fast_paths
    from plsc.loss.margin import ARCFACE
    from plsc.models import build_model
    from plsc.models.layout_check import check_cudnn_nhwc

    config = load_config(overrides=["model.name=iresnet18", "model.width=0.0625", "model.embedding_size=32",
                                    "model.data_format=NHWC", "data.image_size=32"])
    with paddle.utils.unique_name.guard():
        model = build_model(config.model, image_size=32)
    results = [
        fast_paths.check_margin_cross_entropy(ARCFACE, LocalComm()),
        fast_paths.check_class_center_sample(1000, 0.1),
        check_cudnn_nhwc(model, "NHWC", lambda: snapshot_twin(model, config.model, 32), 32),
    ]
    on_gpu = fast_paths.on_gpu()
    checks = []
    for result in results:
        name = f"fast path {result.name}"
        if result.enabled:
            checks.append(Check(name, PASS, "parity with the portable path on one batch"))
        elif not on_gpu:
            checks.append(Check(name, NEEDS_GPU, result.status))
        else:
            checks.append(Check(name, FAIL, result.status, ADVICE["fast_path"]))
    return checks


def check_int8_velocity() -> Check:
    """int8 velocity's start-up check (loss.velocity_dtype: int8), on this machine's default device."""
    from plsc.loss import int8_rows

    problem = int8_rows.self_check()
    if problem:
        return Check("int8 velocity", FAIL, problem, ADVICE["int8_velocity"])
    return Check("int8 velocity", PASS, "scatter, gather and block reads equal numpy's quantisation")


@dataclass(frozen=True)
class TrainCase:
    mode: str  # dynamic | static
    precision: str  # fp32 | fp16
    nproc: int

    @property
    def name(self) -> str:
        where = {0: "all GPUs", 1: "1 device"}.get(self.nproc, f"all {self.nproc} GPUs")
        return f"train {STEPS} steps, {where}, {self.mode} {self.precision}"

    @property
    def slug(self) -> str:
        return f"{self.nproc}dev_{self.mode}_{self.precision}"


def train_cases(gpus: int) -> list[tuple[TrainCase, str | None]]:
    """(case, why it cannot run here, or None); nproc 0 stands for "all GPUs" where there are not two."""
    cases = []
    for nproc in (1, gpus if gpus >= 2 else 0):
        for precision in ("fp32", "fp16"):
            for mode in ("dynamic", "static"):
                reason = None
                if (nproc != 1 or precision == "fp16") and gpus == 0:
                    reason = NEEDS_GPU
                elif nproc == 0:
                    reason = "one GPU: the 1-device runs cover it"
                cases.append((TrainCase(mode, precision, nproc), reason))
    return cases


def write_tiny_config(folder: Path) -> Path:
    import yaml

    from plsc.atomic import write_atomic

    path = folder / "tiny.yaml"
    write_atomic(path, yaml.safe_dump(TINY_CONFIG, sort_keys=False))
    return path


def train_command(config: Path, output: Path, case: TrainCase) -> list[str]:
    command = [sys.executable, "-m", "plsc.cli", "train", "--config", str(config), "--output", str(output),
               "--set", f"train.mode={case.mode}", "--set", f"train.precision={case.precision}"]
    if case.precision == "fp16":
        command += ["--set", "model.data_format=NHWC", "--set", "loss.center_dtype=float16"]
    if case.nproc > 1:
        command += ["--nproc", str(case.nproc)]
    return command


def run_train_case(case: TrainCase, config: Path, folder: Path) -> Check:
    output = folder / case.slug
    shutil.rmtree(output, ignore_errors=True)  # a fresh run, not the continuation of an earlier doctor's
    log = folder / f"{case.slug}.log"
    log.unlink(missing_ok=True)
    failed = run_logged(train_command(config, output, case), log, case.name, _train_advice(case))
    return failed or _trained_to(output, STEPS, case.name, _train_advice(case)) or Check(
        case.name, PASS, f"loss {_last_record(output / 'train_log.jsonl')['loss']:.3f} at step {STEPS}")


def run_logged(command: list[str], log: Path, name: str, advice: str) -> Check | None:
    """Run ``command`` with its output appended to ``log``; a FAIL check when it does not exit 0."""
    with open(log, "ab") as f:
        try:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=TRAIN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            return Check(name, FAIL, f"no end after {TRAIN_TIMEOUT_S} s ({log})", advice)
    if code == 0:
        return None
    tail = log.read_text(errors="replace").strip().splitlines()
    return Check(name, FAIL, f"exit {code}: {tail[-1][:160] if tail else 'no output'} ({log})", advice)


def _trained_to(output: Path, steps: int, name: str, advice: str) -> Check | None:
    """A FAIL check unless the run's log ends at ``steps`` with a finite loss."""
    last = _last_record(output / "train_log.jsonl")
    if last is None or last.get("step") != steps or not math.isfinite(last.get("loss", math.nan)):
        return Check(name, FAIL, f"no finite loss at step {steps} in {output / 'train_log.jsonl'}", advice)
    return None


def write_tiny_pairs(folder: Path, image_size: int, pairs: int = 16) -> Path:
    """A verification .bin of random images: verification runs on it; its accuracy means nothing."""
    import cv2
    import numpy as np

    from plsc.data.verification_bin import save_bin

    images = np.random.default_rng(0).integers(0, 256, (2 * pairs, image_size, image_size, 3), dtype=np.uint8)
    path = folder / "tiny_pairs.bin"
    encoded = [cv2.imencode(".jpg", image)[1].tobytes() for image in images]
    save_bin(path, encoded, [index % 2 == 0 for index in range(pairs)])
    return path


def check_fp16_resume(config: Path, folder: Path, case: TrainCase | None = None) -> Check:
    """``case`` (1 device, dynamic fp16) trains STEPS steps and verifies, then ``--resume`` continues it for
    RESUMED_STEPS more and verifies again: what fp16 training does at its first verification and checkpoint,
    and after a restart."""
    case = case or TrainCase("dynamic", "fp16", 1)
    output, log = folder / f"{case.slug}_resume", folder / f"{case.slug}_resume.log"
    advice = _train_advice(case)
    shutil.rmtree(output, ignore_errors=True)
    log.unlink(missing_ok=True)
    pairs = write_tiny_pairs(folder, TINY_CONFIG["data"]["image_size"])
    verifying = ["--set", f"data.val_bins=[{pairs}]"]
    end = STEPS + RESUMED_STEPS
    first = [*train_command(config, output, case), *verifying]
    resumed = [*first, "--resume", "--set", f"train.max_steps={end}"]
    for command, steps in ((first, STEPS), (resumed, end)):
        failed = run_logged(command, log, FP16_RESUME, advice)
        if failed or (failed := _trained_to(output, steps, FP16_RESUME, advice)):
            return failed
    said = log.read_text(errors="replace")
    unverified = [step for step in (STEPS, end) if f"step {step} verification {pairs.stem}:" not in said]
    if unverified:
        return Check(FP16_RESUME, FAIL, f"no verification at step {unverified[0]} ({log})", advice)
    return Check(FP16_RESUME, PASS, f"verified at steps {STEPS} and {end} (resumed at {STEPS}), "
                                    f"loss {_last_record(output / 'train_log.jsonl')['loss']:.3f}")


def _last_record(path: Path) -> dict | None:
    """The last training record of a run's log (evaluation records have no loss)."""
    from plsc.engine.curves import training_records

    records = training_records(path) if path.is_file() else []
    return records[-1] if records else None


def _train_advice(case: TrainCase) -> str:
    parts = [ADVICE["train"]]
    if case.mode == "static":
        parts.append(ADVICE["static"])
    if case.precision == "fp16":
        parts.append(ADVICE["fp16"])
    if case.nproc > 1:
        parts.append(ADVICE["multi"])
    return "; ".join(parts)


def run_checks(folder: Path) -> list[Check]:
    folder.mkdir(parents=True, exist_ok=True)
    checks = [check_install(folder), *check_fast_paths(), check_int8_velocity()]
    config = write_tiny_config(folder)
    for case, reason in train_cases(gpu_count()):
        if reason == NEEDS_GPU:
            checks.append(Check(case.name, NEEDS_GPU))
        elif reason:
            checks.append(Check(case.name, SKIPPED, reason))
        else:
            checks.append(run_train_case(case, config, folder))
    checks.append(check_fp16_resume(config, folder) if gpu_count() else Check(FP16_RESUME, NEEDS_GPU))
    return checks


# ----------------------------------------------------------------------------------------------------
# Report


def report(environment_rows: list[tuple[str, str]], checks: list[Check]) -> str:
    from tabulate import tabulate

    rows = [[check.name, check.status, check.detail, check.advice] for check in checks]
    return "\n\n".join([
        tabulate(environment_rows, tablefmt="simple"),
        tabulate(rows, headers=["check", "result", "detail", "what to do"], tablefmt="simple",
                 maxcolwidths=[None, None, 60, 60]),
    ])


def summary(checks: list[Check]) -> str:
    counts = {status: sum(check.status == status for check in checks) for status in (PASS, FAIL, NEEDS_GPU)}
    line = f"{counts[PASS]} passed, {counts[FAIL]} failed"
    if counts[NEEDS_GPU]:
        line += f", {counts[NEEDS_GPU]} need a GPU (this machine has none)"
    return line


def run_doctor(folder: Path) -> int:
    """Run every check, print the tables and a summary; 1 if any check failed."""
    checks = run_checks(folder)
    print(report(environment(), checks))
    print(f"\n{summary(checks)}; logs in {folder}")
    return 1 if any(check.status == FAIL for check in checks) else 0

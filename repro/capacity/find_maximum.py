"""The largest class count that trains on this machine, by bisection: scripts/find_maximum_classes_*.sh.

PLSC v2.2's capacity measurement (seed README 9.2) on the user's own devices: synthetic data, batch 64 per
device, the config's sample ratio, FP16 class centers, a few steps per trial, each trial a fresh
``plsc train`` (``--nproc N`` on N GPUs), its fate decided by :func:`repro.capacity.trials.run_trial`
(exit 0: fits; the device's out-of-memory error: does not fit). The bracket starts around plsc's
memory-model prediction (``plsc capacity --predict``, in a child process: this one never touches a GPU) and
is bisected.

On a CPU (no GPU visible) the trials run in host memory under a cap on each trial's peak resident memory,
``--memory-cap-mib``, which is required there: a trial fits when it finishes within it, and is stopped once
it passes it (see :mod:`repro.capacity.trials`).

    python -m repro.capacity.find_maximum --mode dynamic [--config C] [--nproc N] [--bisections K] ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from repro.capacity.trials import (
    GPU_CAPACITY_FLAGS,
    Trial,
    TrialError,
    bisect_max_classes,
    run_trial,
)
from repro.plsc_runs import ROOT, last_step_logged, run_environment, train_command

MIB = 2**20
WIDEN = 1.5


def default_config(mode: str) -> Path:
    return ROOT / "configs" / f"ms1mv3_r50_{mode}_fp16_nhwc_r0.1.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="find_maximum_classes", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["dynamic", "static"], required=True, help="train.mode of the trials")
    p.add_argument("--config", default=None,
                   help="config of the trials (default: configs/ms1mv3_r50_<mode>_fp16_nhwc_r0.1.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a further config override for every trial; repeatable")
    p.add_argument("--nproc", type=int, default=None, help="devices per trial (default: every GPU, or 1)")
    p.add_argument("--batch-size", type=int, default=64, help="per device (default 64, as PLSC)")
    p.add_argument("--steps", type=int, default=None, help="training steps per trial (default: 5 on GPU, 1)")
    p.add_argument("--memory-cap-mib", type=float, default=None,
                   help="CPU: the cap on each trial's peak resident memory (RSS) in MiB "
                        "(required without a GPU)")
    p.add_argument("--low", type=int, default=None, help="first guess below the maximum (default: predicted)")
    p.add_argument("--high", type=int, default=None, help="first guess above it (default: predicted)")
    p.add_argument("--bisections", type=int, default=3, help="halvings of the bracket (default 3)")
    p.add_argument("--output", default=None,
                   help="folder of the trial logs and result.json (default: "
                        "output/find_maximum_classes_<mode>)")
    return p.parse_args(argv)


def visible_gpus() -> list[float]:
    """Memory (MiB) of each visible GPU, asked of a child process: this one must hold no device memory."""
    code = ("import json, paddle\n"
            "n = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0\n"
            "print(json.dumps([paddle.device.cuda.get_device_properties(i).total_memory for i in range(n)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_environment())
    if proc.returncode != 0:
        raise SystemExit(f"find_maximum_classes: cannot ask Paddle for the GPUs:\n{proc.stderr[-2000:]}")
    return [size / MIB for size in json.loads(proc.stdout.strip().splitlines()[-1])]


TRIAL_KEYS = ("data.source", "data.synthetic_samples", "data.val_bins", "data.num_workers",
              "train.batch_size",
              "train.max_steps", "train.log_interval", "train.eval_interval", "train.mode", "train.precision",
              "loss.center_dtype")


def trial_overrides(args, nproc: int, on_gpu: bool, steps: int) -> dict[str, object]:
    """PLSC v2.2's capacity runs: synthetic data, batch 64 per device, FP16 centers, no validation."""
    return {
        "data.source": "synthetic",
        "data.synthetic_samples": args.batch_size * nproc * (steps + 1),  # no epoch ends inside a trial
        "data.val_bins": [],
        "data.num_workers": 0,
        "train.batch_size": args.batch_size,
        "train.max_steps": steps,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.mode": args.mode,
        "train.precision": "fp16" if on_gpu else "fp32",  # the CPU has no float16 kernels
        "loss.center_dtype": "float16",
    }


PREDICTION_KEYS = ("train.batch_size", "train.precision", "train.mode", "loss.center_dtype")


def predicted_classes(config: Path, overrides: dict, memory_mib: float, nproc: int, device: str,
                      folder: Path) -> int:
    """``plsc capacity --predict`` for this setting, run in a child process."""
    out = folder / "prediction.json"
    command = [sys.executable, "-m", "plsc.cli", "capacity", "--predict", "--config", str(config),
               "--device-memory-gib", str(memory_mib / 1024), "--world-size", str(nproc), "--device", device,
               "--json", str(out)]
    for key, value in overrides.items():
        if key in PREDICTION_KEYS or key not in TRIAL_KEYS:
            command += ["--set", f"{key}={value}"]
    proc = subprocess.run(command, capture_output=True, text=True, env=run_environment())
    if proc.returncode != 0:
        raise SystemExit(f"find_maximum_classes: the prediction failed:\n{proc.stderr[-2000:]}")
    return int(json.loads(out.read_text())["max_classes"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Path(args.config) if args.config else default_config(args.mode)
    output = Path(args.output or f"output/find_maximum_classes_{args.mode}")
    output.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus()
    on_gpu = bool(gpus)
    if not on_gpu and args.memory_cap_mib is None:
        raise SystemExit("find_maximum_classes: no GPU visible; on the CPU give --memory-cap-mib M "
                         "(each trial's memory cap)")
    nproc = args.nproc or (len(gpus) if on_gpu else 1)
    steps = args.steps or (5 if on_gpu else 1)
    user = dict(setting.split("=", 1) for setting in args.overrides if "=" in setting)
    overrides = {**trial_overrides(args, nproc, on_gpu, steps), **user}
    env = run_environment(**GPU_CAPACITY_FLAGS) if on_gpu else run_environment()
    cap = None if on_gpu else int(args.memory_cap_mib * MIB)
    shm = Path("/dev/shm")  # trial checkpoints in memory: no disk waits
    scratch = Path(tempfile.mkdtemp(prefix="plsc-capacity-", dir=shm if shm.is_dir() else None))

    def trial(classes: int) -> Trial:
        trial_output = scratch / str(classes)
        command = train_command(config, trial_output, {**overrides, "data.num_classes": classes},
                                nproc if nproc > 1 else None)
        done = (lambda: last_step_logged(trial_output, steps)) if on_gpu else None  # noqa: E731
        try:
            result = run_trial(classes, command, output / f"trial-{classes}.log", memory_cap_bytes=cap,
                               env=env, done=done, worker_logs=trial_output / "log")
        finally:
            shutil.rmtree(trial_output, ignore_errors=True)
        print(f"{classes:>12,} classes: {'fits' if result.fits else 'does not fit'} ({result.reason}, "
              f"peak RSS {result.peak_rss_bytes / MIB:,.0f} MiB, {result.seconds:.0f} s)", flush=True)
        return result

    memory_mib = min(gpus) if on_gpu else args.memory_cap_mib
    low, high = args.low, args.high
    if low is None or high is None:
        guess = predicted_classes(config, overrides, memory_mib, nproc, "gpu" if on_gpu else "cpu", output)
        print(f"plsc's memory model predicts {guess:,} classes; bisecting around it", flush=True)
        low, high = low or max(nproc, int(guess * 0.9)), high or int(guess * 1.1) + 1
    try:
        bracket = bisect_max_classes(trial, low, high, args.bisections, widen=WIDEN)
    except TrialError as exc:
        print(f"find_maximum_classes: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "mode": args.mode, "config": str(config), "overrides": args.overrides, "nproc": nproc,
        "device": (f"{nproc} GPU(s) of {memory_mib:,.0f} MiB" if on_gpu
                   else f"CPU, peak RSS cap {memory_mib} MiB"),
        "max_classes": bracket.fits.classes, "fails_at_classes": bracket.fails.classes, "steps": steps,
        "batch_size_per_device": args.batch_size,
        "trials": [{"classes": t.classes, "fits": t.fits, "reason": t.reason,
                    "peak_rss_mib": round(t.peak_rss_bytes / MIB, 1), "seconds": round(t.seconds, 1)}
                   for t in bracket.trials],
    }
    (output / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"largest class count that fits: {bracket.fits.classes:,} ({bracket.fails.classes:,} does not); "
          f"{output / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

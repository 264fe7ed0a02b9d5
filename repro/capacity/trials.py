"""Capacity trials: one training subprocess per class count, and the bisection that brackets the maximum.

A trial fits when its process exits 0; it does not fit when it ran out of memory: on a GPU the device's own
out-of-memory error, on the CPU an address-space limit the OS enforces in the child (``setrlimit``
RLIMIT_DATA, set between fork and exec), so an allocation beyond it is refused and the run fails. Any other
failure is a harness error, not a verdict. Peak RSS (VmHWM) is the kernel's figure for the child, read with
``os.wait4``.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# What Paddle, numpy, the C++ runtime and CUDA say when an allocation is refused.
OUT_OF_MEMORY = (
    "MemoryError",
    "ResourceExhausted",
    "Fail to alloc memory",
    "Out of memory",
    "out of memory",
    "std::bad_alloc",
    "Cannot allocate memory",
    "Unable to allocate",
    # the dynamic loader, when the capped data segment leaves no room for a library Paddle loads late
    # (seen: "libmklml_intel.so: failed to map segment from shared object")
    "failed to map segment from shared object",
)
TRIAL_TIMEOUT_S = 900
# PLSC v2.2's GPU capacity runs: one allocator pool of (nearly) the whole device.
GPU_CAPACITY_FLAGS = {
    "FLAGS_allocator_strategy": "naive_best_fit",
    "FLAGS_fraction_of_gpu_memory_to_use": "0.999",
}

log = logging.getLogger("repro.capacity")


class TrialError(RuntimeError):
    """A trial failed for a reason other than memory, or did not finish in time."""


@dataclass(frozen=True)
class Trial:
    classes: int
    fits: bool
    peak_rss_bytes: int  # VmHWM of the child (the largest of its process tree)
    seconds: float


def data_limit(cap_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` capping the child's data segment (heap and private mappings) at ``cap_bytes``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    return limit


def run_trial(
    classes: int,
    command: list[str],
    log_path: Path,
    *,
    memory_cap_bytes: int | None = None,
    env: dict[str, str] | None = None,
    done: Callable[[], bool] | None = None,
    worker_logs: Path | None = None,
    timeout_s: float = TRIAL_TIMEOUT_S,
) -> Trial:
    """Run ``command`` (its output to ``log_path``): fits = exit 0, not fits = out of memory, else TrialError.

    ``done``: polled while the trial runs; once true the trial fits and its process group is killed (a GPU
    trial stops after its last step instead of writing a checkpoint of every class center to the host).
    ``worker_logs``: a folder of per-rank logs (``plsc train --nproc``) searched for out-of-memory errors too.
    """
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopping it stops the ranks a launcher started
            preexec_fn=data_limit(memory_cap_bytes) if memory_cap_bytes else None,
        )
        stopped, status, usage = _wait(process, started + timeout_s, done)
    seconds = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024
    if code == 0 or stopped:
        return Trial(classes, True, peak, seconds)
    logs = [log_path, *(sorted(worker_logs.glob("*")) if worker_logs and worker_logs.is_dir() else [])]
    output = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in logs if path.is_file())
    if code == -signal.SIGKILL or any(sign in output for sign in OUT_OF_MEMORY):
        return Trial(classes, False, peak, seconds)
    tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
    raise TrialError(f"trial with {classes} classes failed (exit {code}) for another reason:\n{tail}")


def _wait(process: subprocess.Popen, deadline: float, done: Callable[[], bool] | None):
    """(stopped by us, wait status, rusage) of the child, through ``os.wait4``; killed at ``deadline``."""
    stopped = False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            return stopped, status, usage
        if not stopped and done is not None and done():
            stopped = True
            _kill_group(process)
        elif time.monotonic() > deadline:
            _kill_group(process)
            os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
            raise TrialError(f"trial did not finish in time; killed: {' '.join(map(str, process.args))}")
        time.sleep(0.05)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class Bracket:
    """The maximum lies in [fits, fails): ``fits`` classes trained, ``fails`` ran out of memory."""

    fits: Trial
    fails: Trial
    trials: tuple[Trial, ...]

    @property
    def fitted(self) -> list[Trial]:
        return sorted((trial for trial in self.trials if trial.fits), key=lambda trial: trial.classes)


def bisect_max_classes(
    try_classes: Callable[[int], Trial],
    low: int,
    high: int,
    steps: int,
    widen: float = 1.5,
    max_widen: int = 4,
) -> Bracket:
    """Bracket the largest class count that fits, starting from the guess [low, high].

    The bracket is widened (low / widen, high * widen, up to ``max_widen`` times each) until ``low`` fits and
    ``high`` does not; then ``steps`` bisections halve it.
    """
    trials: list[Trial] = []

    def attempt(classes: int) -> Trial:
        trial = try_classes(max(1, int(classes)))
        trials.append(trial)
        # Each trial is a training run of seconds to minutes: say where the search is.
        log.info("capacity trial %d: %s classes %s (peak RSS %.0f MiB, %.0f s)", len(trials),
                 f"{trial.classes:,}", "fit" if trial.fits else "did not fit", trial.peak_rss_bytes / 2**20,
                 trial.seconds)
        return trial

    fits, fails = attempt(low), attempt(high)
    for _ in range(max_widen):
        if fits.fits:
            break
        fails, fits = fits, attempt(fits.classes / widen)
    for _ in range(max_widen):
        if not fails.fits:
            break
        fits, fails = fails, attempt(fails.classes * widen)
    if not fits.fits or fails.fits:
        raise TrialError(f"no bracket: {[(t.classes, t.fits) for t in trials]}")
    for _ in range(steps):
        middle = attempt((fits.classes + fails.classes) // 2)
        fits, fails = (middle, fails) if middle.fits else (fits, middle)
    return Bracket(fits, fails, tuple(trials))

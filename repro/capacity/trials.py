"""Capacity trials: one training subprocess per class count, and the bisection that brackets the maximum.

A trial fits when its process exits 0; it does not fit when it ran out of memory. On a GPU that is the
device's own out-of-memory error. On the CPU the cap is on resident memory, what the memory model predicts
and what a machine's RAM bounds: a trial fits when it exits 0 with a peak RSS (VmHWM, the kernel's
high-water mark) within the cap, and is stopped as soon as its VmHWM passes it (read from /proc at every
poll). No OS limit can be that cap: RLIMIT_DATA counts the data segment, which leaves out the library pages
RSS counts and counts reserved address space that is never touched, so under it a trial could be refused at
a peak RSS far below the cap and fit far above it. It is kept as a guard only, at :data:`GUARD_FACTOR` x the
cap, so that an allocation far beyond the cap is refused before a poll could see it (such a trial does not
fit either). Any other failure is a harness error, not a verdict. A trial that does not fit stopped early:
its peak RSS is where it stopped, not what it needed. Each trial runs under a small launcher
(:mod:`repro.capacity.own_rusage`): forked from this process directly, its peak RSS would start from this
process's own.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
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
POLL_S = 0.05
# The CPU trials' data-segment limit as a multiple of the resident-memory cap: far above what a trial within
# the cap reserves (its reserved, untouched address space is a few hundred MiB), and a bound on what a trial
# beyond it can take from the machine between two polls.
GUARD_FACTOR = 2
# PLSC v2.2's GPU capacity runs: one allocator pool of (nearly) the whole device.
GPU_CAPACITY_FLAGS = {
    "FLAGS_allocator_strategy": "naive_best_fit",
    "FLAGS_fraction_of_gpu_memory_to_use": "0.999",
}

LAUNCHER = Path(__file__).with_name("own_rusage.py")

log = logging.getLogger("repro.capacity")


class TrialError(RuntimeError):
    """A trial failed for a reason other than memory, or did not finish in time."""


# Why a trial fits or not (Trial.reason).
FINISHED, STOPPED_DONE, OVER_CAP, REFUSED_MEMORY = (
    "finished", "stopped once done", "resident memory over the cap", "out of memory")


@dataclass(frozen=True)
class Trial:
    classes: int
    fits: bool
    peak_rss_bytes: int  # VmHWM of the child (the largest of its process tree)
    seconds: float
    reason: str = FINISHED


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

    ``memory_cap_bytes``: the CPU's cap on the trial's peak RSS (see the module's docstring).
    ``done``: polled while the trial runs; once true the trial fits and its process group is killed (a GPU
    trial stops after its last step instead of writing a checkpoint of every class center to the host).
    ``worker_logs``: a folder of per-rank logs (``plsc train --nproc``) searched for out-of-memory errors too.
    """
    started = time.monotonic()
    report = log_path.with_name(f"{log_path.name}.rusage.json")
    report.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-S", str(LAUNCHER), str(report), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopping it stops the ranks a launcher started
            preexec_fn=data_limit(GUARD_FACTOR * memory_cap_bytes) if memory_cap_bytes else None,
        )
        end = _wait(process, started + timeout_s, done, memory_cap_bytes, report)
    seconds = time.monotonic() - started
    own = _read_report(report)  # the command's own status and peak, unless the launcher was killed too
    report.unlink(missing_ok=True)
    code = os.waitstatus_to_exitcode(own.get("status", end.status))
    peak = max(own.get("maxrss_kib", 0) * 1024, end.polled_peak)
    if end.stopped:
        return Trial(classes, True, peak, seconds, STOPPED_DONE)
    if end.over_cap or (code == 0 and memory_cap_bytes and peak > memory_cap_bytes):
        return Trial(classes, False, peak, seconds, OVER_CAP)
    if code == 0:
        return Trial(classes, True, peak, seconds, FINISHED)
    logs = [log_path, *(sorted(worker_logs.glob("*")) if worker_logs and worker_logs.is_dir() else [])]
    output = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in logs if path.is_file())
    if code == -signal.SIGKILL or any(sign in output for sign in OUT_OF_MEMORY):
        return Trial(classes, False, peak, seconds, REFUSED_MEMORY)
    tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
    raise TrialError(f"trial with {classes} classes failed (exit {code}) for another reason:\n{tail}")


@dataclass(frozen=True)
class _End:
    status: int  # wait status of the launcher
    stopped: bool  # killed by us once ``done``
    over_cap: bool  # killed by us once its VmHWM passed the cap
    polled_peak: int  # the largest VmHWM read while it ran


def _wait(process: subprocess.Popen, deadline: float, done: Callable[[], bool] | None,
          cap: int | None, report: Path) -> _End:
    """How the launcher ended, through ``os.wait4``; killed (its process group) once ``done``, once the
    command's VmHWM passes ``cap``, or at ``deadline`` (TrialError)."""
    stopped = over_cap = False
    polled_peak = 0
    command_pid = None
    while True:
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
            return _End(status, stopped, over_cap, polled_peak)
        command_pid = command_pid or _read_report(report).get("pid")
        if cap and command_pid and not (stopped or over_cap):
            polled_peak = max(polled_peak, peak_rss_of(command_pid))
            if polled_peak > cap:
                over_cap = True
                _kill_group(process)
        if not (stopped or over_cap) and done is not None and done():
            stopped = True
            _kill_group(process)
        elif time.monotonic() > deadline:
            _kill_group(process)
            os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
            raise TrialError(f"trial did not finish in time; killed: {' '.join(map(str, process.args))}")
        time.sleep(POLL_S)


def _read_report(path: Path) -> dict:
    """The launcher's report (see repro.capacity.own_rusage), {} before it is written."""
    try:
        return json.loads(path.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return {}


def peak_rss_of(pid: int) -> int:
    """VmHWM of a running process in bytes (0 once it has exited: a zombie has no memory lines)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
        log.info("capacity trial %d: %s classes %s (%s, peak RSS %.0f MiB, %.0f s)", len(trials),
                 f"{trial.classes:,}", "fit" if trial.fits else "did not fit", trial.reason,
                 trial.peak_rss_bytes / 2**20, trial.seconds)
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

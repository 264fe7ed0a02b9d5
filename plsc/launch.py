"""Start N local training processes through ``paddle.distributed.launch``: what ``plsc train --nproc N`` runs.

The launcher owns rendezvous, ranks and per-process logs (``<output>/log/workerlog.<rank>``); plsc only
builds its command line. Every child runs ``python -m plsc.cli train ...`` with the user's arguments minus
``--nproc`` and finds its rank and the world size in the environment the launcher sets
(see :func:`plsc.distributed.make_comm`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from plsc.errors import PlscError

# Variables that tie a process to a running job: a launcher started from inside a launched process (or from a
# shell that exported them) would join that job instead of starting its own.
_JOB_VARIABLES = ("PADDLE_", "MASTER_ADDR", "MASTER_PORT", "FLAGS_selected_")


def launch_command(
    nproc_per_node: int,
    program: list[str],
    *,
    log_dir: str | Path | None = None,
    nnodes: int = 1,
    master: str | None = None,
    node_rank: int | None = None,
) -> list[str]:
    """``python -m paddle.distributed.launch [options] <program...>``.

    ``program[0]`` must be an executable, not a ``.py`` file: the launcher runs any other first word as is,
    which lets ``program`` be ``[python, "-m", module, ...]``. ``master`` (``ip:port``) and ``node_rank`` are
    only needed with several nodes; one node rendezvouses on free ports the launcher picks itself.
    """
    if nproc_per_node < 1:
        raise PlscError(f"--nproc must be at least 1, got {nproc_per_node}")
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc_per_node)]
    if nnodes > 1:
        if master is None:
            raise PlscError("a multi-node launch needs a master address (ip:port)")
        command += ["--nnodes", str(nnodes)]
    if master is not None:
        command += ["--master", master]
    if node_rank is not None:
        command += ["--rank", str(node_rank)]
    if log_dir is not None:
        command += ["--log_dir", str(log_dir)]
    return command + list(program)


def train_program(plsc_argv: list[str]) -> list[str]:
    """The command every rank runs: this Python, ``-m plsc.cli``, the user's arguments without ``--nproc``."""
    return [sys.executable, "-m", "plsc.cli", *without_option(plsc_argv, "--nproc")]


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` minus ``option VALUE`` / ``option=VALUE`` (the launcher must not be asked to launch again)."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == option:
            skip_next = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def child_environment(nproc_per_node: int) -> dict[str, str]:
    """This process's environment without job variables, with one CPU thread pool per core share.

    Paddle uses one OpenMP thread when OMP_NUM_THREADS is unset; N processes on C cores get C // N each.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VARIABLES)}
    if not _has_gpu():
        # The launcher takes CUDA_VISIBLE_DEVICES for GPUs even in a CPU build, and then starts no gloo group.
        env.pop("CUDA_VISIBLE_DEVICES", None)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")  # rank 0's log reaches the console as it is written
    return env


def _has_gpu() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def in_launched_process() -> bool:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1


def run_train(nproc: int, plsc_argv: list[str], output: Path) -> int:
    """Run ``plsc train`` on ``nproc`` local processes; the launcher's exit code, or 128 + signal when
    interrupted (as a single-process run)."""
    if in_launched_process():
        raise PlscError("--nproc starts processes itself; leave it out under paddle.distributed.launch")
    command = launch_command(nproc, train_program(plsc_argv), log_dir=Path(output) / "log")
    # The launcher gets its own session and each SIGINT/SIGTERM of ours exactly once: it passes them on to
    # the ranks, which save a checkpoint together, and stops them if they take longer than 30 s. (In our
    # process group a Ctrl-C would reach it twice, and its second signal means "quit now".)
    launcher = subprocess.Popen(command, env=child_environment(nproc), start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        launcher.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = launcher.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not received:
        return code
    print(f"plsc: interrupted by signal {received[0]}; continue from the checkpoint in "
          f"{Path(output) / 'checkpoints'} with the same command and --resume", file=sys.stderr)
    return 128 + received[0]

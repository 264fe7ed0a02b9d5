"""Start N local training processes through ``paddle.distributed.launch``: what ``plsc train --nproc N`` runs.

The launcher owns rendezvous, ranks and per-process logs (``<output>/log/workerlog.<rank>``); plsc builds
its command line and watches the job (:class:`Job`): rank 0's output on the console, the launcher's in
``<output>/log/launcher.log``, and a rank that fails ends the job with one line naming it, every process of
the job gone. Every child runs ``python -m plsc.cli train ...`` with the user's arguments minus ``--nproc``
and finds its rank and the world size in the environment the launcher sets (see
:func:`plsc.distributed.make_comm`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

from plsc import nodes as plsc_nodes
from plsc import run_lock
from plsc.errors import PlscError

# Variables that tie a process to a running job: a launcher started from inside a launched process (or from a
# shell that exported them) would join that job instead of starting its own.
# A launcher's lock on the run folder, too (run_train hands its own on to its ranks).
_JOB_VARIABLES = ("PADDLE_", "MASTER_ADDR", "MASTER_PORT", "FLAGS_selected_", run_lock.SHARED_BY)


def launch_command(
    nproc_per_node: int,
    program: list[str],
    *,
    log_dir: str | Path | None = None,
    nnodes: int = 1,
    master: str | None = None,
    node_rank: int | None = None,
    ips: list[str] | None = None,
) -> list[str]:
    """``python -m paddle.distributed.launch [options] <program...>``.

    ``program[0]`` must be an executable, not a ``.py`` file: the launcher runs any other first word as is,
    which lets ``program`` be ``[python, "-m", module, ...]``. ``master`` (``ip:port``) and ``node_rank`` are
    only needed with several nodes; one node rendezvouses on free ports the launcher picks itself. ``ips``
    (with ``node_rank``, this node's position) gives several nodes fixed endpoints ``ip:6070+i`` instead.
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
    if ips is not None:
        command += ["--ips", ",".join(ips)]
        if node_rank is not None:  # the launcher finds its node by this address, not by the host name's
            command += ["--host", ips[node_rank]]
    elif node_rank is not None:
        command += ["--rank", str(node_rank)]
    if log_dir is not None:
        command += ["--log_dir", str(log_dir)]
    return command + list(program)


def train_program(plsc_argv: list[str]) -> list[str]:
    """The command every rank runs: this Python, ``-m plsc.cli``, the user's arguments without ``--nproc``
    and ``--nodes``."""
    own_options = without_option(without_option(plsc_argv, "--nproc"), "--nodes")
    return [sys.executable, "-m", "plsc.cli", *own_options]


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
    """This process's environment without job variables, each rank's OpenMP pool its share of the cores.

    Paddle's CPU kernels use OMP_NUM_THREADS threads (one when it is unset), read when Paddle is imported:
    N ranks on C cores get C // N each, fewer when OMP_NUM_THREADS here asks for fewer (plsc sets it to all
    cores when it is unset, so the share is what one run gets by default).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VARIABLES)}
    if not _has_gpu():
        # The launcher takes CUDA_VISIBLE_DEVICES for GPUs even in a CPU build, and then starts no gloo group.
        env.pop("CUDA_VISIBLE_DEVICES", None)
    share = max(1, (os.cpu_count() or 1) // nproc_per_node)
    env["OMP_NUM_THREADS"] = str(min(share, _positive_int(env.get("OMP_NUM_THREADS")) or share))
    env.setdefault("GLOG_minloglevel", "1")  # no INFO lines from gloo's C++ side on the console
    env.setdefault("PYTHONUNBUFFERED", "1")  # rank 0's log reaches the console as it is written
    return env


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if value > 0 else None


def _has_gpu() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def in_launched_process() -> bool:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1


def run_train(nproc: int, plsc_argv: list[str], output: Path, nodes: list[str] | None = None,
              node_wait_s: float = 120.0) -> int:
    """Run ``plsc train`` on ``nproc`` local processes; 0, or 128 + signal when interrupted (as a
    single-process run). A rank that fails ends the job: :class:`RankFailed` names it.

    The console shows rank 0's own output and one line saying where the rest is: the launcher's output goes
    to ``<output>/log/launcher.log`` beside the ranks' ``workerlog.<rank>``. With several ``nodes`` (this
    command runs on each), they meet first (:mod:`plsc.nodes`): one missing after ``node_wait_s`` ends the run
    in one line before any rank starts.
    """
    if in_launched_process():
        raise PlscError("--nproc starts processes itself; leave it out under paddle.distributed.launch")
    multi_node = {}
    if nodes is not None and len(nodes) > 1:
        node_rank = plsc_nodes.this_node(nodes)
        print(f"plsc: node {node_rank} of {len(nodes)} ({nodes[node_rank]}); waiting up to {node_wait_s:g} s "
              f"for the others", file=sys.stderr, flush=True)
        plsc_nodes.meet(nodes, node_rank, node_wait_s)
        multi_node = {"ips": nodes, "node_rank": node_rank}
    log_dir = Path(output) / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    command = launch_command(nproc, train_program(plsc_argv), log_dir=log_dir, **multi_node)
    print(f"plsc: {nproc} processes started by paddle.distributed.launch; every rank's log and the "
          f"launcher's in {log_dir}", file=sys.stderr, flush=True)
    # The launcher gets its own session and each SIGINT/SIGTERM of ours exactly once: it passes them on to
    # the ranks, which save a checkpoint together, and stops them if they take longer than 30 s. (In our
    # process group a Ctrl-C would reach it twice, and its second signal means "quit now".)
    with open(log_dir / LAUNCHER_LOG, "ab") as launcher_log:
        # The ranks share this process's lock on the run folder (plsc.run_lock).
        env = {**child_environment(nproc), run_lock.SHARED_BY: str(os.getpid())}
        job = Job(command, env, log_dir, launcher_log)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        job.launcher.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = job.wait(interrupted=lambda: bool(received))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        job.kill_leftovers()
    if received:
        print(f"plsc: interrupted by signal {received[0]}; continue from the checkpoint in "
              f"{Path(output) / 'checkpoints'} with the same command and --resume", file=sys.stderr)
        return 128 + received[0]
    failure = job.failure
    if failure is not None:
        raise failure
    if code != 0:
        raise PlscError(f"paddle.distributed.launch exited with code {code} (log: {log_dir / LAUNCHER_LOG})")
    job.console.flush_held()
    return 0


LAUNCHER_LOG = "launcher.log"
POLL_S = 0.25
# After a rank failed: how long the launcher gets to stop the others (it waits 3 s for them, then kills
# them) before plsc kills every process of the job itself. Ranks blocked in a collective ignore SIGTERM.
STOP_GRACE_S = 10.0
# How the launcher stops the other ranks once one has failed (a SIGKILL 3 s later, for ranks that ignore it,
# comes after the first failure was seen).
_STOP_SIGNALS = (signal.SIGTERM,)
# What paddle.distributed.launch (2.6 and 3.x) logs for the first rank that exited non-zero.
_FAILED_RANK = re.compile(r"Container rank (\d+) status failed .*? code (-?\d+) log ")


class RankFailed(PlscError):
    """A rank of a ``--nproc`` job exited non-zero; the job was ended."""

    def __init__(self, rank: int, code: int, log: Path):
        reason = ""
        if code < 0:
            with contextlib.suppress(ValueError):
                reason = f", killed by {signal.Signals(-code).name}"
        message = f"rank {rank} exited with code {code}{reason} (log: {log})"
        cause = _last_error_line(log)
        super().__init__(f"{message}: {cause}" if cause else message)
        self.rank, self.code = rank, code


def _last_error_line(log: Path) -> str | None:
    """The one-line error a rank printed last (``plsc: error: ...``), if its log ends with one."""
    lines = FileTail(log, from_start=True).new_lines()
    errors = [line for line in lines[-5:] if line.startswith("plsc: error: ")]
    return errors[-1].removeprefix("plsc: error: ") if errors else None


def first_cause(failures: dict[int, int], log_dir: Path) -> RankFailed | None:
    """:attr:`Job.failure` of ``failures`` (rank -> exit code, in the order seen) and the ranks' logs."""
    if not failures:
        return None
    logs = {rank: log_dir / f"workerlog.{rank}" for rank in failures}
    own = [rank for rank in failures if not _lost_a_peer(logs[rank])]
    causes = [rank for rank in own if -failures[rank] not in _STOP_SIGNALS] or own or list(failures)
    return RankFailed(causes[0], failures[causes[0]], logs[causes[0]])


# How a gloo collective fails when the rank at the other end is gone.
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|gloo/transport/.*(Read|Write) error")


def _lost_a_peer(log: Path) -> bool:
    return any(_PEER_LOST.search(line) for line in FileTail(log, from_start=True).new_lines()[-40:])


class FileTail:
    """The complete lines appended to a file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path, from_start: bool = False):
        self.path = path
        self.offset = 0 if from_start or not path.exists() else path.stat().st_size
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


class RankZeroConsole:
    """Rank 0's lines on our stdout as they come. From its first error line (a traceback or ``plsc: error:``)
    on, lines are held back: when the job fails, the one-line summary replaces them (they stay in the log)."""

    def __init__(self, log: Path):
        self.tail = FileTail(log)
        self.held: list[str] = []
        self._flags_dump = False

    def pump(self) -> None:
        for line in self.tail.new_lines():
            if self._in_flags_dump(line):
                continue
            if self.held or line.startswith(("Traceback (most recent call last)", "plsc: error: ")):
                self.held.append(line)
            else:
                print(line, flush=True)

    def _in_flags_dump(self, line: str) -> bool:
        """Whether ``line`` belongs to the list of non-default FLAGS that ``init_parallel_env`` prints
        (a box of ``=`` lines around ``FLAGS(...)`` lines): framework detail, kept in the log only."""
        if "Modified FLAGS detected" in line:
            self._flags_dump = True
            return True
        if self._flags_dump:
            self._flags_dump = line.startswith("FLAGS(")
            return True
        return False

    def flush_held(self) -> None:
        self.pump()
        for line in self.held:
            print(line, flush=True)
        self.held = []


class Job:
    """The launcher and the ranks it started, watched until the launcher exits or must be stopped."""

    def __init__(self, command: list[str], env: dict[str, str], log_dir: Path, launcher_log):
        self.log_dir = log_dir
        self.console = RankZeroConsole(log_dir / "workerlog.0")
        self.launcher_output = FileTail(log_dir / LAUNCHER_LOG)
        self.launcher = subprocess.Popen(command, env=env, start_new_session=True, stdout=launcher_log,
                                         stderr=subprocess.STDOUT)
        self.groups = {self.launcher.pid}  # process groups of the job: the launcher's and each rank's
        self.ranks: dict[int, int] = {}  # pid -> rank
        self.failures: dict[int, int] = {}  # rank -> exit code, in the order they were seen
        self._failed_at: float | None = None

    def wait(self, interrupted) -> int:
        """The launcher's exit code; when a rank failed and the launcher has not ended the job
        ``STOP_GRACE_S`` later, plsc kills it."""
        while True:
            self._watch_ranks()  # before the launcher may be reaped (its pid then means nothing)
            code = self.launcher.poll()
            self.console.pump()
            self._read_launcher_report()
            if code is not None:
                return code
            if self._failed_at is not None and not interrupted():
                if time.monotonic() - self._failed_at > STOP_GRACE_S:
                    self.kill_leftovers()
            time.sleep(POLL_S)

    def _watch_ranks(self) -> None:
        """Record each rank's process group; a rank that exited non-zero and is not yet reaped (the
        launcher reaps within a second, unless it hangs itself) is a failure."""
        for pid, info in _all_processes().items():
            if info.parent != self.launcher.pid:
                continue
            self.groups.add(info.group)
            if pid not in self.ranks and (rank := _rank_of(pid)) is not None:
                self.ranks[pid] = rank
            if info.zombie and _exit_code(info.wait_status) != 0 and pid in self.ranks:
                self._fail(self.ranks[pid], _exit_code(info.wait_status))

    def _read_launcher_report(self) -> None:
        for line in self.launcher_output.new_lines():
            match = _FAILED_RANK.search(line)
            if match:
                self._fail(int(match.group(1)), int(match.group(2)))

    def _fail(self, rank: int, code: int) -> None:
        if rank not in self.failures:
            self.failures[rank] = code
        if self._failed_at is None:
            self._failed_at = time.monotonic()

    @property
    def failure(self) -> RankFailed | None:
        """The failed rank that ended the job: the first seen that failed on its own, neither stopped by the
        launcher (SIGTERM: it stops the others once one rank failed) nor for losing a peer (the others'
        collectives break when one rank dies). Which exit is seen first is up to the scheduler."""
        return first_cause(self.failures, self.log_dir)

    def kill_leftovers(self) -> None:
        """SIGKILL every process still in one of the job's process groups (the launcher's, each rank's with
        its data loader workers): nothing of the job outlives it."""
        for pid in _processes_in_groups(self.groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class ProcessInfo(typing.NamedTuple):
    parent: int
    group: int
    zombie: bool
    wait_status: int  # as waitpid reports it; meaningful for a zombie (exited, not yet reaped)


def _process_info(pid: int | str) -> ProcessInfo | None:
    """From /proc/<pid>/stat (fields 4, 5, 3 and 52); None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ", which may hold spaces
    wait_status = int(fields[49]) if len(fields) > 49 else 0
    return ProcessInfo(int(fields[1]), int(fields[2]), fields[0] == "Z", wait_status)


def _exit_code(wait_status: int) -> int:
    """As subprocess reports it: the exit status, or minus the signal that ended the process."""
    return -(wait_status & 0x7F) if wait_status & 0x7F else wait_status >> 8


def _all_processes() -> dict[int, ProcessInfo]:
    """Every process, from /proc (none without it: the launcher's report alone then tells a failed rank)."""
    infos = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return infos
    for entry in entries:
        if entry.isdigit() and (info := _process_info(entry)) is not None:
            infos[int(entry)] = info
    return infos


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"PADDLE_TRAINER_ID="):
            return _positive_int(entry.split(b"=", 1)[1].decode()) or 0
    return None


def _processes_in_groups(groups: set[int]) -> list[int]:
    me = os.getpid()
    return [pid for pid, info in _all_processes().items() if info.group in groups and pid != me]

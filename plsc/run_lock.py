"""One process at a time per run folder: an advisory lock on ``<output>/.plsc.lock``.

The lock is ``flock(2)``'s, held through an open file: the kernel releases it when the holder exits, however
it exits (a killed run never leaves a stale lock). The holder writes its process id and command line into
the file, which is how a refused second run, resume or export names it. The file itself stays: removing it
on release would let two later runs lock two different files of one name.

``plsc train --nproc`` locks the folder in the launching process; the ranks it starts share that lock: the
launcher names itself in :data:`SHARED_BY` in their environment, and a process whose lock holder is the
process named there holds the lock with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from pathlib import Path

from plsc.atomic import writing
from plsc.errors import PlscError

LOCK_FILE = ".plsc.lock"
SHARED_BY = "PLSC_RUN_LOCK_HOLDER"  # process id of a launcher whose lock its ranks share
# A second process may test the lock (a shared lock for a moment) just as the run takes it: the run retries
# for this long before it reports the folder as in use. Readers retry as long for the holder's line.
CONTENTION_S = 1.0
_POLL_S = 0.05


class RunLock:
    """A held lock; :meth:`release` (or the end of the process) lets the next run in."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder = folder
        self._fd = fd  # None: the lock of the launcher this process belongs to

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no holder named once it is free
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(folder: str | os.PathLike) -> RunLock:
    """Lock ``folder`` (created if missing) for this process, or raise the PlscError naming the holder."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    with writing(path):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _lock_within(fd, fcntl.LOCK_EX, 0.0):
            holder = _holder_line(path)
            if holder is not None and _shared_with_us(holder):
                os.close(fd)
                return RunLock(folder, None)
            if not _lock_within(fd, fcntl.LOCK_EX, CONTENTION_S):
                raise PlscError(refusal(folder, _holder_line(path), "train into it"))
        with writing(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_command_line()}\n".encode())
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return RunLock(folder, fd)


def holder(folder: str | os.PathLike) -> str | None:
    """``"<pid> <command>"`` of the process holding ``folder``'s lock when it is not this process's (nor its
    launcher's); None when the folder is free. Reads only: nothing is created or written."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no run has locked this folder
    try:
        if _lock_within(fd, fcntl.LOCK_SH, 0.0):
            return None  # free (the shared lock ends with the descriptor)
    finally:
        os.close(fd)
    line = _holder_line(path) or "? (a process that has not yet written its id)"
    return None if _shared_with_us(line) else line


def require_free(folder: str | os.PathLike, action: str) -> None:
    """PlscError when another process holds ``folder``: ``action`` says what was refused."""
    line = holder(folder)
    if line is not None:
        raise PlscError(refusal(Path(folder), line, action))


def refusal(folder: Path, holder_line: str | None, action: str) -> str:
    return (f"cannot {action}: {in_use(folder, holder_line)}; one run at a time per output folder: wait for "
            "it to end or choose another --output")


def in_use(folder: Path, holder_line: str | None) -> str:
    """``"<folder> is in use by process <pid> (<command>)"``."""
    pid, _, command = (holder_line or "?").partition(" ")
    running = f" ({command})" if command else ""
    return f"{folder} is in use by process {pid}{running}"


def _lock_within(fd: int, kind: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _holder_line(path: Path) -> str | None:
    """The holder's ``"<pid> <command>"`` (it writes it just after locking: wait a moment for it)."""
    deadline = time.monotonic() + CONTENTION_S
    while True:
        try:
            line = path.read_text(errors="replace").strip()
        except OSError:
            line = ""
        if line or time.monotonic() >= deadline:
            return line or None
        time.sleep(_POLL_S)


def _shared_with_us(holder_line: str) -> bool:
    """Whether the holder is this process, or the launcher that started it (``SHARED_BY``)."""
    pid = holder_line.partition(" ")[0]
    return pid in (str(os.getpid()), os.environ.get(SHARED_BY, "-"))


def _command_line() -> str:
    words = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(words)[:300].replace("\n", " ")

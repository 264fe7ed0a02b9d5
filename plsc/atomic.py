"""Files replaced whole: written under a temporary name beside the target, then renamed over it.

A reader, an interruption or a crash sees the previous file or the complete new one, never a part of one.
A failed write removes its temporary file and raises the one-line :class:`PlscError` naming the target ("no
space left writing PATH" for a full disk). ``durable=True`` (the default) also fsyncs the file before the
rename and the directory after it, so the new file survives a power loss once the call returns.

Every writer of a finished file in plsc goes through here: :func:`write_atomic` for bytes or text in memory,
:func:`atomic_file` for a file object to write into, :class:`PendingFile` for a file kept open across calls.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from plsc.errors import PlscError

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` for its next version, unique to this writer (pid and random part)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def remove_stale_temps(directory: Path) -> None:
    """Remove what writers killed before their rename left in ``directory`` (incomplete temporary files)."""
    for temp in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        temp.unlink(missing_ok=True)


def write_error(path: Path, exc: OSError) -> PlscError:
    """The one-line message for a failed write: a full disk is said as such."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PlscError(f"no space left writing {path}")
    return PlscError(f"could not write {path}: {exc.strerror or exc}")


@contextlib.contextmanager
def writing(path: Path):
    """Turns an OSError raised while writing ``path`` into the PlscError naming it."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc) from None


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name (a directory's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingFile:
    """The next version of ``path``, written through :attr:`file` under a temporary name beside it.

    :meth:`commit` moves it into place; :meth:`discard` (or a failed commit) removes it. Files that must
    appear together (a ``.rec`` and its ``.idx``) are all synced before the first is committed.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", *, durable: bool = True, **open_kwargs):
        self.path = Path(path)
        self.durable = durable
        self.temp = temp_path(self.path)
        with writing(self.path):
            self.file: IO = open(self.temp, mode, **open_kwargs)

    def sync(self) -> None:
        """Flush, fsync (when durable) and close the temporary file: all but the rename."""
        if self.file.closed:
            return
        with writing(self.path):
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()

    def commit(self) -> None:
        try:
            self.sync()
            with writing(self.path):
                os.replace(self.temp, self.path)
                if self.durable:
                    fsync_path(self.path.parent)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails too
            self.file.close()
        self.temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *, durable: bool = True, **open_kwargs
                ) -> Iterator[IO]:
    """A file object to write ``path``'s next version into; it replaces ``path`` when the block ends."""
    pending = PendingFile(path, mode, durable=durable, **open_kwargs)
    try:
        with writing(pending.path):
            yield pending.file
    except BaseException:
        pending.discard()
        raise
    pending.commit()


def write_atomic(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` (text is written as UTF-8)."""
    if isinstance(data, str):
        with atomic_file(path, "w", durable=durable, encoding="utf-8") as f:
            f.write(data)
    else:
        with atomic_file(path, "wb", durable=durable) as f:
            f.write(data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one complete line (a log record) to ``path``: written in one call and, when the disk is full
    or the write fails part way, cut back to the file's previous end, so the file never ends in a partial
    line; the failure is the one-line PlscError of :func:`write_error`."""
    path = Path(path)
    data = line.encode("utf-8")
    if not data.endswith(b"\n"):
        data += b"\n"
    with writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):  # a short write: the disk filled up after the first bytes
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise write_error(path, exc) from None
    finally:
        os.close(fd)

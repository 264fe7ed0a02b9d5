"""Where a command will write, checked before it does any work: one line instead of an OSError traceback
after minutes of training, or a folder created for nothing.

Nothing is created here: a path that does not exist yet is judged by its nearest existing ancestor.
"""

from __future__ import annotations

import os
from pathlib import Path

from plsc.errors import PlscError


def require_output_folder(path: str | os.PathLike, flag: str) -> None:
    """PlscError when ``path`` cannot be (or become) a folder this process writes in: it is a file, lies under
    a file, or its nearest existing folder is read-only or not writable by this user."""
    _require_writable_folder(Path(path), Path(path), flag)


def require_output_file(path: str | os.PathLike, flag: str) -> None:
    """PlscError when ``path`` cannot become a file: it is a folder, or its folder cannot be written in."""
    path = Path(path)
    if path.is_dir():
        raise PlscError(f"{flag} {path} is a folder; name a file")
    _require_writable_folder(path.parent, path, flag)


def _require_writable_folder(folder: Path, named: Path, flag: str) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        where = "" if existing == named else f": {existing}"
        raise PlscError(f"{flag} {named}{where} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PlscError(f"{flag} {named}: cannot write in {existing} ({_why_not_writable(existing)})")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (a dangling symlink counts as existing: writing through
    it fails just the same)."""
    for candidate in (path, *path.absolute().parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _why_not_writable(folder: Path) -> str:
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "read-only file system"
    return "permission denied"

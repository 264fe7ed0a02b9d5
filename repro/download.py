"""Fetch and unpack PLSC v2.2's published checkpoint archives, resuming interrupted downloads.

:func:`fetch` keeps ``<cache>/<name>.part`` while bytes arrive and renames it to ``<cache>/<name>`` only when
its size equals what the server announced (Content-Length, or the total of Content-Range). Run it again
after an interruption and it asks for the missing tail with an HTTP Range request; a server that ignores
Range makes it start over. Every failure is one :class:`DownloadError` line (offline, refused, HTTP status,
short transfer), never a traceback. :func:`extract_tgz` unpacks with tarfile's ``data`` filter (no absolute
paths, no ``..``, no links leaving the folder) into a temporary folder renamed into place.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class DownloadError(RuntimeError):
    """A download or an unpacking failed; the message is one line that says what to do."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/plsc/checkpoints`` (``~/.cache/plsc/checkpoints`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "plsc" / "checkpoints"


def fetch(url: str, cache_dir: Path, *, timeout: float = TIMEOUT_S, log=None) -> Path:
    """``cache_dir/<file name of url>``, downloaded (or resumed) unless it is already complete there."""
    target = Path(cache_dir) / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    (log or _stderr)(f"downloading {url} -> {target}")
    try:
        _transfer(url, partial, timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"cannot download {url}: {reason} (offline? copy {target.name} into {target.parent} by hand)"
        ) from None
    partial.replace(target)
    return target


def _transfer(url: str, partial: Path, timeout: float) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:  # 416: the partial file is not a prefix we can extend
            raise
        partial.unlink()
        return _transfer(url, partial, timeout)
    with response:
        expected, resumed = _expected_size(response, offset)
        with open(partial, "ab" if resumed else "wb") as out:
            _copy(response, out)
    _check_size(url, partial, expected)


def _expected_size(response, offset: int) -> tuple[int | None, bool]:
    """(total size of the file, whether the response continues at ``offset``)."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != offset:
            raise DownloadError(f"server answered a range request for byte {offset} with an unusable range")
        return int(match.group(3)), True
    length = response.headers.get("Content-Length")
    return (int(length) if length is not None else None), False


def _copy(response, out) -> None:
    while True:
        try:
            chunk = response.read(CHUNK_BYTES)
        except http.client.IncompleteRead as exc:  # the connection closed early: keep what arrived
            out.write(exc.partial)
            return
        if not chunk:
            return
        out.write(chunk)


def _check_size(url: str, partial: Path, expected: int | None) -> None:
    size = partial.stat().st_size
    if expected is not None and size != expected:
        raise DownloadError(
            f"download of {url} is incomplete: {size} of {expected} bytes in {partial}; run again to resume"
        )


def extract_tgz(archive: Path, destination: Path) -> Path:
    """Unpack ``<stem>.tgz`` into ``destination/<stem>/`` (once; an existing folder is returned as is).

    The published archives hold one top folder named like the archive; an archive without it is unpacked
    into ``<stem>/`` directly.
    """
    archive, destination = Path(archive), Path(destination)
    stem = archive.name.removesuffix(".tgz").removesuffix(".tar.gz")
    target = destination / stem
    if target.is_dir():
        return target
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.", dir=destination))
    try:
        _unpack(archive, staging)
        top = staging / stem
        (top if top.is_dir() else staging).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _unpack(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DownloadError(f"cannot unpack {archive}: {exc} (delete it and download again)") from None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

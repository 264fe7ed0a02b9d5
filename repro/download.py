"""Fetch and unpack PLSC v2.2's published checkpoint archives, resuming interrupted downloads.

:func:`fetch` keeps ``<cache>/<name>.part`` while bytes arrive and renames it to ``<cache>/<name>`` only when
its size equals what the server announced (Content-Length, or the total of Content-Range) and, for an archive
(.tgz, .tar.gz, .tar), when the whole archive reads through (gzip's CRC and length, every tar member): a
server that sends no length cannot pass off a cut transfer as complete. The file's sha256 is recorded beside
it (``<name>.sha256``, sha256sum's format) and checked whenever the cached file is used again; a mismatch
downloads it afresh. Run it again after an interruption and it asks for the missing tail with an HTTP Range
request; a server that ignores Range makes it start over. Every failure is one :class:`DownloadError` line
(offline, refused, HTTP status, short transfer, damaged archive), never a traceback. :func:`extract_tgz`
unpacks with tarfile's ``data`` filter (no absolute paths, no ``..``, no links leaving the folder) into a
temporary folder renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from plsc.atomic import write_atomic

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
# How gzip ("Compressed file ended before the end-of-stream marker was reached") and tarfile ("unexpected end
# of data") say that an archive stops too early: a cut transfer, which a resumed download can complete.
_CUT_SHORT = re.compile(r"ended before|unexpected end of data")


class DownloadError(RuntimeError):
    """A download or an unpacking failed; the message is one line that says what to do."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/plsc/checkpoints`` (``~/.cache/plsc/checkpoints`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "plsc" / "checkpoints"


def fetch(url: str, cache_dir: Path, *, timeout: float = TIMEOUT_S, log=None) -> Path:
    """``cache_dir/<file name of url>``, downloaded (or resumed) unless it is already complete there."""
    log = log or _stderr
    target = Path(cache_dir) / url.rsplit("/", 1)[-1]
    if target.is_file():
        if _cached_file_is_intact(target, log):
            return target
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    log(f"downloading {url} -> {target}")
    try:
        _transfer(url, partial, timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(
            f"cannot download {url}: {reason} (offline? copy {target.name} into {target.parent} by hand)"
        ) from None
    _verify_download(url, partial, target)
    _write_checksum(target, sha256_of(partial))
    partial.replace(target)
    return target


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksum(path: Path, digest: str) -> None:
    write_atomic(checksum_path(path), f"{digest}  {path.name}\n")


def _recorded_checksum(path: Path) -> str | None:
    try:
        return checksum_path(path).read_text().split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _cached_file_is_intact(target: Path, log) -> bool:
    """Whether the cached file can be used: it matches its recorded sha256; without a record (a file copied
    in by hand, or cached before records were kept) an archive must read through, and is then recorded."""
    recorded = _recorded_checksum(target)
    if recorded is not None:
        if sha256_of(target) == recorded:
            return True
        log(f"{target} does not match its recorded sha256 ({checksum_path(target).name}): downloading again")
        return False
    if is_archive(target):
        problem = archive_problem(target)
        if problem is not None:
            raise DownloadError(f"{target} is not a readable archive ({problem}); delete it and run again")
    _write_checksum(target, sha256_of(target))
    return True


def is_archive(path: Path) -> bool:
    return path.name.endswith((".tgz", ".tar.gz", ".tar"))


def archive_problem(path: Path) -> str | None:
    """Why the archive does not read through (None when it does): the gzip stream to its end, CRC and
    length checked, then every tar header and member."""
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"  # gzip's magic number (a .part has no telling suffix)
        if compressed:
            with gzip.open(path, "rb") as stream:
                while stream.read(CHUNK_BYTES):
                    pass
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    with tar.extractfile(member) as data:
                        while data.read(CHUNK_BYTES):
                            pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        return str(exc) or type(exc).__name__
    return None


def _verify_download(url: str, partial: Path, target: Path) -> None:
    """A transfer of an archive that does not read through is never marked complete. A cut stream (an end
    that comes too early) stays to be resumed; damaged bytes are removed."""
    if not is_archive(target):
        return
    problem = archive_problem(partial)
    if problem is None:
        return
    if _CUT_SHORT.search(problem):
        raise DownloadError(f"download of {url} is incomplete: the archive ends early ({problem}); "
                            f"{partial} kept, run again to resume")
    partial.unlink()
    raise DownloadError(f"download of {url} is corrupt ({problem}); removed {partial.name}, run again")


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

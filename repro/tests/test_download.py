"""repro/download.py against a loopback HTTP server (127.0.0.1 only) serving a small .tgz.

The server honours or ignores Range, and can cut a response short; every request is recorded. All requests
are bounded: a few per test, each with a 5 s client timeout, and the server stops with the test.
"""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from repro.download import DownloadError, extract_tgz, fetch

pytestmark = pytest.mark.cpu

STEM = "MS1M_v3_arcface_Res50_dynamic_0.1_NHWC_FP16_v2.2"
MEMBERS = {
    f"{STEM}/FresResNet50/best_model/cfp_fp/meta.json": b'{"embedding_size": 512}',
    f"{STEM}/FresResNet50/best_model/cfp_fp/fc.w_0.pdparam": bytes(range(256)) * 64,
}
TIMEOUT_S = 5.0


def make_tgz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class Served:
    """What the server sends, and what it saw."""

    payload: bytes
    honour_range: bool = True
    cut_after: int | None = None  # send only this many body bytes, then close
    send_length: bool = True  # False: no Content-Length, the end of the body is the end of the connection
    ranges: list[str | None] = field(default_factory=list)
    url: str = ""


class ArchiveHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        served: Served = self.server.served
        if not served.url.endswith(self.path):
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        served.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested and served.honour_range else 0
        body = served.payload[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(served.payload) - 1}/{len(served.payload)}"
            )
        if served.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if served.cut_after is None else body[: served.cut_after])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    httpd.served = Served(payload=make_tgz(MEMBERS), url=f"http://127.0.0.1:{httpd.server_port}/{STEM}.tgz")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd.served
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_download_lands_complete_under_its_own_name(server, tmp_path):
    path = fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=lambda line: None)
    assert path == tmp_path / f"{STEM}.tgz"
    assert path.read_bytes() == server.payload
    assert server.ranges == [None]
    assert not (tmp_path / f"{STEM}.tgz.part").exists()


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    half = len(server.payload) // 2
    server.cut_after = half
    with pytest.raises(DownloadError, match=rf"incomplete: {half} of {len(server.payload)} bytes.*run again"):
        fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=lambda line: None)
    assert (tmp_path / f"{STEM}.tgz.part").stat().st_size == half
    server.cut_after = None
    path = fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=lambda line: None)
    assert path.read_bytes() == server.payload
    assert server.ranges == [None, f"bytes={half}-"]


def test_a_server_ignoring_range_makes_it_start_over(server, tmp_path):
    (tmp_path / f"{STEM}.tgz.part").write_bytes(b"stale bytes")
    server.honour_range = False
    path = fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=lambda line: None)
    assert path.read_bytes() == server.payload
    assert server.ranges == ["bytes=11-"]


def test_a_complete_file_in_the_cache_is_not_downloaded_again(server, tmp_path):
    (tmp_path / f"{STEM}.tgz").write_bytes(server.payload)
    assert fetch(server.url, tmp_path, timeout=TIMEOUT_S).read_bytes() == server.payload
    assert server.ranges == []


def test_offline_is_one_clear_line(closed_port, tmp_path):
    url = f"http://127.0.0.1:{closed_port}/{STEM}.tgz"
    with pytest.raises(DownloadError) as caught:
        fetch(url, tmp_path, timeout=TIMEOUT_S, log=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {url}: ") and "offline?" in message and "refused" in message


def test_http_errors_are_one_line(server, tmp_path):
    with pytest.raises(DownloadError, match=r"^cannot download .*/missing.tgz: HTTP 404 Not Found"):
        fetch(
            server.url.rsplit("/", 1)[0] + "/missing.tgz", tmp_path, timeout=TIMEOUT_S, log=lambda line: None
        )


def test_the_archive_unpacks_into_its_stem(tmp_path):
    archive = tmp_path / f"{STEM}.tgz"
    archive.write_bytes(make_tgz(MEMBERS))
    unpacked = extract_tgz(archive, tmp_path / "checkpoints")
    assert unpacked == tmp_path / "checkpoints" / STEM
    for name, data in MEMBERS.items():
        assert (tmp_path / "checkpoints" / name).read_bytes() == data
    assert extract_tgz(archive, tmp_path / "checkpoints") == unpacked  # already there: left as is
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [STEM]  # no staging folder left


def test_members_escaping_the_folder_are_refused(tmp_path):
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(make_tgz({"../outside.txt": b"x"}))
    with pytest.raises(DownloadError, match="cannot unpack"):
        extract_tgz(archive, tmp_path / "checkpoints")
    assert not (tmp_path / "outside.txt").exists()
    assert list((tmp_path / "checkpoints").iterdir()) == []


def no_log(line: str) -> None:
    pass


def test_the_sha256_is_recorded_beside_the_download(server, tmp_path):
    path = fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    expected = hashlib.sha256(server.payload).hexdigest()
    assert (tmp_path / f"{STEM}.tgz.sha256").read_text() == f"{expected}  {STEM}.tgz\n"
    assert path.read_bytes() == server.payload


def test_a_cut_transfer_without_content_length_is_not_marked_complete(server, tmp_path):
    """Without a length the client cannot tell a closed connection from the end: the archive must read
    through. The cut file stays to be resumed, and the resumed one completes."""
    server.send_length = False
    half = len(server.payload) // 2
    server.cut_after = half
    with pytest.raises(DownloadError) as caught:
        fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    message = str(caught.value)
    assert message.startswith(f"download of {server.url} is incomplete: the archive ends early (")
    assert "run again to resume" in message and "\n" not in message
    assert not (tmp_path / f"{STEM}.tgz").exists() and not (tmp_path / f"{STEM}.tgz.sha256").exists()
    assert (tmp_path / f"{STEM}.tgz.part").read_bytes() == server.payload[:half]
    server.cut_after = None
    path = fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    assert path.read_bytes() == server.payload and server.ranges == [None, f"bytes={half}-"]


def test_a_damaged_archive_is_refused_and_removed(server, tmp_path):
    damaged = bytearray(server.payload)
    damaged[-6] ^= 0xFF  # inside gzip's CRC32 trailer: every byte arrives, the content is wrong
    server.payload = bytes(damaged)
    message = rf"^download of {server.url} is corrupt \(CRC check failed.*run again$"
    with pytest.raises(DownloadError, match=message):
        fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    assert list(tmp_path.iterdir()) == []


def test_a_cached_file_that_no_longer_matches_its_sha256_is_downloaded_again(server, tmp_path):
    path = fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    path.write_bytes(server.payload[:-1] + b"x")  # changed on disk since it was recorded
    lines = []
    assert fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=lines.append).read_bytes() == server.payload
    assert server.ranges == [None, None]
    assert "does not match its recorded sha256" in lines[0]


def test_a_cached_file_matching_its_sha256_is_used_without_a_request(server, tmp_path):
    fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    assert fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log).read_bytes() == server.payload
    assert server.ranges == [None]


def test_a_damaged_archive_copied_into_the_cache_is_one_line(server, tmp_path):
    (tmp_path / f"{STEM}.tgz").write_bytes(server.payload[: len(server.payload) // 2])
    with pytest.raises(DownloadError) as caught:
        fetch(server.url, tmp_path, timeout=TIMEOUT_S, log=no_log)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / STEM}.tgz is not a readable archive (") and "\n" not in message
    assert message.endswith("delete it and run again") and server.ranges == []

"""`plsc convert` wiring: the command reproduces MXNet's payloads and fails in one line on bad input."""

import hashlib
import json

import pytest

from plsc import cli


@pytest.fixture(autouse=True)
def index_cache_dir(tmp_path, monkeypatch):
    """Label indexes of the read-only ../shared files go to a temporary folder, not ~/.cache."""
    monkeypatch.setenv("PLSC_CACHE_DIR", str(tmp_path / "index-cache"))


def test_rec2images_cli_reproduces_payload_bytes(shared_dir, tmp_path, capsys):
    recordio = shared_dir / "data" / "recordio"
    out = tmp_path / "images"
    assert (
        cli.main(["convert", "rec2images", "--rec", str(recordio / "faces_tiny.rec"), "--output", str(out)])
        == 0
    )
    assert "240 images of 40 classes" in capsys.readouterr().out
    manifest = json.loads((recordio / "manifest.json").read_text())
    image_keys = [key for key in manifest["faces_tiny"] if 1 <= int(key) <= 240]
    assert len(image_keys) == 240
    for key in image_keys:
        data = (out / "images" / f"{int(key):08d}.jpg").read_bytes()
        assert hashlib.md5(data).hexdigest() == manifest["faces_tiny"][key]["payload_md5"]


def test_images2rec_then_rec2images_round_trip(tiny_dir, tmp_path):
    prefix = tmp_path / "rec" / "train"
    prefix.parent.mkdir()
    assert cli.main(["convert", "images2rec", "--root", str(tiny_dir), "--output", str(prefix)]) == 0
    out = tmp_path / "back"
    assert cli.main(["convert", "rec2images", "--rec", f"{prefix}.rec", "--output", str(out)]) == 0
    assert (out / "label.txt").read_text() == (tiny_dir / "label.txt").read_text()
    for line in (tiny_dir / "label.txt").read_text().splitlines():
        name = line.split("\t")[0]
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_truncated_rec_is_one_line_error(shared_dir, tmp_path, capsys):
    source = (shared_dir / "data" / "recordio" / "faces_tiny.rec").read_bytes()
    broken = tmp_path / "broken.rec"
    broken.write_bytes(source[: len(source) // 2])
    (tmp_path / "broken.idx").write_bytes((shared_dir / "data" / "recordio" / "faces_tiny.idx").read_bytes())
    out = tmp_path / "out"
    assert cli.main(["convert", "rec2images", "--rec", str(broken), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken" in err
    assert not (out / "label.txt").exists()

"""Fixtures the RecordIO tests share (tests/test_recordio*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plsc.data import FolderDataset


@pytest.fixture(scope="module")
def recordio_dir(shared_dir) -> Path:
    """../shared's .rec/.idx files, written by the real MXNet 1.9.1."""
    return shared_dir / "data" / "recordio"


@pytest.fixture(scope="module")
def recordio_manifest(recordio_dir) -> dict:
    """What MXNet 1.9.1 wrote into each file, record by record (written by the tool that made the files)."""
    return json.loads((recordio_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_samples(tiny_dir) -> list[tuple[Path, int]]:
    """(image path, label) of every image of the bundled data set."""
    folder = FolderDataset(tiny_dir)
    return [(folder.image_path(index), int(label)) for index, label in enumerate(folder.labels)]

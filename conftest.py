"""Root pytest configuration: shared fixtures for the unit tier.

Each xdist worker runs Paddle on one thread so that ``pytest -n 2`` does not oversubscribe the two cores.
Test tiers (markers cpu, cpu_slow, gpu, gpu8, multinode, and the options --run-slow and --gpus) come from the
plugin ``repro.tiers``: a test whose tier this machine lacks is skipped with a reason saying what it needs.
"""

import os
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message="No ccache found")

import pytest  # noqa: E402

from tests.tiny_run import TINY_RUN  # noqa: E402

pytest_plugins = ("repro.tiers", "pytester")

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The bundled default data set (40 people x 6 images + a 100-pair .bin), always present."""
    return ROOT / "data" / "tiny"


@pytest.fixture
def tiny_run() -> list[str]:
    """The tiny training run on ``tiny_dir``'s faces as ``--set`` overrides (tests/tiny_run.py says which);
    a test lists what it varies after these (later overrides win). A new list for each test."""
    return list(TINY_RUN)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` (read-only material); tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared material at {SHARED} (not present on this machine)")
    return SHARED

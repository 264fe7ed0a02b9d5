"""pytest-benchmark suite of the classifier head (``make bench``); never collected by a plain ``pytest``.

``--head-shapes suite`` (default) benchmarks a shape that runs in a few minutes; ``--head-shapes target`` the
issue's two shapes (1M classes at ratio 0.1 and 4M at 0.025, batch 128, emb 512, fp32), which need ~17 GB of
RAM for the 4M head and tens of minutes. Results go to benchmarks/results/ as JSON.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent / "results"


def pytest_configure(config) -> None:
    RESULTS.mkdir(exist_ok=True)  # before pytest-benchmark's --benchmark-json writes there


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("head benchmark")
    group.addoption("--head-shapes", choices=["suite", "target"], default="suite",
                    help="suite: a few minutes; target: the issue's 1M and 4M shapes (~17 GB RAM, long)")
    group.addoption("--head-threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the report measurements")


@pytest.fixture(scope="session")
def results_dir() -> Path:
    RESULTS.mkdir(exist_ok=True)
    return RESULTS


@pytest.fixture(scope="session")
def head_shapes(request) -> str:
    return request.config.getoption("--head-shapes")


@pytest.fixture(scope="session")
def head_threads(request) -> int:
    return request.config.getoption("--head-threads")

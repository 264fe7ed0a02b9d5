"""pytest plugin: test tiers as markers, skipped with a reason when this machine lacks what they need.

Loaded by the root ``conftest.py`` (``pytest_plugins``), so it governs ``tests/`` and ``repro/`` alike. Every
test is collected; none is deselected. A test carries at most one tier marker per requirement:

==========  ==============================================  =============================
marker      needs                                           otherwise
==========  ==============================================  =============================
cpu         nothing (also the tier of unmarked tests)       runs
cpu_slow    ``--run-slow``                                  skipped: "run with --run-slow (<reason>)"
gpu         1 GPU that Paddle can use                       skipped: what was found
gpu8        8 such GPUs                                     skipped: what was found
multinode   2+ nodes (``paddle.distributed.launch --ips``)  skipped: how many nodes
==========  ==============================================  =============================

``--gpus N`` caps how many GPUs the gpu tiers may use (default: every GPU Paddle sees). GPUs are detected
only when a collected test needs them, so the CPU tiers never import Paddle for this. A slow test says what
makes it slow with ``@pytest.mark.cpu_slow(reason=...)``; its skip repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from repro import hardware

TIER_HELP = {
    "cpu": "fast CPU tier (the default; unmarked tests belong to it)",
    "cpu_slow": "CPU tests that take minutes: skipped unless --run-slow",
    "gpu": "needs one GPU usable by paddlepaddle-gpu: skipped otherwise",
    "gpu8": "needs 8 GPUs usable by paddlepaddle-gpu: skipped otherwise",
    "multinode": "needs several nodes (paddle.distributed.launch --ips): skipped otherwise",
}
GPUS_NEEDED = {"gpu": 1, "gpu8": 8}
DEFAULT_TIER = "cpu"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tiers", "test tiers (markers cpu, cpu_slow, gpu, gpu8, multinode)")
    group.addoption("--run-slow", action="store_true", help="run the cpu_slow tier (minutes on 2 cores)")
    group.addoption(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="GPUs the gpu/gpu8 tiers may use (default: every GPU paddle sees)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in TIER_HELP.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gate = TierGate(run_slow=config.getoption("run_slow"), gpu_cap=config.getoption("gpus"))
    for item in items:
        reason = gate.missing(tiers_of(item))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason + why_slow(item)))


def why_slow(item: pytest.Item) -> str:
    """`` (<reason>)`` from ``@pytest.mark.cpu_slow(reason=...)``: what makes the test take minutes."""
    marker = item.get_closest_marker("cpu_slow")
    reason = marker.kwargs.get("reason") if marker else None
    return f" ({reason})" if reason else ""


def tiers_of(item: pytest.Item) -> list[str]:
    """The tier markers of ``item`` in TIER_HELP order; ``["cpu"]`` when it has none."""
    names = {marker.name for marker in item.iter_markers()}
    return [tier for tier in TIER_HELP if tier in names] or [DEFAULT_TIER]


def tier_of(item: pytest.Item) -> str:
    """The most demanding tier of ``item``: the folder its results go to (repro/results/<tier>/)."""
    return tiers_of(item)[-1]


@dataclass
class TierGate:
    """Says what a set of tiers still needs on this machine; detects hardware on first need only."""

    run_slow: bool = False
    gpu_cap: int | None = None
    _hardware: hardware.Hardware | None = None

    @property
    def hardware(self) -> hardware.Hardware:
        if self._hardware is None:
            self._hardware = hardware.detect()
        return self._hardware

    def usable_gpus(self) -> int:
        found = self.hardware.usable_gpus
        return found if self.gpu_cap is None else min(found, self.gpu_cap)

    def missing(self, tiers: list[str]) -> str | None:
        reasons = [reason for reason in map(self._missing_one, tiers) if reason]
        return "; ".join(reasons) or None

    def _missing_one(self, tier: str) -> str | None:
        if tier == "cpu_slow" and not self.run_slow:
            return "cpu_slow tier: too slow for the unit tier; run with --run-slow"
        if tier in GPUS_NEEDED and self.usable_gpus() < GPUS_NEEDED[tier]:
            return f"{tier} tier: needs {GPUS_NEEDED[tier]} GPU(s) usable by paddle; {self._gpu_shortfall()}"
        if tier == "multinode" and self.hardware.nodes < 2:
            return (
                "multinode tier: needs 2+ nodes (run on every node under "
                "python -m paddle.distributed.launch --ips ip1,ip2,...); found 1 node"
            )
        return None

    def _gpu_shortfall(self) -> str:
        if self.gpu_cap is not None and self.gpu_cap < self.hardware.usable_gpus:
            return f"--gpus {self.gpu_cap} allows {self.gpu_cap} of the {self.hardware.usable_gpus} found"
        return self.hardware.gpu_summary()


@pytest.fixture(scope="session")
def machine() -> hardware.Hardware:
    """This machine's hardware (GPUs, CPU, memory, nodes), detected once."""
    return hardware.detect()


@pytest.fixture(scope="session")
def gpu_count(request: pytest.FixtureRequest, machine: hardware.Hardware) -> int:
    """GPUs a test may use: every GPU paddle sees, capped by --gpus."""
    cap = request.config.getoption("gpus")
    return machine.usable_gpus if cap is None else min(machine.usable_gpus, cap)

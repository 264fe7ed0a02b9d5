"""Stand-in machines for the harness's own tests.

The harness's fixtures (options, claims, ``record_result``) live in repro/conftest.py and describe the machine
the cases really run on; these describe imagined ones, so that results, reports and tier decisions can be
checked for hardware this machine does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from repro.hardware import Gpu, Hardware

V100 = Gpu("Tesla V100-SXM2-32GB", 32510)


@pytest.fixture(scope="session")
def cpu_machine() -> Hardware:
    """Two cores, 4 GiB, a CPU-only Paddle 3.3.1 and no GPU."""
    return Hardware(cpu_model="Test CPU", cpu_count=2, memory_mib=4096, paddle_version="3.3.1")


@pytest.fixture(scope="session")
def v100_machine(cpu_machine) -> Callable[[int], Hardware]:
    """``v100_machine(gpus)``: the CPU machine with ``gpus`` Tesla V100s that Paddle can use."""

    def make(gpus: int) -> Hardware:
        return dataclasses.replace(cpu_machine, gpus=(V100,) * gpus, gpu_source="paddle", paddle_cuda=True)

    return make


@pytest.fixture(scope="session")
def gpu_machine(v100_machine) -> Hardware:
    """A node of 8 Tesla V100s, the hardware of PLSC's published GPU tables."""
    return v100_machine(8)

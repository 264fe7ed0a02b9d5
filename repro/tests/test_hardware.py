"""repro/hardware.py: what is detected, and how a missing GPU is explained."""

from __future__ import annotations

import pytest

from repro import hardware
from repro.hardware import Gpu, Hardware

pytestmark = pytest.mark.cpu


def test_this_machine_is_detected():
    machine = hardware.detect()
    assert machine.cpu_count >= 1 and machine.memory_mib > 0 and machine.cpu_model
    assert machine.gpu_source in ("paddle", "nvidia-smi", "none")
    assert machine.usable_gpus == (len(machine.gpus) if machine.paddle_cuda else 0)


@pytest.mark.parametrize(
    "flags, widest",
    [
        ({"sse4_2", "avx", "avx2", "avx512f", "avx512bw"}, "AVX-512"),
        ({"sse4_2", "avx", "avx2", "fma"}, "AVX2"),
        ({"sse4_2"}, "SSE4.2"),
        (set(), ""),
    ],
)
def test_the_widest_vector_extension_is_named(flags, widest):
    assert hardware.widest_vector_extension(flags) == widest


def test_the_cpu_line_names_its_vector_extension():
    machine = Hardware("EPYC", 2, 4096, cpu_vectors="AVX-512")
    assert machine.describe() == "CPU: EPYC (AVX-512), 2 cores, 4 GiB"
    assert Hardware("EPYC", 2, 4096).describe() == "CPU: EPYC, 2 cores, 4 GiB"


def test_nvidia_smi_lines_are_parsed():
    assert hardware._parse_nvidia_smi_line("Tesla V100-SXM2-32GB, 32510") == Gpu(
        "Tesla V100-SXM2-32GB", 32510
    )


@pytest.mark.parametrize(
    "endpoints, nodes",
    [
        ("", 1),
        ("127.0.0.1:6170,127.0.0.1:6171", 1),
        ("10.0.0.1:6170,10.0.0.1:6171,10.0.0.2:6170,10.0.0.2:6171", 2),
    ],
)
def test_nodes_are_the_distinct_hosts_of_the_launch(endpoints, nodes):
    assert hardware.node_count({"PADDLE_TRAINER_ENDPOINTS": endpoints}) == nodes


@pytest.mark.parametrize(
    "machine, says",
    [
        (Hardware("c", 2, 1024, paddle_version="3.3.1"), "paddle 3.3.1 is not compiled with CUDA"),
        (Hardware("c", 2, 1024), "paddle is not installed"),
        (
            Hardware(
                "c", 2, 1024, gpus=(Gpu("A100", 40960),), gpu_source="nvidia-smi", paddle_version="3.3.1"
            ),
            "found 1 with nvidia-smi, but paddle 3.3.1 is not compiled with CUDA (install paddlepaddle-gpu)",
        ),
        (Hardware("c", 2, 1024, gpus=(Gpu("A100", 40960),), paddle_cuda=True), "found 1 (A100, 40960 MiB)"),
    ],
)
def test_the_gpu_summary_says_why_there_is_no_usable_gpu(machine, says):
    assert says in machine.gpu_summary()

"""What this machine has: GPUs (through Paddle, else nvidia-smi), CPU model and memory, node count.

GPUs are read from ``paddle.device.cuda`` when Paddle is compiled with CUDA (those are the GPUs a test can
use); otherwise ``nvidia-smi`` is asked, so that a CPU-only Paddle on a GPU machine is reported as such
instead of as "no GPU". Paddle is imported only when :func:`detect` is called, and detection runs once per
process.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass

NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int


@dataclass(frozen=True)
class Hardware:
    cpu_model: str
    cpu_count: int
    memory_mib: int
    gpus: tuple[Gpu, ...] = ()
    gpu_source: str = "none"  # paddle | nvidia-smi | none
    paddle_cuda: bool = False  # whether the installed Paddle can use the GPUs at all
    paddle_version: str = "not installed"
    nodes: int = 1
    # The widest x86 vector extension the CPU has (AVX-512, AVX2, ...): kernels may take other paths on it.
    cpu_vectors: str = ""

    @property
    def usable_gpus(self) -> int:
        """GPUs Paddle can run on: nvidia-smi's count does not help a CPU-only Paddle."""
        return len(self.gpus) if self.paddle_cuda else 0

    def gpu_summary(self) -> str:
        if self.usable_gpus:
            return f"found {self.usable_gpus} ({self.gpus[0].name}, {self.gpus[0].memory_mib} MiB)"
        if self.gpus:
            return (
                f"found {len(self.gpus)} with nvidia-smi, but paddle {self.paddle_version} is not compiled "
                "with CUDA (install paddlepaddle-gpu)"
            )
        if self.paddle_version == "not installed":
            return "found none (paddle is not installed and nvidia-smi is absent)"
        return f"found none (paddle {self.paddle_version} is not compiled with CUDA and nvidia-smi is absent)"

    def describe(self) -> str:
        """One line for tables: the GPUs when Paddle can use them, else the CPU."""
        if self.usable_gpus:
            return f"{self.usable_gpus} x {self.gpus[0].name} ({self.gpus[0].memory_mib} MiB)"
        vectors = f" ({self.cpu_vectors})" if self.cpu_vectors else ""
        return f"CPU: {self.cpu_model}{vectors}, {self.cpu_count} cores, {self.memory_mib // 1024} GiB"

    def to_dict(self) -> dict:
        """JSON-shaped: what a result file stores and reads back unchanged."""
        return {**asdict(self), "gpus": [asdict(gpu) for gpu in self.gpus]}


@functools.cache
def detect() -> Hardware:
    paddle_version, paddle_cuda, gpus = _paddle_gpus()
    source = "paddle" if gpus else "none"
    if not gpus:
        gpus = _nvidia_smi_gpus()
        source = "nvidia-smi" if gpus else "none"
    return Hardware(
        cpu_model=_cpu_model(),
        cpu_vectors=widest_vector_extension(_cpu_flags()),
        cpu_count=os.cpu_count() or 1,
        memory_mib=_memory_mib(),
        gpus=gpus,
        gpu_source=source,
        paddle_cuda=paddle_cuda,
        paddle_version=paddle_version,
        nodes=node_count(),
    )


def node_count(environ: dict[str, str] | None = None) -> int:
    """Distinct hosts in PADDLE_TRAINER_ENDPOINTS (set by paddle.distributed.launch), 1 outside a launch."""
    endpoints = (environ if environ is not None else os.environ).get("PADDLE_TRAINER_ENDPOINTS", "")
    hosts = {endpoint.rsplit(":", 1)[0] for endpoint in endpoints.split(",") if endpoint.strip()}
    return max(len(hosts), 1)


def _paddle_gpus() -> tuple[str, bool, tuple[Gpu, ...]]:
    try:
        import paddle
    except ImportError:
        return "not installed", False, ()
    if not paddle.device.is_compiled_with_cuda():
        return paddle.__version__, False, ()
    gpus = []
    for index in range(paddle.device.cuda.device_count()):
        properties = paddle.device.cuda.get_device_properties(index)
        gpus.append(Gpu(name=properties.name, memory_mib=int(properties.total_memory) // 2**20))
    return paddle.__version__, True, tuple(gpus)


def _nvidia_smi_gpus() -> tuple[Gpu, ...]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return ()
    try:
        output = subprocess.run(
            [executable, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(_parse_nvidia_smi_line(line) for line in output.splitlines() if line.strip())


def _parse_nvidia_smi_line(line: str) -> Gpu:
    name, memory = (part.strip() for part in line.rsplit(",", 1))
    return Gpu(name=name, memory_mib=int(float(memory)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# /proc/cpuinfo flag -> name, widest first
VECTOR_EXTENSIONS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2"))


def widest_vector_extension(flags: set[str]) -> str:
    """The widest of VECTOR_EXTENSIONS among a CPU's flags; "" when none (or not an x86 CPU)."""
    return next((name for flag, name in VECTOR_EXTENSIONS if flag in flags), "")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _memory_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        return 0

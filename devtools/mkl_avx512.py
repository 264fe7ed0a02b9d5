"""Run a command with MKL's Intel-CPU check answered yes: a measurement aid, never part of the product.

The MKL that Paddle's CPU wheels bundle picks its kernels by CPU vendor: on a non-Intel CPU with AVX-512
(an AMD EPYC, for one) it takes generic kernels, and the head's matmuls run 3-4x slower than the CPU can.
Preloading a library whose ``mkl_serv_intel_cpu_true`` returns 1 makes MKL take its AVX-512 path, so such a
host measures as an AVX-512 host would (docs/performance.md). The library is built here at run time (gcc)
into a temporary folder.

    python devtools/mkl_avx512.py .venv/bin/plsc bench head --classes 100000 --ratio 0.1
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM_SOURCE = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"


def build_shim(folder: Path) -> Path:
    source, library = folder / "intel_cpu.c", folder / "intel_cpu.so"
    source.write_text(SHIM_SOURCE)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
    return library


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mkl_avx512_") as folder:
        library = build_shim(Path(folder))
        preload = " ".join(p for p in (str(library), os.environ.get("LD_PRELOAD", "")) if p)
        return subprocess.run(argv, env={**os.environ, "LD_PRELOAD": preload}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""glibc malloc settings of plsc's command-line processes.

Paddle's CPU tensors come from malloc, which maps every block above its mmap threshold (128 KiB, rising to
at most 32 MiB) afresh and unmaps it when it is freed. A head step at a million classes makes several larger
tensors ([sampled, emb] rows, gradients, velocities): each new one faults in page by page, and on a virtual
machine that can cost ~3 us per 4 KiB page, more than the arithmetic on it (measured: a gather of 100,000 x
512 rows and one multiply, 0.31 s with 4 KiB pages, 0.10 s with 2 MiB transparent huge pages).
``glibc.malloc.hugetlb=1`` makes malloc ask for huge pages on those mappings (``madvise``), 512x fewer
faults; memory is still given back when freed, so peak RSS is unchanged. (Keeping freed memory in the heap
instead, ``mmap_max=0``, is faster still but raised peak RSS per class by 47% at a million classes: freed
blocks that do not fit the next request stay resident.) See ``plsc bench head --malloc``.

Blocks under 32 MiB come from the heap (``mmap_threshold``), and up to 128 MiB of freed heap stays mapped
(``trim_threshold``): a training batch handed to Paddle (2.4 MB at 64 x 3 x 112 x 112) is then copied into
memory that is already there, 0.2 ms instead of 1.4 ms of page faults per batch (measured), while the head's
large tensors are still mapped and unmapped per step (peak RSS per class at a million classes: 4,574 bytes
with these settings against 4,650-4,675 with huge pages alone, one run each).

GLIBC_TUNABLES is read once, when a process starts, so the ``plsc`` command re-executes itself with it set.
A GLIBC_TUNABLES already in the environment (even empty) is left alone: that is how to opt out.
"""

from __future__ import annotations

import os
import sys

# Huge pages for mapped blocks, and the heap thresholds above.
MALLOC_SETTINGS = ":".join([
    "glibc.malloc.hugetlb=1",
    f"glibc.malloc.mmap_threshold={32 * 2**20}",
    f"glibc.malloc.trim_threshold={128 * 2**20}",
])


def reexec_with_huge_pages(module: str, argv: list[str]) -> None:
    """Replace this process (same pid) by ``python -m module *argv`` with GLIBC_TUNABLES set, unless it is
    already set or this is not Linux; returns only in those cases."""
    if "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    environment = {**os.environ, "GLIBC_TUNABLES": MALLOC_SETTINGS}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], environment)

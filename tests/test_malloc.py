"""plsc.malloc: the plsc command restarts itself with huge-page malloc, and that saves page faults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plsc.malloc import MALLOC_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import os, sys
print(os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""
CALLER = """
import os
print(os.getpid(), flush=True)
from plsc.malloc import reexec_with_huge_pages
reexec_with_huge_pages("probe", ["a b", "--c"])
print("not replaced")
"""


def run_python(code: str, tmp_path: Path, **env_changes) -> list[str]:
    (tmp_path / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_changes, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GLIBC_TUNABLES is a Linux (glibc) setting")
def test_reexec_replaces_the_process_with_the_tunable_and_the_same_arguments(tmp_path):
    caller_pid, probe = run_python(CALLER, tmp_path)
    assert probe == f"{caller_pid} {MALLOC_SETTINGS} ['a b', '--c']"  # same pid: exec, not a child


def test_a_tunable_already_set_is_left_alone(tmp_path):
    lines = run_python(CALLER, tmp_path, GLIBC_TUNABLES="")
    assert lines[1:] == ["not replaced"]


FAULTS = """
import resource, paddle  # numpy would not do: it asks for huge pages itself (madvise) on large arrays
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = paddle.ones([64 * 2**20])  # 256 MiB: far above malloc's 32 MiB mmap threshold
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def transparent_huge_pages() -> str:
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "missing"
    return setting.split("[")[1].split("]")[0] if "[" in setting else setting.strip()


@pytest.mark.skipif(transparent_huge_pages() not in ("madvise", "always"),
                    reason=f"transparent huge pages are {transparent_huge_pages()} on this kernel")
def test_huge_page_malloc_faults_a_large_block_in_far_fewer_pieces():
    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables is not None:
            env["GLIBC_TUNABLES"] = tunables
        command = [sys.executable, "-c", FAULTS]
        return int(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)

    small_pages, huge_pages = faults(None), faults(MALLOC_SETTINGS)
    assert small_pages >= 60_000  # 256 MiB / 4 KiB = 65,536 faults
    assert huge_pages <= small_pages / 20, (small_pages, huge_pages)

"""The install is quiet: `make venv` (pip -q, editable) shows nothing from the build backend."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.cpu_slow
def test_editable_install_prints_no_build_backend_notice(tmp_path, project_root):
    """Slow tier: pip builds in an isolated environment, fetching setuptools from the index (~20 s)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    result = subprocess.run([*pip, "install", "--quiet", "--no-deps", "-e", str(project_root)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # Lines from pip's own configuration ("WARNING: Location ... is ignored") are not the project's.
    backend = [line for line in (result.stdout + result.stderr).splitlines() if "Location 'file" not in line]
    assert not [line for line in backend if line.strip()], "\n".join(backend)
    pth = list((venv / "lib").glob("python3*/site-packages/__editable__.plsc-*.pth"))
    assert len(pth) == 1 and pth[0].read_text().strip() == str(project_root)

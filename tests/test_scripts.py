"""scripts/*.sh under POSIX sh (dash, Debian's /bin/sh): syntax, the interpreter they pick, launcher flags.

The scripts run with a stand-in interpreter that prints its arguments (and answers the GPU-count question),
so what each script would run is compared with the command line expected. Runs of the real thing:
tests/test_export.py (export, inference, validation) and tests/test_distributed.py (training, 2 processes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
DASH = shutil.which("dash")
needs_dash = pytest.mark.skipif(DASH is None, reason="dash (Debian's /bin/sh) is not installed")

FAKE_PYTHON = """#!/bin/sh
# Stand-in interpreter: answers train_dynamic.sh's GPU count with $FAKE_GPUS, echoes anything else.
if [ "$1" = "-c" ]; then echo "${FAKE_GPUS:-0}"; else echo "$(basename "$0") $*"; fi
"""


def shell() -> str:
    return DASH or "sh"


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "VIRTUAL_ENV", "NPROC")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("TRAINER_IP_LIST", None)
    env.pop("PLSC_DATA_ROOT", None)
    return {**env, **extra}


def fake_python(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def run(script: Path, *args: str, env: dict[str, str], cwd: Path | None = None) -> str:
    proc = subprocess.run([shell(), str(script), *args], env=env, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@needs_dash
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_script_is_posix_sh(script):
    proc = subprocess.run([DASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    first = script.read_text().splitlines()[0]
    assert first == "#!/bin/sh" or script.name == "_python.sh"


def copy_of_scripts(root: Path) -> Path:
    shutil.copytree(ROOT / "scripts", root / "scripts")
    return root / "scripts"


def test_scripts_use_the_repository_venv_without_an_activated_one(tmp_path):
    scripts = copy_of_scripts(tmp_path / "repo")
    fake_python(tmp_path / "repo" / ".venv" / "bin" / "python")
    out = run(scripts / "inference.sh", env=clean_env(MODEL="m", IMAGE_PATH="faces"))
    assert out == "python -m plsc.cli infer --model m --images faces --engine paddle --batch-size 32"


def test_an_activated_venv_or_python_wins_over_the_repository_venv(tmp_path):
    scripts = copy_of_scripts(tmp_path / "repo")
    fake_python(tmp_path / "repo" / ".venv" / "bin" / "python").write_text("#!/bin/sh\necho wrong venv\n")
    active = fake_python(tmp_path / "active" / "bin" / "python")
    path = f"{active.parent}{os.pathsep}{os.environ['PATH']}"
    env = clean_env(VIRTUAL_ENV=str(active.parent.parent), PATH=path, CHECKPOINT_DIR="ck", OUTPUT_DIR="out")
    expected = "python -m plsc.cli export --checkpoint ck --format paddle --output out"
    assert run(scripts / "export_static.sh", env=env) == expected
    chosen = fake_python(tmp_path / "chosen" / "python3.11")
    env = clean_env(PYTHON=str(chosen), CHECKPOINT_DIR="ck", VAL_TARGETS="lfw,agedb_30", DATA_DIR="d")
    assert run(scripts / "validation_dynamic.sh", env=env) == (
        "python3.11 -m plsc.cli eval --checkpoint ck --batch-size 128 --bin d/lfw.bin --bin d/agedb_30.bin")
    env = clean_env(PYTHON=str(chosen), CHECKPOINT_DIR="ck", VAL_TARGETS="lfw", PLSC_DATA_ROOT="/data")
    assert run(scripts / "validation_dynamic.sh", env=env).endswith("--bin /data/MS1M_v3/lfw.bin")


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--nproc", "2", "c.yaml", "--output", "o"], {},
         "-m paddle.distributed.launch --nproc_per_node 2 PY -m plsc.cli train --config c.yaml --output o"),
        (["c.yaml"], {"CUDA_VISIBLE_DEVICES": "0,1", "FAKE_GPUS": "0"},  # a CPU build ignores the GPU list
         "-m paddle.distributed.launch --nproc_per_node 1 PY -m plsc.cli train --config c.yaml"),
        (["c.yaml"], {"CUDA_VISIBLE_DEVICES": "0,3", "FAKE_GPUS": "8",
                      "TRAINER_IP_LIST": "10.0.0.1,10.0.0.2"},
         "-m paddle.distributed.launch --ips 10.0.0.1,10.0.0.2 --gpus 0,3 PY -m plsc.cli train "
         "--config c.yaml"),
        ([], {"FAKE_GPUS": "8"},
         "-m paddle.distributed.launch PY -m plsc.cli train "
         "--config configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml"),
    ],
)
def test_train_dynamic_builds_the_launcher_command(tmp_path, args, env, expected):
    python = fake_python(tmp_path / "bin" / "python")
    out = run(ROOT / "scripts" / "train_dynamic.sh", *args, env=clean_env(PYTHON=str(python), **env))
    assert out == "python " + expected.replace("PY", str(python))


def test_train_static_adds_static_mode_and_passes_nproc(tmp_path):
    python = fake_python(tmp_path / "bin" / "python")
    out = run(ROOT / "scripts" / "train_static.sh", "--nproc", "2", "c.yaml", "--set", "train.max_steps=2",
              env=clean_env(PYTHON=str(python)))
    assert out == (f"python -m paddle.distributed.launch --nproc_per_node 2 {python} -m plsc.cli train "
                   "--config c.yaml --set train.mode=static --set train.max_steps=2")


def test_demo_passes_detector_threshold_and_font(tmp_path):
    env = clean_env(PYTHON="echo", MODEL="m", GALLERY="g", INDEX="i.npz", INPUT="q.jpg", OUTPUT="r",
                    DET_MODEL="det.pdmodel", THRESHOLD="0.3", FONT="f.otf")
    lines = run(ROOT / "scripts" / "demo.sh", env=env).splitlines()
    assert lines == [
        "-m plsc.cli demo index --gallery g --label g/label.txt --model m --index i.npz "
        "--det-model-file-path det.pdmodel",
        "-m plsc.cli demo recognize --index i.npz --model m --input q.jpg --output r --cdd-num 10 "
        "--threshold 0.3 --font f.otf --det-model-file-path det.pdmodel",
    ]


def test_find_maximum_classes_static_runs_the_bisection_in_static_mode(tmp_path):
    python = fake_python(tmp_path / "bin" / "python")
    out = run(ROOT / "scripts" / "find_maximum_classes_static.sh", "--memory-cap-mib", "900",
              env=clean_env(PYTHON=str(python), PYTHONPATH="/elsewhere"))
    assert out == "python -m repro.capacity.find_maximum --mode static --memory-cap-mib 900"
    python.write_text('#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH"\n')  # repro/ must be importable
    pythonpath = run(ROOT / "scripts" / "find_maximum_classes_static.sh",
                     env=clean_env(PYTHON=str(python), PYTHONPATH="/elsewhere"))
    assert pythonpath == f"PYTHONPATH={ROOT}:/elsewhere"


def test_find_maximum_classes_on_the_cpu_brackets_under_a_memory_cap(tmp_path):
    """Two real trials of repro/capacity/cpu_capacity.yaml (16 px, 1 step) under a 1.25 GiB peak-RSS cap: 1000
    classes fit, 4 million (2 x 4M x 128 float16 centers and velocities = 2 GiB) cannot; the bracket and every
    trial land in result.json, each trial's log beside it."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [shell(), str(ROOT / "scripts" / "find_maximum_classes_dynamic.sh"), "--config",
         str(ROOT / "repro" / "capacity" / "cpu_capacity.yaml"), "--memory-cap-mib", "1280", "--low", "1000",
         "--high", "4000000", "--bisections", "0", "--output", str(out)],
        env=clean_env(PYTHON=sys.executable), cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert (result["max_classes"], result["fails_at_classes"]) == (1000, 4_000_000)
    assert [(t["classes"], t["fits"]) for t in result["trials"]] == [(1000, True), (4_000_000, False)]
    assert result["trials"][0]["reason"] == "finished" and result["trials"][0]["peak_rss_mib"] < 1280
    assert result["mode"] == "dynamic" and result["device"] == "CPU, peak RSS cap 1280.0 MiB"
    assert (out / "trial-1000.log").is_file() and (out / "trial-4000000.log").is_file()
    assert "largest class count that fits: 1,000 (4,000,000 does not)" in proc.stdout


def test_find_maximum_classes_without_a_gpu_needs_a_memory_cap(tmp_path):
    script = ROOT / "scripts" / "find_maximum_classes_dynamic.sh"
    proc = subprocess.run([shell(), str(script), "--output", str(tmp_path)],
                          env=clean_env(PYTHON=sys.executable), capture_output=True, text=True)
    assert proc.returncode == 1 and "on the CPU give --memory-cap-mib M" in proc.stderr

"""scripts/*.sh under POSIX sh (dash, Debian's /bin/sh): syntax, the interpreter they pick, launcher flags.

The scripts run with a stand-in interpreter that prints its arguments (and answers the GPU-count question),
so what each script would run is compared with the command line expected. Runs of the real thing:
tests/test_export.py (export, inference, validation) and tests/test_distributed.py (training, 2 processes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_run import TINY_RUN

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
        (["--nproc", "2", "c.yaml", "--output", "o"], {}, "train --config c.yaml --nproc 2 --output o"),
        (["c.yaml"], {"CUDA_VISIBLE_DEVICES": "0,1", "FAKE_GPUS": "0"},  # a CPU build: one process
         "train --config c.yaml --nproc 1"),
        (["c.yaml"], {"CUDA_VISIBLE_DEVICES": "0,3", "FAKE_GPUS": "2",
                      "TRAINER_IP_LIST": "10.0.0.1,10.0.0.2"},
         "train --config c.yaml --nproc 2 --nodes 10.0.0.1,10.0.0.2"),
        ([], {"FAKE_GPUS": "8"}, "train --config configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml --nproc 8"),
    ],
)
def test_train_dynamic_runs_plsc_train_with_nproc(tmp_path, args, env, expected):
    """The scripts start processes through `plsc train --nproc` (plsc.launch), never the launcher itself."""
    python = fake_python(tmp_path / "bin" / "python")
    out = run(ROOT / "scripts" / "train_dynamic.sh", *args, env=clean_env(PYTHON=str(python), **env))
    assert out == "python -m plsc.cli " + expected


def test_train_static_adds_static_mode_and_passes_nproc(tmp_path):
    python = fake_python(tmp_path / "bin" / "python")
    out = run(ROOT / "scripts" / "train_static.sh", "--nproc", "2", "c.yaml", "--set", "train.max_steps=2",
              env=clean_env(PYTHON=str(python)))
    assert out == ("python -m plsc.cli train --config c.yaml --nproc 2 --set train.mode=static "
                   "--set train.max_steps=2")


def test_demo_passes_detector_threshold_and_font(tmp_path):
    env = clean_env(PYTHON="echo", MODEL="m", GALLERY="g", INDEX="i.npz", INPUT="q.jpg", OUTPUT="r",
                    DET_MODEL="det.pdmodel", THRESHOLD="0.3", FONT="f.otf")
    lines = run(ROOT / "scripts" / "demo.sh", env=env).splitlines()
    assert lines == [
        "-m plsc.cli demo index --gallery g --label g/label.txt --model m --index i.npz "
        "--det-model-file-path det.pdmodel --detector haar",
        "-m plsc.cli demo recognize --index i.npz --model m --input q.jpg --output r --cdd-num 10 "
        "--threshold 0.3 --font f.otf --det-model-file-path det.pdmodel --detector haar",
    ]


def run_failing(script: Path, env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([shell(), str(script)], env=env, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    return line


def test_demo_with_its_defaults_says_what_it_needs_that_is_not_bundled(tmp_path):
    """From a repository checkout without the shared demo photos, then without the faces_mini model."""
    env = clean_env(PYTHON="echo")
    line = run_failing(ROOT / "scripts" / "demo.sh", env, tmp_path)
    assert line.startswith("demo.sh: ../shared/data/demo/gallery not found: the demo photos are not in the ")
    demo = tmp_path / "demo"
    (demo / "gallery").mkdir(parents=True)
    (demo / "query").mkdir()
    (demo / "query" / "expected.json").write_text("{}")
    line = run_failing(ROOT / "scripts" / "demo.sh", {**env, "DEMO": str(demo)}, tmp_path)
    assert line.startswith("demo.sh: output/faces_mini/best_model/lfw_disjoint not found: train it with "
                           "'PLSC_DATA_ROOT=../shared/data plsc train --config configs/cpu/faces_mini.yaml'")
    model = tmp_path / "output" / "faces_mini" / "best_model" / "lfw_disjoint"
    model.mkdir(parents=True)
    lines = run(ROOT / "scripts" / "demo.sh", env={**env, "DEMO": str(demo)}, cwd=tmp_path).splitlines()
    assert lines[0].startswith(f"-m plsc.cli demo index --gallery {demo}/gallery ")
    assert f"--model {model.relative_to(tmp_path)} " in lines[0]
    assert lines[2].endswith(f"--expected {demo}/query/expected.json")  # the default query is scored


def test_find_maximum_classes_static_runs_the_bisection_in_static_mode(tmp_path):
    python = fake_python(tmp_path / "bin" / "python")
    out = run(ROOT / "scripts" / "find_maximum_classes_static.sh", "--memory-cap-mib", "900",
              env=clean_env(PYTHON=str(python), PYTHONPATH="/elsewhere"))
    assert out == "python -m repro.capacity.find_maximum --mode static --memory-cap-mib 900"
    python.write_text('#!/bin/sh\necho "PYTHONPATH=$PYTHONPATH"\n')  # repro/ must be importable
    pythonpath = run(ROOT / "scripts" / "find_maximum_classes_static.sh",
                     env=clean_env(PYTHON=str(python), PYTHONPATH="/elsewhere"))
    assert pythonpath == f"PYTHONPATH={ROOT}:/elsewhere"


@pytest.mark.cpu_slow(reason="a bracketing search of real trainings under a memory cap (~50 s)")
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


# What plsc itself prints: its log records, and the summary lines of `plsc train`.
PLSC_LINE = re.compile(r"^(\d\d:\d\d:\d\d (INFO|WARNING) |checkpoint: |wall time: |plsc: )")
# What the launcher and the framework print, which belongs in <output>/log only.
CHATTER = ("LAUNCH", "UserWarning", "FLAGS", "Traceback", "ccache")


def run_real_script(script: str, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``script`` run with this interpreter (plsc and Paddle installed) from ``cwd``, on the tiny faces."""
    config = ROOT / "configs" / "cpu" / "mini.yaml"
    settings = [*TINY_RUN, f"data.root={ROOT / 'data' / 'tiny'}", "train.max_steps=1",
                "train.eval_interval=0"]
    flags = [flag for setting in settings for flag in ("--set", setting)]
    cwd.mkdir(parents=True, exist_ok=True)
    command = [shell(), str(ROOT / "scripts" / script), *args[:2], str(config), *args[2:], *flags]
    return subprocess.run(command,
                          env=clean_env(PYTHON=sys.executable, OMP_NUM_THREADS="1", **env), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_train_dynamic_on_two_processes_prints_plscs_lines_only_and_writes_nothing_here(tmp_path):
    had_log = (ROOT / "log").exists()
    output, cwd = tmp_path / "run", tmp_path / "here"
    proc = run_real_script("train_dynamic.sh", cwd, "--nproc", "2", "--output", str(output),
                           "--set", "data.val_bins=[]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert [line for line in lines if not PLSC_LINE.match(line)] == []
    assert not any(word in proc.stdout + proc.stderr for word in CHATTER)
    started = "plsc: 2 processes started by paddle.distributed.launch; every rank's log and the launcher's in"
    assert proc.stderr.splitlines() == [f"{started} {output / 'log'}"]
    assert (output / "log" / "launcher.log").stat().st_size > 0  # the launcher's lines went there
    assert list(cwd.iterdir()) == []
    assert (ROOT / "log").exists() == had_log


def test_train_static_error_on_the_ranks_is_printed_once(tmp_path):
    missing = tmp_path / "missing.bin"  # read by each rank
    proc = run_real_script("train_static.sh", tmp_path / "here", "--nproc", "2", "--output",
                           str(tmp_path / "run"), "--set", f"data.val_bins=[{missing}]")
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).count(f"{missing} not found") == 1
    assert not any(word in proc.stdout + proc.stderr for word in CHATTER)


def test_unreachable_nodes_end_in_one_line_naming_them(tmp_path):
    """127.0.0.2 is this machine's too, but nothing there joins: the first node gives up after
    train.node_wait_s with one line, before any process or log folder exists."""
    output = tmp_path / "run"
    proc = run_real_script("train_dynamic.sh", tmp_path / "here", "--nproc", "1", "--output", str(output),
                           "--set", "train.node_wait_s=1", TRAINER_IP_LIST="127.0.0.1,127.0.0.2")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("plsc: error: node(s) 127.0.0.2 did not join within 1 s")
    assert "Traceback" not in proc.stderr
    assert not (output / "log").exists()

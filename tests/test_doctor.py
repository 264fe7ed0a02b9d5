"""``plsc doctor`` on a CPU machine: the CPU subset passes, GPU checks say so, failures exit 1 with advice."""

from __future__ import annotations

import json
import re

import paddle
import pytest

from plsc import cli, doctor
from plsc.loss import int8_rows

ROW = (r"((?:Paddle install check|fast path \S+|int8 velocity|train 5 steps, [^,]+, \w+ \w+|"
       r"fp16 train, verify, resume, verify))\s{2,}(.*)")


def rows_of(output: str) -> dict[str, str]:
    """check name -> the rest of its table row (first line of it)."""
    rows = {}
    for line in output.splitlines():
        match = re.match(ROW, line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


@pytest.mark.cpu_slow(reason="every CPU check of plsc doctor end to end (~40 s); each check has its "
                              "own fast test")
def test_doctor_on_cpu_passes_the_cpu_subset_and_names_the_gpu_checks(tmp_path, capsys):
    assert cli.main(["doctor", "--output", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    rows = rows_of(output)
    assert len(rows) == 17 - 3 and "Paddle" in output and "not compiled with CUDA" in output
    assert rows["Paddle install check"].startswith("pass")
    for name in ("margin_cross_entropy", "class_center_sample", "cudnn_nhwc"):
        assert rows[f"fast path {name}"].startswith("needs a GPU")
    dynamic = rows["train 5 steps, 1 device, dynamic fp32"]
    static = rows["train 5 steps, 1 device, static fp32"]
    assert dynamic.startswith("pass") and static.startswith("pass")
    # Static mode reproduces dynamic mode's losses: both runs really trained, the same 5 steps.
    assert re.search(r"loss (\S+) at step 5", dynamic).group(1) == re.search(r"loss (\S+)", static).group(1)
    for mode in ("dynamic", "static"):
        assert rows[f"train 5 steps, 1 device, {mode} fp16"] == "needs a GPU"
        assert rows[f"train 5 steps, all GPUs, {mode} fp32"] == "needs a GPU"
    assert rows["int8 velocity"].startswith("pass")
    assert rows[doctor.FP16_RESUME] == "needs a GPU"
    assert "4 passed, 0 failed, 10 need a GPU" in output
    assert (tmp_path / "run_check.log").read_text().count("works well") == 1  # captured, not printed
    assert "works well" not in output.replace("PaddlePaddle works well on 1 CPU.", "")


def test_failures_exit_1_with_what_to_do(tmp_path, capsys, monkeypatch):
    def broken_install():
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(paddle.utils, "run_check", broken_install)
    broken_int8 = "gather after scatter differs from numpy's quantisation"
    monkeypatch.setattr(int8_rows, "self_check", lambda: broken_int8)
    missing_model = {**doctor.TINY_CONFIG["model"], "name": "resnet_missing"}
    monkeypatch.setitem(doctor.TINY_CONFIG, "model", missing_model)
    assert cli.main(["doctor", "--output", str(tmp_path)]) == 1
    output = capsys.readouterr().out
    rows = rows_of(output)
    assert re.match(r"FAIL\s+CUDA driver version is insufficient", rows["Paddle install check"])
    assert "Paddle itself does not work here" in rows["Paddle install check"]
    for mode in ("dynamic", "static"):
        row = rows[f"train 5 steps, 1 device, {mode} fp32"]
        assert re.match(r"FAIL\s+exit 2: plsc: error: ", row) and "read the log" in row
        assert "resnet_missing" in (tmp_path / f"1dev_{mode}_fp32.log").read_text()
    assert re.match(r"FAIL\s+gather after scatter differs", rows["int8 velocity"])
    assert "train with loss.velocity_dtype same" in rows["int8 velocity"]
    assert "0 passed, 4 failed" in output


@pytest.mark.parametrize("gpus, runnable, skipped", [(0, 2, 0), (1, 4, 4), (8, 8, 0)])
def test_train_cases_by_gpu_count(gpus, runnable, skipped):
    cases = doctor.train_cases(gpus)
    assert len(cases) == 8
    assert sum(reason is None for _, reason in cases) == runnable
    assert sum(reason not in (None, doctor.NEEDS_GPU) for _, reason in cases) == skipped
    if gpus == 8:
        assert {case.nproc for case, _ in cases} == {1, 8}
        assert "all 8 GPUs" in cases[-1][0].name


def test_train_command_flags(tmp_path):
    case = doctor.TrainCase("static", "fp16", 4)
    command = doctor.train_command(tmp_path / "tiny.yaml", tmp_path / "out", case)
    text = " ".join(command)
    assert "-m plsc.cli train --config" in text
    assert "--set train.mode=static --set train.precision=fp16" in text
    assert "--set model.data_format=NHWC" in text and text.endswith("--nproc 4")
    assert "--nproc" not in " ".join(doctor.train_command(tmp_path / "t.yaml", tmp_path, doctor.TrainCase(
        "dynamic", "fp32", 1)))


@pytest.mark.cpu_slow(reason="runs the doctor row's train and resume commands (~40 s)")
def test_the_fp16_resume_row_runs_its_commands_and_reads_their_results(tmp_path):
    """The GPU-only row's own code, run on the CPU (where train.precision fp16 computes in float32: the
    float16 backbone's checkpoint, verification and resume paths are tests/test_fp16_o2.py's, under an
    emulation of the GPU's decoration). Both runs must train, the second from the first's checkpoint, and
    each must verify."""
    check = doctor.check_fp16_resume(doctor.write_tiny_config(tmp_path), tmp_path)
    assert check.status == doctor.PASS, check
    end = doctor.STEPS + doctor.RESUMED_STEPS
    assert check.detail.startswith(f"verified at steps {doctor.STEPS} and {end} (resumed at {doctor.STEPS})")
    said = (tmp_path / "1dev_dynamic_fp16_resume.log").read_text()
    assert f"resumed from {tmp_path / '1dev_dynamic_fp16_resume' / 'checkpoints' / str(doctor.STEPS)}" in said
    log = [json.loads(line) for line in (tmp_path / "1dev_dynamic_fp16_resume" / "train_log.jsonl").open()]
    log = [record for record in log if "loss" in record]  # evaluation records hold {"step", "eval"}
    assert [record["step"] for record in log] == list(range(1, end + 1))


def test_the_fp16_resume_row_fails_with_what_to_do(tmp_path, monkeypatch):
    missing_model = {**doctor.TINY_CONFIG["model"], "name": "resnet_missing"}
    monkeypatch.setitem(doctor.TINY_CONFIG, "model", missing_model)
    check = doctor.check_fp16_resume(doctor.write_tiny_config(tmp_path), tmp_path)
    assert check.status == doctor.FAIL and check.detail.startswith("exit 2: plsc: error: ")
    assert doctor.ADVICE["fp16"] in check.advice
    assert not (tmp_path / "1dev_dynamic_fp16_resume" / "checkpoints").exists()  # the resume never ran

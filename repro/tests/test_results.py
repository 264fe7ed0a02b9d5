"""repro/results.py: one JSON per case, written atomically, read back strictly."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from repro.claims import FAIL, PASS, load_claims
from repro.hardware import Hardware
from repro.results import (
    OUTPUT_RESULTS_DIR,
    RESULTS_DIR,
    ResultsError,
    chosen_results_dir,
    load_results,
    new_result,
    read_result,
    result_path,
    write_result,
)

pytestmark = pytest.mark.cpu


@pytest.fixture(scope="module")
def claims():
    return load_claims()


@pytest.fixture
def make_result(claims, cpu_machine):
    def make(claim_id: str, measured: dict, machine: Hardware = cpu_machine, tier: str = "cpu"):
        claim = claims.find(claim_id)[1]
        return new_result(
            claims,
            claim,
            tier=tier,
            config=getattr(claim, "config", "synthetic"),
            measured=measured,
            machine=machine,
            command="python -m pytest repro/accuracy -k res50_fp16",
            duration_s=1.23456,
        )

    return make


def test_a_result_carries_everything_the_issue_asks_for(make_result):
    result = make_result("dynamic_res50_fp16_nhwc_r0.1", {"agedb30": 0.9837, "cfp_fp": 0.9903, "lfw": 0.9985})
    assert result.verdict == PASS
    assert result.published == {"agedb30": 0.98367, "cfp_fp": 0.99029, "lfw": 0.9985}
    assert result.tolerance["value"] == 0.002
    assert result.config == "configs/ms1mv3_r50_dynamic_fp16_nhwc_r0.1.yaml"
    assert result.hardware["summary"] == "CPU: Test CPU, 2 cores, 4 GiB"
    assert {"plsc", "paddle", "paddle_cuda", "numpy", "python"} <= set(result.software)
    assert result.time.endswith("+00:00") and result.duration_s == 1.235


def test_a_wrong_measurement_fails(make_result):
    result = make_result("dynamic_res50_fp16_nhwc_r0.1", {"agedb30": 0.95, "cfp_fp": 0.9903, "lfw": 0.9985})
    assert result.verdict == FAIL
    assert "published" in result.explain() and "0.95" in result.explain()


def test_gpu_hardware_is_summarised_by_its_gpus(make_result, gpu_machine):
    result = make_result("capacity_paddle_static_fp16_res50", {"classes": 9.1e7}, gpu_machine, "gpu8")
    assert result.hardware["summary"] == "8 x Tesla V100-SXM2-32GB (32510 MiB)"
    assert result.verdict == PASS


def test_write_then_read_round_trips(tmp_path, make_result):
    result = make_result("static_res50_fp32_nchw_r0.1", {"agedb30": 0.98, "cfp_fp": 0.99, "lfw": 0.998})
    path = write_result(tmp_path, result)
    assert path == result_path(tmp_path, "cpu", "static_res50_fp32_nchw_r0.1") == tmp_path / "cpu" / path.name
    assert read_result(path) == result
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_rewriting_a_case_replaces_its_file(tmp_path, make_result):
    first = make_result("static_res50_fp32_nchw_r0.1", {"agedb30": 0.90, "cfp_fp": 0.99, "lfw": 0.998})
    second = make_result("static_res50_fp32_nchw_r0.1", {"agedb30": 0.98, "cfp_fp": 0.99, "lfw": 0.998})
    write_result(tmp_path, first)
    write_result(tmp_path, second)
    assert load_results(tmp_path) == {second.claim_id: second}


def test_the_newest_result_of_a_claim_wins_across_tiers(tmp_path, make_result):
    older = make_result("nhwc_fp16_memory", {"change": -0.1}, tier="gpu")
    newer = make_result("nhwc_fp16_memory", {"change": -0.3}, tier="gpu8")
    write_result(tmp_path, newer)
    write_result(tmp_path, type(older)(**{**older.__dict__, "time": "2000-01-01T00:00:00+00:00"}))
    assert load_results(tmp_path)["nhwc_fp16_memory"] == newer


def test_no_results_folder_means_no_results(tmp_path):
    assert load_results(tmp_path / "absent") == {}


def test_unknown_keys_in_a_result_are_errors(tmp_path, make_result):
    path = write_result(tmp_path, make_result("nhwc_fp16_memory", {"change": -0.3}, tier="gpu"))
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "colour": "red"}))
    with pytest.raises(ResultsError, match="unknown keys \\['colour'\\]"):
        read_result(path)


def test_unreadable_results_are_errors(tmp_path):
    path = tmp_path / "cpu" / "x.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(ResultsError, match="cannot read result"):
        load_results(tmp_path)


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=RESULTS_DIR, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to tell tracked from ignored files")
def test_a_run_writes_an_untracked_folder_unless_asked_to_update_the_committed_results(tmp_path):
    if git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("the project is not a git work tree here: nothing is tracked")
    default = chosen_results_dir(None, update_committed=False)
    assert default == OUTPUT_RESULTS_DIR
    assert git("check-ignore", "-q", str(default / "cpu" / "a_claim.json")).returncode == 0  # git ignores it
    assert chosen_results_dir(tmp_path, update_committed=False) == tmp_path
    committed = chosen_results_dir(None, update_committed=True)
    assert committed == RESULTS_DIR and git("ls-files", str(committed)).stdout.strip()  # tracked files
    assert chosen_results_dir(RESULTS_DIR, update_committed=True) == RESULTS_DIR
    with pytest.raises(ValueError, match="--update-results writes"):
        chosen_results_dir(tmp_path, update_committed=True)

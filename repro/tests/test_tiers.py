"""The tier plugin (repro/tiers.py): every test is collected; a missing tier is a skip with a reason."""

from __future__ import annotations

import pytest

from repro import hardware
from repro.hardware import Hardware

pytestmark = pytest.mark.cpu

ONE_TEST_PER_TIER = """
import pytest

def test_unmarked():
    pass

@pytest.mark.cpu
def test_cpu():
    pass

@pytest.mark.cpu_slow
def test_cpu_slow():
    pass

@pytest.mark.gpu
def test_gpu(gpu_count):
    assert gpu_count >= 1

@pytest.mark.gpu8
def test_gpu8(gpu_count):
    assert gpu_count >= 8

@pytest.mark.multinode
def test_multinode():
    pass
"""


@pytest.fixture
def tier_run(pytester, monkeypatch):
    """Run ONE_TEST_PER_TIER under the tier plugin on a machine with the given hardware."""
    pytester.makepyfile(test_tiers_demo=ONE_TEST_PER_TIER)

    def run(machine: Hardware, *args: str) -> pytest.RunResult:
        monkeypatch.setattr(hardware, "detect", lambda: machine)
        return pytester.runpytest("-p", "repro.tiers", "-rs", *args)

    return run


def test_without_gpus_only_the_cpu_tier_runs_and_the_rest_say_what_they_need(tier_run, cpu_machine):
    result = tier_run(cpu_machine)
    result.assert_outcomes(passed=2, skipped=4)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED*cpu_slow tier: too slow for the unit tier; run with --run-slow",
            "SKIPPED*gpu tier: needs 1 GPU(s) usable by paddle; found none (paddle 3.3.1 is not compiled*",
            "SKIPPED*gpu8 tier: needs 8 GPU(s) usable by paddle; found none*",
            "SKIPPED*multinode tier: needs 2+ nodes*found 1 node",
        ]
    )


def test_run_slow_runs_the_cpu_slow_tier(tier_run, cpu_machine):
    tier_run(cpu_machine, "--run-slow").assert_outcomes(passed=3, skipped=3)


def test_a_slow_tests_skip_says_what_makes_it_slow(pytester, cpu_machine, monkeypatch):
    pytester.makepyfile(
        test_slow_reason="""
import pytest

@pytest.mark.cpu_slow(reason="trains four models (~40 s)")
def test_slow():
    pass
"""
    )
    monkeypatch.setattr(hardware, "detect", lambda: cpu_machine)
    result = pytester.runpytest("-p", "repro.tiers", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*cpu_slow tier: too slow for the unit tier; run with --run-slow "
                                 "(trains four models (~40 s))"])


def test_two_gpus_run_the_gpu_tier_but_not_gpu8(tier_run, v100_machine):
    result = tier_run(v100_machine(2))
    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines(
        ["SKIPPED*gpu8 tier: needs 8 GPU(s) usable by paddle; found 2 (Tesla V100-SXM2-32GB, 32510 MiB)"]
    )


def test_eight_gpus_run_both_gpu_tiers(tier_run, v100_machine):
    tier_run(v100_machine(8)).assert_outcomes(passed=4, skipped=2)


def test_gpus_option_caps_the_gpus_a_tier_may_use(tier_run, v100_machine):
    result = tier_run(v100_machine(8), "--gpus", "1")
    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines(
        ["SKIPPED*gpu8 tier: needs 8 GPU(s) usable by paddle; --gpus 1 allows 1 of the 8 found"]
    )


def test_cpu_only_runs_never_detect_hardware(pytester, monkeypatch):
    def refuse():
        raise AssertionError("hardware detection ran for a CPU-only selection")

    monkeypatch.setattr(hardware, "detect", refuse)
    pytester.makepyfile(test_cpu_only="import pytest\n\n@pytest.mark.cpu\ndef test_cpu():\n    pass\n")
    pytester.runpytest("-p", "repro.tiers").assert_outcomes(passed=1)


def test_the_tier_markers_are_registered(pytester):
    result = pytester.runpytest("-p", "repro.tiers", "--markers")
    result.stdout.fnmatch_lines_random(
        [f"@pytest.mark.{tier}:*" for tier in ("cpu", "cpu_slow", "gpu", "gpu8")]
    )

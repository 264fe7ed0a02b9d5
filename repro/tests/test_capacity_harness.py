"""The capacity and throughput harness's own machinery: trials under a resident-memory cap, the bisection, the
steady-state throughput, and the claims and tables they feed. No training runs here (repro/capacity and
repro/throughput do that)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from repro import report
from repro.capacity.trials import (
    FINISHED,
    GUARD_FACTOR,
    OVER_CAP,
    REFUSED_MEMORY,
    STOPPED_DONE,
    Trial,
    TrialError,
    bisect_max_classes,
    run_trial,
)
from repro.claims import CLAIMS_FILE, ClaimsError, load_claims
from repro.hardware import Hardware
from repro.results import new_result
from repro.throughput.measure import RunFailed, check_finite_loss, steady_state

pytestmark = pytest.mark.cpu

MIB = 2**20


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# --- one trial


def test_a_trial_whose_resident_memory_passes_the_cap_does_not_fit(tmp_path):
    # 300 MiB written (resident) under a 200 MiB cap; within the guard, so the allocation itself succeeds.
    # It would sleep past the timeout (TrialError) unless stopped once its RSS passed the cap.
    code = "import time; b = bytearray(300 * 2**20); time.sleep(600)"
    trial = run_trial(7, python(code), tmp_path / "log", memory_cap_bytes=200 * MIB, timeout_s=120)
    assert (trial.classes, trial.fits, trial.reason) == (7, False, OVER_CAP)
    assert trial.peak_rss_bytes > 200 * MIB


def test_address_space_reserved_but_never_touched_is_not_resident_and_fits(tmp_path):
    # 300 MiB of private address space (RLIMIT_DATA counts it), never touched, under a 200 MiB cap on RSS.
    code = ("import mmap; m = mmap.mmap(-1, 300 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); "
            "print(open('/proc/self/status').read())")
    trial = run_trial(7, python(code), tmp_path / "log", memory_cap_bytes=200 * MIB)
    status = dict(line.split(":", 1) for line in (tmp_path / "log").read_text().splitlines() if ":" in line)
    assert int(status["VmData"].split()[0]) * 1024 > 300 * MIB  # the reservation is in the data segment
    assert (trial.fits, trial.reason) == (True, FINISHED) and trial.peak_rss_bytes < 200 * MIB


def test_an_allocation_far_beyond_the_cap_is_refused_by_the_guard_and_does_not_fit(tmp_path):
    cap = 100 * MIB
    code = f"b = bytearray({(GUARD_FACTOR + 1) * cap})"
    trial = run_trial(7, python(code), tmp_path / "log", memory_cap_bytes=cap)
    assert (trial.fits, trial.reason) == (False, REFUSED_MEMORY) and trial.peak_rss_bytes < cap
    assert "MemoryError" in (tmp_path / "log").read_text()


def test_a_trial_under_the_cap_fits_and_reports_its_peak_rss(tmp_path):
    trial = run_trial(7, python("b = bytearray(100 * 2**20)"), tmp_path / "log", memory_cap_bytes=400 * MIB)
    assert trial.fits and trial.peak_rss_bytes >= 100 * MIB


def test_a_trials_peak_rss_is_its_own_not_the_high_water_mark_of_the_process_that_started_it(tmp_path):
    code = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    grown = bytearray(600 * MIB)  # this process's high-water mark: at least 600 MiB from here on
    del grown
    trial = run_trial(7, python(code), tmp_path / "log", memory_cap_bytes=400 * MIB)
    # A child forked from here would report >= 600 MiB: its ru_maxrss starts from this process's mark.
    forked = subprocess.run(python(code), capture_output=True, text=True, check=True)
    assert int(forked.stdout) * 1024 > 600 * MIB
    assert (trial.fits, trial.reason) == (True, FINISHED) and trial.peak_rss_bytes < 100 * MIB


def test_a_library_that_cannot_be_mapped_under_the_cap_does_not_fit(tmp_path):
    message = "libmklml_intel.so: failed to map segment from shared object"  # what the loader says
    trial = run_trial(7, python(f"raise SystemExit({message!r})"), tmp_path / "log")
    assert (trial.classes, trial.fits) == (7, False)


def test_a_trial_failing_for_another_reason_is_a_harness_error(tmp_path):
    with pytest.raises(TrialError, match="another reason"):
        run_trial(7, python("raise SystemExit('bad config')"), tmp_path / "log")


def test_a_trial_stopped_once_done_fits(tmp_path):
    # Not stopped, the 60 s sleep would outlast the 30 s timeout: run_trial would raise TrialError.
    trial = run_trial(
        7, python("import time; time.sleep(60)"), tmp_path / "log", done=lambda: True, timeout_s=30
    )
    assert (trial.fits, trial.reason) == (True, STOPPED_DONE)


# --- the bisection


def threshold_trials(limit: int, seen: list[int]):
    def attempt(classes: int) -> Trial:
        seen.append(classes)
        return Trial(classes, classes <= limit, classes, 0.0)

    return attempt


@pytest.mark.parametrize("limit", [900, 1000, 1190, 3000, 200])
def test_bisection_brackets_the_limit(limit):
    seen: list[int] = []
    bracket = bisect_max_classes(threshold_trials(limit, seen), 850, 1150, steps=3)
    assert bracket.fits.classes <= limit < bracket.fails.classes
    assert bracket.fitted[-1] == bracket.fits and len(bracket.trials) == len(seen)


def test_bisection_halves_the_bracket_each_step():
    bracket = bisect_max_classes(threshold_trials(1000, []), 800, 1200, steps=2)
    assert bracket.fails.classes - bracket.fits.classes <= 100


def test_bisection_logs_each_trial(caplog):
    caplog.set_level("INFO", logger="repro.capacity")
    bracket = bisect_max_classes(threshold_trials(1000, []), 800, 1200, steps=1)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(bracket.trials) == 3
    assert lines[0].startswith("capacity trial 1: 800 classes fit (")
    assert lines[1].startswith("capacity trial 2: 1,200 classes did not fit (")


def test_bisection_without_a_bracket_says_so():
    with pytest.raises(TrialError, match="no bracket"):
        bisect_max_classes(threshold_trials(10**9, []), 10, 20, steps=1, max_widen=2)


# --- steady-state throughput


def test_steady_state_is_the_median_after_warm_up():
    records = [{"step": 3 * i, "loss": 1.0, "ips": ips} for i, ips in enumerate([1.0, 9.0, 10.0, 12.0, 11.0])]
    throughput = steady_state(records, warmup_windows=1)
    assert (throughput.images_per_s, throughput.low, throughput.high, throughput.windows) == (
        10.5,
        9.0,
        12.0,
        4,
    )


def test_no_window_after_warm_up_and_non_finite_losses_fail_the_run():
    with pytest.raises(RunFailed, match="no window"):
        steady_state([{"step": 3, "loss": 1.0, "ips": 5.0}], warmup_windows=1)
    with pytest.raises(RunFailed, match="not finite"):
        check_finite_loss([{"step": 3, "loss": float("nan"), "ips": 5.0}])


# --- claims and tables


def test_predictions_repeat_the_published_capacity_they_predict():
    claims = load_claims()
    for row in claims.capacity_model.rows:
        assert claims.find(row.predicts)[1].published == row.published


def test_a_prediction_of_an_unknown_or_different_claim_is_an_error(tmp_path):
    raw = yaml.safe_load(CLAIMS_FILE.read_text(encoding="utf-8"))
    raw["capacity_model"]["rows"][0]["published"] = {"classes": 1.0}
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ClaimsError, match="differs"):
        load_claims(path)


def test_per_row_tiers_override_the_group():
    claims = load_claims()
    tiers = {row.id: claims.cpu_throughput.tier_for(row) for row in claims.cpu_throughput.rows}
    assert tiers == {"cpu_throughput_mini_dynamic": "cpu", "cpu_throughput_mini_static": "cpu_slow"}


def cells(text: str) -> list[list[str]]:
    """The cells of every table row in ``text``."""
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]


def record(claims, claim_id: str, measured: dict, details: dict, machine: Hardware):
    claim = claims.find(claim_id)[1]
    return new_result(
        claims,
        claim,
        tier="cpu",
        config="test",
        measured=measured,
        machine=machine,
        command="python -m pytest",
        duration_s=1.0,
        details=details,
    )


def test_the_capacity_block_shows_prediction_ratio_and_cpu_measurement(cpu_machine):
    claims = load_claims()
    prediction = record(
        claims,
        "model_capacity_paddle_static_fp16_res50",
        {"classes": 69_000_000.0},
        {"binding_phase": "center update", "bytes_per_class": 3694.0},
        cpu_machine,
    )
    cpu = record(
        claims,
        "cpu_capacity_memory_model",
        {"classes": 1_130_799, "bytes_per_class_error": -0.006, "peak_error": -0.008},
        {
            "memory_cap_mib": 1536,
            "fails_at_classes": 1_222_486,
            "predicted_classes": 1_222_487,
            "classes_error": 1_222_487 / 1_130_799 - 1,
            "fixed_overhead_mib": 352.4,
            "binding_phase": "inf/nan check",
            "bytes_per_class": 1027.0,
            "predicted_bytes_per_class": 1020.6,
        },
        cpu_machine,
    )
    results = {result.claim_id: result for result in (prediction, cpu)}
    rows = cells(report.render_blocks(claims, results, "figure.png")["capacity"])
    assert [
        "static",
        "Res50",
        "92,000,000",
        "69,000,000",
        "0.75",
        "center update",
        "3,694",
        "recorded",
    ] in rows
    cpu_row = ["1.5 GiB", "352 MiB", "1,130,799 / 1,222,486", "1,222,487 (+8.1%)", "inf/nan check",
               "1,027 / 1,021", "-0.6% / -0.8%", "pass"]
    assert cpu_row + [cpu_machine.describe()] in rows


def test_the_throughput_and_accuracy_blocks_list_the_cpu_rows_not_run():
    blocks = report.render_blocks(load_claims(), {}, "figure.png")
    assert "Tiers `cpu`, `cpu_slow`: 0 of 2 cases run." in blocks["throughput"]
    assert "faces_mini_lfw_disjoint" in blocks["accuracy"] and ">= 0.8500" in blocks["accuracy"]


def test_the_readme_capacity_sentence_takes_every_number_from_the_results(cpu_machine):
    claims = load_claims()
    assert report.capacity_summary(claims, {}) == (
        "Capacity: plsc's memory model has not been run for PLSC v2.2's 92M setting (8 x NVIDIA Tesla V100 "
        "32G (32510 MiB), configs/ms1mv3_r50_static_fp16_nhwc_r0.1.yaml, batch 64 per GPU, ratio 0.1); the "
        "CPU tier has not been run:"
    )
    prediction = record(claims, "model_capacity_paddle_static_fp16_res50", {"classes": 101_537_232.0},
                        {"binding_phase": "inf/nan check", "int8_velocity_classes": 124_987_654}, cpu_machine)
    cpu = record(claims, "cpu_capacity_memory_model",
                 {"classes": 1_484_569, "bytes_per_class_error": -0.021, "peak_error": -0.018},
                 {"memory_cap_mib": 1280, "bytes_per_class": 651.1}, cpu_machine)
    sentence = report.capacity_summary(claims, {r.claim_id: r for r in (prediction, cpu)})
    assert "predicts 101.5M classes (125.0M with `loss.velocity_dtype=int8`) for PLSC v2.2's 92M" in sentence
    assert "bound by its inf/nan check phase" in sentence
    assert sentence.endswith("the CPU tier fits 1,484,569 classes under a 1.25 GiB cap on peak RSS, the "
                             "model's bytes per class -2.1% off the measured 651 (pass):")

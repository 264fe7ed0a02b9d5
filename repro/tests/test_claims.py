"""repro/claims.yaml and its loader: the published numbers, the schema, the tolerance and the verdict."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from repro.claims import (
    CLAIMS_FILE,
    FAIL,
    PASS,
    RECORDED,
    ClaimsError,
    Tolerance,
    load_claims,
    verdict,
)

pytestmark = pytest.mark.cpu

SEED_ACCURACY_ROW = re.compile(
    r"^\| (Static|Dynamic) +\| +MS1MV3 +\| (\S+) +\| (FP16|FP32) +\| (NHWC|NCHW) +\| (\S+) +\| "
    r"(\S+) \| (\S+) \| (\S+) +\| \[download\]\((\S+)\) \|$",
    re.M,
)
SEED_CAPACITY_ROW = re.compile(
    r"^\| (\w+) \((static|dynamic)\) +\| (\w+) +\| (\d+) \((\d+)MiB\)\| (\d+) \((\d+)MiB\)\|$", re.M
)
BACKBONE_SHORT = {"Res50": "r50", "Res100": "r100", "MobileFaceNet": "mfn"}


@pytest.fixture(scope="module")
def claims():
    return load_claims()


@pytest.fixture(scope="module")
def seed_readme(shared_dir) -> str:
    return (shared_dir / "seed" / "PLSC-v2.2-README.md").read_text(encoding="utf-8")


@pytest.fixture
def raw_claims() -> dict:
    return yaml.safe_load(CLAIMS_FILE.read_text(encoding="utf-8"))


@pytest.fixture
def write_claims(tmp_path):
    def write(raw: dict) -> Path:
        path = tmp_path / "claims.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    return write


# --- the published numbers


def test_accuracy_table_has_the_eighteen_published_rows(claims):
    assert len(claims.accuracy.rows) == 18
    assert {row.backbone for row in claims.accuracy.rows} == {"Res50", "Res100", "MobileFaceNet"}


def test_accuracy_rows_match_the_seed_readme(claims, seed_readme):
    published = {
        (mode.lower(), backbone, precision, fmt, float(ratio)): ((float(a), float(c), float(l)), url)
        for mode, backbone, precision, fmt, ratio, a, c, l, url in SEED_ACCURACY_ROW.findall(seed_readme)
    }
    ours = {
        (row.mode, row.backbone, row.precision, row.format, row.ratio): (
            (row.published["agedb30"], row.published["cfp_fp"], row.published["lfw"]),
            row.checkpoint,
        )
        for row in claims.accuracy.rows
    }
    assert ours == published


def test_capacity_rows_match_the_seed_readme(claims, seed_readme):
    published = {}
    for framework, mode, precision, res50, pool50, res100, pool100 in SEED_CAPACITY_ROW.findall(seed_readme):
        published[(framework, mode, precision, "Res50")] = (float(res50), int(pool50))
        published[(framework, mode, precision, "Res100")] = (float(res100), int(pool100))
    ours = {
        (row.framework, row.mode, row.precision, row.backbone): (row.published["classes"], row.pool_mib)
        for row in claims.capacity.rows
    }
    assert ours == published
    assert len(ours) == 8


def test_only_paddle_capacity_rows_are_measured(claims):
    assert {row.framework for row in claims.capacity.rows if row.reference} == {"Framework1", "Framework2"}


@pytest.mark.parametrize("claim_id, change", [("nhwc_fp16_throughput", 0.10), ("nhwc_fp16_memory", -0.30)])
def test_nhwc_claims_are_the_news_items_figures(claims, claim_id, change):
    assert claims.find(claim_id)[1].published == {"change": change}


def test_throughput_has_no_published_number(claims):
    assert all(value is None for row in claims.throughput.rows for value in row.published.values())
    assert "chart" in claims.throughput.note


def test_accuracy_ids_and_config_names_follow_the_row(claims, project_root):
    for row in claims.accuracy.rows:
        setting = f"{row.precision.lower()}_{row.format.lower()}_r{row.ratio}"
        assert row.id == f"{row.mode}_{row.backbone.lower()}_{setting}"
        assert row.config == f"configs/ms1mv3_{BACKBONE_SHORT[row.backbone]}_{row.mode}_{setting}.yaml"
        assert (project_root / row.config).is_file()


def test_checkpoint_names_follow_plsc_naming(claims):
    for row in claims.accuracy.rows:
        expected = f"MS1M_v3_arcface_{row.backbone}_{row.mode}_{row.ratio}_{row.format}_{row.precision}_v2.2"
        assert row.archive_stem == expected
        assert row.archive_name == expected + ".tgz"


def test_claim_ids_are_found_by_id(claims):
    group, claim = claims.find("dynamic_res50_fp16_nhwc_r0.1")
    assert group is claims.accuracy and claim.backbone == "Res50"
    with pytest.raises(KeyError, match="no claim"):
        claims.find("no_such_claim")


# --- the schema


@pytest.mark.parametrize(
    "where, edit",
    [
        ("claims.yaml", lambda raw: raw.update(extra=1)),
        ("accuracy", lambda raw: raw["accuracy"].update(gpus=8)),
        ("accuracy.rows[3]", lambda raw: raw["accuracy"]["rows"][3].update(top1=0.9)),
        ("accuracy.tolerance", lambda raw: raw["accuracy"]["tolerance"].update(percent=True)),
    ],
)
def test_unknown_keys_are_errors_naming_where(raw_claims, write_claims, where, edit):
    edit(raw_claims)
    with pytest.raises(ClaimsError, match=re.escape(where) + r".*unknown key"):
        load_claims(write_claims(raw_claims))


def test_missing_keys_are_errors(raw_claims, write_claims):
    del raw_claims["capacity"]["rows"][0]["pool_mib"]
    with pytest.raises(ClaimsError, match=r"capacity.rows\[0\]: missing key 'pool_mib'"):
        load_claims(write_claims(raw_claims))


def test_wrongly_typed_values_are_errors(raw_claims, write_claims):
    raw_claims["accuracy"]["rows"][0]["published"]["lfw"] = "0.9985"
    with pytest.raises(ClaimsError, match=r"published.lfw: expected float, found str"):
        load_claims(write_claims(raw_claims))


def test_duplicate_ids_are_errors(raw_claims, write_claims):
    raw_claims["accuracy"]["rows"][1]["id"] = raw_claims["accuracy"]["rows"][0]["id"]
    with pytest.raises(ClaimsError, match="appears twice"):
        load_claims(write_claims(raw_claims))


def test_unknown_tiers_and_directions_are_errors(raw_claims, write_claims):
    raw_claims["capacity"]["tier"] = "tpu"
    with pytest.raises(ClaimsError, match="tier must be one of"):
        load_claims(write_claims(raw_claims))
    with pytest.raises(ClaimsError, match="direction must be one of"):
        Tolerance(value=0.1, direction="around")


# --- tolerance and verdict


def test_accuracy_tolerance_is_documented_absolute_0_002(claims):
    tolerance = claims.accuracy.tolerance
    assert (tolerance.value, tolerance.relative, tolerance.direction) == (0.002, False, "both")
    assert "6000" in tolerance.note


@pytest.mark.parametrize(
    "measured, expected",
    [
        ({"lfw": 0.99850, "cfp_fp": 0.98943}, PASS),
        ({"lfw": 0.99650, "cfp_fp": 0.99143}, PASS),  # both exactly at the margin
        ({"lfw": 0.99850, "cfp_fp": 0.98700}, FAIL),  # one data set 0.00243 low
        ({"lfw": 1.00100, "cfp_fp": 0.98943}, FAIL),  # too high is not a reproduction either
        ({"lfw": float("nan"), "cfp_fp": 0.98943}, FAIL),
    ],
)
def test_accuracy_verdict_both_ways(claims, measured, expected):
    published = {"lfw": 0.99850, "cfp_fp": 0.98943}
    assert verdict(published, measured, claims.accuracy.tolerance) == expected


@pytest.mark.parametrize(
    "tolerance, measured, expected",
    [
        (Tolerance(value=0.05, relative=True, direction="at_least"), 87_400_000, PASS),  # 95% of 92M
        (Tolerance(value=0.05, relative=True, direction="at_least"), 87_300_000, FAIL),
        (Tolerance(value=0.05, relative=True, direction="at_least"), 200_000_000, PASS),
        (Tolerance(value=0.1, direction="at_most"), 92_000_000 - 1, PASS),
    ],
)
def test_one_sided_tolerances(tolerance, measured, expected):
    assert verdict({"classes": 92_000_000.0}, {"classes": measured}, tolerance) == expected


@pytest.mark.parametrize(
    "claim_id, change, expected",
    [
        ("nhwc_fp16_throughput", 0.12, PASS),
        ("nhwc_fp16_throughput", 0.03, FAIL),
        ("nhwc_fp16_memory", -0.25, PASS),
        ("nhwc_fp16_memory", -0.10, FAIL),
    ],
)
def test_nhwc_verdicts(claims, claim_id, change, expected):
    group, claim = claims.find(claim_id)
    assert verdict(claim.published, {"change": change}, group.tolerance_for(claim)) == expected


def test_unpublished_values_are_recorded_not_judged(claims):
    group, claim = claims.find("throughput_dynamic_res50_fp16_nhwc_r0.1")
    assert verdict(claim.published, {"images_per_s": 3000.0}, group.tolerance_for(claim)) == RECORDED


def test_a_missing_measurement_is_a_harness_bug(claims):
    with pytest.raises(KeyError, match="no measurement for lfw"):
        verdict({"lfw": 0.9985}, {"cfp_fp": 0.99}, claims.accuracy.tolerance)

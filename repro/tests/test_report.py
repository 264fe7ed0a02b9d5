"""python -m repro.report: tables between markers (docs/reproduction.md, the README's summary), a
byte-reproducible PNG, --check for staleness."""

from __future__ import annotations

import pytest

from repro import report
from repro.claims import load_claims
from repro.hardware import Hardware
from repro.results import new_result, results_recorded, write_result

pytestmark = pytest.mark.cpu

README_TEMPLATE = """# Project

Text before, kept as it is.

{blocks}

Text after, kept as it is.
"""


@pytest.fixture(scope="module")
def claims():
    return load_claims()


def empty_blocks(*names: str) -> str:
    return "\n\n".join(f"{report.marker(name, 'begin')}\n{report.marker(name, 'end')}" for name in names)


@pytest.fixture
def workspace(tmp_path):
    """(reproduction document with empty marker blocks, figure path, results folder, README with the summary
    block) in a temporary folder."""
    document = tmp_path / "docs" / "reproduction.md"
    document.parent.mkdir()
    document.write_text(README_TEMPLATE.format(blocks=empty_blocks(*report.BLOCKS)), encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text(README_TEMPLATE.format(blocks=empty_blocks(*report.README_BLOCKS)), encoding="utf-8")
    return document, tmp_path / "figures" / "plot.png", tmp_path / "results", readme


@pytest.fixture
def run_report(workspace):
    document, figure, results, readme = workspace

    def run(*extra: str) -> int:
        return report.main(["--doc", str(document), "--readme", str(readme), "--figure", str(figure),
                            "--results-dir", str(results), *extra])

    return run


@pytest.fixture
def record(claims, workspace):
    def record(claim_id: str, measured: dict, machine: Hardware, tier: str) -> None:
        claim = claims.find(claim_id)[1]
        result = new_result(
            claims,
            claim,
            tier=tier,
            config="test",
            measured=measured,
            machine=machine,
            command="python -m pytest",
            duration_s=1.0,
        )
        write_result(workspace[2], result)

    return record


def test_the_report_fills_every_block_and_keeps_the_rest(run_report, workspace):
    readme, figure, *_ = workspace
    assert run_report() == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Project\n\nText before, kept as it is.") and text.endswith(
        "Text after, kept as it is.\n"
    )
    assert "| static  | Res50 " in text and "0.98200 / —" in text
    assert "![Maximum classes and throughput: published and measured](../figures/plot.png)" in text
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_rows_without_results_say_not_run(run_report, workspace):
    run_report()
    text = workspace[0].read_text(encoding="utf-8")
    verdicts = [row[6] for row in table_rows(text, "capacity")[2:10]]  # the published table, then others
    assert verdicts == ["reference (other framework)"] * 4 + ["not run"] * 4  # Paddle's rows need 8 GPUs
    assert "Tier `gpu8`: 0 of 8 cases run." in text


def test_a_second_run_changes_nothing(run_report, workspace, capsys):
    document, figure, _, readme = workspace
    run_report()
    first = document.read_bytes(), figure.read_bytes(), readme.read_bytes()
    capsys.readouterr()
    assert run_report() == 0
    assert (document.read_bytes(), figure.read_bytes(), readme.read_bytes()) == first
    assert capsys.readouterr().out == ""  # nothing was rewritten


def test_the_png_has_identical_bytes_each_time_and_no_metadata(claims):
    png = report.render_figure(claims, {})
    assert report.render_figure(claims, {}) == png
    assert b"Software" not in png and b"matplotlib" not in png


def test_results_appear_beside_the_published_values(
    run_report, workspace, record, claims, cpu_machine, gpu_machine
):
    accuracy = {"agedb30": 0.98370, "cfp_fp": 0.99000, "lfw": 0.99850}
    record("dynamic_res50_fp16_nhwc_r0.1", accuracy, cpu_machine, "cpu")
    record("capacity_paddle_static_fp16_res50", {"classes": 91_000_000}, gpu_machine, "gpu8")
    record("nhwc_fp16_memory", {"change": -0.05}, gpu_machine, "gpu")
    run_report()
    text = workspace[0].read_text(encoding="utf-8")
    accuracy_row = ["dynamic", "Res50", "FP16", "NHWC", "0.1", "0.98367 / 0.98370", "0.99029 / 0.99000"]
    accuracy_row += ["0.99850 / 0.99850", "pass", "CPU: Test CPU, 2 cores, 4 GiB"]
    assert accuracy_row in table_rows(text, "accuracy")
    capacity_row = ["Paddle", "static", "FP16", "Res50", "92,000,000 (32298 MiB)", "91,000,000", "pass"]
    assert capacity_row + ["8 x Tesla V100-SXM2-32GB (32510 MiB)"] in table_rows(text, "capacity")
    nhwc_row = ["nhwc_fp16_memory", "FP16", "-30% gpu memory", "-5.0%", "accepts <= -20%", "fail"]
    assert nhwc_row + ["8 x Tesla V100-SXM2-32GB (32510 MiB)"] in table_rows(text, "nhwc")
    assert report.render_figure(claims, {}) != workspace[1].read_bytes()  # the measured capacity is drawn


def test_the_readme_summary_counts_each_groups_verdicts(
    run_report, workspace, record, claims, cpu_machine, gpu_machine
):
    record("dynamic_res50_fp16_nhwc_r0.1", {"agedb30": 0.98370, "cfp_fp": 0.99000, "lfw": 0.99850},
           cpu_machine, "cpu")
    record("nhwc_fp16_memory", {"change": -0.05}, gpu_machine, "gpu")
    run_report()
    rows = {row[0]: row for row in table_rows(workspace[3].read_text(encoding="utf-8"), "glance")[2:]}
    assert rows[claims.accuracy.section][1:] == ["18", "1 pass, 17 not run"]
    nhwc = len(claims.nhwc.rows)
    assert rows[claims.nhwc.section][1:] == [str(nhwc), f"1 fail, {nhwc - 1} not run"]
    # other frameworks' published rows are shown in the tables, never measured: not counted
    paddle_rows = [claim for claim in claims.capacity.rows if not claim.reference]
    assert rows[claims.capacity.section][1:] == [str(len(paddle_rows)), f"{len(paddle_rows)} not run"]


def table_rows(text: str, block: str) -> list[list[str]]:
    """The cells of every table line between the block's markers."""
    inside = text.split(report.marker(block, "begin"))[1].split(report.marker(block, "end"))[0]
    lines = [line for line in inside.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_check_passes_when_current_and_fails_when_stale(run_report, workspace, record, capsys, gpu_machine):
    readme, figure, *_ = workspace
    assert run_report("--check") == 1  # never rendered
    run_report()
    assert run_report("--check") == 0
    record("nhwc_fp16_throughput", {"change": 0.12}, gpu_machine, "gpu")
    capsys.readouterr()
    assert run_report("--check") == 1
    assert f"{readme} is stale" in capsys.readouterr().err
    run_report()
    figure.write_bytes(b"not the figure")
    assert run_report("--check") == 1
    assert f"{figure} is stale" in capsys.readouterr().err


def test_check_writes_nothing(run_report, workspace):
    readme, figure, *_ = workspace
    before = readme.read_bytes()
    run_report("--check")
    assert readme.read_bytes() == before and not figure.exists()


def test_a_missing_marker_block_is_an_error(run_report, workspace, capsys):
    readme = workspace[0]
    readme.write_text(readme.read_text().replace(report.marker("nhwc", "end"), ""))
    assert run_report() == 2
    assert "<!-- repro:nhwc:begin --> ... <!-- repro:nhwc:end -->" in capsys.readouterr().err


def test_the_project_readme_and_figure_are_current(pytestconfig):
    if results_recorded(pytestconfig):
        pytest.skip("cases of this session recorded new results: run `make report`, then check again")
    assert report.main(["--check"]) == 0, "a document or the figure is stale: run `make report`"


def test_the_own_accuracy_run_its_curve_and_demo_score_come_from_the_result(
    run_report, workspace, claims, cpu_machine
):
    claim = claims.own_accuracy.rows[0]
    details = {"checkpoint_step": 760, "curve": [[250, 0.8217], [500, 0.87]],
               "demo": {"right": 4, "faces": 6}}
    write_result(workspace[2], new_result(claims, claim, tier="cpu_slow", config=claim.config,
                                          measured={"accuracy": 0.8765}, machine=cpu_machine,
                                          command="python -m pytest", duration_s=600.0, details=details))
    run_report()
    rows = table_rows(workspace[0].read_text(encoding="utf-8"), "accuracy")
    expected = [claim.id, claim.config, claim.bin, ">= 0.8500", "0.8765", "4 of 6", "pass"]
    assert expected in [row[:7] for row in rows]
    assert rows[-2:] == [["250", "0.8217"], ["500", "0.8700"]]  # the curve, after the claims table
    readme = workspace[3].read_text(encoding="utf-8")
    assert "reached 0.8765 on lfw_disjoint.bin" in readme and "after 760 steps" in readme
    assert "named 4 of the 6 faces" in readme and "10 min" in readme

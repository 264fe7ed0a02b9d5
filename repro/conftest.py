"""Options and fixtures of the reproduction harness: ``pytest repro [--data-dir D] [--checkpoint-dir C] ...``.

Tiers (markers, ``--run-slow``, ``--gpus``) and the ``machine`` / ``gpu_count`` fixtures come from the plugin
``repro.tiers``, loaded by the root conftest. Each case writes its result with ``record_result`` to
``<results dir>/<tier>/<claim id>.json``: output/repro/results/ (not tracked) unless ``--results-dir`` names
another folder or ``--update-results`` asks for the committed repro/results/, which ``python -m repro.report``
renders into docs/reproduction.md.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest

from repro import hardware
from repro.accuracy.published_checkpoints import CheckpointStore
from repro.claims import Claims, load_claims
from repro.results import (
    OUTPUT_RESULTS_DIR,
    RESULTS_DIR,
    CaseResult,
    chosen_results_dir,
    mark_recorded,
    new_result,
    write_result,
)
from repro.tiers import tier_of


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("repro", "reproduction of PLSC v2.2's published claims")
    group.addoption(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the verification files agedb_30.bin, cfp_fp.bin, lfw.bin (PLSC's MS1M_v3/)",
    )
    group.addoption(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the published checkpoints, unpacked or .tgz (default: ~/.cache/plsc/checkpoints)",
    )
    group.addoption(
        "--download",
        action="store_true",
        help="download missing published checkpoints into the checkpoint folder (resumable)",
    )
    group.addoption(
        "--results-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"where each case writes <tier>/<claim id>.json (default: {OUTPUT_RESULTS_DIR}, not tracked)",
    )
    group.addoption(
        "--update-results",
        action="store_true",
        help=f"write the committed results instead, {RESULTS_DIR}, which `make report` renders",
    )


@pytest.fixture(scope="session")
def claims() -> Claims:
    return load_claims()


@pytest.fixture(scope="session")
def data_dir(request: pytest.FixtureRequest) -> Path | None:
    return request.config.getoption("data_dir")


@pytest.fixture(scope="session")
def checkpoint_store(request: pytest.FixtureRequest) -> CheckpointStore:
    options = request.config.getoption
    return CheckpointStore.from_options(options("checkpoint_dir"), options("download"))


@pytest.fixture(scope="session")
def results_dir(request: pytest.FixtureRequest) -> Path:
    options = request.config.getoption
    try:
        return chosen_results_dir(options("results_dir"), options("update_results"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture
def record_result(request: pytest.FixtureRequest, claims, results_dir):
    """``record(claim, measured, config=..., details=...)``: judge, stamp and write one case's result.

    Hardware is detected (importing Paddle) only when a case records, never for cases that skip.
    """
    started = time.monotonic()

    def record(claim, measured: dict, *, config: str, details: dict | None = None) -> CaseResult:
        result = new_result(
            claims,
            claim,
            tier=tier_of(request.node),
            config=config,
            measured=measured,
            machine=hardware.detect(),
            command=_command(request.config),
            duration_s=time.monotonic() - started,
            details={"case": request.node.nodeid, **(details or {})},
        )
        write_result(results_dir, result)
        request.config.repro_results_written = results_dir  # named at the end of the session
        if Path(results_dir).resolve() == RESULTS_DIR:  # the results the documents are rendered from
            mark_recorded(request.config)
        return result

    return record


def _command(config: pytest.Config) -> str:
    return shlex.join(["python", "-m", "pytest", *config.invocation_params.args])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    written = getattr(config, "repro_results_written", None)
    if written is None:
        return
    if Path(written).resolve() == RESULTS_DIR:
        terminalreporter.write_line(f"repro: results written to {written}; `make report` renders them")
    else:
        terminalreporter.write_line(f"repro: results written to {written} (the committed ones in "
                                    f"{RESULTS_DIR} are unchanged: --update-results or UPDATE_RESULTS=1 "
                                    "writes those)")

"""One JSON file per reproduced case: ``<results dir>/<tier>/<claim id>.json``, written atomically.

A result says which claim was checked and how: the plsc config, published and measured values, the
tolerance and the verdict, the hardware and software it ran on, the command that produced it and when.
Reading is as strict as claims.yaml: unknown or missing keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from plsc.atomic import write_atomic
from repro.claims import Claim, ClaimGroup, Claims, verdict
from repro.hardware import Hardware

# The committed results, which `make report` renders into the documents; a run writes there only when asked
# (--update-results), else into OUTPUT_RESULTS_DIR, under the untracked output/ folder.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUTPUT_RESULTS_DIR = RESULTS_DIR.parent.parent / "output" / "repro" / "results"


class ResultsError(ValueError):
    """A result file is unreadable or does not match :class:`CaseResult`."""


@dataclass(frozen=True)
class CaseResult:
    claim_id: str
    tier: str
    config: str  # plsc config file (or a description of the setting) the case ran
    published: dict
    measured: dict
    tolerance: dict | None
    verdict: str
    hardware: dict
    software: dict
    command: str
    time: str  # UTC, ISO 8601, when the case finished
    duration_s: float
    details: dict = field(default_factory=dict)

    def explain(self) -> str:
        """One line for an assertion message: what was expected, what was measured."""
        return (
            f"{self.claim_id}: {self.verdict}; published {self.published}, measured {self.measured}, "
            f"tolerance {self.tolerance}"
        )


def software_versions() -> dict[str, str]:
    """plsc, Paddle (with the CUDA/cuDNN it was built with, 'False' for CPU builds), numpy and Python."""
    import paddle

    from plsc.checkpoint import versions

    build = {"paddle_cuda": str(paddle.version.cuda()), "paddle_cudnn": str(paddle.version.cudnn())}
    return {**versions(), **build}


def new_result(
    claims: Claims,
    claim: Claim,
    *,
    tier: str,
    config: str,
    measured: dict[str, float],
    machine: Hardware,
    command: str,
    duration_s: float,
    details: dict | None = None,
) -> CaseResult:
    """A result for ``claim``, judged against its group's tolerance, stamped with versions and time."""
    group: ClaimGroup = claims.find(claim.id)[0]
    tolerance = group.tolerance_for(claim)
    return CaseResult(
        claim_id=claim.id,
        tier=tier,
        config=config,
        published=dict(claim.published),
        measured=dict(measured),
        tolerance=asdict(tolerance) if tolerance else None,
        verdict=verdict(claim.published, measured, tolerance),
        hardware={"summary": machine.describe(), **machine.to_dict()},
        software=software_versions(),
        command=command,
        time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        duration_s=round(duration_s, 3),
        details=details or {},
    )


def result_path(results_dir: Path, tier: str, claim_id: str) -> Path:
    return Path(results_dir) / tier / f"{claim_id}.json"


def chosen_results_dir(results_dir: Path | None, update_committed: bool) -> Path:
    """Where a run writes: the committed results when ``update_committed``, else ``results_dir`` or, by
    default, :data:`OUTPUT_RESULTS_DIR`."""
    if update_committed:
        if results_dir is not None and Path(results_dir).resolve() != RESULTS_DIR:
            raise ValueError(f"--update-results writes {RESULTS_DIR}: drop --results-dir {results_dir}")
        return RESULTS_DIR
    return Path(results_dir) if results_dir is not None else OUTPUT_RESULTS_DIR


def write_result(results_dir: Path, result: CaseResult) -> Path:
    """Write ``result`` atomically (:mod:`plsc.atomic`): never half a file."""
    path = result_path(results_dir, result.tier, result.claim_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(result), indent=2, sort_keys=True) + "\n"
    write_atomic(path, text)
    return path


def read_result(path: Path) -> CaseResult:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultsError(f"cannot read result {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    specs = dataclasses.fields(CaseResult)
    names = {spec.name for spec in specs}
    required = {spec.name for spec in specs if spec.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(raw) - names), sorted(required - set(raw))
    if unknown or missing:
        raise ResultsError(f"{path}: unknown keys {unknown}, missing keys {missing}")
    return CaseResult(**raw)


_RECORDED = "repro_results_recorded"  # attribute of the pytest config: a case of this session wrote a result


def mark_recorded(pytest_config) -> None:
    setattr(pytest_config, _RECORDED, True)


def results_recorded(pytest_config) -> bool:
    """Whether a case of this pytest session has written a result (the documents are then stale)."""
    return getattr(pytest_config, _RECORDED, False)


def load_results(results_dir: Path) -> dict[str, CaseResult]:
    """``{claim id: newest result}`` over the tier folders of ``results_dir`` (empty when there are none)."""
    newest: dict[str, CaseResult] = {}
    for path in sorted(Path(results_dir).glob("*/*.json")):
        result = read_result(path)
        if result.claim_id not in newest or result.time > newest[result.claim_id].time:
            newest[result.claim_id] = result
    return newest

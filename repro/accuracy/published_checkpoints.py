"""Find PLSC v2.2's published checkpoints on disk (or download them) and evaluate them with plsc.

A published archive ``MS1M_v3_arcface_<Backbone>_<mode>_<ratio>_<format>_<precision>_v2.2.tgz`` unpacks to
``<stem>/<PLSC backbone name>/best_model/<data set>/``: PLSC v2.2 saves the weights with the best accuracy on
each validation set in the folder of that set, and its table reports those best accuracies. So each data set
is evaluated with its own ``best_model/<data set>/``; when that folder is absent, with ``best_model/cfp_fp/``,
the one PLSC's validation and export scripts use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repro.claims import AccuracyClaim
from repro.download import default_cache_dir, extract_tgz, fetch

FALLBACK_BEST_MODEL = "cfp_fp"


@dataclass(frozen=True)
class CheckpointStore:
    """Where published checkpoints live: ``<stem>/`` folders or ``<stem>.tgz`` archives in ``directory``."""

    directory: Path
    download: bool = False

    @classmethod
    def from_options(cls, directory: Path | None, download: bool) -> CheckpointStore:
        return cls(Path(directory) if directory else default_cache_dir(), download)

    def available(self, claim: AccuracyClaim) -> bool:
        """Whether :meth:`locate` can deliver: unpacked, packed, or allowed to download."""
        stored = self.directory / claim.archive_stem, self.directory / claim.archive_name
        return self.download or any(path.exists() for path in stored)

    def locate(self, claim: AccuracyClaim) -> Path:
        """The unpacked checkpoint of ``claim``, unpacking (and first downloading) it if need be."""
        unpacked = self.directory / claim.archive_stem
        if unpacked.is_dir():
            return unpacked
        return extract_tgz(fetch(claim.checkpoint, self.directory), self.directory)

    def missing_reason(self, claim: AccuracyClaim) -> str:
        return (
            f"the published checkpoint {claim.archive_stem} (folder or .tgz) in {self.directory}: pass "
            f"--checkpoint-dir DIR holding it, or --download to fetch {claim.checkpoint}"
        )


def best_model_dirs(unpacked: Path, datasets: list[str]) -> dict[str, Path]:
    """``{data set: checkpoint folder to evaluate it with}`` inside one unpacked published checkpoint."""
    best_model = _find_best_model(unpacked)
    fallback = best_model / FALLBACK_BEST_MODEL
    chosen = {}
    for dataset in datasets:
        own = best_model / dataset
        if not own.is_dir() and not fallback.is_dir():
            raise FileNotFoundError(f"{best_model} has neither {dataset}/ nor {FALLBACK_BEST_MODEL}/")
        chosen[dataset] = own if own.is_dir() else fallback
    return chosen


def _find_best_model(unpacked: Path) -> Path:
    found = sorted(path for path in unpacked.glob("*/best_model") if path.is_dir())
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one <backbone>/best_model/ folder in {unpacked}, found {len(found)}"
        )
    return found[0]


def evaluate_published(unpacked: Path, bins: dict[str, Path], batch_size: int) -> tuple[dict, dict]:
    """(``{published key: accuracy}``, details) for the checkpoint in ``unpacked`` on ``bins``.

    ``bins`` maps the published keys (agedb30, cfp_fp, lfw) to ``.bin`` files; a checkpoint folder serving
    several data sets is loaded once.
    """
    from plsc.eval.runner import evaluate_model  # imports Paddle: only when a case really runs

    key_of = {Path(path).stem: key for key, path in bins.items()}
    folders = best_model_dirs(unpacked, list(key_of))
    measured, details = {}, {}
    for folder in sorted(set(folders.values())):
        paths = [str(bins[key_of[stem]]) for stem, chosen in folders.items() if chosen == folder]
        for stem, metrics in evaluate_model(folder, paths, batch_size).items():
            measured[key_of[stem]] = metrics["accuracy"]
            details[key_of[stem]] = {"checkpoint": str(folder), **metrics}
    return measured, details

"""Seed README section 9.1: each published PLSC v2.2 checkpoint, evaluated by plsc on agedb_30, cfp_fp, lfw.

One case per row of the accuracy table, with the row's claim id as pytest id (``-k res50_fp16`` selects the
four FP16 Res50 rows). A case needs the three ``.bin`` files (``--data-dir``) and its checkpoint
(``--checkpoint-dir``, or ``--download``); without them it is skipped with a reason naming what is missing.
No GPU is needed: Paddle evaluates on whatever device it has. Pass: every accuracy within the tolerance of
claims.yaml (absolute 0.002) of the published one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from repro.accuracy.published_checkpoints import evaluate_published
from repro.claims import PASS, AccuracyClaim, load_claims

ACCURACY = load_claims().accuracy
EVAL_BATCH_SIZE = 64

pytestmark = getattr(pytest.mark, ACCURACY.tier)


@pytest.fixture
def accuracy_inputs(claim: AccuracyClaim, data_dir, checkpoint_store) -> tuple[Path, dict[str, Path]]:
    """(unpacked checkpoint, {published key: .bin path}), or a skip naming everything that is missing."""
    bins = {key: (data_dir or Path()) / name for key, name in ACCURACY.bins.items()}
    missing_bins = [path.name for path in bins.values() if data_dir is None or not path.is_file()]
    needs = []
    if missing_bins:
        where = f"in {data_dir}" if data_dir else "(no --data-dir given)"
        needs.append(f"--data-dir DIR holding {', '.join(missing_bins)} {where}")
    if not checkpoint_store.available(claim):
        needs.append(checkpoint_store.missing_reason(claim))
    if needs:
        pytest.skip("needs " + "; and ".join(needs))
    return checkpoint_store.locate(claim), bins


@pytest.mark.parametrize("claim", ACCURACY.rows, ids=lambda claim: claim.id)
def test_published_checkpoint_reproduces_table(claim: AccuracyClaim, accuracy_inputs, record_result):
    checkpoint, bins = accuracy_inputs
    measured, per_dataset = evaluate_published(checkpoint, bins, EVAL_BATCH_SIZE)
    details = {"checkpoint_url": claim.checkpoint, "batch_size": EVAL_BATCH_SIZE, "datasets": per_dataset}
    result = record_result(claim, measured, config=claim.config, details=details)
    assert result.verdict == PASS, result.explain()

"""The data pipeline and verification under pytest-benchmark, plus ``plsc bench data|verify``'s JSON reports.

The pytest-benchmark cases time in this process (threads: OMP_NUM_THREADS, which ``make bench`` sets to the
core count); the report cases run ``bench_data`` (a fresh process per source) and ``bench_verify`` and write
benchmarks/results/data_{folder,rec}[_1worker].json and verify.json, docs/performance.md's inputs.
Data: ../shared/data/faces-mini when present (4,878 LFW faces), else the bundled data/tiny. Nothing here
asserts on time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from plsc.bench.data import (
    BUNDLED_ROOT,
    DataBenchSpec,
    RepeatedDataset,
    bench_data,
    build_source_dataset,
    encoded_images,
    repeats_needed,
    table,
)
from plsc.bench.verify import VerifyBenchSpec, bench_verify, random_pairs
from plsc.eval.verification import evaluate

FACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces-mini"
DATA_ROOT = FACES_MINI if (FACES_MINI / "label.txt").is_file() else BUNDLED_ROOT
BATCH, BATCHES_PER_ROUND, ROUNDS = 64, 8, 5
REPORT_WORKERS = os.cpu_count() or 1


def spec_for(source: str, workers: int) -> DataBenchSpec:
    return DataBenchSpec(source=source, root=str(DATA_ROOT), workers=workers, batch_size=BATCH,
                         threads=os.cpu_count() or 1)


@pytest.fixture(scope="module")
def folder_dataset():
    return build_source_dataset(spec_for("folder", 0))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches(benchmark, folder_dataset, workers):
    """``BATCHES_PER_ROUND`` batches from the training loader per round; its workers started once."""
    from plsc.data.loader import build_train_loader

    total = (ROUNDS + 1) * BATCHES_PER_ROUND
    repeated = RepeatedDataset(folder_dataset, repeats_needed(len(folder_dataset), total, BATCH))
    loader, sampler = build_train_loader(repeated, batch_size=BATCH, image_size=112, num_workers=workers)
    sampler.set_epoch(0)
    batches = iter(loader)

    def some_batches():
        for _ in range(BATCHES_PER_ROUND):
            next(batches)

    benchmark.extra_info.update(root=str(DATA_ROOT), workers=workers, images=BATCH * BATCHES_PER_ROUND)
    benchmark.pedantic(some_batches, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_raw_decode(benchmark, folder_dataset):
    """cv2.imdecode of the images one round of test_loader_batches delivers, on one thread."""
    count = BATCH * BATCHES_PER_ROUND
    encoded = encoded_images(folder_dataset, range(min(len(folder_dataset), count)))
    cv2.setNumThreads(1)

    def decode_all():
        for index in range(count):
            cv2.imdecode(encoded[index % len(encoded)], cv2.IMREAD_COLOR)

    benchmark.extra_info.update(root=str(DATA_ROOT), images=count)
    benchmark.pedantic(decode_all, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def test_verification_evaluate(benchmark):
    embeddings, issame = random_pairs(6000, 512)
    benchmark.extra_info.update(pairs=6000, dim=512)
    benchmark.pedantic(evaluate, args=(embeddings, issame), rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("one_worker", [False, True], ids=["all_cores", "one_worker"])
@pytest.mark.parametrize("source", ["folder", "rec"])
def test_data_report(source, one_worker, results_dir):
    """``plsc bench data`` with all cores as workers, and with one (the main process then has a core of its
    own), written to benchmarks/results/data_<source>[_1worker].json."""
    result = bench_data(spec_for(source, 1 if one_worker else REPORT_WORKERS))
    name = f"data_{source}_1worker" if one_worker else f"data_{source}"
    (results_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{table(result)}")
    assert result["pipeline_images_per_s"] > 0


def test_verify_report(results_dir):
    """``plsc bench verify`` (6000 pairs), written to benchmarks/results/verify.json."""
    result = bench_verify(VerifyBenchSpec())
    (results_dir / "verify.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nevaluate on {result['pairs']} pairs: {result['evaluate_s']:.4f} s (median)")
    assert np.isfinite(result["metrics"]["accuracy"])

"""Distributed training on CPU (gloo): N processes must compute what one process computes.

Every multi-process test starts real processes with ``python -m paddle.distributed.launch`` (through
:mod:`plsc.launch`, the code ``plsc train --nproc`` uses) running ``tests/distributed_worker.py`` or the CLI,
then compares their output files with a single-process reference computed here. One node's launch picks
free ports itself, so concurrent tests (``pytest -n 2``) do not collide; the two-node test passes a master
address on a port the OS just handed out.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import paddle
import pytest
from distributed_worker import use_running_batchnorm_statistics
from reference_loss import margin_logits, softmax_cross_entropy

from plsc.distributed import LocalComm, shard_classes
from plsc.launch import child_environment, launch_command
from plsc.loss.margin import Margin
from plsc.loss.partial_fc import PartialFC, init_class_centers
from plsc.loss.rows import lazy_update, row_store
from plsc.loss.sampling import num_sampled

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT_S = 240


def launch(tmp_path: Path, nproc: int, program: list[str], **options) -> subprocess.CompletedProcess:
    """Run ``program`` on ``nproc`` local ranks; a failing rank fails the test, with the workers' logs."""
    log_dir = tmp_path / f"launch-log-{len(list(tmp_path.glob('launch-log-*')))}"
    env = {**child_environment(nproc), "OMP_NUM_THREADS": "1"}
    command = launch_command(nproc, program, log_dir=log_dir, **options)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0:
        tails = [f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:])
                 for log in sorted(log_dir.glob("workerlog.*"))]
        outputs = [proc.stdout[-3000:], proc.stderr[-3000:]]
        pytest.fail("\n".join([f"launch exited {proc.returncode}", *outputs, *tails]))
    return proc


def launch_worker(tmp_path: Path, nproc: int, *arguments: str) -> subprocess.CompletedProcess:
    return launch(tmp_path, nproc, [sys.executable, str(WORKER), *map(str, arguments)])


# --- the PartialFC head on N ranks vs one process ---------------------------------------------------------

EMBEDDING_SIZE = 8
ARCFACE = Margin(1.0, 0.5, 0.0, 64.0)
COMBINED = Margin(0.9, 0.4, 0.15, 64.0)  # m1 != 1: the acos path of the target logit
# Inter-class filtering at 0.2: about a fifth of these cosines (8-dim random embeddings and centers) are
# filtered, on the rank of the row's target and, every column above it, on the other.
FILTERED = Margin(1.0, 0.5, 0.0, 64.0, 0.2)


def head_case(tmp_path: Path, name: str, *, world: int, rows_per_rank: int, num_classes: int, ratio: float,
              margin: Margin = ARCFACE, seed: int = 3, step: int = 5, every_class: bool = False,
              chunk_size: int = 0) -> dict:
    """A global batch on disk plus the PartialFC settings the ranks and the reference share.

    ``every_class``: the labels cover every class (the batch must be at least as large as the class count).
    ``chunk_size`` > 0: the streaming head (plsc.loss.streaming), which must give the same numbers.
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rows = world * rows_per_rank
    embeddings = rng.standard_normal((rows, EMBEDDING_SIZE)).astype(np.float32)
    if every_class:
        labels = rng.permutation(np.arange(rows) % num_classes).astype(np.int64)
    else:
        labels = rng.integers(0, num_classes, rows).astype(np.int64)
    data = tmp_path / f"{name}.npz"
    np.savez(data, embeddings=embeddings, labels=labels)
    margin_list = [margin.m1, margin.m2, margin.m3, margin.scale, margin.interclass_filtering_threshold]
    return {"name": name, "data": str(data), "num_classes": num_classes, "ratio": ratio,
            "margin": margin_list, "seed": seed, "step": step, "world": world, "chunk_size": chunk_size}


def run_head_cases(tmp_path: Path, world: int, cases: list[dict]) -> dict[str, list[dict]]:
    """Launch the cases on ``world`` ranks; per case, each rank's results in rank order."""
    spec = tmp_path / f"head-spec-{world}.json"
    spec.write_text(json.dumps({"cases": cases}))
    out = tmp_path / f"head-out-{world}"
    out.mkdir()
    launch_worker(tmp_path, world, "head", spec, out)
    return {case["name"]: [dict(np.load(out / f"{case['name']}.rank{rank}.npz")) for rank in range(world)]
            for case in cases}


def reference_from_sampled(case: dict, sampled_ids: np.ndarray) -> dict:
    """One process, one classifier over exactly the given global class ids: loss, gradients and the update.

    With every class id this is the full classifier (what ratio 1.0 must equal); with the union of the
    ranks' sampled ids it is the single-process twin of a sampled step.
    """
    data = np.load(case["data"])
    labels = data["labels"]
    centers = paddle.to_tensor(init_class_centers(case["seed"], 0, case["num_classes"], EMBEDDING_SIZE))
    velocity = paddle.zeros_like(centers)
    index = paddle.to_tensor(sampled_ids)
    sampled = paddle.gather(centers, index)
    sampled.stop_gradient = False
    embeddings = paddle.to_tensor(data["embeddings"], stop_gradient=False)
    columns = paddle.to_tensor(np.searchsorted(sampled_ids, labels))  # every label is a sampled positive
    cosine = paddle.matmul(
        paddle.nn.functional.normalize(embeddings, axis=1), paddle.nn.functional.normalize(sampled, axis=1),
        transpose_y=True,
    )
    margin = Margin(*case["margin"])
    loss = softmax_cross_entropy(margin_logits(cosine, columns, margin), columns, LocalComm())
    loss.backward()
    result = {"loss": float(loss), "embedding_grad": embeddings.grad.numpy(),
              "sampled_grad": sampled.grad.numpy()}
    lazy_update(row_store(centers), row_store(velocity), index, sampled.grad, lr=0.1, momentum=0.9,
                weight_decay=5e-4)
    return {**result, "weight": centers.numpy(), "velocity": velocity.numpy()}


def relative_difference(actual: np.ndarray, desired: np.ndarray) -> float:
    """``max |actual - desired| / max(1, max |desired|)``.

    Relative to the largest entry, not elementwise: center gradients are ~100x the embeddings' (the centers
    start with norm ~0.03 and normalisation divides by it), and a difference in summation order shows up as a
    few float32 ulps of the largest terms, wherever cancellation leaves a small entry.
    """
    assert actual.shape == desired.shape
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    return float(np.abs(np.asarray(actual, np.float64) - desired).max(initial=0.0)) / scale


def assert_close(actual: np.ndarray, desired: np.ndarray, tolerance: float) -> None:
    difference = relative_difference(actual, desired)
    assert difference <= tolerance, f"max error {difference:.3g} relative to max(1, largest entry)"


def concatenated(ranks: list[dict], key: str) -> np.ndarray:
    return np.concatenate([r[key] for r in ranks])


def assert_matches_reference(ranks: list[dict], reference: dict) -> None:
    losses = [float(r["loss"]) for r in ranks]
    assert max(losses) == min(losses), f"ranks disagree on the loss: {losses}"
    # Scale-64 losses are ~10-60 at these random embeddings: 1e-6 relative is a few float32 ulps.
    assert losses[0] == pytest.approx(reference["loss"], rel=1e-6)
    assert_close(concatenated(ranks, "embedding_grad"), reference["embedding_grad"], 1e-5)
    if "sampled_grad" in ranks[0]:
        assert_close(concatenated(ranks, "sampled_grad"), reference["sampled_grad"], 1e-5)
    if "center_grad_sq_norm" in ranks[0]:  # the streaming head's
        center_sq_norm = sum(float(r["center_grad_sq_norm"][0]) for r in ranks)
        assert center_sq_norm == pytest.approx(float(np.sum(reference["sampled_grad"] ** 2.0)), rel=1e-5)
    assert_close(concatenated(ranks, "weight"), reference["weight"], 1e-5)
    assert_close(concatenated(ranks, "velocity"), reference["velocity"], 1e-5)


def assert_sampling_is_valid(case: dict, ranks: list[dict]) -> None:
    """Each rank's centers: inside its shard, sorted and unique, every positive it owns, the right count."""
    labels = np.load(case["data"])["labels"]
    for rank, result in enumerate(ranks):
        shard = shard_classes(case["num_classes"], rank, case["world"])
        assert tuple(result["shard"]) == (shard.start, shard.count)
        ids = result["sampled_ids"]
        assert np.all(np.diff(ids) > 0), "duplicate or unsorted sampled ids"
        assert ids.size == 0 or (ids[0] >= shard.start and ids[-1] < shard.stop)
        positives = np.unique(labels[(labels >= shard.start) & (labels < shard.stop)])
        assert set(positives) <= set(ids)
        assert ids.size == max(num_sampled(shard.count, case["ratio"]), positives.size)


def check_head_cases(cases: list[dict], results: dict[str, list[dict]]) -> None:
    for case in cases:
        ranks = results[case["name"]]
        assert_sampling_is_valid(case, ranks)
        assert_matches_reference(ranks, reference_from_sampled(case, concatenated(ranks, "sampled_ids")))


def two_rank_head_cases(folder: Path) -> list[dict]:
    return [
        head_case(folder, "full", world=2, rows_per_rank=4, num_classes=10, ratio=1.0),
        head_case(folder, "sampled", world=2, rows_per_rank=4, num_classes=40, ratio=0.3, margin=COMBINED),
        head_case(folder, "full-streaming", world=2, rows_per_rank=4, num_classes=10, ratio=1.0,
                  chunk_size=2),
        head_case(folder, "sampled-streaming", world=2, rows_per_rank=4, num_classes=40, ratio=0.3,
                  margin=COMBINED, chunk_size=4),
        head_case(folder, "filtered", world=2, rows_per_rank=4, num_classes=40, ratio=0.3, margin=FILTERED),
        head_case(folder, "filtered-streaming", world=2, rows_per_rank=4, num_classes=40, ratio=0.3,
                  margin=FILTERED, chunk_size=4),
    ]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], dict[str, list[dict]], Path]:
    """One two-rank launch for the head's cases and the coalesced all-reduces (each launch costs seconds of
    start-up): (the head cases, their results per rank, the folder of the all-reduce results)."""
    folder = tmp_path_factory.mktemp("two-ranks")
    cases = two_rank_head_cases(folder)
    head_spec, allreduce_spec = folder / "head-spec.json", folder / "allreduce.json"
    head_spec.write_text(json.dumps({"cases": cases}))
    allreduce_spec.write_text(json.dumps({"tensors": GRADIENTS, "bucket_bytes": list(ALL_REDUCES)}))
    launch_worker(folder, 2, "head_and_allreduce", head_spec, allreduce_spec, folder)
    results = {case["name"]: [dict(np.load(folder / f"{case['name']}.rank{rank}.npz")) for rank in range(2)]
               for case in cases}
    return cases, results, folder


def test_full_classifier_on_two_ranks_equals_one_process_with_the_double_batch(two_ranks):
    """(a) ratio 1.0, 2 x batch b == 1 x batch 2b; (b) ratio < 1 == one process over the union of the
    ranks' sampled centers; both heads, and with inter-class filtering."""
    cases, results, _ = two_ranks
    check_head_cases(cases, results)
    # The full case also against PartialFC itself in one process: the code path single-process training runs.
    full = cases[0]
    data = np.load(full["data"])
    head = PartialFC(full["num_classes"], EMBEDDING_SIZE, ARCFACE, sample_ratio=1.0, seed=full["seed"])
    embeddings = paddle.to_tensor(data["embeddings"], stop_gradient=False)
    loss, pending = head(embeddings, paddle.to_tensor(data["labels"]), full["step"])
    loss.backward()
    ranks = results["full"]
    assert float(ranks[0]["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert_close(concatenated(ranks, "embedding_grad"), embeddings.grad.numpy(), 1e-5)
    assert_close(concatenated(ranks, "sampled_grad"), pending.rows.grad.numpy(), 1e-5)


@pytest.mark.cpu_slow(reason="a three-rank launch (~11 s); two-rank parity of both heads, and the in-process "
                              "tests of uneven shards and of sampling's positives and budget stay fast")
def test_three_ranks_uneven_shards_and_more_positives_than_budget(tmp_path):
    """(c) 7 classes on 3 ranks (3, 2, 2) and a global batch of 12 holding all of them: every rank has more
    positives than ratio 0.5 allows and keeps exactly its positives; (d) 3-rank parity, ratios 1.0 and 0.3."""
    cases = [
        head_case(tmp_path, "crowded", world=3, rows_per_rank=4, num_classes=7, ratio=0.5, every_class=True),
        head_case(tmp_path, "full3", world=3, rows_per_rank=3, num_classes=11, ratio=1.0),
        head_case(tmp_path, "sampled3", world=3, rows_per_rank=3, num_classes=50, ratio=0.3, margin=COMBINED),
        head_case(tmp_path, "crowded-streaming", world=3, rows_per_rank=4, num_classes=7, ratio=0.5,
                  every_class=True, chunk_size=2),
        head_case(tmp_path, "sampled3-streaming", world=3, rows_per_rank=3, num_classes=50, ratio=0.3,
                  margin=COMBINED, chunk_size=4),
    ]
    results = run_head_cases(tmp_path, 3, cases)
    check_head_cases(cases, results)
    crowded = results["crowded"]
    assert [int(r["shard"][1]) for r in crowded] == [3, 2, 2]
    assert all(r["sampled_ids"].size > num_sampled(int(r["shard"][1]), 0.5) for r in crowded)


# --- coalesced gradient all-reduce ------------------------------------------------------------------------

# A backbone's gradients as O2 leaves them (float16 weights, BatchNorm in float32), in parameter order; bytes:
# float32 864, 32, 64, 2560, 4 and float16 16, 2304, 32.
GRADIENTS = [((8, 3, 3, 3), "float32"), ((8,), "float32"), ((8,), "float16"), ((16, 8, 3, 3), "float16"),
             ((16,), "float32"), ((40, 16), "float32"), ((16,), "float16"), ((1,), "float32")]
# bucket bytes -> all-reduces: 0 one per tensor; 1024 float32 [864 32 64] [2560] [4] and float16 [16] [2304]
# [32] (a tensor larger than a bucket is alone); 1 GiB one per dtype.
ALL_REDUCES = {0: 8, 1024: 6, 2**30: 2}


def test_coalesced_all_reduce_on_two_ranks_equals_per_tensor_and_numpy_sums(two_ranks):
    """Mixed float32/float16 tensors summed over 2 gloo ranks: bit for bit the per-tensor all-reduce and
    numpy's sum of the two ranks' inputs (a + b rounded once, in the tensor's dtype), in every bucket size,
    with one all-reduce per bucket."""
    folder = two_ranks[2]
    ranks = [dict(np.load(folder / f"allreduce.rank{rank}.npz")) for rank in (0, 1)]
    for i, (shape, dtype) in enumerate(GRADIENTS):
        expected = ranks[0][f"input{i}"] + ranks[1][f"input{i}"]
        assert expected.dtype == dtype and expected.shape == shape
        for rank in ranks:
            np.testing.assert_array_equal(rank[f"per_tensor{i}"], expected)
            for bucket_bytes in ALL_REDUCES:
                coalesced = rank[f"coalesced{bucket_bytes}_{i}"]
                assert coalesced.dtype == dtype
                np.testing.assert_array_equal(coalesced, expected)
    for rank in ranks:
        assert {b: int(rank[f"calls{b}"]) for b in ALL_REDUCES} == ALL_REDUCES
    # Why all_reduce_sum_ sums float16 in float32 on CPU: gloo's own float16 sum is wrong in Paddle 3.
    raw = ranks[0]["raw_float16_sum_of_ones"]
    if paddle.__version__.startswith("2."):
        np.testing.assert_array_equal(raw, 2.0)
    else:
        assert not np.isfinite(raw).all(), f"gloo sums float16 right now ({raw}): the widening can go"


def test_coalesce_keeps_dtypes_apart_order_and_the_bucket_size():
    from plsc.distributed import coalesce

    rng = np.random.default_rng(0)
    tensors = [paddle.zeros([int(rng.integers(1, 300))], dtype=str(rng.choice(["float32", "float16"])))
               for _ in range(60)]
    for bucket_bytes in (0, 100, 512, 4096, 2**30):
        buckets = coalesce(tensors, bucket_bytes)
        for dtype in ("float32", "float16"):
            mine = [t for t in tensors if t.dtype == getattr(paddle, dtype)]
            assert [id(t) for b in buckets for t in b if t.dtype == mine[0].dtype] == [id(t) for t in mine]
        for bucket in buckets:
            assert len({t.dtype for t in bucket}) == 1
            nbytes = [t.size * t.element_size() for t in bucket]
            assert len(bucket) == 1 or sum(nbytes) <= bucket_bytes
        if bucket_bytes == 0:
            assert len(buckets) == len(tensors)
        if bucket_bytes == 2**30:
            assert len(buckets) == 2
        # Greedy: a bucket is closed only when its next tensor of the dtype would not fit.
        for first, second in zip(buckets, buckets[1:], strict=False):
            if first[0].dtype == second[0].dtype:
                assert sum(t.size * t.element_size() for t in [*first, second[0]]) > bucket_bytes


# --- the trainer on 2 ranks vs one process ----------------------------------------------------------------
#
# BatchNorm: PLSC normalises each rank's batch with that batch's statistics, so 2 ranks x b is not 1 process
# x 2b in general. Two comparisons, each the same mathematics on both sides:
#
# 1. BatchNorm on its running statistics (use_global_stats, kept at their initial values) in both runs: the
#    backbone is then per-sample, and 2 x b is 1 x 2b. Everything distributed is exercised (sampler blocks,
#    all-gather with gradients, sharded softmax, coalesced gradient all-reduce, clipping over all shards, the
#    schedule, sparse momentum, sharded checkpoints), over 11 steps and across a resume.
# 2. PLSC's per-rank BatchNorm, against one process that pushes each rank's block through the backbone
#    separately (normalise_batches_like_ranks), over one epoch with verification.
#
# Where the runs part, and why by different amounts on AVX2 and AVX-512 hosts. Measured on this tiny run:
# - The backbone's forward is per-sample exact on both: 48 images at once and two blocks of 24 give the
#   same bits in every layer (MKL's sgemm rows do not depend on the batch), and with per-rank BatchNorm the
#   one-process backbone gradient is the sum of the same two block gradients the all-reduce adds.
# - What differs is the order of float32 sums over classes: the sharded softmax adds two shards' partial
#   sums (20 + 20 classes) where one process sums 40 at once, and the embeddings' gradient is two K=20
#   products added by the all-gather's backward instead of one K=40 product (in comparison 1 the backbone
#   gradients are also 24 + 24 images instead of 48). After step 1 the runs differ by one or two ulps
#   (1e-7 to 2.3e-7 relative, centers and backbone alike) on both instruction sets; which ulps depends on
#   the sgemm kernel, and Paddle's bundled MKL (2019.0.5) runs its AVX-512 kernels on Intel CPUs only.
# - The trajectory then amplifies whatever ulps it is given. At the tiny run's learning rate of 0.05,
#   per-rank BatchNorm (24 samples, 2x2 pixels in the last stage) is chaotic: moving every initial weight of
#   the one-process run by one ulp moved its loss by 2.7e-3 at step 5 and 2.5e-2 at step 6; the 2-rank run
#   followed that curve on AVX-512 (2.7e-3 at step 5) and stayed within 4e-6 on AVX2, by the luck of which
#   ulps it drew. At 0.01 both comparisons were well conditioned on an AVX2 host and an AMD AVX-512 host,
#   except for one readout: at step 12 the class centers' velocity (their gradient, ~1.8) jumps to ~1e-5
#   apart (AVX-512; 3e-6 on AVX2), in the 2-rank run and in a one-process run that sums classes in two chunks
#   alike. On an Intel Xeon (AVX-512) it was not: the twins' spread in the tensors grew from 6e-6 at step 4
#   to 1.0e-4 at step 9 and 1.7e-4 at step 10. At 0.005 it stays at 2.9e-6 (tensors) and 3.8e-6 (loss) over
#   all 13 steps there.
#
# So each comparison, at 0.005, checks (a) step 1 from identical states to a few ulps, and (b) every step
# within SPREAD_FACTOR times the spread, measured in the same test, between the one-process reference and
# two legitimate twins of it (run_twins): its initial weights each one ulp off, and its class sums taken in
# the ranks' two chunks by the streaming head; floors of a few ulps. Measured at 0.01 on AVX2 and AMD's
# AVX-512, the 2-rank run's distance to the reference never exceeded the twins' spread (above the floors):
# comparison 1 up to 3e-6 (AVX2) and 1.0e-5 (AVX-512, steps 12-13) against spreads of 1.2e-5 and 1.0e-5;
# comparison 2 up to 2.2e-6 against 2.9e-6 and 2.7e-6. The spread must itself stay small
# (WELL_CONDITIONED): on a chaotic trajectory the bound would mean nothing, and the test says so instead.

STEP_ONE_TOLERANCE = 1e-6  # relative to max(1, |largest entry|); measured 1e-7 to 2.3e-7 (1-2 ulps)
SPREAD_FACTOR = 4
TENSOR_FLOOR = 1e-6  # a few float32 ulps at the tensors' scale (~1): measured differences start at 1e-7
LOSS_FLOOR_ULPS = 4  # losses ~15 (ulp 9.5e-7): measured differences 0 to 3 ulps when well conditioned
WELL_CONDITIONED = 1e-4  # the twins' spread at 0.005: at most 3.8e-6; at 0.01 up to 1.7e-4, at 0.05 1e-2

GLOBAL_BATCH = 48  # 240 images: 5 steps per epoch


@pytest.fixture
def tiny_overrides(tiny_dir, tiny_run):
    """``tiny_overrides(processes, *extra, verify=False)``: the tiny run's settings with the global batch
    split over ``processes``; every center is used (ratio < 1 would sample per rank)."""

    def overrides(processes: int, *extra: str, verify: bool = False) -> list[str]:
        bins = f"[{tiny_dir / 'lfw_disjoint_100.bin'}]" if verify else "[]"
        return [f"data.root={tiny_dir}", f"data.val_bins={bins}", *tiny_run, "loss.sample_ratio=1.0",
                "train.eval_batch_size=50", f"train.batch_size={GLOBAL_BATCH // processes}", *extra]

    return overrides


def normalise_batches_like_ranks(model: paddle.nn.Layer, ranks: int) -> paddle.nn.Layer:
    """Make a one-process backbone see its batch the way ``ranks`` processes see theirs.

    In training mode the forward splits the batch into the ranks' contiguous blocks (the sampler gives rank r
    the r-th block of each global batch), runs each block through the backbone and concatenates: per-rank
    BatchNorm statistics. Evaluation is unaffected. The parameters stay the model's own, so state dicts and
    the optimizer are unchanged.
    """
    forward = model.forward

    def per_rank_forward(images):
        if not model.training:
            return forward(images)
        return paddle.concat([forward(block) for block in paddle.split(images, ranks)])

    model.forward = per_rank_forward
    return model


def one_process_trainer(overrides: list[str], output: Path, batchnorm: str, resume=False):
    """A one-process Trainer whose backbone normalises like 2 ranks with ``batchnorm``: global | per-rank."""
    from plsc.config import load_config
    from plsc.engine.trainer import Trainer

    trainer = Trainer(load_config(overrides=overrides), output, resume=resume, comm=LocalComm())
    if batchnorm == "global":
        use_running_batchnorm_statistics(trainer.model)
    else:
        normalise_batches_like_ranks(trainer.model, 2)
    return trainer


def train_on_two_ranks(tmp_path: Path, output: Path, batchnorm: str, overrides: list[str]) -> Path:
    """Launch the worker's Trainer on 2 ranks; returns the folder of its per-rank records."""
    ranks_dir = tmp_path / f"{output.name}-ranks"
    ranks_dir.mkdir()
    launch_worker(tmp_path, 2, "train", ranks_dir, output, batchnorm, *overrides)
    return ranks_dir


def read_log(output: Path, kind: str = "loss") -> list[dict]:
    """The training records of a run's log (``kind="eval"``: its evaluation records)."""
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [record for record in records if kind in record]


def losses(output: Path) -> np.ndarray:
    return np.array([record["loss"] for record in read_log(output)])


def centers_of(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """All class centers and velocities of a checkpoint, whatever its number of shards."""
    from plsc import checkpoint as ckpt

    manifest = ckpt.read_manifest(checkpoint)
    rows = ckpt.read_center_rows(checkpoint, manifest, shard_classes(manifest["num_classes"], 0, 1))
    return np.asarray(rows["weight"]), np.asarray(rows["velocity"])


def backbone_of(checkpoint: Path) -> dict[str, np.ndarray]:
    from plsc import checkpoint as ckpt

    return {k: v.numpy() for k, v in ckpt.load_backbone_state(checkpoint).items()}


def checkpoint_difference(a: Path, b: Path, running_statistics=True) -> float:
    """The largest relative_difference of class centers, their velocities and the backbone's tensors;
    ``running_statistics=False`` leaves out the BatchNorm running statistics (per-rank state that the
    one-process reference updates once per block)."""
    pairs = list(zip(centers_of(a), centers_of(b), strict=True))
    a_backbone, b_backbone = backbone_of(a), backbone_of(b)
    assert a_backbone.keys() == b_backbone.keys()
    pairs += [(value, b_backbone[name]) for name, value in a_backbone.items()
              if running_statistics or not name.endswith(("._mean", "._variance"))]
    return max(relative_difference(x, y) for x, y in pairs)


def assert_same_checkpoint_tensors(a: Path, b: Path, tolerance: float, running_statistics=True) -> None:
    difference = checkpoint_difference(a, b, running_statistics)
    assert difference <= tolerance, f"checkpoints {a} and {b} differ by {difference:.3g}"


def nudge_by_one_ulp(model: paddle.nn.Layer) -> None:
    """Move every parameter of ``model`` one float32 ulp up or down (at random, a fixed draw): another
    float32 rounding of the same initial state, as legitimate as the first."""
    rng = np.random.default_rng(0)
    with paddle.no_grad():
        for parameter in model.parameters():
            value = parameter.numpy()
            up = rng.random(value.shape) < 0.5
            parameter.set_value(np.nextafter(value, np.where(up, np.float32(np.inf), np.float32(-np.inf))))


def losses_by_step(output: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_log(output)}


def loss_floor(loss: float) -> float:
    return LOSS_FLOOR_ULPS * float(np.spacing(np.float32(abs(loss))))


def checkpoint(output: Path, step: int) -> Path:
    return output / "checkpoints" / str(step)


def assert_step_one_exact(two: Path, one: Path, running_statistics=True) -> None:
    """From identical states the runs differ by summation order alone: a few ulps."""
    two_loss, one_loss = losses_by_step(two)[1], losses_by_step(one)[1]
    assert abs(two_loss - one_loss) <= loss_floor(one_loss), (two_loss, one_loss)
    difference = checkpoint_difference(checkpoint(two, 1), checkpoint(one, 1), running_statistics)
    assert difference <= STEP_ONE_TOLERANCE, f"step 1: {difference:.3g}"


def assert_follows_reference(two_runs: list[Path], one: Path, twins: list[Path], running_statistics=True):
    """Every step the 2-rank runs logged (a resumed run's folder after the run it resumed) against the
    one-process reference ``one``, within SPREAD_FACTOR times the largest spread so far between ``one`` and
    its ``twins`` (floors: a few ulps); that spread must stay under WELL_CONDITIONED."""
    run_of = {step: run for run in two_runs for step in losses_by_step(run)}
    one_losses, twin_losses = losses_by_step(one), [losses_by_step(twin) for twin in twins]
    loss_spread = tensor_spread = 0.0
    for step, run in sorted(run_of.items()):
        reference = one_losses[step]
        loss_spread = max(loss_spread, *(abs(losses[step] - reference) for losses in twin_losses))
        tensor_spread = max(tensor_spread, *(
            checkpoint_difference(checkpoint(twin, step), checkpoint(one, step), running_statistics)
            for twin in twins))
        assert max(loss_spread / max(1.0, abs(reference)), tensor_spread) <= WELL_CONDITIONED, (
            f"step {step}: the twins part by {loss_spread:.3g} (loss), {tensor_spread:.3g} (tensors): the "
            "trajectory is too sensitive for this comparison")
        loss_error = abs(losses_by_step(run)[step] - reference)
        assert loss_error <= SPREAD_FACTOR * max(loss_spread, loss_floor(reference)), (
            f"step {step}: loss {loss_error:.3g} off, twins' spread {loss_spread:.3g}")
        tensor_error = checkpoint_difference(checkpoint(run, step), checkpoint(one, step), running_statistics)
        assert tensor_error <= SPREAD_FACTOR * max(tensor_spread, TENSOR_FLOOR), (
            f"step {step}: tensors {tensor_error:.3g} off, twins' spread {tensor_spread:.3g}")


GENTLE_LR = "optim.lr=0.005"


EVERY_STEP_SAVED = ("train.save_interval=1", "train.keep_checkpoints=100")


CLASSES_PER_RANK = 20  # the bundled data's 40 classes on 2 ranks


def run_twins(overrides: list[str], output: Path, batchnorm: str) -> list[Path]:
    """Two legitimate variants of the one-process reference, run to ``output``/nudged and /chunked: its
    initial weights each one ulp off (nudge_by_one_ulp), and its class sums taken in chunks of
    CLASSES_PER_RANK classes (the streaming head, loss.chunk_size: the ranks' split, by other code)."""
    nudged, chunked = output / "nudged", output / "chunked"
    trainer = one_process_trainer(overrides, nudged, batchnorm)
    nudge_by_one_ulp(trainer.model)
    trainer.run()
    one_process_trainer([*overrides, f"loss.chunk_size={CLASSES_PER_RANK}"], chunked, batchnorm).run()
    return [nudged, chunked]


def test_two_ranks_take_the_first_step_exactly_like_one_process(tiny_overrides, tmp_path):
    """Comparison 1's first step (see above): from identical states, 2 ranks and one process with the double
    batch differ by summation order alone, a few ulps in the loss and in every tensor of the checkpoint (the
    sampler's blocks, the all-gather, the sharded softmax, the coalesced all-reduce, clipping, the momentum
    steps, the sharded save). The trajectory over 11 steps and a resume across ranks:
    test_two_ranks_train_exactly_like_one_process_with_the_double_batch (cpu_slow)."""
    two, one = tmp_path / "two", tmp_path / "one"
    run_length = ("train.max_steps=1", GENTLE_LR, *EVERY_STEP_SAVED)
    train_on_two_ranks(tmp_path, two, "global", tiny_overrides(2, *run_length))
    one_process_trainer(tiny_overrides(1, *run_length), one, "global").run()
    assert [r["step"] for r in read_log(two)] == [1]
    assert_step_one_exact(two, one)


@pytest.mark.cpu_slow(reason="a two-rank run and three one-process references of 11 steps, then resumes "
                              "(~30 s); the first step's exactness stays fast")
def test_two_ranks_train_exactly_like_one_process_with_the_double_batch(tiny_overrides, tmp_path):
    """Comparison 1 (see above): 11 steps, then each run resumes on 1 process for 2 more from its own
    checkpoint; the 2-rank checkpoint continues at the same step, on the same trajectory. Step 1 to a few
    ulps, steps 1-13 within SPREAD_FACTOR x the twins' spread."""
    steps = 11  # two epochs and one step: the resume starts mid-epoch
    two, one = tmp_path / "two", tmp_path / "one"
    run_length = (f"train.max_steps={steps}", GENTLE_LR, *EVERY_STEP_SAVED)
    train_on_two_ranks(tmp_path, two, "global", tiny_overrides(2, *run_length))
    one_process_trainer(tiny_overrides(1, *run_length), one, "global").run()
    twins = run_twins(tiny_overrides(1, *run_length), tmp_path, "global")
    assert [r["step"] for r in read_log(two)] == list(range(1, steps + 1))
    assert_step_one_exact(two, one)

    more = tiny_overrides(1, f"train.max_steps={steps + 2}", GENTLE_LR, *EVERY_STEP_SAVED)
    resumed = one_process_trainer(more, two / "resumed", "global", resume=checkpoint(two, steps))
    assert (resumed.state.step, resumed.state.epoch, resumed.state.step_in_epoch) == (steps, 2, 1)
    resumed.run()
    one_process_trainer(more, one, "global", resume=True).run()
    twins_more = [more, [*more, f"loss.chunk_size={CLASSES_PER_RANK}"]]
    for twin, overrides in zip(twins, twins_more, strict=True):
        one_process_trainer(overrides, twin, "global", resume=True).run()
    assert_follows_reference([two, two / "resumed"], one, twins)


@pytest.mark.cpu_slow(reason="a two-rank run with verification and three one-process references "
                              "(~25 s); the two-rank equality tests stay fast")
def test_per_rank_batchnorm_and_shared_verification(tiny_overrides, tiny_dir, tmp_path):
    """Comparison 2 (see above), with verification at steps 2, 4 and 5 on both ranks: each rank embeds half
    of the pairs, both get identical results and take the same best-model decisions, and rank 0 alone
    writes the shared files. Step 1 to a few ulps, steps 1-5 within SPREAD_FACTOR x the twins' spread."""
    steps = 5
    two, one = tmp_path / "two", tmp_path / "one"
    run_length = (f"train.max_steps={steps}", GENTLE_LR, *EVERY_STEP_SAVED)
    ranks_dir = train_on_two_ranks(tmp_path, two, "per-rank",
                                   tiny_overrides(2, *run_length, "train.eval_interval=2", verify=True))
    one_process_trainer(tiny_overrides(1, *run_length), one, "per-rank").run()
    twins = run_twins(tiny_overrides(1, *run_length), tmp_path, "per-rank")
    assert_step_one_exact(two, one, running_statistics=False)
    assert_follows_reference([two], one, twins, running_statistics=False)
    check_shared_verification(tiny_dir, two, ranks_dir, evaluations=3)


def check_shared_verification(tiny_dir: Path, output: Path, ranks_dir: Path, evaluations: int) -> None:
    from plsc import checkpoint as ckpt
    from plsc.eval.runner import evaluate_model

    rank0, rank1 = (json.loads((ranks_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["best"] == rank1["best"] and rank0["last_eval"] == rank1["last_eval"]
    # 100 pairs = 200 images, embedded plain and mirrored: each rank did half of every evaluation.
    assert rank0["images_embedded"] == rank1["images_embedded"] == evaluations * 200
    # Shared files come from rank 0 alone: one log line per step, no second writer's leftovers.
    assert [r["step"] for r in read_log(output)] == list(range(1, rank0["steps"] + 1))
    assert len(read_log(output, "eval")) == evaluations
    shared = [".plsc.lock", "best_model", "checkpoints", "config.yaml", "train_log.jsonl"]  # lock: rank 0's
    shared += ["visualdl"] if importlib.util.find_spec("visualdl") else []  # plsc.engine.curves
    assert sorted(p.name for p in output.iterdir()) == shared
    best_dir = output / "best_model" / "lfw_disjoint_100"
    best = ckpt.read_manifest(best_dir)
    assert best["world_size"] == 2 and best["step"] == rank0["best"]["lfw_disjoint_100"]["step"]
    # Scored again in one process, the saved best model gives what the ranks computed together: every rank
    # evaluated rank 0's model, the one checkpoints hold (BatchNorm statistics are otherwise per rank).
    again = evaluate_model(best_dir, [str(tiny_dir / "lfw_disjoint_100.bin")], batch_size=50)
    for key in ("accuracy", "threshold", "tar_at_far_1e-3", "xnorm"):
        assert again["lfw_disjoint_100"][key] == pytest.approx(best["best_metric"]["lfw_disjoint_100"][key])


# --- checkpoints across world sizes -----------------------------------------------------------------------


def random_center_checkpoint(path: Path, num_classes: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A one-process checkpoint whose centers and velocities are random (so every row is distinguishable)."""
    from plsc import checkpoint as ckpt
    from plsc.config import Config

    rng = np.random.default_rng(num_classes)
    weight = rng.standard_normal((num_classes, EMBEDDING_SIZE)).astype(dtype)
    velocity = rng.standard_normal((num_classes, EMBEDDING_SIZE)).astype(dtype)
    head = PartialFC(num_classes, EMBEDDING_SIZE, ARCFACE, center_dtype=dtype)
    head.set_state(weight, velocity)
    ckpt.save_checkpoint(path, comm=LocalComm(), state=ckpt.TrainingState(7, 1, 2),
                         config=Config().to_dict(), model=paddle.nn.Linear(2, 2), optimizer=None, head=head)
    return weight, velocity


@pytest.mark.cpu_slow(reason="four launched trainings on 1, 2, 3 and 1 ranks (~40 s)")
def test_checkpoint_round_trip_over_1_2_3_1_ranks_is_bit_identical(tmp_path):
    from plsc import checkpoint as ckpt

    chains = {dtype: [tmp_path / f"{dtype}-{n}" for n in (1, 2, 3)] for dtype in ("float32", "float16")}
    originals = {dtype: random_center_checkpoint(chain[0], 23, dtype) for dtype, chain in chains.items()}
    launch_worker(tmp_path, 2, "reshard", *[p for chain in chains.values() for p in (chain[0], chain[1])])
    launch_worker(tmp_path, 3, "reshard", *[p for chain in chains.values() for p in (chain[1], chain[2])])
    for dtype, chain in chains.items():
        weight, velocity = originals[dtype]
        for world, checkpoint in zip((1, 2, 3), chain, strict=True):
            manifest = ckpt.read_manifest(checkpoint)
            assert manifest["world_size"] == world and manifest["center_dtype"] == dtype
            assert (manifest["step"], manifest["epoch"], manifest["step_in_epoch"]) == (7, 1, 2)
            for shard in manifest["shards"]:  # each rank's file holds exactly its own rows
                rows = slice(shard["start"], shard["start"] + shard["count"])
                assert np.array_equal(np.load(checkpoint / shard["weight"]), weight[rows])
                assert np.array_equal(np.load(checkpoint / shard["velocity"]), velocity[rows])
        back = ckpt.read_center_rows(chain[2], ckpt.read_manifest(chain[2]), shard_classes(23, 0, 1))
        for restored, original in zip(back.values(), (weight, velocity), strict=True):
            restored = np.asarray(restored)
            assert restored.dtype == original.dtype and np.array_equal(restored, original)


# --- starting processes: plsc train --nproc, scripts/train_dynamic.sh, two nodes ---------------------------


@pytest.fixture
def cli_arguments(tiny_overrides):
    """``cli_arguments(output, processes, *extra)``: ``plsc train``'s arguments for the tiny run, no
    verification."""
    config = Path(__file__).resolve().parent.parent / "configs" / "cpu" / "mini.yaml"

    def arguments(output: Path, processes: int, *extra: str) -> list[str]:
        settings = tiny_overrides(processes, "train.eval_interval=0", *extra)
        flags = [flag for setting in settings for flag in ("--set", setting)]
        return ["train", "--config", str(config), "--output", str(output), *flags]

    return arguments


def run_quietly(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**child_environment(2), "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          **kwargs)
    outputs = [proc.stdout[-3000:], proc.stderr[-3000:]]
    assert proc.returncode == 0, "\n".join([f"exit {proc.returncode}", *outputs])
    return proc


@pytest.mark.cpu_slow(reason="a one-process run then a launched two-rank resume (~35 s)")
def test_plsc_train_nproc_continues_a_one_process_run_on_two(cli_arguments, tmp_path):
    """``plsc train --nproc 2`` launches 2 ranks of ``python -m plsc.cli train``; resuming a 1-process
    checkpoint on them continues at its step (global batch kept: 2 x 24 after 1 x 48)."""
    from plsc import checkpoint as ckpt
    from plsc import cli

    output = tmp_path / "run"
    assert cli.main(cli_arguments(output, 1, "train.max_steps=2")) == 0
    arguments = cli_arguments(output, 2, "train.max_steps=4")
    proc = run_quietly([sys.executable, "-m", "plsc.cli", *arguments, "--resume", "--nproc", "2"])
    assert "checkpoint:" in proc.stdout  # rank 0's console output reaches the user through the launcher
    assert [r["step"] for r in read_log(output)] == [1, 2, 3, 4]
    manifest = ckpt.read_manifest(output / "checkpoints" / "4")
    assert manifest["world_size"] == 2 and manifest["step"] == 4
    assert sorted(p.name for p in (output / "log").glob("workerlog.*")) == ["workerlog.0", "workerlog.1"]


@pytest.mark.cpu_slow(reason="the dynamic script on two launched processes (~30 s); its "
                              "quiet-output test stays fast")
def test_train_dynamic_script_runs_two_cpu_processes(cli_arguments, tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_dynamic.sh"
    output = tmp_path / "run"
    env = {"PYTHON": sys.executable, "NPROC": "2", "CUDA_VISIBLE_DEVICES": "0,1"}  # no GPU here: ignored
    arguments = cli_arguments(output, 2, "train.max_steps=2")[2:]  # CONFIG and options
    run_quietly(["sh", str(script), *arguments], env=env, cwd=tmp_path)  # POSIX sh (dash on Debian)
    from plsc import checkpoint as ckpt

    assert ckpt.read_manifest(output / "checkpoints" / "2")["world_size"] == 2
    assert sorted(p.name for p in (output / "log").glob("workerlog.*")) == ["workerlog.0", "workerlog.1"]
    assert not (tmp_path / "log").exists()  # nothing written into the folder the script was run from


@pytest.mark.cpu_slow(reason="the static script on two launched processes (~40 s)")
def test_train_static_script_trains_in_static_mode_on_two_cpu_processes(cli_arguments, tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_static.sh"
    output = tmp_path / "run"
    arguments = cli_arguments(output, 2, "train.max_steps=2")[2:]  # CONFIG and options
    command = ["sh", str(script), "--nproc", "2", *arguments]
    run_quietly(command, env={"PYTHON": sys.executable}, cwd=tmp_path)
    from plsc import checkpoint as ckpt

    manifest = ckpt.read_manifest(output / "checkpoints" / "2")
    assert manifest["world_size"] == 2 and manifest["config"]["train"]["mode"] == "static"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cpu_slow(reason="two launchers as two nodes (~30 s)")
def test_two_nodes_on_one_machine_train_like_one_process(tiny_overrides, tmp_path):
    """Two launchers (--nnodes 2, one process each) meeting at a loopback master: the multi-node path of
    paddle.distributed.launch. They train like one process with the double batch (comparison 1 above)."""
    steps = 3
    two, one, ranks_dir = tmp_path / "two-nodes", tmp_path / "one", tmp_path / "ranks"
    ranks_dir.mkdir()
    program = [sys.executable, str(WORKER), "train", str(ranks_dir), str(two), "global",
               *tiny_overrides(2, f"train.max_steps={steps}")]
    master = f"127.0.0.1:{free_port()}"
    env = {**child_environment(1), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(launch_command(1, program, nnodes=2, master=master, node_rank=rank,
                                        log_dir=tmp_path / f"node{rank}-log"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    one_process_trainer(tiny_overrides(1, f"train.max_steps={steps}"), one, "global").run()
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-6, atol=1e-5)
    assert_same_checkpoint_tensors(two / "checkpoints" / str(steps), one / "checkpoints" / str(steps), 1e-5)
    assert sorted(json.loads(p.read_text())["rank"] for p in ranks_dir.glob("rank*.json")) == [0, 1]


@pytest.mark.cpu_slow(reason="a launched two-rank run stopped by a signal (~20 s); the one-process "
                              "signal test stays fast")
def test_sigterm_to_plsc_train_nproc_saves_one_checkpoint_on_all_ranks(cli_arguments, tmp_path):
    """The signal travels plsc -> launcher -> ranks; the ranks agree to stop after the same step (any_true)
    and save one checkpoint together, as a single process does."""
    from plsc import checkpoint as ckpt

    output = tmp_path / "run"
    env = {**child_environment(2), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "plsc.cli", *cli_arguments(output, 2, "train.max_steps=500"),
               "--nproc", "2"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = output / "train_log.jsonl"
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "--resume" in err
    latest = ckpt.CheckpointDir(output / "checkpoints").latest()
    manifest = ckpt.read_manifest(latest)
    assert manifest["world_size"] == 2 and manifest["step"] == read_log(output)[-1]["step"] >= 2


def test_more_ranks_than_classes_is_a_clear_error(tiny_overrides, tmp_path):
    """A rank without classes would have an empty softmax shard; the trainer refuses before building one."""
    from plsc.config import load_config
    from plsc.engine.trainer import Trainer
    from plsc.errors import PlscError

    class FortyOneRanks(LocalComm):
        world_size = 41  # the bundled data has 40 classes

    with pytest.raises(PlscError, match="cannot shard 40 classes over 41 ranks"):
        Trainer(load_config(overrides=tiny_overrides(1)), tmp_path, comm=FortyOneRanks())

"""The head benchmark's own code, and the fast paths of the head it led to, each against a plain reference.

Tiny shapes only: nothing here times anything (``plsc bench head`` and bench/ write timings as JSON).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from reference_loss import margin_logits, softmax_cross_entropy

from plsc.bench import rss_classes_of, spec_from_args
from plsc.bench.head import (
    PHASES,
    HeadBenchSpec,
    PhaseClock,
    build_head,
    head_step,
    make_batch,
    measure_rss,
    measure_time,
    rss_slope,
    simulated_rank,
    table,
)
from plsc.cli import build_parser
from plsc.distributed import LocalComm
from plsc.engine.modes import HeadLossStep
from plsc.errors import PlscError
from plsc.loss.margin import (
    ARCFACE,
    COSFACE,
    Margin,
    ScratchRows,
    cosine_to_centers,
    margin_softmax_cross_entropy,
    target_logit,
)
from plsc.loss.partial_fc import CenterUpdate, PartialFC, init_class_center_tensor, init_class_centers
from plsc.loss.row_backend import cast
from plsc.loss.rows import lazy_update, row_store
from plsc.loss.sampling import distinct_uniform, sorted_unique

COMBINED = Margin(0.9, 0.4, 0.15, 32.0)
MARGINS = pytest.mark.parametrize(
    "margin", [ARCFACE, COSFACE, COMBINED], ids=["arcface", "cosface", "combined"]
)
TINY = HeadBenchSpec(classes=3000, ratio=0.1, batch=8, emb=16, steps=2, warmup=1, threads=1)


# --- sampling without replacement in O(count) ---------------------------------------------------------------


@pytest.mark.parametrize("population,count", [(10**6, 1000), (100, 30), (100, 70), (5, 5), (7, 0)])
def test_distinct_uniform_draws_distinct_values_in_range(population, count):
    drawn = distinct_uniform(np.random.default_rng(1), population, count)
    assert len(drawn) == count == len(np.unique(drawn))
    assert count == 0 or (drawn.min() >= 0 and drawn.max() < population)
    np.testing.assert_array_equal(drawn, distinct_uniform(np.random.default_rng(1), population, count))


def test_distinct_uniform_gives_every_subset_the_same_chance():
    """All 20 subsets of 3 out of 6 (the i.i.d.-draws path: 2 x 3 <= 6), 4000 draws: chi-square with 19
    degrees of freedom below 51 (p = 1e-4 for a uniform law; a bias of 30% on one subset gives ~90)."""
    population, count, trials = 6, 3, 4000
    seen: dict[tuple, int] = {}
    for trial in range(trials):
        drawn = distinct_uniform(np.random.default_rng(trial), population, count)
        assert np.all(np.diff(drawn) > 0)  # sorted, distinct
        seen[tuple(drawn)] = seen.get(tuple(drawn), 0) + 1
    assert len(seen) == math.comb(population, count)
    expected = trials / len(seen)
    assert sum((n - expected) ** 2 / expected for n in seen.values()) < 51


def test_sorted_unique_is_numpys_unique():
    values = np.random.default_rng(0).integers(-5, 50, 300)
    np.testing.assert_array_equal(sorted_unique(values), np.unique(values))
    assert sorted_unique(np.empty(0, dtype=np.int64)).size == 0


@pytest.mark.parametrize("count", [4, 14], ids=["rejection", "permutation"])
def test_distinct_uniform_gives_every_value_the_same_chance(count):
    population, trials = 20, 2000  # hit rates within 0.035 of count / population: about 4 sigma
    hits = np.zeros(population)
    for trial in range(trials):
        hits[distinct_uniform(np.random.default_rng(trial), population, count)] += 1
    np.testing.assert_allclose(hits / trials, count / population, atol=0.035)


# --- the fused margin softmax and cosine against the autograd compositions --------------------------------


def composed_loss(cosine, labels, margin):
    return softmax_cross_entropy(margin_logits(cosine, labels, margin), labels, LocalComm())


def fused_loss(cosine, labels, margin):
    return margin_softmax_cross_entropy(cosine, labels, margin, LocalComm())


def loss_and_grad(loss_fn, cosine: np.ndarray, labels: np.ndarray, margin):
    x = paddle.to_tensor(cosine, stop_gradient=False)
    loss = loss_fn(x, paddle.to_tensor(labels), margin)
    (loss * 1.7).backward()  # an upstream gradient other than 1
    return float(loss), x.grad.numpy()


@MARGINS
def test_fused_margin_softmax_equals_the_composition(margin):
    rng = np.random.default_rng(2)
    cosine = rng.uniform(-0.95, 0.95, (6, 11))
    cosine[0, 3], cosine[1, 2] = 1.0, -1.0  # the clipped ends of the target logit
    labels = np.array([3, 2, -1, 5, 0, -1])  # -1: the class lives on another rank
    fused = loss_and_grad(fused_loss, cosine, labels, margin)
    reference = loss_and_grad(composed_loss, cosine, labels, margin)
    np.testing.assert_allclose(fused[0], reference[0], rtol=1e-12)
    np.testing.assert_allclose(fused[1], reference[1], rtol=1e-6, atol=1e-12)


@MARGINS
def test_target_logit_slope_is_the_autograd_derivative(margin):
    values = np.array([-1.0, -0.9999999, -0.7, 0.0, 0.3, 0.9999999, 1.0, 1.0000001])
    x = paddle.to_tensor(values, stop_gradient=False)
    target_logit(x, margin)[0].sum().backward()
    slope = target_logit(paddle.to_tensor(values), margin)[1]
    np.testing.assert_allclose(slope.numpy(), x.grad.numpy(), rtol=1e-7)  # 2.6's float64 sqrt grad: 3e-8


def normalize_then_matmul(embeddings, centers):
    return paddle.matmul(F.normalize(embeddings, axis=1), F.normalize(centers, axis=1), transpose_y=True)


@pytest.mark.parametrize("embeddings_need_grad", [True, False])
def test_cosine_to_centers_equals_normalize_then_matmul(embeddings_need_grad):
    rng = np.random.default_rng(3)
    embeddings_np, centers_np = rng.standard_normal((5, 7)), rng.standard_normal((9, 7))
    grad_np = rng.standard_normal((5, 9))
    results = []
    for cosine_fn in (cosine_to_centers, normalize_then_matmul):
        e = paddle.to_tensor(embeddings_np, stop_gradient=not embeddings_need_grad)
        w = paddle.to_tensor(centers_np, stop_gradient=False)
        cosine = cosine_fn(e, w)
        cosine_values = cosine.numpy()  # before backward, which may overwrite it (see cosine_to_centers)
        (cosine * paddle.to_tensor(grad_np)).sum().backward()
        results.append((cosine_values, w.grad.numpy(), None if e.grad is None else e.grad.numpy()))
    (cosine, grad_w, grad_e), (cosine_ref, grad_w_ref, grad_e_ref) = results
    np.testing.assert_allclose(cosine, cosine_ref, rtol=1e-12)
    np.testing.assert_allclose(grad_w, grad_w_ref, rtol=1e-9, atol=1e-12)
    if embeddings_need_grad:
        np.testing.assert_allclose(grad_e, grad_e_ref, rtol=1e-9, atol=1e-12)
    else:
        assert grad_e is None and grad_e_ref is None


def test_cosine_to_centers_leaves_a_gradient_passed_to_backward_untouched():
    # its backward scales the incoming gradient in place: Paddle must hand it a buffer of its own
    centers = paddle.to_tensor(np.random.default_rng(4).standard_normal((9, 7)), stop_gradient=False)
    cosine = cosine_to_centers(paddle.ones([5, 7], dtype="float64"), centers)
    grad = paddle.full([5, 9], 2.0, dtype="float64")
    cosine.backward(grad)
    assert np.all(grad.numpy() == 2.0) and centers.grad is not None


def test_center_gradient_written_into_the_scratch_is_the_leafs_gradient_step_after_step():
    rng = np.random.default_rng(5)
    scratch = ScratchRows()
    for _ in range(3):  # the scratch is overwritten step after step
        embeddings, centers_np = rng.standard_normal((6, 8)), rng.standard_normal((11, 8))
        grads = []
        for into in (None, scratch):
            centers = paddle.to_tensor(centers_np, stop_gradient=False)
            cosine = cosine_to_centers(paddle.to_tensor(embeddings), centers, into)
            (cosine * paddle.to_tensor(np.arange(66.0).reshape(6, 11))).sum().backward()
            grads.append(centers.grad)
        plain, scratched = grads
        np.testing.assert_array_equal(scratched.numpy(), plain.numpy())
        # Paddle hands the returned gradient to the leaf without a copy: the scratch is reused, not doubled
        assert scratched.data_ptr() == scratch.tensor.data_ptr() != plain.data_ptr()


def test_partial_fc_steps_the_same_with_its_gradient_scratch_and_without():
    heads = []
    for scratched in (True, False):
        head = PartialFC(500, 16, ARCFACE, sample_ratio=0.2, seed=3)
        if not scratched:
            head.strategy.center_grad_scratch = None
        heads.append(head)
    rng = np.random.default_rng(6)
    for step in range(3):
        embeddings = rng.standard_normal((8, 16))
        labels = paddle.to_tensor(rng.integers(0, 500, 8))
        for head in heads:
            loss, pending = head(paddle.to_tensor(embeddings, dtype="float32"), labels, step)
            loss.backward()
            head.apply(pending, CenterUpdate(0.1, 0.9, 5e-4))
    np.testing.assert_array_equal(heads[0].weight.numpy(), heads[1].weight.numpy())
    np.testing.assert_array_equal(heads[0].velocity.numpy(), heads[1].velocity.numpy())
    assert heads[0].strategy.center_grad_scratch.tensor is not None
    heads[0].release_scratch()
    assert heads[0].strategy.center_grad_scratch.tensor is None


# --- initialisation and the update -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_center_tensor_is_written_block_by_block_with_the_same_rows(dtype):
    tensor = init_class_center_tensor(5, 4000, 9000, 6, dtype)  # starts and ends inside init blocks
    assert tensor.dtype == getattr(paddle, dtype) and tensor.shape == [9000, 6]
    # Paddle's own cast as the reference: 2.6's float16 rounding differs from numpy's in the last bit.
    expected = paddle.to_tensor(init_class_centers(5, 4000, 9000, 6)).astype(dtype)
    np.testing.assert_array_equal(tensor.numpy(), expected.numpy())


@pytest.mark.parametrize("block_rows", [4096, 2], ids=["one-block", "blocks-of-2"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("pass_rows", [True, False], ids=["gathered-rows", "own-gather"])
def test_lazy_update_with_gathered_rows_and_grad_scale_matches_numpy(
    block_rows, dtype, pass_rows, monkeypatch
):
    monkeypatch.setattr("plsc.loss.rows.UPDATE_BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(4)
    weight_np, velocity_np = (rng.standard_normal((10, 3)).astype(dtype).astype(np.float64) for _ in range(2))
    index_np, grad_np = np.array([1, 4, 5, 8, 9]), rng.standard_normal((5, 3))
    lr, mu, wd, scale = 0.1, 0.9, 5e-4, 0.25
    expected_w, expected_v = weight_np.copy(), velocity_np.copy()
    expected_v[index_np] = mu * velocity_np[index_np] + scale * grad_np + wd * weight_np[index_np]
    expected_w[index_np] = weight_np[index_np] - lr * expected_v[index_np]
    weight = paddle.to_tensor(weight_np.astype(dtype))
    velocity = paddle.to_tensor(velocity_np.astype(dtype))
    index = paddle.to_tensor(index_np)
    rows = paddle.gather(weight.astype("float32"), index) if pass_rows else None
    lazy_update(row_store(weight), row_store(velocity), index, paddle.to_tensor(grad_np.astype(np.float32)),
                lr, mu, wd, grad_scale=scale, rows=rows)
    assert weight.dtype == velocity.dtype == getattr(paddle, dtype)
    # float16 storage: the float32 result rounded once, within one float16 ulp (2^-10 relative): Paddle
    # 2.6's float32 -> float16 cast is not always round-to-nearest (measured: 0.86 ulp).
    tolerance = {"float32": dict(rtol=1e-6, atol=1e-7), "float16": dict(rtol=2**-10, atol=1e-7)}[dtype]
    np.testing.assert_allclose(weight.numpy(), expected_w, **tolerance)
    np.testing.assert_allclose(velocity.numpy(), expected_v, **tolerance)
    untouched = np.setdiff1d(np.arange(10), index_np)
    np.testing.assert_array_equal(weight.numpy()[untouched], weight_np[untouched].astype(dtype))


def test_cast_between_float16_and_float32_rounds_like_numpy():
    # numpy's astype is IEEE round-to-nearest-even: ties, subnormals, overflow to inf, inf and nan included
    rng = np.random.default_rng(8)
    special = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, np.inf, -np.inf, np.nan, 2.0**-24, 2.0**-25,
               3 * 2.0**-25, 2.0**-14 * (1 + 2.0**-11), 1 + 2.0**-11, 1 + 3 * 2.0**-11]
    scales = np.float32(10.0) ** rng.integers(-9, 6, 4000).astype(np.float32)
    values = np.concatenate([special, rng.standard_normal(4000) * scales]).astype(np.float32)
    values = values[: len(values) // 8 * 8].reshape(-1, 8)
    whole = paddle.to_tensor(np.concatenate([values, values]))  # a row slice of it: a view on Paddle 3.x
    half = cast(whole[len(values):], paddle.float16)
    assert half.dtype == paddle.float16 and half.shape == list(values.shape)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(half.numpy().view(np.uint16), expected.view(np.uint16))
    if int(paddle.__version__.split(".")[0]) >= 3:  # 2.6's own CPU cast is sometimes one ulp off
        own = whole[len(values):].astype("float16").numpy()
        np.testing.assert_array_equal(half.numpy().view(np.uint16), own.view(np.uint16))
    back = cast(half, paddle.float32)
    assert back.dtype == paddle.float32
    np.testing.assert_array_equal(back.numpy(), expected.astype(np.float32))
    assert cast(back, paddle.float32) is back


def test_static_mode_loss_equals_dynamic():
    """The trainer's static mode compiles ``PartialFC.rows_loss`` as one graph, PyLayers included."""
    rng = np.random.default_rng(5)
    head = PartialFC(50, 8, ARCFACE, sample_ratio=0.5, seed=1)
    labels = paddle.to_tensor(rng.integers(0, 50, 6))
    embeddings_np = rng.standard_normal((6, 8)).astype(np.float32)
    results = []
    for loss_fn in (HeadLossStep(head), paddle.jit.to_static(HeadLossStep(head), full_graph=True)):
        pending = head.prepare(labels, step=3)
        embeddings = paddle.to_tensor(embeddings_np, stop_gradient=False)
        loss = loss_fn(embeddings, pending.rows, pending.squared_norms, pending.remapped)
        loss.backward()
        results.append((float(loss), embeddings.grad.numpy(), pending.rows.grad.numpy()))
    for static, dynamic in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(static, dynamic, rtol=1e-5, atol=1e-7)


# --- the benchmark ---------------------------------------------------------------------------------------


def test_simulated_rank_owns_its_shard_and_sees_the_global_batch():
    spec = HeadBenchSpec(classes=1001, ratio=0.1, batch=4, emb=8, world_size=4)
    comm = simulated_rank(spec.world_size)
    assert (comm.rank, comm.world_size, spec.global_batch) == (0, 4, 16)
    assert PartialFC(spec.classes, spec.emb, ARCFACE, spec.ratio, comm=comm).shard.count == 251


def test_measure_time_reports_step_floor_phases_and_exact_state_bytes():
    result = measure_time(TINY)
    assert set(result["phases"]) == set(PHASES)
    assert result["step_s"] > 0 and result["floor_s"] > 0
    assert result["ratio"] == pytest.approx(result["step_s"] / result["floor_s"])
    assert len(result["step_s_all"]) == TINY.steps
    assert result["bytes_per_class"] == 2 * 4 * TINY.emb  # float32 weight + velocity
    assert result["sampled"] == 300 and result["local_classes"] == 3000


def test_a_step_marks_only_its_own_clock_and_unwraps_the_strategy():
    head = build_head(TINY)
    batch = make_batch(TINY, np.random.default_rng(0))
    first, second = PhaseClock(), PhaseClock()
    head_step(head, *batch, 0, first)
    marked = dict(first.wall)
    head_step(head, *make_batch(TINY, np.random.default_rng(1)), 1, second)
    assert first.wall == marked and list(marked) == list(PHASES)
    assert "prepare" not in vars(head.strategy)


def test_fp16_state_is_half_and_rss_probe_reads_vmhwm():
    half = HeadBenchSpec(**{**TINY.__dict__, "precision": "fp16"})
    assert measure_time(half)["bytes_per_class"] == 2 * 2 * TINY.emb
    probe = measure_rss(TINY)
    assert probe["vmhwm_bytes"] >= probe["vmhwm_after_init_bytes"] > 0


def test_rss_slope_is_per_local_class():
    points = [{"local_classes": 3000, "vmhwm_bytes": 10_000_000},
              {"local_classes": 1000, "vmhwm_bytes": 2_000_000}]
    assert rss_slope(points) == 4000


def head_args(*extra: str):
    return build_parser().parse_args(["bench", "head", "--classes", "1000", *extra])


def test_cli_arguments_become_a_spec():
    args = head_args("--ratio", "0.2", "--world-size", "4", "--precision", "fp16", "--threads", "3")
    spec = spec_from_args(args)
    assert (spec.classes, spec.ratio, spec.world_size) == (1000, 0.2, 4)
    assert (spec.precision, spec.threads) == ("fp16", 3)
    assert rss_classes_of(args) == (500, 1000)
    assert rss_classes_of(head_args("--rss-classes", "100,400")) == (100, 400)
    assert rss_classes_of(head_args("--no-rss")) is None


@pytest.mark.parametrize("extra", [["--ratio", "0"], ["--world-size", "2000"], ["--rss-classes", "9,3"],
                                   ["--rss-classes", "x"]])
def test_cli_rejects_bad_values_in_one_line(extra):
    args = head_args(*extra)
    with pytest.raises(PlscError):
        spec_from_args(args)
        rss_classes_of(args)


def test_plsc_bench_head_writes_json_and_a_table(tmp_path):
    out = tmp_path / "head.json"
    command = [sys.executable, "-m", "plsc.cli", "bench", "head", "--classes", "2000", "--batch", "4",
               "--emb", "8", "--steps", "1", "--warmup", "0", "--threads", "1", "--no-rss",
               "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("step_s", "floor_s", "ratio", "phases", "bytes_per_class", "rss_bytes_per_class", "shape",
                "threads", "paddle_version"):
        assert key in result
    assert result["omp_num_threads"] == "1" and result["shape"]["sampled"] == 200
    assert "step / floor" in proc.stdout and "step / floor" in table(result)


class WalkCountingClock(PhaseClock):
    """A phase clock that also notes, at each mark, how many row gathers and gradient walks the streaming
    head has made so far: what each phase did, told by the code's own calls instead of by its duration."""

    def __init__(self, calls: dict[str, int]):
        super().__init__()
        self.calls, self.seen = calls, {}

    def mark(self, phase: str) -> None:
        super().mark(phase)
        self.seen[phase] = dict(self.calls)


def count_calls(monkeypatch, owner, names: tuple[str, ...]) -> dict[str, int]:
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(owner, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("update_in_backward", [True, False], ids=["update-in-backward", "separate-update"])
def test_streaming_head_bench_gathers_rows_inside_the_walks_and_updates_in_the_planned_walk(
    monkeypatch, update_in_backward
):
    from plsc.loss.streaming import Streaming

    spec = HeadBenchSpec(**{**TINY.__dict__, "chunk_size": 64, "update_in_backward": update_in_backward})
    calls = count_calls(monkeypatch, Streaming, ("gather_chunk", "chunk_gradients", "update_chunk"))
    head = build_head(spec)
    clock = WalkCountingClock(calls)
    index = head_step(head, *make_batch(spec, np.random.default_rng(0)), 0, clock, update_in_backward)
    assert index.ndim == 1 and index.shape[0] == 300  # the sampled ids, not gathered rows
    chunks = -(-300 // 64)
    assert set(clock.seen["gather"].values()) == {0}  # no rows before the forward
    assert clock.seen["forward"]["gather_chunk"] == chunks  # walk 1: the weight rows of every chunk
    assert clock.seen["backward"]["chunk_gradients"] == 1  # walk 2
    # With the update planned, walk 2 steps every chunk and step() walks no more; else step() is walk 3.
    assert clock.seen["backward"]["update_chunk"] == (chunks if update_in_backward else 0)
    assert (clock.seen["update"]["update_chunk"], clock.seen["update"]["chunk_gradients"]) == (chunks, 1)


def test_streaming_head_bench_times_the_same_floor_and_reads_its_options():
    result = measure_time(HeadBenchSpec(**{**TINY.__dict__, "chunk_size": 64}))
    whole = measure_time(TINY)
    assert result["sampled"] == whole["sampled"] == 300  # the floor's shapes: all sampled rows
    assert set(result["phases"]) == set(PHASES) and len(result["step_s_all"]) == TINY.steps
    assert spec_from_args(head_args("--chunk-size", "256")).chunk_size == 256
    assert not spec_from_args(head_args("--separate-update")).update_in_backward
    with pytest.raises(PlscError):
        spec_from_args(head_args("--chunk-size", "-1"))

"""Margin softmax, PartialFC sampling and sparse momentum, each against an independent numpy reference."""

import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from reference_loss import margin_logits, softmax_cross_entropy

from plsc.distributed import LocalComm, shard_classes
from plsc.loss.margin import (
    ARCFACE,
    COSFACE,
    Margin,
    margin_softmax_cross_entropy,
    target_logit,
)
from plsc.loss.partial_fc import CenterUpdate, PartialFC, center_init_std, init_class_centers
from plsc.loss.sampling import num_sampled, sample_centers

COMBINED = Margin(0.9, 0.4, 0.15, 32.0)


def numpy_margin_loss(cosine, labels, margin):
    """Reference: float64, explicit theta, per-row log-sum-exp."""
    cosine = cosine.astype(np.float64)
    logits = margin.scale * cosine.copy()
    rows = np.arange(len(labels))
    theta = np.arccos(cosine[rows, labels])
    logits[rows, labels] = margin.scale * (np.cos(margin.m1 * theta + margin.m2) - margin.m3)
    top = logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return np.mean(log_sum - logits[rows, labels])


def random_cosine(rng, batch, classes):
    return rng.uniform(-0.95, 0.95, size=(batch, classes))


@pytest.mark.parametrize("margin", [ARCFACE, COSFACE, COMBINED], ids=["arcface", "cosface", "combined"])
def test_margin_loss_matches_numpy(margin):
    rng = np.random.default_rng(0)
    cosine = random_cosine(rng, 6, 11)
    labels = rng.integers(0, 11, size=6)
    x = paddle.to_tensor(cosine)
    y = paddle.to_tensor(labels)
    loss = softmax_cross_entropy(margin_logits(x, y, margin), y, LocalComm())
    np.testing.assert_allclose(float(loss), numpy_margin_loss(cosine, labels, margin), rtol=1e-7)


def composed_loss(cosine, labels, margin):
    return softmax_cross_entropy(margin_logits(cosine, labels, margin), labels, LocalComm())


def fused_loss(cosine, labels, margin):
    """The PyLayer training uses, whose backward is written out by hand."""
    return margin_softmax_cross_entropy(cosine, labels, margin, LocalComm())


@pytest.mark.parametrize("loss_fn", [composed_loss, fused_loss], ids=["composed", "fused"])
@pytest.mark.parametrize("margin", [ARCFACE, COSFACE, COMBINED], ids=["arcface", "cosface", "combined"])
def test_margin_loss_gradient_matches_finite_differences(margin, loss_fn):
    rng = np.random.default_rng(1)
    cosine = random_cosine(rng, 4, 5)
    labels = rng.integers(0, 5, size=4)
    x = paddle.to_tensor(cosine, stop_gradient=False)
    y = paddle.to_tensor(labels)
    loss = loss_fn(x, y, margin)
    np.testing.assert_allclose(float(loss), numpy_margin_loss(cosine, labels, margin), rtol=1e-7)
    loss.backward()
    numeric = np.zeros_like(cosine)
    h = 1e-6
    for i in range(cosine.shape[0]):
        for j in range(cosine.shape[1]):
            plus, minus = cosine.copy(), cosine.copy()
            plus[i, j] += h
            minus[i, j] -= h
            numeric[i, j] = (
                numpy_margin_loss(plus, labels, margin) - numpy_margin_loss(minus, labels, margin)
            ) / (2 * h)
    np.testing.assert_allclose(x.grad.numpy(), numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("margin", [ARCFACE, COMBINED], ids=["arcface", "combined"])
def test_target_logit_is_finite_at_theta_zero_and_pi(margin):
    # Normalised dot products can round slightly past +-1.
    x = paddle.to_tensor(
        np.array([1.0, 1.0000001, -1.0, -1.0000001, 0.9999999], dtype=np.float32), stop_gradient=False
    )
    y = target_logit(x, margin)[0]
    y.sum().backward()
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(x.grad.numpy()))
    np.testing.assert_allclose(y.numpy()[0], math.cos(margin.m2) - margin.m3, atol=2e-3)


def test_rows_without_target_get_no_margin():
    rng = np.random.default_rng(2)
    cosine = paddle.to_tensor(random_cosine(rng, 3, 4))
    logits = margin_logits(cosine, paddle.to_tensor(np.array([-1, -1, -1])), ARCFACE)
    np.testing.assert_allclose(logits.numpy(), 64.0 * cosine.numpy(), rtol=1e-12)


# --- PartialFC -------------------------------------------------------------------------------------------


def test_init_is_per_class_and_independent_of_sharding():
    full = init_class_centers(7, 0, 9000, 8)
    for world in (2, 3, 4):
        parts = [
            init_class_centers(7, s.start, s.count, 8)
            for s in (shard_classes(9000, r, world) for r in range(world))
        ]
        np.testing.assert_array_equal(np.concatenate(parts), full)
    assert full.dtype == np.float32
    assert abs(full.std() - 0.01) < 1e-3
    assert not np.array_equal(init_class_centers(8, 0, 10, 8), full[:10])


def test_plscs_init_std_counts_one_of_n_ranks_classes():
    """PLSC v2.2 (dynamic/classifiers/lsc.py:53,66): sqrt(2 / (embedding + ceil(C / world))); MS1MV3 on 8."""
    assert center_init_std(8, 93431, 512) == pytest.approx(math.sqrt(2.0 / (512 + 11679)), rel=1e-12)
    assert center_init_std(0, 93431, 512) == 0.01  # arcface_torch's
    std = center_init_std(8, 9000, 8)
    full = init_class_centers(7, 0, 9000, 8, std)
    # Two float32 roundings apart: 1e-6.
    np.testing.assert_allclose(full, init_class_centers(7, 0, 9000, 8) * (std / 0.01), rtol=1e-6)
    head = PartialFC(9000, 8, ARCFACE, seed=7, init_std=std, comm=LocalComm())
    np.testing.assert_array_equal(head.weight.numpy(), full)


@pytest.mark.parametrize("num_classes,world", [(9, 4), (10, 3), (3, 4), (100, 1)])
def test_shards_are_balanced_and_contiguous(num_classes, world):
    shards = [shard_classes(num_classes, r, world) for r in range(world)]
    assert shards[0].start == 0 and shards[-1].stop == num_classes
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:], strict=False))
    sizes = [s.count for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 1.0])
def test_sampling_keeps_positives_and_count(ratio):
    rng = np.random.default_rng(3)
    num_local = 200
    labels = rng.integers(-50, 250, size=64)  # values outside [0, 200) belong to other ranks
    index, remapped = sample_centers(labels, num_local, ratio, seed=5, step=11, rank=1)
    mine = (labels >= 0) & (labels < num_local)
    positives = set(labels[mine].tolist())
    assert positives <= set(index.tolist())
    assert len(index) == max(num_sampled(num_local, ratio), len(positives))
    assert len(set(index.tolist())) == len(index)
    assert np.all(np.diff(index) > 0) and index.min() >= 0 and index.max() < num_local
    np.testing.assert_array_equal(index[remapped[mine]], labels[mine])
    assert np.all(remapped[~mine] == -1)


def test_sampling_is_deterministic_and_varies_with_step_and_rank():
    labels = np.arange(5)
    first = sample_centers(labels, 1000, 0.1, seed=1, step=3, rank=0)[0]
    np.testing.assert_array_equal(first, sample_centers(labels, 1000, 0.1, seed=1, step=3, rank=0)[0])
    assert not np.array_equal(first, sample_centers(labels, 1000, 0.1, seed=1, step=4, rank=0)[0])
    assert not np.array_equal(first, sample_centers(labels, 1000, 0.1, seed=1, step=3, rank=1)[0])
    assert not np.array_equal(first, sample_centers(labels, 1000, 0.1, seed=2, step=3, rank=0)[0])


def test_negatives_are_uniform():
    counts = np.zeros(50)
    labels = np.array([0, 1, 2, 3, 4])
    for step in range(2000):
        index, _ = sample_centers(labels, 50, 0.2, seed=0, step=step, rank=0)
        counts[index] += 1
    assert np.all(counts[:5] == 2000)
    negatives = counts[5:] / 2000  # each of the 45 negatives is drawn with probability 5/45
    assert np.all(np.abs(negatives - 5 / 45) < 0.03)


def test_full_ratio_equals_full_classifier_loss_and_gradients():
    rng = np.random.default_rng(4)
    batch, emb, classes = 8, 16, 13
    head = PartialFC(classes, emb, ARCFACE, sample_ratio=1.0, seed=3)
    embeddings = rng.standard_normal((batch, emb)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch)

    x = paddle.to_tensor(embeddings, stop_gradient=False)
    loss, pending = head(x, paddle.to_tensor(labels), step=0)
    loss.backward()

    # Independent reference: a plain full classifier with the weight as an ordinary parameter.
    x_ref = paddle.to_tensor(embeddings, stop_gradient=False)
    w_ref = paddle.to_tensor(init_class_centers(3, 0, classes, emb), stop_gradient=False)
    cosine = paddle.matmul(F.normalize(x_ref, axis=1), F.normalize(w_ref, axis=1), transpose_y=True)
    logits = cosine * 64.0
    theta = paddle.acos(paddle.clip(cosine, -1, 1))
    target = 64.0 * paddle.cos(theta + 0.5)
    one_hot = F.one_hot(paddle.to_tensor(labels), classes)
    logits = logits * (1 - one_hot) + target * one_hot
    loss_ref = F.cross_entropy(logits, paddle.to_tensor(labels).unsqueeze(1))
    loss_ref.backward()

    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), x_ref.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pending.rows.grad.numpy(), w_ref.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_sampled_loss_equals_full_classifier_restricted_to_sampled_columns():
    rng = np.random.default_rng(5)
    batch, emb, classes = 6, 8, 40
    head = PartialFC(classes, emb, COSFACE, sample_ratio=0.25, seed=1)
    embeddings = rng.standard_normal((batch, emb)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch)
    loss, _ = head(paddle.to_tensor(embeddings), paddle.to_tensor(labels), step=7)
    index, remapped = head.sample(labels, 7)
    assert len(index) == max(10, len(set(labels.tolist())))

    weight = init_class_centers(1, 0, classes, emb)[index].astype(np.float64)
    e = embeddings.astype(np.float64)
    cosine = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (
        weight / np.linalg.norm(weight, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(float(loss), numpy_margin_loss(cosine, remapped, COSFACE), rtol=1e-5)


# --- sparse momentum --------------------------------------------------------------------------------------


def numpy_momentum(weight, velocity, full_grad, lr, mu, wd, rows=None):
    """Dense Paddle-Momentum reference; ``rows`` restricts the update to those rows (lazy)."""
    w, v = weight.astype(np.float64).copy(), velocity.astype(np.float64).copy()
    rows = np.arange(len(w)) if rows is None else rows
    g = full_grad[rows] + wd * w[rows]
    v[rows] = mu * v[rows] + g
    w[rows] = w[rows] - lr * v[rows]
    return w, v


@pytest.mark.parametrize("mode", ["lazy", "dense"])
def test_sparse_momentum_matches_numpy_over_several_steps(mode):
    rng = np.random.default_rng(6)
    classes, emb, lr, mu, wd = 30, 4, 0.1, 0.9, 5e-4
    head = PartialFC(classes, emb, ARCFACE, sample_ratio=0.3, momentum_mode=mode, seed=2)
    w_ref = head.weight.numpy().astype(np.float64)
    v_ref = np.zeros_like(w_ref)
    for step in range(5):
        embeddings = paddle.to_tensor(rng.standard_normal((4, emb)).astype(np.float32))
        labels = rng.integers(0, classes, size=4)
        loss, pending = head(embeddings, paddle.to_tensor(labels), step)
        loss.backward()
        index = pending.index.numpy()
        full_grad = np.zeros_like(w_ref)
        full_grad[index] = pending.rows.grad.numpy()
        w_ref, v_ref = numpy_momentum(
            w_ref, v_ref, full_grad, lr, mu, wd, rows=index if mode == "lazy" else None
        )
        head.apply(pending, CenterUpdate(lr, mu, wd))
    np.testing.assert_allclose(head.weight.numpy(), w_ref, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(head.velocity.numpy(), v_ref, rtol=1e-5, atol=1e-8)
    if mode == "lazy":
        untouched = np.all(v_ref == 0, axis=1)
        assert untouched.any(), "test needs some never-sampled rows"
        np.testing.assert_array_equal(
            head.weight.numpy()[untouched], init_class_centers(2, 0, classes, emb)[untouched]
        )


def paddle_sparse_momentum_(weight_t, velocity_t, index, grad_t, lr: float, mu: float, wd: float) -> None:
    """PLSC v2.2's class-center update (dynamic/utils/hybrid_optimizer.py:85-101): Paddle's own
    sparse_momentum kernel on the [emb, classes] weight along axis 1, L2 decay fused, no Nesterov."""
    from paddle import _legacy_C_ops  # the op has no other Python entry point, in 2.6 as in 3.x

    lr_tensor = paddle.to_tensor([lr], dtype="float32")
    _legacy_C_ops.sparse_momentum(weight_t, grad_t, velocity_t, index, lr_tensor, None, weight_t,
                                  velocity_t, None, "mu", mu, "use_nesterov", False,
                                  "regularization_method", "l2_decay", "regularization_coeff", wd,
                                  "axis", 1, "multi_precision", False)


@pytest.mark.parametrize("chunk_size", [0, 4], ids=["whole-matrix", "streaming"])
def test_dense_momentum_is_paddles_sparse_momentum_kernel(chunk_size):
    """Every row's velocity decays and takes weight decay, sampled or not: plsc's dense mode against the
    kernel PLSC v2.2 ran, fed the whole-matrix head's sampled gradient, over several steps."""
    from plsc.loss.partial_fc import build_head

    rng = np.random.default_rng(9)
    classes, emb, lr, mu, wd = 40, 6, 0.1, 0.9, 5e-2  # a decay whose effect (lr * wd = 5e-3 a step) shows
    options = dict(sample_ratio=0.25, momentum_mode="dense", seed=4)
    head = build_head(chunk_size, num_classes=classes, embedding_size=emb, margin=ARCFACE, **options)
    whole = PartialFC(classes, emb, ARCFACE, **options)  # its gradient feeds the kernel
    weight_t = paddle.to_tensor(head.weight.numpy().T.copy())
    velocity_t = paddle.zeros_like(weight_t)
    for step in range(4):
        embeddings = rng.standard_normal((6, emb)).astype(np.float32)
        labels = paddle.to_tensor(rng.integers(0, classes, size=6))
        whole.set_state(weight_t.numpy().T, velocity_t.numpy().T)
        loss, pending = whole(paddle.to_tensor(embeddings, stop_gradient=False), labels, step)
        loss.backward()
        index, grad = pending.index, pending.rows.grad
        paddle_sparse_momentum_(weight_t, velocity_t, index, grad.t(), lr, mu, wd)
        loss, pending = head(paddle.to_tensor(embeddings, stop_gradient=False), labels, step)
        loss.backward()
        head.apply(pending, CenterUpdate(lr, mu, wd))
        assert len(index) < classes // 2  # most rows unsampled
        for mine, kernels in ((head.weight, weight_t), (head.velocity, velocity_t)):
            # 1e-5 of the largest element: the streaming head sums its gradient in another order.
            desired = kernels.numpy().T
            np.testing.assert_allclose(mine.numpy(), desired, rtol=0, atol=1e-5 * np.abs(desired).max())


def test_rows_gathered_into_kept_memory_train_exactly_like_fresh_ones(monkeypatch):
    # Paddle 3.x gathers the sampled rows into the same buffer every step; each step's leaf must still start
    # with an empty gradient. Reference: the same head gathering into a new tensor each step (2.6's way).
    from plsc.loss import rows

    supported = rows.GATHER_WRITES_INTO
    assert supported == (int(paddle.__version__.split(".")[0]) >= 3)
    rng = np.random.default_rng(8)
    steps = [(rng.standard_normal((6, 8)).astype(np.float32), rng.integers(0, 40, size=6)) for _ in range(4)]

    def train(kept: bool):
        monkeypatch.setattr(rows, "GATHER_WRITES_INTO", kept and supported)
        head = PartialFC(40, 8, ARCFACE, sample_ratio=0.25, seed=3)  # k = 10 every step: one buffer
        grads = []
        for step, (embeddings, labels) in enumerate(steps):
            loss, pending = head(paddle.to_tensor(embeddings), paddle.to_tensor(labels), step)
            loss.backward()
            grads.append(pending.rows.grad.numpy().copy())
            scratch = head.strategy.gathered_rows_scratch
            if kept and scratch.tensor is not None:  # the leaf is the buffer's memory
                assert pending.rows.data_ptr() == scratch.tensor.data_ptr()
            head.apply(pending, CenterUpdate(0.1, 0.9, 5e-4))
        return grads, head.weight.numpy(), head.velocity.numpy()

    fresh, kept = train(kept=False), train(kept=True)
    for got, expected in zip(kept[0], fresh[0], strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(kept[1], fresh[1])
    np.testing.assert_array_equal(kept[2], fresh[2])


def test_fp16_storage_halves_bytes_and_tracks_fp32():
    rng = np.random.default_rng(7)
    heads = {
        dtype: PartialFC(50, 8, ARCFACE, 0.5, center_dtype=dtype, seed=0) for dtype in ("float32", "float16")
    }
    assert (
        heads["float16"].weight.dtype == paddle.float16 and heads["float16"].velocity.dtype == paddle.float16
    )
    nbytes = {d: h.weight.numel().item() * h.weight.element_size() for d, h in heads.items()}
    assert nbytes["float16"] * 2 == nbytes["float32"]
    losses = {d: [] for d in heads}
    for step in range(10):
        embeddings = rng.standard_normal((4, 8)).astype(np.float32)
        labels = rng.integers(0, 50, size=4)
        for dtype, head in heads.items():
            loss, pending = head(paddle.to_tensor(embeddings), paddle.to_tensor(labels), step)
            loss.backward()
            head.apply(pending, CenterUpdate(0.1, 0.9, 5e-4))
            losses[dtype].append(float(loss))
    # Relative: at scale 64 the loss is ~50; float16 rounding of the centers moves each logit by ~1e-3 * s.
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=1e-2)


@pytest.mark.parametrize("shape", [(1, 5), (7, 1), (128, 300)])
def test_row_and_column_sums_as_products_equal_numpy_sums(shape):
    from plsc.loss.margin import column_sums, row_sums

    matrix = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    tensor = paddle.to_tensor(matrix)
    np.testing.assert_allclose(column_sums(tensor).numpy(), matrix.astype(np.float64).sum(axis=0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(row_sums(tensor).numpy(), matrix.astype(np.float64).sum(axis=1),
                               rtol=1e-5, atol=1e-5)
    assert column_sums(tensor).shape == [shape[1]] and row_sums(tensor).shape == [shape[0]]

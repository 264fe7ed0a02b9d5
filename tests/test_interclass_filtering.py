"""Inter-class filtering (``loss.interclass_filtering_threshold``) against a numpy reference written here.

The behaviour matched is arcface_torch's CombinedMarginLoss: on the cosines of the global batch to this
rank's sampled centers, before the margin, every non-target cosine above the threshold becomes 0 (it still
adds exp(0 - max) to the softmax's normaliser) and gets no gradient; a row's target column is never filtered,
and a row whose target is not among the columns has every column above the threshold filtered. The
streaming head's equality with the whole-matrix head under filtering is tests/test_streaming_head.py's, the
2-rank one tests/test_distributed.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from plsc.config import load_config
from plsc.distributed import LocalComm
from plsc.engine.modes import PADDLE_MAJOR, compile_head_loss, is_compiled
from plsc.engine.trainer import Trainer
from plsc.loss import fast_paths
from plsc.loss.margin import Margin, margin_softmax_cross_entropy
from plsc.loss.partial_fc import CenterUpdate, build_head, init_class_centers

THRESHOLD = 0.2
ARCFACE = Margin(1.0, 0.5, 0.0, 64.0, THRESHOLD)
COSFACE = Margin(1.0, 0.0, 0.35, 64.0, THRESHOLD)
COMBINED = Margin(0.9, 0.4, 0.15, 32.0, THRESHOLD)  # m1 != 1: the acos path of the target logit
MARGINS = pytest.mark.parametrize("margin", [ARCFACE, COSFACE, COMBINED],
                                  ids=["arcface", "cosface", "combined"])


def unfiltered(margin: Margin) -> Margin:
    return Margin(margin.m1, margin.m2, margin.m3, margin.scale)


# --- the reference ------------------------------------------------------------------------------------------


def numpy_filter(cosine: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Bool mask of the filtered entries: above the threshold and not the row's target (labels -1: no target
    among these columns); none for threshold 0 (off)."""
    filtered = cosine > threshold if threshold > 0 else np.zeros(cosine.shape, bool)
    rows = np.flatnonzero(labels >= 0)
    filtered[rows, labels[rows]] = False
    return filtered


def numpy_logits(cosine: np.ndarray, labels: np.ndarray, margin: Margin) -> np.ndarray:
    """float64 logits: filtered cosines as 0, the combined margin at the target column, times the scale."""
    cosine = np.asarray(cosine, np.float64)
    logits = np.where(numpy_filter(cosine, labels, margin.interclass_filtering_threshold), 0.0, cosine)
    rows = np.flatnonzero(labels >= 0)
    theta = np.arccos(cosine[rows, labels[rows]])
    logits[rows, labels[rows]] = np.cos(margin.m1 * theta + margin.m2) - margin.m3
    return margin.scale * logits


def numpy_loss(cosine: np.ndarray, labels: np.ndarray, margin: Margin) -> float:
    """Mean over rows of ``log sum exp(logit - max) - (target logit - max)``; a row without a target here
    contributes its log-sum-exp alone (the target term is another rank's), as the sharded loss does."""
    logits = numpy_logits(cosine, labels, margin)
    top = logits.max(axis=1)
    log_sum = np.log(np.exp(logits - top[:, None]).sum(axis=1))
    rows = np.flatnonzero(labels >= 0)
    target = np.zeros(len(labels))
    target[rows] = logits[rows, labels[rows]] - top[rows]
    return float(np.mean(log_sum - target))


def numpy_head_loss(embeddings: np.ndarray, centers: np.ndarray, labels: np.ndarray, margin: Margin) -> float:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit_centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    return numpy_loss(unit @ unit_centers.T, labels, margin)


def finite_differences(loss, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of ``loss(x)`` in float64, element by element."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += h
        minus[i] -= h
        grad[i] = (loss(plus) - loss(minus)) / (2 * h)
    return grad


def assert_away_from_threshold(cosine: np.ndarray, gap: float = 1e-4) -> None:
    """Finite differences of step h move a cosine by about h: none may cross the threshold."""
    assert np.abs(cosine - THRESHOLD).min() > gap


def relative_error(actual, desired) -> float:
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape
    return float(np.abs(actual - desired).max() / np.abs(desired).max())


# --- the margin softmax on given cosines --------------------------------------------------------------------


def filtered_cosines(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[6, 9] cosines with targets in every row, some above the threshold (filtered), one target above it
    (never filtered) and one non-target cosine exactly 0 (not filtered: it must keep its gradient)."""
    rng = np.random.default_rng(seed)
    cosine = rng.uniform(-0.95, 0.95, (6, 9))
    labels = rng.integers(0, 9, 6)
    cosine[0, labels[0]] = 0.7
    cosine[1, (labels[1] + 1) % 9] = 0.0
    assert_away_from_threshold(cosine)
    return cosine, labels


@MARGINS
def test_filtered_margin_loss_and_gradient_equal_numpy_and_finite_differences(margin):
    cosine, labels = filtered_cosines(0)
    filtered = numpy_filter(cosine, labels, THRESHOLD)
    assert 10 <= filtered.sum() and not filtered[0, labels[0]]
    x = paddle.to_tensor(cosine, stop_gradient=False)  # float64: the layer's own arithmetic, not float32's
    loss = margin_softmax_cross_entropy(x, paddle.to_tensor(labels), margin, LocalComm())
    # Measured: 0 to 3e-16 relative (float64 both) on Paddle 3.3.1; 1.9e-8 on 2.6.2, whose kernels take Python
    # scalars (m3, cos m2) as float32 attributes. Unfiltered, the loss is 2.6-4.5x larger here.
    assert float(loss) == pytest.approx(numpy_loss(cosine, labels, margin), rel=1e-12 if PADDLE_MAJOR >= 3
                                        else 1e-7)
    assert float(loss) < 0.5 * numpy_loss(cosine, labels, unfiltered(margin))
    loss.backward()
    grad = x.grad.numpy()
    numeric = finite_differences(lambda c: numpy_loss(c, labels, margin), cosine)
    # Measured relative to the largest entry (central differences, h = 1e-6): at most 2.3e-10 on Paddle 3.3.1,
    # 1.1e-8 on 2.6.2, whose kernels take Python scalars (cos m2, sin m2) as float32 attributes.
    assert relative_error(grad, numeric) <= 5e-8
    assert np.all(grad[filtered] == 0.0)
    zero_cosine = (1, (labels[1] + 1) % 9)
    assert grad[zero_cosine] != 0.0 and not filtered[zero_cosine]


def test_a_row_without_its_target_here_filters_every_column_above_the_threshold():
    """Rows whose class is another rank's (label -1): every column above the threshold is filtered; the
    gradient (the row max a constant, as the sharded softmax treats it) is s * softmax / batch elsewhere."""
    cosine, labels = filtered_cosines(1)
    labels[[1, 4]] = -1
    x = paddle.to_tensor(cosine, stop_gradient=False)
    loss = margin_softmax_cross_entropy(x, paddle.to_tensor(labels), ARCFACE, LocalComm())
    assert float(loss) == pytest.approx(numpy_loss(cosine, labels, ARCFACE), rel=1e-12)  # measured 3e-16
    loss.backward()
    logits = numpy_logits(cosine, labels, ARCFACE)
    filtered = numpy_filter(cosine, labels, THRESHOLD)
    assert np.array_equal(filtered[[1, 4]], cosine[[1, 4]] > THRESHOLD) and filtered[[1, 4]].any()
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    expected = np.where(filtered, 0.0, ARCFACE.scale * softmax / len(labels))
    # Measured: 4e-17 relative to the largest entry.
    assert relative_error(x.grad.numpy()[[1, 4]], expected[[1, 4]]) <= 1e-12


# --- the head: embeddings and class centers -----------------------------------------------------------------

CLASSES, EMBEDDING, BATCH, RATIO, SEED = 24, 8, 8, 0.5, 3


def head_inputs(seed: int):
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((BATCH, EMBEDDING)).astype(np.float32)
    labels = rng.integers(0, CLASSES, BATCH)
    return embeddings, labels


@pytest.mark.parametrize("margin", [ARCFACE, COSFACE], ids=["arcface", "cosface"])
def test_whole_matrix_head_loss_and_gradients_equal_finite_differences_of_numpy(margin):
    """Loss, d(embeddings) and d(sampled centers) of the whole-matrix head against central differences of
    the float64 numpy loss of embeddings and centers (the sampling: PartialFC.sample)."""
    embeddings, labels = head_inputs(7)
    head = build_head(0, num_classes=CLASSES, embedding_size=EMBEDDING, margin=margin, sample_ratio=RATIO,
                      seed=SEED)
    x = paddle.to_tensor(embeddings, stop_gradient=False)
    loss, pending = head(x, paddle.to_tensor(labels), step=0)
    loss.backward()
    index, remapped = head.sample(labels, 0)
    centers = init_class_centers(SEED, 0, CLASSES, EMBEDDING)[index].astype(np.float64)
    e64 = embeddings.astype(np.float64)
    unit = e64 / np.linalg.norm(e64, axis=1, keepdims=True)
    cosine = unit @ (centers / np.linalg.norm(centers, axis=1, keepdims=True)).T
    assert_away_from_threshold(cosine)
    assert numpy_filter(cosine, remapped, THRESHOLD).sum() >= 10
    # Measured: 1.4e-8 (ArcFace) and 5.9e-8 (CosFace) relative, float32 against float64.
    assert float(loss) == pytest.approx(numpy_head_loss(e64, centers, remapped, margin), rel=1e-6)
    d_embeddings = finite_differences(lambda e: numpy_head_loss(e, centers, remapped, margin), e64)
    d_centers = finite_differences(lambda w: numpy_head_loss(e64, w, remapped, margin), centers)
    # Measured: 3.3e-7 / 3.5e-7 (embeddings) and 2.8e-7 / 2.2e-7 (centers) relative to the largest entry,
    # float32 against float64.
    assert relative_error(x.grad.numpy(), d_embeddings) <= 2e-6
    assert relative_error(pending.rows.grad.numpy(), d_centers) <= 2e-6


# --- threshold 0 is the loss without filtering --------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [0, 5], ids=["whole-matrix", "streaming"])
def test_a_threshold_that_filters_nothing_gives_the_unfiltered_numbers_bit_for_bit(chunk_size):
    """Threshold 0 runs no filtering code; a threshold above every cosine runs it and masks nothing: the two
    give the same loss, gradient and updated centers to the bit."""
    embeddings, labels = head_inputs(8)
    results = []
    for threshold in (0.0, 0.999):
        head = build_head(chunk_size, num_classes=CLASSES, embedding_size=EMBEDDING, sample_ratio=RATIO,
                          seed=SEED, margin=Margin(1.0, 0.5, 0.0, 64.0, threshold))
        x = paddle.to_tensor(embeddings, stop_gradient=False)
        loss, pending = head(x, paddle.to_tensor(labels), step=0)
        loss.backward()
        head.apply(pending, CenterUpdate(0.1, 0.9, 5e-4))
        results.append([loss.numpy(), x.grad.numpy(), head.weight.numpy(), head.velocity.numpy()])
    for off, nothing_filtered in zip(*results, strict=True):
        assert off.tobytes() == nothing_filtered.tobytes()


# --- static mode and the fast path --------------------------------------------------------------------------


def test_static_mode_compiles_the_filtered_loss():
    """The whole-matrix head's loss under paddle.jit.to_static: compile_head_loss keeps the compiled program
    only when it reproduces the eager loss and gradients to 1e-5 on a batch; then it trains the same."""
    head = build_head(0, num_classes=CLASSES, embedding_size=EMBEDDING, margin=ARCFACE, sample_ratio=RATIO,
                      seed=SEED)
    compiled = compile_head_loss(head, "static", LocalComm(), BATCH, CLASSES)
    # Paddle 2.6 keeps a loss with collectives eager in static mode (plsc.engine.modes.compile_for_mode).
    assert is_compiled(compiled) == (PADDLE_MAJOR >= 3)
    embeddings, labels = head_inputs(9)
    outputs = []
    for loss_fn in (compiled, head.loss):
        x = paddle.to_tensor(embeddings, stop_gradient=False)
        pending = head.prepare(paddle.to_tensor(labels), 0)
        loss = loss_fn(x, pending)
        loss.backward()
        outputs.append([loss.numpy(), x.grad.numpy(), pending.rows.grad.numpy()])
    for static, eager in zip(*outputs, strict=True):
        assert relative_error(static, eager) <= 1e-6  # measured: 0


def test_the_fused_kernel_is_not_used_with_filtering():
    chosen = fast_paths.select_fast_paths(ARCFACE, CLASSES, 1.0, LocalComm())
    (status,) = [r.status for r in chosen.results if r.name == "margin_cross_entropy"]
    assert "interclass_filtering_threshold" in status
    assert chosen.margin_loss is margin_softmax_cross_entropy


# --- in the trainer -----------------------------------------------------------------------------------------


def logged_losses(output: Path) -> np.ndarray:
    records = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if "loss" in r])


@pytest.mark.cpu_slow(reason="four short trainings, one compiled (~8 s); the filtered loss against numpy and "
                              "finite differences in both heads, and its static compile, stay fast")
def test_training_with_filtering_in_both_heads_and_static_mode(tiny_dir, tiny_run, tmp_path):
    """Three steps of the tiny run with loss.interclass_filtering_threshold: the streaming head and static
    mode log the whole-matrix head's losses, which differ from those without filtering. Measured: streaming
    within 1.6e-7 relative, static mode identical; without filtering the losses are 4.1-5.1 higher."""
    def losses(name: str, *extra: str) -> np.ndarray:
        overrides = [f"data.root={tiny_dir}", "data.val_bins=[]", *tiny_run, "train.max_steps=3",
                     "train.eval_interval=0", *extra]
        Trainer(load_config(overrides=overrides), tmp_path / name).run()
        return logged_losses(tmp_path / name)

    filtering = "loss.interclass_filtering_threshold=0.2"
    whole = losses("whole", filtering)
    assert len(whole) == 3
    np.testing.assert_allclose(losses("streaming", filtering, "loss.chunk_size=7"), whole, rtol=1e-6)
    np.testing.assert_allclose(losses("static", filtering, "train.mode=static"), whole, rtol=1e-6)
    assert np.all(np.abs(losses("off") - whole) > 0.1)

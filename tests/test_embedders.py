"""Embedders (plsc.eval.embedders): Paddle Inference against the dygraph forward, the reference.

A tiny IResNet-18 (width 0.125, embedding 16, 32 px) with random weights and BN statistics, in NCHW and NHWC:
the engine's embeddings must match dygraph's to 1e-4 relative and give the same verification metrics on
data/tiny/lfw_disjoint_100.bin (100 pairs).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import paddle
import pytest
from model_weights import random_state
from test_export import IMAGE_SIZE, TINY_MODEL, write_checkpoint

from plsc.config import load_config
from plsc.data.verification_bin import load_bin
from plsc.errors import PlscError
from plsc.eval import embedders
from plsc.eval.embedders import DygraphEmbedder, InferenceEmbedder, open_embedder
from plsc.eval.verification import verify
from plsc.models import build_model

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "data" / "tiny" / "lfw_disjoint_100.bin"
RELATIVE_TOLERANCE = 1e-4


def tiny_model(data_format: str, seed: int = 5):
    config = load_config(overrides=[*TINY_MODEL, f"model.data_format={data_format}"])
    model = build_model(config.model, image_size=IMAGE_SIZE)
    model.set_state_dict(random_state(model, seed))
    model.eval()
    return model, config


def relative_error(actual: np.ndarray, desired: np.ndarray) -> float:
    return float(np.abs(actual - desired).max() / np.abs(desired).max())


@pytest.fixture(scope="module")
def vset():
    return load_bin(BIN, IMAGE_SIZE)


@pytest.mark.parametrize("data_format", ["NCHW", "NHWC"])
def test_inference_matches_dygraph_embeddings_and_accuracy(data_format, vset):
    model, config = tiny_model(data_format)
    dygraph = open_embedder(model, config.model, IMAGE_SIZE, "dygraph")
    engine = open_embedder(model, config.model, IMAGE_SIZE, "paddle")
    assert isinstance(engine, InferenceEmbedder) and engine.data_format == "NCHW"
    assert isinstance(dygraph, DygraphEmbedder) and dygraph.data_format == data_format

    images = vset.images[:24].astype(np.float32) / 127.5 - 1.0  # NHWC
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    reference = dygraph(nchw if data_format == "NCHW" else np.ascontiguousarray(images))
    assert relative_error(engine(nchw), reference) < RELATIVE_TOLERANCE

    expected = verify(dygraph, vset, 32, dygraph.data_format)
    actual = verify(engine, vset, 32, engine.data_format)
    assert actual["accuracy"] == expected["accuracy"]
    assert actual["threshold"] == expected["threshold"]
    assert actual["xnorm"] == pytest.approx(expected["xnorm"], rel=RELATIVE_TOLERANCE)


def test_engine_is_a_snapshot_and_leaves_the_model_and_rng_alone():
    """The predictor keeps the weights it was built with; building it changes neither the model, nor names,
    nor Paddle's random stream (a training run that evaluates continues as one that does not)."""
    model, config = tiny_model("NCHW")
    batch = np.random.default_rng(0).standard_normal((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    before = DygraphEmbedder(model, "NCHW")(batch)
    paddle.seed(11)
    expected_draw = paddle.rand([4]).numpy()
    paddle.seed(11)
    names_before = [p.name for p in model.parameters()]
    engine = InferenceEmbedder(model, config.model, IMAGE_SIZE)
    assert np.array_equal(paddle.rand([4]).numpy(), expected_draw)
    assert [p.name for p in model.parameters()] == names_before
    assert np.array_equal(DygraphEmbedder(model, "NCHW")(batch), before)  # the model is untouched

    model.set_state_dict(random_state(model, seed=9))
    assert relative_error(engine(batch), before) < RELATIVE_TOLERANCE  # the old weights
    changed = DygraphEmbedder(model, "NCHW")(batch)
    assert relative_error(changed, before) > 1e-2
    rebuilt = InferenceEmbedder(model, config.model, IMAGE_SIZE)
    assert relative_error(rebuilt(batch), changed) < RELATIVE_TOLERANCE


def test_auto_takes_the_engine_on_cpu_and_falls_back_to_dygraph_with_a_warning(monkeypatch, caplog):
    model, config = tiny_model("NHWC")
    assert isinstance(open_embedder(model, config.model, IMAGE_SIZE), InferenceEmbedder)

    def broken(*args, **kwargs):
        raise PlscError("Paddle Inference cannot load backbone.json: boom")

    monkeypatch.setattr(embedders, "InferenceEmbedder", broken)
    with caplog.at_level(logging.WARNING, logger="plsc.eval"):
        fallback = open_embedder(model, config.model, IMAGE_SIZE)
    assert isinstance(fallback, DygraphEmbedder) and fallback.data_format == "NHWC"
    assert "Paddle Inference unavailable (Paddle Inference cannot load backbone.json: boom)" in caplog.text
    with pytest.raises(PlscError, match="boom"):
        open_embedder(model, config.model, IMAGE_SIZE, "paddle")
    with pytest.raises(PlscError, match="engine must be one of auto, paddle, dygraph"):
        open_embedder(model, config.model, IMAGE_SIZE, "onnx")


def test_auto_embeds_a_job_too_small_for_the_engine_in_dygraph(monkeypatch):
    """The tiny backbone's multiply-adds, counted here from its convolutions and Linear layers by hand (not
    by plsc.models.cost), decide: below DYGRAPH_BELOW_MULTIPLY_ADDS of work dygraph, at or above it the
    engine (recorded, not built: the choice is the subject); an unknown count (0) is never small."""
    model, config = tiny_model("NCHW")
    per_image = hand_counted_multiply_adds(model)
    below = int(embedders.DYGRAPH_BELOW_MULTIPLY_ADDS // per_image)  # the largest job under the bound
    assert below * per_image < embedders.DYGRAPH_BELOW_MULTIPLY_ADDS <= (below + 1) * per_image
    monkeypatch.setattr(embedders, "InferenceEmbedder", lambda *args: "the engine")
    assert isinstance(open_embedder(model, config.model, IMAGE_SIZE, images=below), DygraphEmbedder)
    assert open_embedder(model, config.model, IMAGE_SIZE, images=below + 1) == "the engine"
    assert open_embedder(model, config.model, IMAGE_SIZE, images=0) == "the engine"
    assert open_embedder(model, config.model, IMAGE_SIZE, "paddle", images=1) == "the engine"


def hand_counted_multiply_adds(model: paddle.nn.Layer) -> int:
    """Per image: each Conv2D's output elements x (in_channels / groups) x kernel area, each Linear's
    in x out, from output shapes recorded by forward hooks of one image."""
    shapes = {}
    layers = [layer for layer in model.sublayers() if isinstance(layer, (paddle.nn.Conv2D, paddle.nn.Linear))]
    hooks = [layer.register_forward_post_hook(lambda layer, _, out: shapes.__setitem__(id(layer), out.shape))
             for layer in layers]
    with paddle.no_grad():
        model(paddle.zeros([1, 3, IMAGE_SIZE, IMAGE_SIZE]))
    for hook in hooks:
        hook.remove()
    total = 0
    for layer in layers:
        weight = layer.weight.shape
        if isinstance(layer, paddle.nn.Linear):
            total += weight[0] * weight[1]
        else:  # Paddle's conv weight: [out, in / groups, kh, kw]
            total += int(np.prod(shapes[id(layer)])) * weight[1] * weight[2] * weight[3]
    return total


def test_eval_cli_engines_agree(tmp_path, monkeypatch):
    """plsc eval --engine paddle and --engine dygraph: the same metrics for the same checkpoint."""
    from plsc import cli

    checkpoint = write_checkpoint(tmp_path / "ck", "NHWC", seed=4)
    engines_used = []
    original = embedders.open_embedder

    def recording(*args, **kwargs):
        embed = original(*args, **kwargs)
        engines_used.append(embed.engine)
        return embed

    monkeypatch.setattr("plsc.eval.sources.open_embedder", recording)
    results = {}
    for engine in ("paddle", "dygraph"):
        out = tmp_path / f"{engine}.json"
        assert cli.main(["eval", "--checkpoint", str(checkpoint), "--bin", str(BIN), "--engine", engine,
                         "--json", str(out)]) == 0
        results[engine] = json.loads(out.read_text())["lfw_disjoint_100"]
    assert engines_used == ["paddle", "dygraph"]
    assert results["paddle"]["accuracy"] == results["dygraph"]["accuracy"]
    assert results["paddle"]["threshold"] == results["dygraph"]["threshold"]

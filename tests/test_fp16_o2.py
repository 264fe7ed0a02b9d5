"""train.precision fp16 on a GPU, emulated on the CPU (tests/o2_emulation.py): the trainer's own resume,
verification, checkpoints and export of an O2-decorated backbone (float16 weights, float32 normalisation
layers, float32 master weights in the optimizer, Paddle's float32 state-dict hook).

The references are independent of the code under test: numpy casts of the float16 weights, a float32 model
built by hand from them, and ``plsc eval`` / an exported model run by Paddle Inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from o2_emulation import create_step_state, decorate_as_on_gpu, master_weights, state_after_steps, velocities

from plsc import checkpoint as ckpt
from plsc.config import load_config
from plsc.data.verification_bin import load_bin
from plsc.distributed import share_statistics_from_rank0
from plsc.engine.trainer import Trainer
from plsc.eval import embedders
from plsc.eval.runner import evaluate_model
from plsc.eval.verification import verify
from plsc.export.exporter import export_checkpoint
from plsc.export.infer import PaddleEngine
from plsc.models import build_model, precision

NORM_LAYERS = (paddle.nn.BatchNorm, paddle.nn.BatchNorm1D, paddle.nn.BatchNorm2D)
BIN = "lfw_disjoint_100.bin"


def fp16_config(tiny_dir: Path, tiny_run: list[str], *extra: str):
    return load_config(overrides=[
        f"data.root={tiny_dir}", f"data.val_bins=[{tiny_dir / BIN}]", *tiny_run,
        "train.precision=fp16", "train.eval_interval=0", "train.eval_batch_size=50", *extra,
    ])


def o2_trainer(monkeypatch, config, output, **kwargs) -> Trainer:
    with decorate_as_on_gpu(monkeypatch):
        trainer = Trainer(config, output, **kwargs)
    assert trainer.amp_level == "O2"
    return trainer


def params_as_float32(model) -> dict[str, np.ndarray]:
    """Each tensor of the model (its own dtype: float16 or float32) cast up by numpy."""
    return {key: tensor.numpy().astype(np.float32) for key, tensor in precision.own_state(model).items()}


def assert_cast_of(actual: np.ndarray, float32: np.ndarray) -> None:
    """``actual`` is ``float32`` itself or (a float16 array) a float16 neighbour of it: within one float16
    step. Either rounding: Paddle 2.6.2's CPU cast to float16 rounds toward zero, 3.3.1's (and a GPU's) to
    nearest (tests/test_fp16_o2.py::test_paddle_casts_to_float16_by_one_of_two_roundings)."""
    if actual.dtype == np.float32:
        np.testing.assert_array_equal(actual, float32)
        return
    assert actual.dtype == np.float16
    step = np.spacing(np.abs(actual)).astype(np.float32)
    assert np.all(np.abs(actual.astype(np.float32) - float32) <= step)


def float32_reference(config, weights: dict[str, np.ndarray]):
    """A float32 backbone built by hand with ``weights``, in eval mode."""
    with paddle.utils.unique_name.guard():
        model = build_model(config.model, image_size=config.data.image_size)
    model.set_state_dict({key: paddle.to_tensor(value) for key, value in weights.items()})
    model.eval()
    return model


def embed(model, images: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


@pytest.fixture
def trained_fp32(tiny_dir, tiny_run, tmp_path) -> Path:
    """A checkpoint of 2 real training steps of the fp16 config on the CPU (which computes in float32)."""
    config = fp16_config(tiny_dir, tiny_run, "train.max_steps=2")
    Trainer(config, tmp_path / "cpu").run()
    return tmp_path / "cpu" / "checkpoints" / "2"


def test_the_emulation_is_paddles_own_o2_decoration(tiny_dir, tiny_run, tmp_path, monkeypatch):
    config = fp16_config(tiny_dir, tiny_run)
    plain = Trainer(config, tmp_path / "plain")
    assert plain.amp_level is None  # the CPU itself: decorate does nothing here
    trainer = o2_trainer(monkeypatch, config, tmp_path / "o2")
    norm_params = {id(p) for layer in trainer.model.sublayers() if isinstance(layer, NORM_LAYERS)
                   for p in layer.parameters()}
    dtypes = {p.name: p.dtype for p in trainer.model.parameters()}
    assert {p.name for p in trainer.model.parameters() if id(p) in norm_params} == {
        name for name, dtype in dtypes.items() if dtype == paddle.float32}
    assert paddle.float16 in dtypes.values() and trainer.optimizer._multi_precision
    assert all(t.dtype == paddle.float32 for t in trainer.model.state_dict().values())  # Paddle's hook
    # ... which returns copies: a write into them does not reach the model (why plsc reads own_state)
    key = next(k for k, t in precision.own_state(trainer.model).items() if t.dtype == paddle.float16)
    trainer.model.state_dict()[key].set_value(paddle.zeros_like(trainer.model.state_dict()[key]))
    assert np.abs(precision.own_state(trainer.model)[key].numpy()).max() > 0


def test_fp16_checkpoint_resume_verify_export_through_the_trainer(trained_fp32, tiny_dir, tiny_run, tmp_path,
                                                                   monkeypatch):
    config = fp16_config(tiny_dir, tiny_run, "train.max_steps=4")
    output = tmp_path / "o2"
    # Resume (weights only) of real float32 weights into the float16 backbone: cast down on load.
    first = o2_trainer(monkeypatch, config, output, resume=trained_fp32, weights_only=True)
    saved32 = {k: v.numpy() for k, v in ckpt.load_backbone_state(trained_fp32).items()}
    for key, tensor in precision.own_state(first.model).items():
        assert_cast_of(tensor.numpy(), saved32[key])
    state_after_steps(first.optimizer)
    first.state.step = 3
    weights = params_as_float32(first.model)

    # Verification (and best_model) of the float16 backbone == a float32 model of the same weights.
    reference = float32_reference(config, weights)
    vset = load_bin(tiny_dir / BIN, config.data.image_size)
    expected = verify(embedders.DygraphEmbedder(reference, "NCHW"), vset, 50, "NCHW")
    results = first._evaluate_and_keep_best()
    assert results[vset.name]["accuracy"] == pytest.approx(expected["accuracy"], abs=1 / vset.issame.size)
    with monkeypatch.context() as patch:  # the branch a GPU takes: the dygraph engine
        patch.setattr(embedders, "_on_gpu", lambda: True)
        on_gpu = first.evaluate()
    assert on_gpu[vset.name] == expected
    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    dygraph = embedders.open_embedder(first.model, config.model, config.data.image_size, "dygraph")
    np.testing.assert_allclose(dygraph(images), embed(reference, images), rtol=1e-6, atol=1e-6)

    # The step checkpoint: float32 weights equal to the float16 ones cast up; float32 master weights.
    step = first.save_step_checkpoint()
    for directory in (step, output / "best_model" / vset.name):
        saved = ckpt.load_backbone_state(directory)
        for key, value in weights.items():
            assert saved[key].dtype == paddle.float32
            np.testing.assert_array_equal(saved[key].numpy(), value)
    masters, moments = master_weights(first.optimizer), velocities(first.optimizer)

    # Full resume into another float16 backbone: weights, master weights (by name) and velocities exactly.
    second = o2_trainer(monkeypatch, config, output, resume=True)
    assert second.state.step == 3
    for key, tensor in precision.own_state(second.model).items():
        assert tensor.dtype == precision.own_state(first.model)[key].dtype
        np.testing.assert_array_equal(tensor.numpy().astype(np.float32), weights[key])
    create_step_state(second.optimizer)  # the first step after resuming binds the restored state by name
    restored_state = master_weights(second.optimizer), velocities(second.optimizer)
    for saved, restored in zip((masters, moments), restored_state, strict=True):
        assert set(restored) == set(saved)
        for name, value in saved.items():
            np.testing.assert_array_equal(restored[name], value)

    # plsc eval of the saved best model gives the trainer's numbers; the export computes the float32 model.
    best = output / "best_model" / vset.name
    assert evaluate_model(best, [str(tiny_dir / BIN)], 50)[vset.name] == results[vset.name]
    exported = export_checkpoint(best, tmp_path / "export")
    graph = next(tmp_path / "export" / f for f in exported["artifacts"]["paddle"]["files"]
                 if f.endswith((".json", ".pdmodel")))
    engine = PaddleEngine(graph, graph.with_suffix(".pdiparams"))
    expected = embed(reference, images)
    # Paddle Inference folds BatchNorm into the convolutions: float32 rounding relative to the embedding's
    # scale, not each element's (one element of ~5e-4 in an embedding of ~17 parted by 2.5e-5 on 2.6.2).
    scale = np.abs(expected).max()
    np.testing.assert_allclose(engine(images), expected, rtol=1e-4, atol=1e-5 * scale)


def saved_optimizer_state(directory: Path) -> dict[str, np.ndarray]:
    """The optimizer file read by Paddle's own loader: accumulators and master weights by tensor name."""
    state = paddle.load(str(directory / ckpt.OPTIMIZER))
    masters = {t.name: t.numpy() for t in state.pop("master_weights", {}).values()}
    return {**{name: t.numpy() for name, t in state.items()}, **masters}


def test_a_float32_checkpoint_resumes_into_fp16_with_master_weights_from_its_float32_weights(
        trained_fp32, tiny_dir, tiny_run, tmp_path, monkeypatch):
    config = fp16_config(tiny_dir, tiny_run, "train.max_steps=4")
    trainer = o2_trainer(monkeypatch, config, tmp_path / "o2", resume=trained_fp32)
    create_step_state(trainer.optimizer)  # the first GPU step: binds the state by name (Paddle asserts)
    saved = {k: v.numpy() for k, v in ckpt.load_backbone_state(trained_fp32).items()}
    saved_opt = saved_optimizer_state(trained_fp32)
    names = {param.name: key for key, param in trainer.model.named_parameters()}
    masters = master_weights(trainer.optimizer)
    assert masters and all(name in names for name in masters)
    for name, master in masters.items():  # the float32 weights, not the float16 ones cast back up
        np.testing.assert_array_equal(master, saved[names[name]])
    assert any(np.any(master != saved[names[name]].astype(np.float16).astype(np.float32))
               for name, master in masters.items())
    moments = velocities(trainer.optimizer)
    for name, value in moments.items():
        plain = name.replace(precision.MASTER_SUFFIX, "")
        np.testing.assert_array_equal(value, saved_opt[plain])
    assert len(moments) == len(saved_opt)


def test_an_fp16_checkpoint_resumes_and_trains_on_the_cpu(tiny_dir, tiny_run, tmp_path, monkeypatch):
    config = fp16_config(tiny_dir, tiny_run, "train.max_steps=4")
    o2 = o2_trainer(monkeypatch, config, tmp_path)
    state_after_steps(o2.optimizer)
    o2.state.step = 3
    directory = o2.save_step_checkpoint()
    saved_opt = saved_optimizer_state(directory)
    saved = {k: v.numpy() for k, v in ckpt.load_backbone_state(directory).items()}
    cpu = Trainer(config, tmp_path, resume=True)  # the CPU: float32 parameters, no master weights
    for key, param in cpu.model.named_parameters():
        mastered = param.name + precision.MASTER_SUFFIX
        # the float32 weight the fp16 run trained: its master weight where it kept one
        np.testing.assert_array_equal(param.numpy(), saved_opt.get(mastered, saved[key]))
    cpu.run()  # step 4: the optimizer finds every velocity (Paddle asserts it does)
    moments = velocities(cpu.optimizer)
    assert set(moments) == {name.replace(precision.MASTER_SUFFIX, "") for name in saved_opt
                            if name.endswith("_velocity_0")}
    records = map(json.loads, (tmp_path / "train_log.jsonl").open())
    last = [record for record in records if "loss" in record][-1]
    assert last["step"] == 4 and np.isfinite(last["loss"])


@pytest.mark.filterwarnings("ignore:Accumulating with FP16")  # Paddle's word on float16 velocities
def test_fp16_without_master_weights_resumes_with_them_and_on_the_cpu(tiny_dir, tiny_run, tmp_path,
                                                                        monkeypatch):
    """train.fp16_master_weights=false keeps float16 velocities of the float16 weights themselves: resumed
    with master weights they become the masters' float32 velocities (the masters made from the saved float32
    weights); resumed on the CPU, the float32 parameters' velocities."""
    config = fp16_config(tiny_dir, tiny_run, "train.max_steps=4", "train.fp16_master_weights=false")
    plain = o2_trainer(monkeypatch, config, tmp_path)
    assert not plain.optimizer._multi_precision
    state_after_steps(plain.optimizer)
    plain.state.step = 3
    directory = plain.save_step_checkpoint()
    saved_opt = saved_optimizer_state(directory)
    assert not any(name.endswith(precision.MASTER_SUFFIX) for name in saved_opt)
    assert np.dtype(np.float16) in {value.dtype for value in saved_opt.values()}
    saved = {k: v.numpy() for k, v in ckpt.load_backbone_state(directory).items()}
    with_masters = fp16_config(tiny_dir, tiny_run, "train.max_steps=4")
    for trainer in (o2_trainer(monkeypatch, with_masters, tmp_path, resume=True),
                    Trainer(with_masters, tmp_path, resume=True)):
        create_step_state(trainer.optimizer)
        moments = velocities(trainer.optimizer)
        assert len(moments) == len(saved_opt)
        for name, value in moments.items():
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value, saved_opt[name.replace(precision.MASTER_SUFFIX, "")])
        names = {param.name: key for key, param in trainer.model.named_parameters()}
        for name, master in master_weights(trainer.optimizer).items():
            np.testing.assert_array_equal(master, saved[names[name]])


class _Rank0Statistics:
    """A comm whose broadcast delivers rank 0's value: here, a constant."""

    def broadcast_(self, tensor, src):
        tensor.set_value(paddle.full_like(tensor, 0.25))


def test_rank0_statistics_reach_a_float16_model(tiny_dir, tiny_run, tmp_path, monkeypatch):
    trainer = o2_trainer(monkeypatch, fp16_config(tiny_dir, tiny_run), tmp_path)
    share_statistics_from_rank0(trainer.model, _Rank0Statistics())
    stats = [t for t in precision.own_state(trainer.model).values() if t.stop_gradient]
    assert stats and all(np.all(t.numpy() == 0.25) for t in stats)


def test_paddle_casts_to_float16_by_one_of_two_roundings():
    """Paddle 3.3.1's CPU cast rounds to nearest even, as numpy does; 2.6.2's rounds toward zero (drops the
    13 low mantissa bits). assert_cast_of accepts both and nothing else."""
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    cast = paddle.to_tensor(x).astype("float16").numpy()
    toward_zero = (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float16)
    expected = toward_zero if paddle.__version__.startswith("2.") else x.astype(np.float16)
    np.testing.assert_array_equal(cast, expected)
    assert_cast_of(cast, x)
    with pytest.raises(AssertionError):
        assert_cast_of(cast + np.spacing(np.abs(cast)) * 2, x)

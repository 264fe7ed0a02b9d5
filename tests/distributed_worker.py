"""The per-rank side of tests/test_distributed.py, run under ``python -m paddle.distributed.launch``.

``python distributed_worker.py head SPEC.json OUT_DIR``: PartialFC forward/backward/step on this rank's block
  of a global batch (stored in the spec's .npz), one ``<case>.rank<r>.npz`` per case.
``python distributed_worker.py reshard SRC DST [SRC DST ...]``: restore checkpoints on this world size and
  save them again.
``python distributed_worker.py allreduce SPEC.json OUT_DIR``: sums of this rank's random tensors (the spec's
  shapes and dtypes) over ranks, per tensor and coalesced in each of the spec's bucket sizes, with the
  number of all-reduces each issued, in ``allreduce.rank<r>.npz``.
``python distributed_worker.py grad_accum SPEC.json OUT_DIR``: two Trainers on this world size, BatchNorm on
  its running statistics, one with ``train.grad_accum`` N and batch B, one with batch N x B, take the same
  optimizer steps on the same data (:func:`lockstep_grad_accum`; each one's state in ``<name>.rank<r>.npz``).
``python distributed_worker.py train RESULTS OUTPUT BATCHNORM OVERRIDE...``: a Trainer run writing OUTPUT, its
  BatchNorm layers on batch statistics (BATCHNORM=per-rank, the default of training) or on their running
  statistics (global, see :func:`use_running_batchnorm_statistics`);
  ``RESULTS/rank<r>.json`` holds what the shared output does not show (each rank's verification results and
  how many images it embedded).

The test compares these files with single-process references; nothing here asserts.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
warnings.filterwarnings("ignore", message="No ccache found")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from plsc.distributed import make_comm  # noqa: E402
from plsc.loss.margin import Margin  # noqa: E402
from plsc.loss.partial_fc import CenterUpdate, PartialFC, build_head  # noqa: E402


def run_head(spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    comm = make_comm()
    for case in spec["cases"]:
        data = np.load(case["data"])
        out = Path(out_dir) / f"{case['name']}.rank{comm.rank}.npz"
        np.savez(out, **_head_case(case, data["embeddings"], data["labels"], comm))


def _head_case(case: dict, all_embeddings: np.ndarray, all_labels: np.ndarray, comm) -> dict:
    head = build_head(  # chunk_size > 0: the streaming head
        case.get("chunk_size", 0),
        num_classes=case["num_classes"],
        embedding_size=all_embeddings.shape[1],
        margin=Margin(*case["margin"]),
        sample_ratio=case["ratio"],
        seed=case["seed"],
        comm=comm,
    )
    rows = len(all_labels) // comm.world_size
    mine = slice(comm.rank * rows, (comm.rank + 1) * rows)
    embeddings = paddle.to_tensor(all_embeddings[mine], stop_gradient=False)
    loss, pending = head(embeddings, paddle.to_tensor(all_labels[mine]), case["step"])
    loss.backward()
    index, _ = head.sample(all_labels, case["step"])
    result = {
        "loss": np.float64(float(loss)),
        "embedding_grad": embeddings.grad.numpy(),
        "shard": np.array([head.shard.start, head.shard.count]),
        "sampled_ids": index + head.shard.start,
    }
    if pending.rows is not None:  # the streaming head never holds the gradient
        result["sampled_grad"] = pending.rows.grad.numpy()
    else:  # what its found-inf check reads instead: the squared norm of its shard's gradient
        result["center_grad_sq_norm"] = head.center_grads(pending)[0].numpy()
    head.apply(pending, CenterUpdate(lr=0.1, momentum=0.9, weight_decay=5e-4))
    return {**result, "weight": head.weight.numpy(), "velocity": head.velocity.numpy()}


def run_allreduce(spec_path: str, out_dir: str) -> None:
    import paddle.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    comm = make_comm()
    rng = np.random.default_rng(comm.rank)
    inputs = [(rng.standard_normal(shape) * 100).astype(dtype) for shape, dtype in spec["tensors"]]
    calls = {"all_reduce": 0}
    all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    result = {f"input{i}": x for i, x in enumerate(inputs)}
    per_tensor = [comm.all_reduce_sum_(paddle.to_tensor(x)).numpy() for x in inputs]
    result.update({f"per_tensor{i}": x for i, x in enumerate(per_tensor)})
    for bucket_bytes in spec["bucket_bytes"]:
        tensors = [paddle.to_tensor(x) for x in inputs]
        calls["all_reduce"] = 0
        comm.all_reduce_sum_coalesced_(tensors, bucket_bytes)
        result[f"calls{bucket_bytes}"] = np.array(calls["all_reduce"])
        result.update({f"coalesced{bucket_bytes}_{i}": t.numpy() for i, t in enumerate(tensors)})
    raw = paddle.to_tensor(np.ones(4, np.float16))
    all_reduce(raw)  # gloo's own float16 sum, what all_reduce_sum_ works around
    result["raw_float16_sum_of_ones"] = raw.numpy()
    np.savez(Path(out_dir) / f"allreduce.rank{comm.rank}.npz", **result)


def run_reshard(*sources_and_targets: str) -> None:
    """Restore each SOURCE checkpoint's class centers on this world size and save them to TARGET, as a resume
    on another number of ranks followed by a save would."""
    for source, target in zip(sources_and_targets[::2], sources_and_targets[1::2], strict=True):
        _reshard(Path(source), Path(target))


def _reshard(source: Path, target: Path) -> None:
    from plsc import checkpoint as ckpt

    comm = make_comm()
    manifest = ckpt.read_manifest(source)
    head = PartialFC(
        manifest["num_classes"],
        manifest["embedding_size"],
        Margin(1.0, 0.5, 0.0, 64.0),
        center_dtype=manifest["center_dtype"],
        comm=comm,
    )
    head.set_state(**ckpt.read_center_rows(source, manifest, head.shard))
    state = ckpt.TrainingState(manifest["step"], manifest["epoch"], manifest["step_in_epoch"])
    backbone = paddle.nn.Linear(2, 2)
    backbone.set_state_dict(ckpt.load_backbone_state(source))
    ckpt.save_checkpoint(
        target, comm=comm, state=state, config=manifest["config"], model=backbone, optimizer=None, head=head
    )


def use_running_batchnorm_statistics(model: paddle.nn.Layer) -> None:
    """BatchNorm normalises with its running statistics in training too (and leaves them unchanged), making
    the backbone a per-sample function: how a batch is split over ranks then changes nothing."""
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
            layer._use_global_stats = True


def trained_state(trainer) -> dict[str, np.ndarray]:
    """What a step changes on this rank: the backbone's tensors (BatchNorm's running statistics included),
    the backbone optimizer's velocities (named alike in every run), this rank's class centers and their
    velocities."""
    state = {f"backbone/{name}": value.numpy() for name, value in trainer.model.state_dict().items()}
    state.update({f"optimizer/{name}": value.numpy() for name, value in trainer.optimizer.state_dict().items()
                  if isinstance(value, paddle.Tensor)})
    state.update(centers=trainer.head.weight.numpy(), center_velocity=trainer.head.velocity.numpy())
    return state


def lockstep_grad_accum(spec: dict, output: Path, comm) -> dict[str, dict[str, np.ndarray]]:
    """Two Trainers, BatchNorm on its running statistics: ``accumulated`` with ``train.grad_accum`` N
    (``micro_batches``) and batch B (``batch``), ``whole`` with batch N x B, each taking the same ``steps``
    optimizer steps at rate ``lr`` on the same images (this rank's of each step). Their
    :func:`trained_state` and per-step ``losses``. ``spec["overrides"]``: the run's other settings."""
    from plsc.config import load_config
    from plsc.engine.trainer import Trainer

    count, batch = spec["micro_batches"], spec["batch"]
    settings = {"whole": [f"train.batch_size={count * batch}"],
                "accumulated": [f"train.batch_size={batch}", f"train.grad_accum={count}"]}
    trainers = {}
    for name, extra in settings.items():
        config = load_config(overrides=[*spec["overrides"], *extra])
        trainers[name] = Trainer(config, output / name, comm=comm)
        use_running_batchnorm_statistics(trainers[name].model)
    losses = {name: [] for name in trainers}
    trainers["whole"].sampler.set_epoch(0)
    for step, (images, labels) in zip(range(spec["steps"]), trainers["whole"].loader, strict=False):
        for name, trainer in trainers.items():
            losses[name].append(trainer.step(images, labels, step, spec["lr"]))
    return {name: {**trained_state(trainer), "losses": np.array(losses[name])}
            for name, trainer in trainers.items()}


def run_grad_accum(spec_path: str, out_dir: str) -> None:
    comm = make_comm()
    states = lockstep_grad_accum(json.loads(Path(spec_path).read_text()), Path(out_dir), comm)
    for name, state in states.items():
        np.savez(Path(out_dir) / f"{name}.rank{comm.rank}.npz", **state)


def run_train(results_dir: str, output: str, batchnorm: str, *overrides: str) -> None:
    from plsc.config import load_config
    from plsc.engine import trainer as trainer_module
    from plsc.engine import verification

    embedded = {"images": 0}
    original_open_embedder = verification.open_embedder

    class CountingEmbedder:
        def __init__(self, embed):
            self.embed, self.data_format = embed, embed.data_format

        def __call__(self, batch):
            embedded["images"] += len(batch)
            return self.embed(batch)

    def counting_open_embedder(*args, **kwargs):
        return CountingEmbedder(original_open_embedder(*args, **kwargs))

    verification.open_embedder = counting_open_embedder
    trainer = trainer_module.Trainer(load_config(overrides=list(overrides)), Path(output))
    if batchnorm == "global":
        use_running_batchnorm_statistics(trainer.model)
    result = trainer.run()
    record = {
        "rank": trainer.rank,
        "steps": result.steps,
        "best": result.best,
        "last_eval": result.last_eval,
        "images_embedded": embedded["images"],
    }
    (Path(results_dir) / f"rank{trainer.rank}.json").write_text(json.dumps(record))


def run_head_and_allreduce(head_spec: str, allreduce_spec: str, out_dir: str) -> None:
    """Both jobs on the same ranks, one launch: the head's cases, then the all-reduces (whose counting
    wrapper of dist.all_reduce stays in place after them)."""
    run_head(head_spec, out_dir)
    run_allreduce(allreduce_spec, out_dir)


if __name__ == "__main__":
    mode, *arguments = sys.argv[1:]
    modes = {"head": run_head, "allreduce": run_allreduce, "reshard": run_reshard, "train": run_train,
             "grad_accum": run_grad_accum, "head_and_allreduce": run_head_and_allreduce}
    modes[mode](*arguments)

"""The backbone's gradient all-reduce on 2 CPU ranks (gloo): one all-reduce per parameter against coalesced
buckets (``train.allreduce_bucket_mb``), side by side in the same two processes.

    .venv/bin/python benchmarks/allreduce_bench.py --json benchmarks/results/allreduce_2ranks.json

1. The all-reduce alone, on gradients shaped like IResNet-50's (width 1, 512-d embedding, 112 px: 238
   parameters with gradients, 43.6M values, 174 MB in float32): per parameter (bucket 0), 128 MiB buckets
   (PLSC v2.2's size, the default), one bucket for all.
2. Whole training steps (the Trainer's step on its own loader, timed by ``plsc.bench.train``'s phases)
   of a small IResNet-50 on the bundled faces, bucket 0 against 128 MiB.

The ranks run with the malloc settings of the ``plsc`` command (plsc.malloc). Configurations alternate
round by round, so the machine's load falls on them alike; each figure is the median over rounds (all
samples are in the JSON). Collectives per step are counted by wrapping ``paddle.distributed.all_reduce``
and ``all_gather``. Nothing here asserts; the equality of the sums is tested in tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKETS_MB = {"per_parameter": 0, "buckets_128mib": 128, "one_bucket": 2**20}
TRAIN_BUCKETS_MB = {"per_parameter": 0, "buckets_128mib": 128}
RES50 = ["model.name=iresnet50", "model.width=1.0", "model.embedding_size=512", "data.image_size=112"]
SMALL_RES50 = ["model.name=iresnet50", "model.width=0.25", "model.embedding_size=64", "data.image_size=32",
               "train.batch_size=16", "data.num_workers=0", "loss.sample_ratio=1.0", "optim.clip_norm=0",
               f"data.root={ROOT / 'data' / 'tiny'}", "data.val_bins=[]"]


class CollectiveCounter:
    """Counts calls of paddle.distributed's all_reduce and all_gather (wrapped module-wide)."""

    def __init__(self) -> None:
        import paddle.distributed as dist

        self.counts = {"all_reduce": 0, "all_gather": 0}
        for name in self.counts:
            setattr(dist, name, self._counting(name, getattr(dist, name)))

    def _counting(self, name: str, function):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return function(*args, **kwargs)

        return counted

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        return {name: self.counts[name] - before[name] for name in self.counts}


def res50_gradients():
    import paddle

    from plsc.config import load_config
    from plsc.engine.trainer import build_backbone

    model = build_backbone(load_config(overrides=RES50), seed=0)
    return [paddle.randn(p.shape) for p in model.parameters() if not p.stop_gradient]


def time_gradient_all_reduce(comm, counter, rounds: int) -> dict:
    grads = res50_gradients()
    samples = {name: [] for name in BUCKETS_MB}
    collectives = {}
    for _ in range(rounds):
        for name, mb in BUCKETS_MB.items():
            comm.barrier()
            before = counter.snapshot()
            started = time.perf_counter()
            comm.all_reduce_sum_coalesced_(grads, mb * 2**20)
            comm.barrier()
            samples[name].append(time.perf_counter() - started)
            collectives[name] = counter.since(before)["all_reduce"]  # (a barrier is no all_reduce call)
    return {"parameters": len(grads), "values": sum(int(g.size) for g in grads),
            "seconds": samples, "all_reduces": collectives}


def time_train_steps(comm, counter, rounds: int, steps: int, warmup: int) -> dict:
    from plsc.bench.train import StepPhaseTimer, build_trainer, repeat_loader, run_steps, summarise
    from plsc.config import load_config

    runs = {}
    with tempfile.TemporaryDirectory(prefix="plsc-allreduce-bench-") as scratch:
        for name, mb in TRAIN_BUCKETS_MB.items():
            config = load_config(overrides=[*SMALL_RES50, f"train.allreduce_bucket_mb={mb}"])
            trainer = build_trainer(config, os.path.join(scratch, name))
            repeat_loader(trainer, max(steps, warmup))
            run_steps(trainer, warmup)  # first-step allocations and caches, untimed
            runs[name] = {"trainer": trainer, "timer": StepPhaseTimer(trainer), "clocks": []}
        for _ in range(rounds):
            for run in runs.values():
                comm.barrier()
                before = counter.snapshot()
                run["clocks"] += run_steps(run["trainer"], steps, run["timer"])[1]
                run["per_step"] = {k: v / steps for k, v in counter.since(before).items()}
        batch = config.train.batch_size * comm.world_size
        return {name: {**summarise(run["clocks"], batch), "collectives_per_step": run["per_step"],
                       "backbone_parameters": len([p for p in run["trainer"].model.parameters()
                                                   if not p.stop_gradient])}
                for name, run in runs.items()}


def rank_main(args) -> None:
    import warnings

    import paddle

    from plsc.distributed import make_comm

    warnings.filterwarnings("ignore", message=".*always track global mean and variance.*")
    comm = make_comm()
    counter = CollectiveCounter()
    result = {
        "gradient_all_reduce": time_gradient_all_reduce(comm, counter, args.rounds),
        "train_step": time_train_steps(comm, counter, args.rounds, args.steps, args.warmup),
        "world_size": comm.world_size,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "paddle_version": paddle.__version__,
    }
    if comm.rank == 0:
        Path(args.rank_output).write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/allreduce_2ranks.json")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the configurations")
    parser.add_argument("--steps", type=int, default=4, help="training steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per configuration")
    parser.add_argument("--rank-output", help=argparse.SUPPRESS)  # set in the launched ranks
    args = parser.parse_args()
    if args.rank_output:
        rank_main(args)
        return 0
    from plsc.launch import child_environment, launch_command
    from plsc.malloc import MALLOC_SETTINGS

    with tempfile.TemporaryDirectory(prefix="plsc-allreduce-bench-") as scratch:
        rank_output = Path(scratch) / "rank0.json"
        program = [sys.executable, str(Path(__file__).resolve()), "--rank-output", str(rank_output),
                   "--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        load_before = os.getloadavg()
        env = {"GLIBC_TUNABLES": MALLOC_SETTINGS, **child_environment(2)}  # as the plsc command runs
        proc = subprocess.run(launch_command(2, program, log_dir=Path(scratch) / "log"), cwd=ROOT, env=env)
        if proc.returncode != 0:
            for log in sorted((Path(scratch) / "log").glob("workerlog.*")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            return proc.returncode
        result = json.loads(rank_output.read_text())
    result.update(load_average_before=load_before, load_average_after=os.getloadavg(), cpus=os.cpu_count(),
                  rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup,
                  res50_overrides=RES50, train_overrides=SMALL_RES50, python=sys.version.split()[0])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    import statistics

    lines = [f"gradient all-reduce, {result['gradient_all_reduce']['parameters']} parameters:"]
    for name, seconds in result["gradient_all_reduce"]["seconds"].items():
        count = result["gradient_all_reduce"]["all_reduces"][name]
        lines.append(f"  {name:15s} {count:4d} all-reduces  median {statistics.median(seconds):.4f} s")
    lines.append("training step (small IResNet-50, 2 ranks):")
    for name, run in result["train_step"].items():
        per_step = run["collectives_per_step"]
        lines.append(f"  {name:15s} {per_step['all_reduce']:6.1f} all-reduces/step  median step "
                     f"{run['step_s']:.4f} s  optimizer phase {run['phases_s']['optimizer']:.4f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""The head step and its matmul floor under pytest-benchmark, plus ``plsc bench head``'s full JSON report.

The pytest-benchmark cases time in this process (threads: OMP_NUM_THREADS, which ``make bench`` sets to the
core count); the report cases run ``bench_head``, whose measurements are fresh subprocesses (--head-threads).
Nothing here asserts on time: the numbers are the output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from plsc.bench.head import HeadBenchSpec, PhaseClock, bench_head, build_head, head_step, make_batch, table
from plsc.loss.sampling import num_sampled

SUITE = HeadBenchSpec(classes=200_000, ratio=0.1, batch=128, emb=512, steps=8, warmup=2)
TARGETS = {
    "1M": HeadBenchSpec(classes=1_000_000, ratio=0.1, batch=128, emb=512, steps=8, warmup=2),
    "4M": HeadBenchSpec(classes=4_000_000, ratio=0.025, batch=128, emb=512, steps=8, warmup=2),
}
# The streaming head (loss.chunk_size) at the 1M shape, float32 and float16 centers, and float16 centers with
# int8 velocity (loss.velocity_dtype): head_streaming*_1M.json.
STREAMING = {
    "streaming_1M": HeadBenchSpec(classes=1_000_000, ratio=0.1, batch=128, emb=512, steps=8, warmup=2,
                                  chunk_size=4096),
    "streaming_fp16_1M": HeadBenchSpec(classes=1_000_000, ratio=0.1, batch=128, emb=512, steps=8, warmup=2,
                                       precision="fp16", chunk_size=4096),
    "streaming_fp16_int8_1M": HeadBenchSpec(classes=1_000_000, ratio=0.1, batch=128, emb=512, steps=8,
                                            warmup=2, precision="fp16", chunk_size=4096,
                                            velocity_dtype="int8"),
}


def shapes(kind: str) -> dict[str, HeadBenchSpec]:
    return {"suite": SUITE} if kind == "suite" else {**TARGETS, **STREAMING}


@pytest.fixture(scope="module")
def suite_head():
    """The suite shape's head, built once: pytest-benchmark times its steps."""
    return build_head(SUITE)


def test_head_step(benchmark, suite_head):
    rng = np.random.default_rng(0)
    steps = iter(range(10**6))

    def one_step():
        head_step(suite_head, *make_batch(SUITE, rng), next(steps), PhaseClock())

    benchmark.extra_info.update(classes=SUITE.classes, ratio=SUITE.ratio, batch=SUITE.batch, emb=SUITE.emb)
    benchmark.pedantic(one_step, rounds=SUITE.steps, warmup_rounds=SUITE.warmup, iterations=1)


def test_matmul_floor(benchmark, suite_head):
    import paddle

    sampled = num_sampled(SUITE.classes, SUITE.ratio)
    embeddings = paddle.randn([SUITE.global_batch, SUITE.emb])
    rows = paddle.randn([sampled, SUITE.emb])
    grad_logits = paddle.randn([SUITE.global_batch, sampled])

    def floor():
        paddle.matmul(embeddings, rows, transpose_y=True)
        paddle.matmul(grad_logits, rows)
        paddle.matmul(grad_logits, embeddings, transpose_x=True)

    benchmark.extra_info.update(sampled=sampled, batch=SUITE.global_batch, emb=SUITE.emb)
    benchmark.pedantic(floor, rounds=SUITE.steps, warmup_rounds=SUITE.warmup, iterations=1)


@pytest.mark.parametrize("name", ["suite", "1M", "4M", *STREAMING])
def test_head_report(name, head_shapes, head_threads, results_dir):
    """``plsc bench head`` with peak-RSS probes at C/2 and C, into benchmarks/results/head_<name>.json."""
    specs = shapes(head_shapes)
    if name not in specs:
        pytest.skip(f"shape {name} runs with --head-shapes {'target' if name != 'suite' else 'suite'}")
    spec = HeadBenchSpec(**{**specs[name].__dict__, "threads": head_threads})
    result = bench_head(spec, rss_classes=(spec.classes // 2, spec.classes))
    (results_dir / f"head_{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{table(result)}")
    assert result["bytes_per_class"] > 0


def test_scaling_report(head_shapes, results_dir):
    """1M -> 4M classes at a fixed sampled count: the step time ratio (written after both reports)."""
    if head_shapes != "target":
        pytest.skip("runs with --head-shapes target")
    reports = {name: json.loads((results_dir / f"head_{name}.json").read_text()) for name in TARGETS}
    scaling = {
        "step_s": {name: report["step_s"] for name, report in reports.items()},
        "step_4M_over_1M": reports["4M"]["step_s"] / reports["1M"]["step_s"],
        "ratio_4M_over_1M_paired": reports["4M"]["ratio_paired"] / reports["1M"]["ratio_paired"],
        "sampled": {name: report["shape"]["sampled"] for name, report in reports.items()},
    }
    (results_dir / "head_scaling.json").write_text(json.dumps(scaling, indent=1) + "\n")
    print(f"\n4M / 1M step time at k={scaling['sampled']}: {scaling['step_4M_over_1M']:.3f}")

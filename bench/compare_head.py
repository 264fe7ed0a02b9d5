"""Before/after of the head benchmark in one run: ``plsc bench head`` on an older commit's PartialFC and on
the working tree, same shapes, same machine, one after the other.

    python bench/compare_head.py --baseline f257797 --json bench/results/head_1M.json \\
        --classes 1000000 --ratio 0.1 --batch 128 --emb 512

Every option after the compare script's own is ``plsc bench head``'s. The baseline is ``git archive`` of
``plsc/`` at the given commit (read-only for the repository) with today's ``plsc/bench`` copied in; its
processes run bench/legacy_head.py. ``--variants current`` skips the baseline (e.g. when its memory use
would not fit: the old PartialFC held three copies of the centers during initialisation).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plsc.bench import rss_classes_of, spec_from_args, write_json  # noqa: E402
from plsc.bench.head import Runner, bench_head, table  # noqa: E402
from plsc.cli import build_parser  # noqa: E402

BASELINE = "f257797"  # the last commit of plsc/loss before the head's performance work
COMPARED = ("step_s", "floor_s", "ratio", "ratio_paired", "step_cpu_s", "floor_cpu_s", "bytes_per_class",
            "rss_bytes_per_class")


def baseline_tree(revision: str, into: Path) -> Path:
    """plsc/ at ``revision``, plus today's plsc/bench (the code that measures)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "plsc"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.rmtree(into / "plsc" / "bench", ignore_errors=True)
    shutil.copytree(ROOT / "plsc" / "bench", into / "plsc" / "bench")
    return into


def baseline_runner(tree: Path) -> Runner:
    env = (("PYTHONPATH", str(ROOT / "bench")), ("PLSC_BASELINE_TREE", str(tree)))
    return Runner(env=env, entry="legacy_head")


def side_by_side(results: dict[str, dict]) -> str:
    from tabulate import tabulate

    names = list(results)
    keys = [*COMPARED, *(f"phases.{p}" for p in next(iter(results.values()))["phases"])]
    rows = []
    for key in keys:
        values = [lookup(results[name], key) for name in names]
        change = f"{values[-1] / values[0]:.2f}x" if len(values) == 2 and values[0] and values[1] else ""
        rows.append([key, *(("-" if v is None else f"{v:.4g}") for v in values), change])
    return tabulate(rows, headers=["metric", *names, "after / before" if len(names) == 2 else ""])


def lookup(result: dict, key: str):
    value = result
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help=f"commit of the 'before' PartialFC ({BASELINE})")
    parser.add_argument("--variants", default="baseline,current",
                        help="baseline,current (default), current or baseline")
    parser.add_argument("--out", "--json", dest="out", required=True, help="JSON file for both results")
    own, rest = parser.parse_known_args(argv)
    args = build_parser().parse_args(["bench", "head", *rest])
    spec, rss = spec_from_args(args), rss_classes_of(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="plsc-baseline-") as tmp:
        for variant in own.variants.split(","):
            runner = Runner()
            if variant == "baseline":
                runner = baseline_runner(baseline_tree(own.baseline, Path(tmp)))
            print(f"--- {variant}", flush=True)
            results[variant] = bench_head(spec, rss, runner)
            print(table(results[variant]), flush=True)
    print(side_by_side(results))
    write_json(own.out, {"baseline_commit": own.baseline, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

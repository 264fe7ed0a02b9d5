"""How many of plsc's own functions, in how many modules, one training step calls (data loading included).

Profiles ``Trainer.run`` (cProfile) for two run lengths of the same config, ``--short`` and ``--long``
steps: a function called per step is called more often in the longer run; start-up, the final checkpoint
and the final verification are the same in both and cancel out. Counted: distinct functions defined in the
``plsc`` package whose call count grows, and their modules. The loader runs in this process
(``data.num_workers=0``) so that data loading is counted. Functions are told apart by module, line and name
(two ``forward`` methods of one module are two functions). Comprehensions and generator expressions are not
counted: they are expressions read where they stand, and whether the profiler sees them as functions depends
on the Python version (3.12 inlines comprehensions, PEP 709).

    .venv/bin/python -m devtools.step_calls [--config configs/cpu/mini.yaml] [--set key=value ...] [--list]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from collections import Counter
from pathlib import Path

# A tiny model on the config's data: the count is the code's, not the model's size.
TINY = ["model.width=0.125", "model.embedding_size=16", "data.image_size=32", "data.num_workers=0",
        "train.eval_interval=0", "train.save_interval=0", "train.epochs=100"]
PACKAGE = Path(__file__).resolve().parent.parent / "plsc"


def plsc_call_counts(config_path: str, overrides: list[str], steps: int) -> Counter:
    """``{(module, line, function): calls}`` of plsc's functions in one ``Trainer.run`` of ``steps`` steps."""
    from plsc.config import load_config
    from plsc.engine.trainer import Trainer

    config = load_config(config_path, [*TINY, *overrides, f"train.max_steps={steps}"])
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(config, output)
        profile = cProfile.Profile()
        profile.runcall(trainer.run)
    counts: Counter = Counter()
    for (filename, line, name), row in pstats.Stats(profile).stats.items():
        path = Path(filename).resolve()
        if path.is_relative_to(PACKAGE):
            module = ".".join(("plsc", *path.relative_to(PACKAGE).with_suffix("").parts))
            counts[(module.removesuffix(".__init__"), line, name)] += row[1]  # primitive + recursive calls
    return counts


EXPRESSIONS = {"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


def per_step_functions(short: Counter, long: Counter) -> list[tuple[str, int, str]]:
    """The functions called more often in the longer run: those a training step calls."""
    return sorted(key for key, calls in long.items()
                  if calls > short.get(key, 0) and key[2] not in EXPRESSIONS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/mini.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=6)
    parser.add_argument("--list", action="store_true", help="print every function counted")
    args = parser.parse_args(argv)
    short = plsc_call_counts(args.config, args.overrides, args.short)
    long = plsc_call_counts(args.config, args.overrides, args.long)
    functions = per_step_functions(short, long)
    modules = sorted({module for module, _, _ in functions})
    if args.list:
        for module, line, name in functions:
            print(f"{module}:{line} {name}")
    print(f"one training step calls {len(functions)} plsc functions in {len(modules)} modules: "
          + ", ".join(modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())

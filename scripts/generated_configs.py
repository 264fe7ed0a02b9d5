"""A folder of generated config files, written or checked: what scripts/gen_published_configs.py and
scripts/gen_arcface_torch_configs.py share (each supplies its files' names and texts)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write(expected: dict[str, str], out_dir: Path) -> list[str]:
    """Write ``expected`` (file name -> text) into out_dir; the names whose content changed (none on a
    re-run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    for name, text in expected.items():
        path = out_dir / name
        if path.is_file() and path.read_text() == text:
            continue
        path.write_text(text)
        changed.append(name)
    return changed


def check(expected: dict[str, str], out_dir: Path, pattern: str) -> list[str]:
    """Problems in out_dir: missing or differing files, and files matching ``pattern`` not in ``expected``."""
    problems = []
    for name, text in expected.items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"missing: {path}")
        elif path.read_text() != text:
            problems.append(f"differs from the generator: {path}")
    for path in sorted(out_dir.glob(pattern)):
        if path.name not in expected:
            problems.append(f"not produced by the generator: {path}")
    return problems


def main(argv: list[str] | None, description: str, expected: dict[str, str], default_out: Path,
         pattern: str) -> int:
    """``--out DIR`` (default ``default_out``) written, or with ``--check`` compared (exit 1 on a
    difference)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out,
                        help=f"output directory (default: {default_out})")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when anything differs")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(expected, args.out, pattern)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    changed = write(expected, args.out)
    print(f"{len(expected)} configurations in {args.out}: {len(changed)} written, "
          f"{len(expected) - len(changed)} unchanged")
    return 0

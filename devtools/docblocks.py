"""Generated blocks in the documentation: one marker-block replacement, staleness check and command line for
every renderer (benchmarks/report.py, repro/report.py).

A block is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a renderer builds the whole
text of each document it owns and the figure's PNG bytes, and these functions compare them with the files and
write only what changed, so regenerating twice changes nothing the second time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from plsc.errors import PlscError

# (document texts by path, figure PNG bytes) as a renderer says they should be
Rendered = tuple[dict[Path, str], bytes]


def marker(name: str, edge: str) -> str:
    """``<!-- name:begin -->`` or ``<!-- name:end -->``."""
    return f"<!-- {name}:{edge} -->"


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with everything between block ``name``'s markers replaced by ``content``; PlscError unless
    there is exactly one such block."""
    begin, end = marker(name, "begin"), marker(name, "end")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise PlscError(f"the document needs exactly one {begin} ... {end} block")
    return pattern.sub(lambda _match: f"{begin}\n{content}\n{end}", text)


def read_document(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlscError(f"cannot read {path}: {exc.strerror or exc}") from None


def figure_link(figure: Path, document: Path) -> str:
    """The figure's path as a Markdown link from ``document``'s folder."""
    return Path(os.path.relpath(figure, document.parent)).as_posix()


def check_or_write(texts: dict[Path, str], figure: Path, png: bytes, check: bool, regenerate: str) -> int:
    """``check``: name each stale file (``regenerate`` says how to renew it), exit code 1 if any, else 0.
    Otherwise write the stale ones and return 0."""
    stale = [path for path, text in texts.items() if path.read_text(encoding="utf-8") != text]
    if not (figure.is_file() and figure.read_bytes() == png):
        stale.append(figure)
    if check:
        for path in stale:
            print(f"{path} is stale: run {regenerate}", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path == figure:
            path.write_bytes(png)
        else:
            path.write_text(texts[path], encoding="utf-8")
        print(f"updated {path}")
    return 0


def main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    documents: dict[str, Path],
    results_dir: Path,
    figure: Path,
    build: Callable[[dict[str, Path], Path, Path], Rendered],
    regenerate: str,
) -> int:
    """The renderers' command line: ``--<document> PATH`` per document (e.g. ``--readme``), ``--results-dir``,
    ``--figure``, ``--check``. ``build(documents, results_dir, figure)`` renders; a missing marker block or an
    unreadable input is one line and exit code 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, default in documents.items():
        parser.add_argument(f"--{name}", type=Path, default=default, help=f"the {name} (its marker blocks)")
    parser.add_argument("--results-dir", type=Path, default=results_dir, help="result files to render")
    parser.add_argument("--figure", type=Path, default=figure, help="PNG to draw (linked from a document)")
    parser.add_argument("--check", action="store_true", help="exit 1 when stale; writes nothing")
    args = parser.parse_args(argv)
    paths = {name: getattr(args, name.replace("-", "_")) for name in documents}
    try:
        texts, png = build(paths, args.results_dir, args.figure)
    except (PlscError, OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return check_or_write(texts, args.figure, png, args.check, regenerate)

"""README blocks and figures generated from result files: one marker-block replacement, staleness check and
writer for every renderer (plsc.bench.report, repro.report).

A block is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; a renderer builds the whole
README text and the figure's PNG bytes, and these functions compare them with the files and write only what
changed, so regenerating twice changes nothing the second time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from plsc.errors import PlscError


def marker(name: str, edge: str) -> str:
    """``<!-- name:begin -->`` or ``<!-- name:end -->``."""
    return f"<!-- {name}:{edge} -->"


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with everything between block ``name``'s markers replaced by ``content``; PlscError unless
    there is exactly one such block."""
    begin, end = marker(name, "begin"), marker(name, "end")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise PlscError(f"README needs exactly one {begin} ... {end} block")
    return pattern.sub(lambda _match: f"{begin}\n{content}\n{end}", text)


def check_or_write(readme: Path, figure: Path, text: str, png: bytes, check: bool, regenerate: str) -> int:
    """``check``: name each stale file (``regenerate`` says how to renew it), exit code 1 if any, else 0.
    Otherwise write the stale ones and return 0."""
    stale = _stale_files(readme, figure, text, png)
    if check:
        for path in stale:
            print(f"{path} is stale: run {regenerate}", file=sys.stderr)
        return 1 if stale else 0
    _write_stale(stale, readme, text, figure, png)
    return 0


def _stale_files(readme: Path, figure: Path, text: str, png: bytes) -> list[Path]:
    """Which of ``readme`` and ``figure`` differ from ``text`` and ``png``."""
    stale = [] if readme.read_text(encoding="utf-8") == text else [readme]
    return stale + ([] if figure.is_file() and figure.read_bytes() == png else [figure])


def _write_stale(stale: list[Path], readme: Path, text: str, figure: Path, png: bytes) -> None:
    """Write the stale ones of ``readme`` and ``figure``, saying so."""
    if readme in stale:
        readme.write_text(text, encoding="utf-8")
        print(f"updated {readme}")
    if figure in stale:
        figure.parent.mkdir(parents=True, exist_ok=True)
        figure.write_bytes(png)
        print(f"updated {figure}")

"""Names taken from input (a ``.bin`` file's stem, an export's ``--name``, an output file's name) that plsc
turns into paths: each must be one ordinary path component, and two inputs must not share one.

A name such as ``.`` (the stem of ``..bin``) or ``a/b`` would make plsc write somewhere else than beside its
siblings (``best_model/.`` is ``best_model`` itself), and two inputs with one name would silently share one
result; both are refused here in one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from plsc.errors import PlscError

_SEPARATORS = tuple(sep for sep in ("/", os.sep, os.altsep, "\0") if sep)


def path_component(name: str, source: str) -> str:
    """``name`` when it is one ordinary path component (not empty, not ``.``/``..``, no separator); else the
    PlscError naming ``source`` (what the name came from)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(sep in name for sep in _SEPARATORS):
        raise PlscError(f"{source}: the name {name!r} cannot name a file or folder (empty, '.', '..' or "
                        "holding a path separator): rename it")
    return name


def distinct_names(named: Iterable[tuple[str, str]], what: str) -> list[str]:
    """The names of ``(source, name)`` pairs; two sources with one name are refused (their results would be
    filed under that one name)."""
    first_source: dict[str, str] = {}
    names = []
    for source, name in named:
        if name in first_source:
            raise PlscError(f"{what}: {first_source[name]} and {source} are both named {name!r} (results are "
                            "kept by name): rename one")
        first_source[name] = source
        names.append(name)
    return names

"""The one reader of pickled files in plsc: data comes out, code never runs.

``pickle.load`` imports and calls whatever globals a file names (``os.system`` included), so a checkpoint or a
verification set handed around could run anything. This unpickler resolves only an allow-list of globals,
which covers what ``paddle.save`` writes for a state_dict (numpy arrays, on Paddle 2.6 and 3.x, numpy 1 and
2), insightface ``.bin`` files and PLSC v2.2 tensor files. Plain containers, numbers, strings and bytes need
no globals at all. Anything else is refused with one line naming the file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from plsc.errors import PlscError
from plsc.runtime import first_line

# numpy 2 pickles name numpy._core, numpy 1 numpy.core; both load on either numpy.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("builtins", "tuple"),
    }
)


def _latin1_bytes(text, encoding="latin1"):
    """What ``_codecs.encode`` does in pickles of bytes at protocol <= 2, and nothing else it could do."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin1")
    raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")


SUBSTITUTES: dict[tuple[str, str], Callable] = {("_codecs", "encode"): _latin1_bytes}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global outside the allow-list (loading it could run code)."""


class DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves the allow-listed globals and the given stand-ins, nothing else.

    ``substitutes``: ``{(module, name): callable}`` called instead of the named global (e.g. a stand-in that
    returns an array where PLSC v2.2's static payload calls ``builtins.eval``).
    """

    def __init__(self, file, substitutes: dict | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self.substitutes = {**SUBSTITUTES, **(substitutes or {})}

    def find_class(self, module: str, name: str):
        if (module, name) in self.substitutes:
            return self.substitutes[(module, name)]
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not data")


def load(path: str | os.PathLike, kind: str, substitutes: dict | None = None, encoding: str = "ASCII"):
    """The object pickled in ``path`` (a ``kind``, named in errors), or PlscError in one line.

    ``encoding='bytes'`` reads Python 2 pickles whose byte strings were pickled as ``str``.
    """
    path = Path(path)
    try:
        file = open(path, "rb")  # streamed: a large state_dict is not held twice
    except OSError as exc:
        raise PlscError(f"cannot read {kind} {path}: {exc.strerror or exc}") from None
    try:
        with file:
            content = DataUnpickler(file, substitutes, encoding=encoding).load()
    except RefusedGlobal as exc:
        raise PlscError(f"{path}: refusing to load the global {exc} (a {kind} holds data only; loading it "
                        "could run code)") from None
    except Exception as exc:  # garbage bytes can raise almost any exception type from the unpickler
        raise PlscError(f"{path}: truncated or corrupt {kind} (cannot unpickle: {first_line(exc)})") from None
    _refuse_expansion(path, kind, content)
    _refuse_object_arrays(path, kind, content)
    return content


# Objects one byte of pickle may stand for, plus a constant for the smallest files. Each reference to an
# object in the unpickled structure costs at least one opcode byte (building it, or fetching it from the
# memo), so data (no container referenced twice) stays below one object per byte; a file whose containers
# are shared (a list of two references to a list of two references to ...) expands exponentially in its
# size, and whatever walks it (np.asarray, a loop over the pairs) runs out of memory.
OBJECTS_PER_BYTE = 1
OBJECTS_SLACK = 1024


def _refuse_expansion(path: Path, kind: str, content) -> None:
    limit = OBJECTS_PER_BYTE * path.stat().st_size + OBJECTS_SLACK
    if expanded_size(content, limit) > limit:
        raise PlscError(f"{path}: the {kind} unpickles to a structure far larger than the file (shared or "
                        "recursive containers); refusing it")


def _children(value) -> tuple | list:
    if isinstance(value, dict):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return ()


def expanded_size(root, limit: int) -> int:
    """Objects in ``root`` counted as a tree (a container referenced twice counts twice, with its content),
    each distinct one visited once; stops at the first count above ``limit`` (a cycle counts as infinite)."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()
    stack = [(root, False)]
    while stack:  # iterative: a small file can nest lists far deeper than Python's recursion limit
        value, children_done = stack.pop()
        key = id(value)
        if children_done:
            open_ids.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(value))
            if sizes[key] > limit:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in open_ids:  # reached again below itself
            return limit + 1
        open_ids.add(key)
        stack.append((value, True))
        stack.extend((child, False) for child in _children(value) if id(child) not in sizes)
    return sizes[id(root)]


def _refuse_object_arrays(path: Path, kind: str, content, depth: int = 0) -> None:
    """Object arrays are not tensors; the only way one gets here is a crafted or foreign file."""
    if isinstance(content, np.ndarray) and content.dtype.hasobject:
        raise PlscError(f"{path}: the {kind} holds an array of Python objects, not numbers")
    if depth > 4:  # state_dicts nest two levels (optimizer master weights); .bin files one
        return
    if isinstance(content, dict):
        content = content.values()
    if isinstance(content, (list, tuple, type({}.values()))):
        for item in content:
            if isinstance(item, (np.ndarray, dict, list, tuple)):
                _refuse_object_arrays(path, kind, item, depth + 1)

"""The one way plsc writes and reads JSON: strict (RFC 8259), with ``null`` where a number is undefined.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON: ``jq``, JavaScript's
``JSON.parse`` and most other readers refuse the whole file. A metric that has no value (an accuracy of an
empty fold, the mean loss of a window of skipped steps) is written as ``null`` instead. Reading refuses them
too, and turns a document nested deeper than Python's recursion limit into the same ValueError as any other
malformed text, so a reader has one exception to turn into its one-line message.
"""

from __future__ import annotations

import json
import math

import numpy as np


def finite_or_none(value):
    """``value`` with every non-finite float (Python or numpy) replaced by None, in dicts, lists and tuples;
    numpy scalars become their Python equivalents."""
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes):
    """The value of strict JSON ``text``; ValueError (json.JSONDecodeError included) for anything else."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def dumps(value, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (non-finite numbers as null); raises ValueError on anything else that
    JSON cannot hold, never writes it."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)

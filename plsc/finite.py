"""Weights read from files must be finite numbers.

A NaN in a BatchNorm running variance (a diverged run saved, a damaged file) does not fail anywhere: every
embedding becomes NaN, verification reports accuracy 0.5 and training continues from garbage. So every
loader of weights (plsc checkpoints, PLSC v2.2 tensors, class-center shards) refuses them, in one line
naming the tensor.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from plsc.errors import PlscError


def non_finite_count(array) -> int:
    """How many entries of a float array are nan or inf (0 for integer and other arrays)."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def require_finite(name: str, array, where) -> None:
    """PlscError when ``array`` holds nan or inf: ``<where>: tensor <name> holds N non-finite values ...``."""
    count = non_finite_count(array)
    if count:
        size = np.asarray(array).size
        raise PlscError(f"{where}: tensor {name} holds {count} non-finite value{'s' if count > 1 else ''} "
                        f"(nan or inf) of {size}; refusing weights that would make every output nan")


def require_finite_state(state: Mapping, where, prefix: str = "") -> None:
    """:func:`require_finite` on every array of a (nested) state_dict; nested keys are joined by '/'."""
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            require_finite_state(value, where, f"{name}/")
        elif isinstance(value, np.ndarray):
            require_finite(name, value, where)

"""What every fast-path start-up check shares: its result, the tolerance against the portable code, and the
guard that turns a missing kernel into "unavailable". The checks live beside what they check
(:mod:`plsc.loss.fast_paths` for the head, :mod:`plsc.models.layout_check` for the backbone's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

ENABLED = "enabled"
# Loss and gradients of a fused kernel may differ from the composed ops by float rounding only.
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FastPath:
    name: str
    status: str  # ENABLED, or why the portable path is used

    @property
    def enabled(self) -> bool:
        return self.status == ENABLED


def on_gpu() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.get_device().startswith("gpu")


def differs(a: paddle.Tensor, b: paddle.Tensor) -> float:
    """Largest absolute difference, relative to ``b``'s largest magnitude (or absolute below 1)."""
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def attempt(name: str, check) -> FastPath:
    """Run ``check`` (returns a status); a missing kernel or any failure of the op means 'unavailable'."""
    try:
        return FastPath(name, check())
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        message = str(exc).strip()
        reason = "no CPU kernel" if "cpu kernel" in message.lower() else message.splitlines()[0][:120]
        return FastPath(name, f"unavailable ({reason})")


def agreed(result: FastPath, comm) -> FastPath:
    """``result`` as every rank must take it: a path that failed on any rank is disabled on all."""
    rejected_somewhere = comm.any_true(not result.enabled)
    if result.enabled and rejected_somewhere:
        return FastPath(result.name, "disabled (failed on another rank)")
    return result

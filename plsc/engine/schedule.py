"""Learning rate per step: linear warmup, then PLSC's piecewise (step) decay or polynomial decay."""

from __future__ import annotations

import bisect

from plsc.config import OptimConfig


def learning_rate(optim: OptimConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate used for optimizer step ``step`` (0-based)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "poly":
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.lr * (1.0 - progress) ** optim.poly_power
    # Boundaries in epochs (PLSC's MS1MV3 configs) or in steps (its base config).
    position = step // steps_per_epoch if optim.decay_unit == "epoch" else step
    passed = bisect.bisect_right(sorted(optim.decay_boundaries), position)
    return optim.lr * optim.decay_factor**passed

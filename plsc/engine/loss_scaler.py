"""Dynamic loss scaling for FP16 training, decided collectively.

PLSC v2.2's defaults: initial scale 27648, doubled after 2000 consecutive good steps, halved after every step
whose gradients hold an inf or nan (that step is skipped). Whether a step overflowed is all-reduced, so every
rank skips the same steps: a rank that skipped alone would leave the others waiting in a collective, and its
class centers would drift from the backbone the others keep.

A disabled scaler (FP32 training) has scale 1, never checks gradients (no extra synchronisation per step) and
never changes: the training step runs the same code either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle


@dataclass
class DynamicLossScaler:
    scale: float = 27648.0
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    min_scale: float = 1.0
    good_steps: int = 0
    enabled: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            self.scale = 1.0
        factors_valid = self.growth_factor >= 1 and 0 < self.backoff_factor < 1
        if self.scale <= 0 or self.growth_interval < 1 or not factors_valid:
            raise ValueError(f"invalid loss scaling settings: {self}")

    @classmethod
    def from_config(cls, train, enabled: bool) -> DynamicLossScaler:
        """The scaler a :class:`plsc.config.TrainConfig` describes."""
        return cls(
            scale=train.loss_scale_init,
            growth_interval=train.loss_scale_growth_interval,
            growth_factor=train.loss_scale_growth_factor,
            backoff_factor=train.loss_scale_backoff_factor,
            enabled=enabled,
        )

    def scale_loss(self, loss: paddle.Tensor) -> paddle.Tensor:
        return loss * self.scale if self.enabled else loss

    @property
    def inverse(self) -> float:
        """Multiply gradients by this to undo the scaling (class-center gradients included)."""
        return 1.0 / self.scale

    def found_inf(self, grads: list[paddle.Tensor], comm) -> bool:
        """Whether this step must be skipped on every rank; always False (and free) when disabled."""
        return self.enabled and found_inf_anywhere(grads, comm)

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step: back off on overflow, grow after enough good steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        """What changes during training; the factors and interval come from the configuration."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled:
            self.scale = float(state["scale"])
            self.good_steps = int(state["good_steps"])


# paddle.isfinite returns a bool per element: the check reads a large tensor in row blocks of at most this
# many elements, so checking a shard of tens of millions of class centers costs one block, not a byte per
# element.
FINITE_CHECK_BLOCK = 1 << 24


def all_finite(tensors: list[paddle.Tensor]) -> bool:
    """True when every tensor is free of inf and nan (one host sync for all of them)."""
    flags = [paddle.isfinite(block).all() for t in tensors for block in _row_blocks(t, FINITE_CHECK_BLOCK)]
    return bool(paddle.stack(flags).all().item()) if flags else True


def _row_blocks(tensor: paddle.Tensor, elements: int):
    """``tensor`` itself when it is small or a vector, else slices of whole rows of at most ``elements``."""
    if tensor.ndim < 2 or tensor.size <= elements:
        yield tensor
        return
    rows = max(1, elements * tensor.shape[0] // tensor.size)
    for start in range(0, tensor.shape[0], rows):
        yield tensor[start:start + rows]


def found_inf_anywhere(grads: list[paddle.Tensor], comm) -> bool:
    """The collective overflow decision: True on every rank when any rank saw a non-finite gradient."""
    return comm.any_true(not all_finite(grads))

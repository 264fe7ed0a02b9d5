"""Learning rate per step, as PLSC v2.2 schedules it: the linear scaling rule, linear warmup from 0, then
piecewise (step) decay or polynomial decay.

PLSC v2.2 (dynamic/train.py:83-112, static/train.py:80-109) computes, from the image count and the global
batch: ``steps_per_epoch = images // global_batch``; ``base_lr = global_batch * lr / 512``; decay boundaries
in global steps (epochs times ``steps_per_epoch``); and wraps Paddle's ``PiecewiseDecay`` in
``LinearWarmup(start_lr=0, end_lr=base_lr)``. Paddle's LinearWarmup gives step ``k`` (0-based) the rate
``base_lr * k / warmup`` (step 0 trains at 0) and afterwards asks the wrapped schedule for step
``k - warmup``: the decay boundaries count from the end of the warmup.

arcface_torch (train_v2.py:137-143, lr_scheduler.py:14-42) warms up linearly over ``warmup_epoch`` epochs and
then decays polynomially to 0 at the last step: step ``k`` trains at ``base * k / w``, then at
``base * (1 - (k - w) / (t - w)) ** power``, as :meth:`Schedule.lr` with ``schedule: poly``. Its
PolynomialLRWarmup has power 1 (lr_scheduler.py:7; train_v2.py:140-143 passes none) and trains step 0 at the
full rate (lr_scheduler.py:19-20 keeps the initial rate at ``last_epoch == 0``); the PolyScheduler it replaced
(lr_scheduler.py:4-30 at insightface commit dfa209de) had power 2 and reads its rate one step late.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from plsc.config import OptimConfig, TrainConfig
from plsc.errors import PlscError


def steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of an epoch of ``batches_per_epoch`` loader batches, ``grad_accum``
    (``train.grad_accum``) of them each: the batches past the last whole step are left out, as the images
    past the last whole batch are."""
    steps = batches_per_epoch // grad_accum
    if steps == 0:
        raise PlscError(f"an epoch has {batches_per_epoch} batches of train.batch_size, fewer than the "
                        f"{grad_accum} of one optimizer step (train.grad_accum): lower either")
    return steps


def step_batch(train: TrainConfig, world_size: int) -> int:
    """Images of one optimizer step over every rank: the global batch the schedule and the log count."""
    return train.batch_size * world_size * train.grad_accum


def run_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a whole run: ``train.max_steps`` when set, else ``train.epochs`` epochs (PLSC
    v2.2's ``total_steps = steps_per_epoch * train_num`` for epoch units, dynamic/train.py:87)."""
    return train.max_steps if train.max_steps > 0 else train.epochs * steps_per_epoch


def warmup_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    """The warmup in optimizer steps: ``optim.warmup_steps``, or ``optim.warmup_epochs`` epochs of this run
    (arcface_torch's ``warmup_step = num_image // total_batch_size * warmup_epoch``, train_v2.py:137)."""
    return optim.warmup_steps or optim.warmup_epochs * steps_per_epoch


def base_learning_rate(optim: OptimConfig, global_batch: int) -> float:
    """``optim.lr`` scaled by PLSC's linear rule: the rate is given for a global batch of
    ``optim.lr_reference_batch`` (0: ``optim.lr`` is used as it is)."""
    if optim.lr_reference_batch <= 0:
        return optim.lr
    return optim.lr * global_batch / optim.lr_reference_batch


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step of a run.

    ``decay_steps``: the decay boundaries in global steps as PLSC logs them (``boundary * steps_per_epoch``
    for epoch boundaries); the decayed rate takes effect ``warmup_steps`` later, see :meth:`lr`.
    """

    base_lr: float
    warmup_steps: int
    total_steps: int
    kind: str  # "step" or "poly"
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    poly_power: float = 1.0

    @classmethod
    def from_config(cls, optim: OptimConfig, steps_per_epoch: int, total_steps: int,
                    global_batch: int) -> Schedule:
        per_unit = steps_per_epoch if optim.decay_unit == "epoch" else 1
        return cls(
            base_lr=base_learning_rate(optim, global_batch),
            warmup_steps=warmup_steps(optim, steps_per_epoch),
            total_steps=total_steps,
            kind=optim.schedule,
            decay_steps=tuple(sorted(b * per_unit for b in optim.decay_boundaries)),
            decay_factor=optim.decay_factor,
            poly_power=optim.poly_power,
        )

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        after = step - self.warmup_steps
        if self.kind == "poly":
            span = max(1, self.total_steps - self.warmup_steps)
            return self.base_lr * (1.0 - min(1.0, after / span)) ** self.poly_power
        return self.base_lr * self.decay_factor ** bisect.bisect_right(self.decay_steps, after)

    def phases(self) -> list[tuple[int, float]]:
        """(first step, learning rate) of each constant-rate phase of a step schedule after the warmup."""
        starts = [0, *self.decay_steps]
        return [(self.warmup_steps + s, self.lr(self.warmup_steps + s)) for s in starts
                if self.warmup_steps + s < max(self.total_steps, 1)]

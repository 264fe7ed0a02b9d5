"""The one place that builds the backbone's optimizer (``optim``); it describes the class centers' update too.

- ``optim.name: sgd``: Paddle's ``Momentum``, ``optim.weight_decay`` as L2 added to the gradient, as PLSC v2.2
  (dynamic/train.py:138-146) and arcface_torch's SGD (train_v2.py:121-123, torch's SGD adds it alike).
- ``optim.name: adamw``: Paddle's ``AdamW``. Its ``weight_decay`` is decoupled, as torch's: each step first
  multiplies the weights by ``1 - lr * weight_decay``, then takes the Adam step with bias-corrected moments
  (tests/test_optimizer.py checks it against numpy's formulas). arcface_torch passes only lr and
  weight_decay (train_v2.py:130-132): torch's betas (0.9, 0.999) and eps 1e-8, no AMSGrad, decay on every
  parameter (one group, norms and biases included), which are plsc's defaults.

The class centers are not a Paddle parameter (plsc.loss.partial_fc): they are stepped by sparse momentum SGD
under either optimizer, with the settings the training step gives them
(:func:`plsc.engine.step.center_update`). arcface_torch's AdamW steps its PartialFC weight too
(train_v2.py:130-132 hands it ``module_partial_fc.parameters()``), every row of the shard each step; plsc
does not (docs/design.md, "Training semantics").
"""

from __future__ import annotations

import paddle

from plsc.config import OptimConfig
from plsc.engine.step import center_update


def build_optimizer(optim: OptimConfig, parameters) -> paddle.optimizer.Optimizer:
    """The backbone's optimizer over ``parameters``; the trainer sets its rate every step."""
    if optim.name == "adamw":
        beta1, beta2 = optim.betas
        return paddle.optimizer.AdamW(learning_rate=optim.lr, beta1=beta1, beta2=beta2, epsilon=optim.eps,
                                      parameters=parameters, weight_decay=optim.weight_decay)
    return paddle.optimizer.Momentum(learning_rate=optim.lr, momentum=optim.momentum, parameters=parameters,
                                     weight_decay=optim.weight_decay or None)


def describe_optimizer(optim: OptimConfig) -> str:
    """The backbone's optimizer in words, for the plan."""
    if optim.name == "adamw":
        beta1, beta2 = optim.betas
        return (f"adamw, betas {beta1:g} {beta2:g}, eps {optim.eps:g}, decoupled weight decay "
                f"{optim.weight_decay:g}, every parameter")
    return f"sgd, momentum {optim.momentum:g}, L2 weight decay {optim.weight_decay:g}, every parameter"


def describe_center_update(optim: OptimConfig, momentum_mode: str) -> str:
    """The class centers' update in words, for the plan."""
    rate = "the backbone's rate" if optim.center_lr <= 0 else f"base rate {optim.center_lr:g} on the schedule"
    decay = center_update(optim, optim.lr, 1.0).weight_decay
    return f"sparse momentum {optim.momentum:g} ({momentum_mode}), {rate}, L2 weight decay {decay:g}"

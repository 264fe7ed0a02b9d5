"""Random weights, BN statistics included, for tests that check where tensors go (export, import)."""

from __future__ import annotations

import numpy as np


def random_state(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Default conv/linear init plus perturbed BN statistics, BN affine terms and PReLU alphas, so that a
    misplaced tensor changes the output."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        value = tensor.numpy()
        if key.endswith("_variance"):
            value = value + rng.uniform(0.05, 0.5, value.shape)
        elif value.ndim == 1:  # BN gamma, beta, mean; PReLU alpha; Linear bias
            value = value + rng.normal(0, 0.1, value.shape)
        state[key] = value.astype(np.float32)
    return state

"""Synthetic data for benchmarks and maximum-identities (capacity) runs, as PLSC's capacity scripts use.

Images are random uint8 noise, generated on demand from (seed, index) so that the data set costs no memory or
I/O beyond its label array, and any worker produces the same image for the same index.
"""

from __future__ import annotations

import numpy as np

from plsc.errors import PlscError


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PlscError(f"SyntheticDataset: {name} must be a positive integer, got {value!r}")
    return int(value)


class SyntheticDataset:
    """``num_samples`` random BGR images of ``image_size`` squared with labels uniform in [0, num_classes).

    ``num_classes`` is the requested number, not max(label) + 1: a capacity run declares far more classes than
    it has samples, and the classifier must be sized for all of them.
    """

    def __init__(self, num_samples: int, num_classes: int, image_size: int = 112, seed: int = 0):
        self.num_samples = _positive_int("num_samples", num_samples)
        self.num_classes = _positive_int("num_classes", num_classes)
        self.image_size = _positive_int("image_size", image_size)
        self.seed = int(seed)
        label_rng = np.random.default_rng((self.seed, 0x1AB3))  # own stream: labels don't depend on images
        self.labels = label_rng.integers(0, self.num_classes, size=self.num_samples, dtype=np.int64)
        self.skipped = 0
        self.skipped_reasons: list[str] = []

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        index = int(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        index %= self.num_samples
        rng = np.random.default_rng((self.seed, index))
        size = self.image_size
        image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        return image, int(self.labels[index])

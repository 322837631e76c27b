"""Scores with confidence intervals: paired differences between two policies on the same images, by the bootstrap.

Two policies run on the same held-out images give paired outcomes (1 if image i is classified right, its MACs
ratio, ...). `paired_difference` gives the mean of b - a and a percentile bootstrap interval over the images, the
resampling shared by both so that what the images have in common cancels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval (`low`, `high`) at `level`."""

    mean: float
    low: float
    high: float
    level: float = 0.95

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return not self.contains(0.0)


def bootstrap_mean(values, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of `values` (one per image) and its percentile bootstrap interval over the images."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"expected one value per image (a non-empty 1-D array), got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high), level)


def paired_difference(a, b, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of b - a over paired per-image outcomes, with its bootstrap interval (images resampled together)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need one value per image for both, got shapes {a.shape} and {b.shape}")
    return bootstrap_mean(b - a, resamples, level, seed)


__all__ = ["Interval", "bootstrap_mean", "paired_difference"]

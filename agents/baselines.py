"""Baseline policies with stable-baselines3's `predict` signature, for PranceViT-v0 and `AdaptiveViT`.

Each acts on a single observation or a batch (a leading dimension on `cls`) and returns choice indices for the
fields of the env's action space (heads, MLP width, keep ratio[, merge ratio]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StaticPolicy:
    """The same choice indices at every step: a static subnet.

    Args:
        nvec: number of choices per field (the env's `action_space.nvec`).
        indices: one index per field; negative indices count from the end (-1 is the full choice).
    """

    def __init__(self, nvec: Sequence[int], indices: Sequence[int]) -> None:
        self.nvec = np.asarray(nvec, dtype=np.int64)
        if len(indices) != len(self.nvec):
            raise ValueError(f"expected {len(self.nvec)} indices, got {len(indices)}")
        self.action = np.asarray(indices, dtype=np.int64) % self.nvec

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """The static action, for one observation or a batch."""
        cls = np.asarray(observation["cls"])
        if cls.ndim == 1:
            return self.action.copy(), state
        return np.broadcast_to(self.action, (cls.shape[0], len(self.action))).copy(), state


class FullModelPolicy(StaticPolicy):
    """Every field at its largest choice: the full model."""

    def __init__(self, nvec: Sequence[int]) -> None:
        super().__init__(nvec, [-1] * len(nvec))


class UniformMergePolicy(StaticPolicy):
    """Full widths and one keep ratio index at every block (ToMe-like uniform token reduction)."""

    def __init__(self, nvec: Sequence[int], keep_index: int) -> None:
        super().__init__(nvec, [-1, -1] + [keep_index] * (len(nvec) - 2))


class RandomPolicy:
    """Uniformly random choices, from its own seeded generator."""

    def __init__(self, nvec: Sequence[int], seed: int | None = None) -> None:
        self.nvec = np.asarray(nvec, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """Random actions, for one observation or a batch."""
        cls = np.asarray(observation["cls"])
        shape = (len(self.nvec),) if cls.ndim == 1 else (cls.shape[0], len(self.nvec))
        return self.rng.integers(0, self.nvec, size=shape), state


__all__ = ["FullModelPolicy", "RandomPolicy", "StaticPolicy", "UniformMergePolicy"]

"""Deprecated: selector training is `agents.training` (it trains A2C, MaskablePPO and RecurrentPPO too)."""

import warnings

from .training import SelectorConfig, latest_checkpoint, train_selector

warnings.warn("agents.ppo is now agents.training", DeprecationWarning, stacklevel=2)

__all__ = ["SelectorConfig", "latest_checkpoint", "train_selector"]

"""The selector's features extractor: it reads the CLS token, as PRANCE's selector does."""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


class CLSFeaturesExtractor(BaseFeaturesExtractor):
    """LayerNorm and an MLP over the `cls` observation, joined with `progress` and `price`.

    Wire it through `policy_kwargs=dict(features_extractor_class=CLSFeaturesExtractor)`.

    Args:
        observation_space: PranceViT-v1's `Dict` space (`cls`, `progress`, `price`).
        hidden: width of the MLP's hidden and output layers.
    """

    def __init__(self, observation_space: spaces.Dict, hidden: int = 128) -> None:
        cls_dim = observation_space["cls"].shape[0]
        cls_net = nn.Sequential(
            nn.LayerNorm(cls_dim), nn.Linear(cls_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
        )
        with torch.no_grad():  # the output size, from a dummy forward on a sample
            sample = {k: torch.as_tensor(v[None]) for k, v in observation_space.sample().items()}
            features_dim = self._join(cls_net, sample).shape[1]
        super().__init__(observation_space, features_dim)
        self.cls_net = cls_net

    @staticmethod
    def _join(cls_net: nn.Module, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([cls_net(obs["cls"].float()), obs["progress"].float(), obs["price"].float()], dim=1)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._join(self.cls_net, observations)


__all__ = ["CLSFeaturesExtractor"]

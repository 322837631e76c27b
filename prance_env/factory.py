"""What the single and the vector env share: building the supernet and data, the spaces, prices, conversions."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor
from torch.utils.data import Dataset

import vit
from vit.data import FashionMNIST
from vit.utils import resolve_device

from .core import BatchedInference, MDPConfig, log_price

ACTION_TYPES = ("discrete", "continuous")
CHOICE_KEYS = {
    "heads": "head_choices",
    "mlp_hidden": "mlp_hidden_choices",
    "keep_ratio": "keep_ratio_choices",
    "merge_ratio": "merge_ratio_choices",
}


def build_supernet(
    supernet: str | vit.ElasticViT,
    checkpoint: str | os.PathLike | None,
    token_mode: str | None,
    choices: Mapping[str, Sequence] | None,
    device: torch.device,
) -> vit.ElasticViT:
    """A supernet module as given, or the registered preset `supernet` with its shipped or given weights."""
    if isinstance(supernet, vit.ElasticViT):
        if token_mode not in (None, supernet.token_mode) or choices:
            raise ValueError("token_mode and choices apply to a supernet built by name; configure your module instead")
        return supernet.to(device)
    if not isinstance(supernet, str):
        raise TypeError(f"supernet must be a registered name or a vit.ElasticViT, got {type(supernet).__name__}")
    unknown = set(choices or {}) - set(CHOICE_KEYS)
    if unknown:
        raise ValueError(f"unknown choices {sorted(unknown)}; expected keys among {sorted(CHOICE_KEYS)}")
    kwargs = {CHOICE_KEYS[k]: tuple(v) for k, v in (choices or {}).items()}
    if token_mode is not None:
        kwargs["token_mode"] = token_mode
    model = vit.create_supernet(supernet, pretrained=checkpoint is None, checkpoint=checkpoint, **kwargs)
    return model.to(device)


class ImageSource:
    """Images and labels of a dataset fetched by index onto a device (whole split held there for Fashion-MNIST)."""

    def __init__(self, dataset: Dataset, device: torch.device) -> None:
        self.dataset, self.device = dataset, device
        self.tensors = dataset.tensors(device) if isinstance(dataset, FashionMNIST) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) and labels (B,) of the given dataset indices, on the device."""
        if self.tensors is not None:
            index = torch.as_tensor(indices, device=self.device)
            return self.tensors[0][index], self.tensors[1][index]
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(list(map(int, indices))) if fetch else [self.dataset[int(i)] for i in indices]
        images = torch.stack([torch.as_tensor(x) for x, _ in items]).to(self.device)
        return images, torch.as_tensor([int(y) for _, y in items], device=self.device)


def build_source(
    data: str | Dataset, data_path: str | os.PathLike | None, split: str, model: vit.ElasticViT, device: torch.device
) -> ImageSource:
    """An `ImageSource` over a dataset given by name (`vit.load_dataset`) or as a torch Dataset."""
    dataset = vit.load_dataset(data, split=split, root=data_path, model=model) if isinstance(data, str) else data
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    return ImageSource(dataset, device)


class Prices:
    """The compute price of each episode: fixed, or drawn log-uniformly from `price_range`."""

    def __init__(self, price: float | None, price_range: Sequence[float]) -> None:
        if len(price_range) != 2:
            raise ValueError(f"price_range must be (low, high), got {tuple(price_range)}")
        low, high = (float(price), float(price)) if price is not None else map(float, price_range)
        if not 0 < low <= high:
            raise ValueError(f"prices must satisfy 0 < low <= high, got {(low, high)}")
        self.low, self.high = low, high
        # observed log-prices: the configured range, widened to a fixed price, so the space is never degenerate
        self.bounds = (min(low, float(price_range[0])), max(high, float(price_range[1])))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` prices."""
        if self.low == self.high:
            return np.full(n, self.low)
        return np.exp(rng.uniform(math.log(self.low), math.log(self.high), n))

    def check(self, price: np.ndarray) -> np.ndarray:
        """Prices given in reset options, checked against the observation bounds."""
        price = np.asarray(price, dtype=np.float64)
        if not np.all(np.isfinite(price)) or np.any(price < self.low) or np.any(price > self.high):
            raise ValueError(f"price must lie in [{self.low}, {self.high}], got {price}")
        return price


def single_spaces(inference: BatchedInference, prices: Prices, action_type: str) -> tuple[spaces.Dict, spaces.Space]:
    """The observation and action space of one episode."""
    if action_type not in ACTION_TYPES:
        raise ValueError(f"unknown action_type {action_type!r}; expected one of {', '.join(ACTION_TYPES)}")
    big = np.finfo(np.float32).max
    observation = spaces.Dict(
        {
            "cls": spaces.Box(-big, big, (inference.model.embed_dim,), np.float32),
            "progress": spaces.Box(0.0, 1.0, (3,), np.float32),
            "price": spaces.Box(*log_price(torch.tensor(prices.bounds)).numpy(), (1,), np.float32),
        }
    )
    nvec = np.array(inference.nvec, dtype=np.int64)
    action = (
        spaces.MultiDiscrete(nvec) if action_type == "discrete" else spaces.Box(-1.0, 1.0, (len(nvec),), np.float32)
    )
    return observation, action


def action_indices(inference: BatchedInference, actions, action_type: str, shape: tuple[int, ...]) -> Tensor:
    """Choice indices (B, fields) int64 from actions of exactly `shape`: `(fields,)` for the single env,
    `(num_envs, fields)` for the vector env. Discrete actions are the indices; continuous ones, values in
    [-1, 1], are rounded to them. Raises `ValueError` quoting the value as given, before anything runs."""
    given = np.asarray(actions)
    if given.dtype.kind not in "iuf":
        raise ValueError(f"actions must be numbers (choice indices or values in [-1, 1]), got dtype {given.dtype}")
    if given.shape != shape:
        raise ValueError(f"expected actions of shape {shape} for fields {inference.space.fields}, got {given.shape}")
    rows = given.reshape(-1, len(inference.nvec))
    nvec = np.array(inference.nvec)
    if given.dtype.kind == "f" and not np.all(np.isfinite(rows)):
        where, value, _ = _first_offender(inference, given, ~np.isfinite(rows))
        raise ValueError(f"{where} value {value}: actions contain NaN or Inf")
    if action_type == "continuous":
        if np.any(np.abs(rows) > 1):
            where, value, _ = _first_offender(inference, given, np.abs(rows) > 1)
            raise ValueError(f"{where} value {value}: continuous actions must lie in [-1, 1]")
        return torch.from_numpy(np.rint((rows.astype(np.float64) + 1.0) / 2.0 * (nvec - 1)).astype(np.int64))
    if given.dtype.kind == "f" and not np.all(rows == np.round(rows)):
        where, value, _ = _first_offender(inference, given, rows != np.round(rows))
        raise ValueError(f"{where} index {value}: discrete actions must be whole numbers")
    if np.any((rows < 0) | (rows >= nvec)):
        where, value, n = _first_offender(inference, given, (rows < 0) | (rows >= nvec))
        raise ValueError(f"{where} index {value} out of range [0, {n})")
    return torch.from_numpy(rows.astype(np.int64))  # a copy: the caller's array may be read-only or reused


def _first_offender(inference: BatchedInference, given: np.ndarray, mask: np.ndarray) -> tuple[str, str, int]:
    """Where the first entry of `mask` (B, fields) lies (the action and its field), its value and its field's
    number of choices; values are printed in the caller's dtype, so no cast shows 2**64 - 1 as -1."""
    rows = given.reshape(mask.shape)
    sample, field = (int(i) for i in np.argwhere(mask)[0])
    row = "[" + ", ".join(map(str, rows[sample])) + "]"
    action = f"action {row}" if given.ndim == 1 else f"actions[{sample}] = {row}"
    return f"{action}: {inference.space.fields[field]}", str(rows[sample, field]), inference.nvec[field]


def to_numpy(obs: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Observation tensors as float32 numpy arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in obs.items()}


def make_inference(
    supernet: str | vit.ElasticViT = "prance_fmnist",
    checkpoint: str | os.PathLike | None = None,
    data: str | Dataset = "fashion-mnist",
    data_path: str | os.PathLike | None = None,
    split: str = "train",
    device: str | torch.device = "auto",
    token_mode: str | None = None,
    choices: Mapping[str, Sequence] | None = None,
    reward: str = MDPConfig.reward,
    quality: str = MDPConfig.quality,
    price_range: Sequence[float] = MDPConfig.price_range,
    stem_blocks: int = MDPConfig.stem_blocks,
    blocks_per_step: int = MDPConfig.blocks_per_step,
) -> tuple[BatchedInference, ImageSource]:
    """The MDP over a supernet and its image source, from the env's keyword arguments."""
    config = MDPConfig(
        stem_blocks=stem_blocks,
        blocks_per_step=blocks_per_step,
        reward=reward,
        quality=quality,
        price_range=tuple(price_range),
    )
    device = resolve_device(device)
    model = build_supernet(supernet, checkpoint, token_mode, choices, device)
    return BatchedInference(model, config), build_source(data, data_path, split, model, device)


__all__ = ["ImageSource", "Prices", "action_indices", "make_inference", "single_spaces", "to_numpy"]

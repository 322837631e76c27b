"""What the single and the vector env share: building the supernet and data, the spaces, prices, conversions."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

import vit
from vit.data import SeededItems, batch_loader, default_workers, memory_tensors, to_device
from vit.inference import LoopShape, log_price
from vit.utils import resolve_device

from .core import BatchedInference, MDPConfig

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
    shape: LoopShape = LoopShape(),
) -> vit.ElasticViT:
    """A supernet module as given, or the registered preset `supernet` with its shipped or given weights, offering
    the ratios the decisions of `shape` choose (`LoopShape.supernet_kwargs`) unless `choices` says otherwise."""
    if isinstance(supernet, vit.ElasticViT):
        if token_mode not in (None, supernet.token_mode) or choices:
            raise ValueError("token_mode and choices apply to a supernet built by name; configure your module instead")
        if checkpoint is not None:
            raise ValueError("checkpoint applies to a supernet built by name; load weights into your module instead")
        return supernet.to(device)
    if not isinstance(supernet, str):
        raise TypeError(f"supernet must be a registered name or a vit.ElasticViT, got {type(supernet).__name__}")
    unknown = set(choices or {}) - set(CHOICE_KEYS)
    if unknown:
        raise ValueError(f"unknown choices {sorted(unknown)}; expected keys among {sorted(CHOICE_KEYS)}")
    kwargs = shape.supernet_kwargs() | {CHOICE_KEYS[k]: tuple(v) for k, v in (choices or {}).items()}
    if token_mode is not None:
        kwargs["token_mode"] = token_mode
    model = vit.create_supernet(supernet, pretrained=checkpoint is None, checkpoint=checkpoint, **kwargs)
    return model.to(device)


class _Chunks(Sampler):
    """The batch sampler of an `ImageSource`'s loader: the indices it was last given, in chunks of `size`."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.size = 1

    def __iter__(self) -> Iterator[list[int]]:
        return (self.indices[s : s + self.size] for s in range(0, len(self.indices), self.size))

    def __len__(self) -> int:
        return -(-len(self.indices) // self.size)


class ImageSource:
    """Images and labels of a dataset fetched by index onto a device.

    Fashion-MNIST (or a subset of it) is held on the device whole. Other datasets are decoded by `workers` loader
    processes (None: `vit.data.default_workers()`), started once and kept for the source's life, each decoding
    chunks of a batch; batches are pinned for a CUDA device. With workers, `prefetch(indices)` starts decoding a
    batch from a background thread, so the vector env decodes its next batch while the current episodes run; `get`
    of the same indices then only waits for what is left. With no workers, `get` decodes in the calling thread and
    `prefetch` does nothing: decoding draws from the process-wide generators (below), which the calling thread may
    be drawing from meanwhile. Item `i` is read under generators seeded by `i` (`vit.data.SeededItems`), so even a
    dataset with random transforms gives the same image for the same index.
    """

    MAX_CHUNK = 32  # images per worker task: small enough to spread a batch over the workers

    def __init__(self, dataset: Dataset, device: torch.device, workers: int | None = None) -> None:
        self.dataset, self.device = dataset, device
        self.tensors = memory_tensors(dataset, device)
        self.workers = 0 if self.tensors is not None else default_workers() if workers is None else workers
        self._pending: tuple[np.ndarray, Future] | None = None
        self._loader: DataLoader | None = None
        self._fetcher: ThreadPoolExecutor | None = None
        self._chunks = _Chunks()
        if self.tensors is None:
            self._start()

    def _start(self) -> None:
        """Start the loader, its workers and the fetching thread (again, after `close`), from the calling thread:
        the workers are never forked from the fetching thread."""
        if self._loader is not None:
            return
        self._loader = batch_loader(
            SeededItems(self.dataset, (0,)),
            self.device,
            self.workers,
            batch_sampler=self._chunks,
            persistent_workers=self.workers > 0,
        )
        if self.workers > 0:
            iter(self._loader)  # starts the persistent workers
            self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-source")

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, indices: np.ndarray) -> list[tuple[Tensor, Tensor]]:
        """Decode the images of `indices` (run by the fetching thread when there is one, the only thread then that
        iterates the loader)."""
        self._chunks.indices = indices.tolist()
        self._chunks.size = max(1, min(self.MAX_CHUNK, -(-len(indices) // max(1, self.workers))))
        return list(self._loader)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start decoding the images of `indices` in the background, for a later `get` of the same indices (with
        loader workers only)."""
        if self.tensors is None and self.workers > 0:
            self._start()
            indices = np.array(indices, dtype=np.int64)
            self._discard_pending()
            self._pending = (indices, self._fetcher.submit(self._load, indices))

    def _discard_pending(self) -> None:
        """Drop the prefetch in flight: cancelled if not started, else its failure, if any, raised here."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending[1].cancel() and pending[1].exception() is not None:
            raise pending[1].exception()

    def get(self, indices: np.ndarray) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) and labels (B,) of the given dataset indices, on the device."""
        if self.tensors is not None:
            index = torch.as_tensor(indices, device=self.device)
            return self.tensors[0][index], self.tensors[1][index]
        self._start()
        indices = np.array(indices, dtype=np.int64)
        if self._fetcher is None:
            chunks = self._load(indices)
        else:
            if self._pending is not None and np.array_equal(self._pending[0], indices):
                (_, future), self._pending = self._pending, None
            else:
                self._discard_pending()
                future = self._fetcher.submit(self._load, indices)
            chunks = future.result()
        chunks = list(to_device(chunks, self.device))
        return torch.cat([x for x, _ in chunks]), torch.cat([y for _, y in chunks])

    def close(self) -> None:
        """Stop the fetching thread and the loader's workers; a later `get` starts them again."""
        if self._fetcher is not None:
            self._fetcher.shutdown(cancel_futures=True)
        self._fetcher, self._loader, self._pending = None, None, None  # the dropped loader stops its workers


def build_source(
    data: str | Dataset,
    data_path: str | os.PathLike | None,
    split: str,
    model: vit.ElasticViT,
    device: torch.device,
    workers: int | None = None,
) -> ImageSource:
    """An `ImageSource` over a dataset given by name (`vit.load_dataset`, eval transforms even for the train split)
    or as a torch Dataset."""
    dataset = vit.load_dataset(data, split=split, root=data_path, model=model) if isinstance(data, str) else data
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    return ImageSource(dataset, device, workers)


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
        raise ValueError(f"expected actions of shape {shape} for fields {inference.fields}, got {given.shape}")
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
    return f"{action}: {inference.fields[field]}", str(rows[sample, field]), inference.nvec[field]


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
    token_penalty: float = MDPConfig.token_penalty,
    decisions: str | LoopShape = "per-block",
    stem_blocks: int | None = None,
    blocks_per_step: int | None = None,
    amp: bool = False,
    workers: int | None = None,
) -> tuple[BatchedInference, ImageSource]:
    """The MDP over a supernet and its image source, from the env's keyword arguments."""
    config = MDPConfig(
        shape=LoopShape.named(decisions, stem_blocks, blocks_per_step),
        reward=reward,
        quality=quality,
        price_range=tuple(price_range),
        token_penalty=token_penalty,
    )
    device = resolve_device(device)
    model = build_supernet(supernet, checkpoint, token_mode, choices, device, config.shape)
    return BatchedInference(model, config, amp=amp), build_source(data, data_path, split, model, device, workers)


__all__ = ["ImageSource", "Prices", "action_indices", "make_inference", "single_spaces", "to_numpy"]

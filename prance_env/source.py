"""Images and labels of a dataset fetched by index onto the env's device, the next batch decoded while the current
episodes run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

import vit
from vit.data import SeededItems, batch_loader, default_workers, memory_tensors, to_device


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
    data_dir: str | os.PathLike | None,
    split: str,
    model: vit.ElasticViT,
    device: torch.device,
    workers: int | None = None,
) -> ImageSource:
    """An `ImageSource` over a dataset given by name (`vit.load_dataset`, eval transforms even for the train split)
    or as a torch Dataset."""
    dataset = vit.load_dataset(data, split=split, root=data_dir, model=model) if isinstance(data, str) else data
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    return ImageSource(dataset, device, workers)


__all__ = ["ImageSource", "build_source"]

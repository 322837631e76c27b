"""Per-sample execution by bucketing: a grouping strategy over the one block (`vit.supernet.ElasticBlock`).

Samples whose configurations differ soon hold different numbers of tokens, so a batch is kept as buckets: each
bucket is a dense tensor of the samples that share a token count. To run a block, the batch groups its samples by
(configuration, token count) (`groups`), the model runs every group through the block as one dense `PackedBatch`,
and the groups it returns become the new buckets (`regrouped`).
Nothing is padded or masked: each sample costs exactly what its configuration costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BlockConfig
from .packed import PackedBatch


@dataclass(frozen=True)
class Bucket:
    """Samples of a batch that hold the same number of tokens.

    Attributes:
        index: (b,) positions of the samples in the batch.
        x: (b, 1 + N, C) tokens, CLS first.
        size: (b, 1 + N) token sizes after merging, or None while every token has size 1.
    """

    index: Tensor
    x: Tensor
    size: Tensor | None = None

    @property
    def num_patches(self) -> int:
        """Patch tokens alive in each sample of the bucket."""
        return self.x.shape[1] - 1


def _cat_sizes(parts: list[Bucket]) -> Tensor | None:
    if all(p.size is None for p in parts):
        return None
    return torch.cat([p.x.new_ones(p.x.shape[:2]) if p.size is None else p.size for p in parts])


class BucketedBatch:
    """A batch of token sequences of per-sample length, held as `Bucket`s of equal length.

    Functional: running a block (`ElasticViT.run_block`, through `groups` and `regrouped`) returns a new
    `BucketedBatch` and leaves this one as it was, so a caller can branch (run the rest of the network from here)
    without copying.
    """

    def __init__(self, x: Tensor | None = None, buckets: Sequence[Bucket] | None = None, batch_size: int = 0):
        """Start from dense tokens x (B, 1 + N, C), or from existing buckets of a batch of `batch_size`."""
        if x is not None:
            buckets = [Bucket(torch.arange(x.shape[0], device=x.device), x)] if x.shape[0] else []
            batch_size = x.shape[0]
        self.buckets: list[Bucket] = list(buckets or [])
        self.batch_size = batch_size
        self._order: Tensor | None = None
        self._num_patches: Tensor | None = None

    def groups(self, configs: BlockConfig | Sequence[BlockConfig]) -> list[tuple[Tensor, PackedBatch, BlockConfig]]:
        """The samples grouped by (configuration, token count), configs one for all samples or one per sample
        (batch order): per group, its samples' positions in the batch, their tokens as a dense `PackedBatch`, and
        their configuration (`ElasticViT.run_block` runs each; `regrouped` takes the results back)."""
        groups: dict[tuple[BlockConfig, int], list[Bucket]] = {}
        for bucket in self.buckets:
            for config, part in self._split(bucket, configs):
                groups.setdefault((config, bucket.num_patches), []).append(part)
        out = []
        for (config, _), parts in groups.items():
            index = parts[0].index if len(parts) == 1 else torch.cat([p.index for p in parts])
            x = parts[0].x if len(parts) == 1 else torch.cat([p.x for p in parts])
            out.append((index, PackedBatch(x, size=_cat_sizes(parts)), config))
        return out

    def regrouped(self, groups: Sequence[tuple[Tensor, PackedBatch]]) -> BucketedBatch:
        """The batch whose groups of samples (their positions in the batch) now hold these dense tokens."""
        buckets = []
        for index, tokens in groups:
            x, size, _ = tokens.dense()
            buckets.append(Bucket(index, x, size))
        return BucketedBatch(buckets=buckets, batch_size=self.batch_size)

    @staticmethod
    def _split(bucket: Bucket, configs: BlockConfig | Sequence[BlockConfig]) -> list[tuple[BlockConfig, Bucket]]:
        """The parts of `bucket` that share a configuration (the whole bucket when all do)."""
        if isinstance(configs, BlockConfig):
            return [(configs, bucket)]
        members: dict[BlockConfig, list[int]] = {}
        for row, sample in enumerate(bucket.index.tolist()):
            members.setdefault(configs[sample], []).append(row)
        if len(members) == 1:
            return [(next(iter(members)), bucket)]
        parts = []
        for config, rows in members.items():
            rows_t = torch.tensor(rows, device=bucket.x.device)
            size = None if bucket.size is None else bucket.size[rows_t]
            parts.append((config, Bucket(bucket.index[rows_t], bucket.x[rows_t], size)))
        return parts

    def gather(self, fn) -> Tensor:
        """Stack `fn(bucket)` (a (b, ...) tensor per bucket) back into batch order: (B, ...)."""
        values = torch.cat([fn(b) for b in self.buckets])
        out = values.new_empty((self.batch_size, *values.shape[1:]))
        out[self._index()] = values
        return out

    def _index(self) -> Tensor:
        if self._order is None:
            self._order = torch.cat([b.index for b in self.buckets])
        return self._order

    def cls(self) -> Tensor:
        """The CLS token of every sample, in batch order: (B, C)."""
        return self.gather(lambda b: b.x[:, 0])

    def patch_mean(self, norm: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Per sample, the mean of its patch tokens weighted by their sizes, each token passed through `norm` first
        when given, in batch order: (B, C)."""

        def mean(bucket: Bucket) -> Tensor:
            patches = bucket.x[:, 1:] if norm is None else norm(bucket.x[:, 1:])
            if bucket.size is None:
                return patches.mean(dim=1)
            weight = bucket.size[:, 1:, None].to(patches.dtype)
            return (patches * weight).sum(dim=1) / weight.sum(dim=1)

        return self.gather(mean)

    def num_patches(self) -> Tensor:
        """Patch tokens alive per sample, in batch order: (B,) int64 (computed once per batch)."""
        if self._num_patches is None:
            self._num_patches = self.gather(lambda b: torch.full_like(b.index, b.num_patches))
        return self._num_patches


__all__ = ["Bucket", "BucketedBatch"]

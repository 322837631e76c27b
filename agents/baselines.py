"""Baselines for the selector.

Policies with stable-baselines3's `predict` signature, for PranceViT-v1 and `AdaptiveViT`: each acts on a single
observation or a batch (a leading dimension on `cls`) and returns choice indices for the fields of the env's action
space (heads, MLP width, keep ratio[, merge ratio]).

Token-reduction heuristics from the work PRANCE compares with, at full width on the supernet's blocks (any token
mode it was trained in: they prune and merge through its `prune_merge` path), as `agents.evaluation` methods
(images to an `Outcome`):

- `PruneMergeSchedule`, Prune-and-Merge style: a static schedule, every block from `start` pruning to a fixed
  keep rate, then merging the survivors to another.
- `PPTHeuristic`, PPT style: at every block from `start`, per image, prune when the CLS token's attention over the
  patches is spread out (its variance above a threshold: a few tokens clearly matter) and merge when it is flat,
  the same number of tokens either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vit import BlockConfig, ElasticViT
from vit.inference import DecisionSchedule, InferenceRunner, reduces_tokens
from vit.token_ops import cls_attention

from .metrics import Outcome


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
    """Full widths and one keep ratio index at every reduction (ToMe-like uniform token reduction).

    Args:
        nvec: number of choices per field (the env's `action_space.nvec`).
        keep_index: the index of every token field (keep ratio, and merge ratio in `prune_merge` mode).
        fields: the names of the fields (`env.unwrapped.codec.fields`); those of `keep_ratio` and `merge_ratio`
            are the token fields. Default: per-block decisions, heads and MLP width first, then the token fields;
            grouped and one-shot decisions need their names.
    """

    def __init__(self, nvec: Sequence[int], keep_index: int, fields: Sequence[str] | None = None) -> None:
        if fields is None:
            tokens = [i >= 2 for i in range(len(nvec))]
        elif len(fields) != len(nvec):
            raise ValueError(f"expected {len(nvec)} field names, got {len(fields)}")
        else:
            tokens = [reduces_tokens(name) for name in fields]
        super().__init__(nvec, [keep_index if token else -1 for token in tokens])


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


class _FullWidthReduction:
    """Full width at every block, tokens pruned and merged as `configs` says, block by block, through a
    `vit.InferenceRunner` deciding every block in `prune_merge` mode."""

    def __init__(self, model: ElasticViT, start: int) -> None:
        if not 0 <= start < model.depth:
            raise ValueError(f"start must be a block index in [0, {model.depth}), got {start}")
        self.model, self.start = model, start
        self.largest = model.search_space.largest()
        self.runner = InferenceRunner(model, DecisionSchedule(stem_blocks=0), token_mode="prune_merge")

    def configs(
        self, i: int, x: Tensor, size: Tensor | None, quantile: float | None
    ) -> tuple[list[BlockConfig], Tensor]:
        """Block `i`'s configuration of each image of the dense tokens x (B, 1 + N, C), and the MACs (B,) spent on
        choosing them; `quantile`: calibrating (PPT's thresholds)."""
        raise NotImplementedError

    def __call__(self, images: Tensor) -> Outcome:
        return self._run(images, None)

    @torch.inference_mode()
    def _run(self, images: Tensor, quantile: float | None) -> Outcome:
        runner = self.runner
        state = runner.start(images.to(self.model.pos_embed.dtype))
        chosen = torch.zeros(state.batch_size, dtype=torch.float64, device=images.device)  # MACs spent choosing
        while not state.done:
            x, size, _ = state.tokens.dense()
            configs, spent = self.configs(state.next_block, x, size, quantile)
            chosen = chosen + spent
            state = runner.advance(state, configs)
        B = state.batch_size
        return Outcome(
            runner.complete(state), (state.macs + chosen).float(), [self.largest] * B, state.tokens.num_patches()
        )


class PruneMergeSchedule(_FullWidthReduction):
    """Prune-and-Merge-style static token schedule: at every block from `start`, the patch tokens pruned to
    `prune_keep` of them (lowest CLS attention first), then the survivors merged to `merge_keep` (into their most
    similar kept token), full widths throughout. `prune_keep=1` is uniform merging, `merge_keep=1` uniform pruning.
    """

    def __init__(self, model: ElasticViT, prune_keep: float, merge_keep: float, start: int = 0) -> None:
        super().__init__(model, start)
        if not (0 < prune_keep <= 1 and 0 < merge_keep <= 1):
            raise ValueError(f"keep rates must lie in (0, 1], got {prune_keep} and {merge_keep}")
        self.prune_keep, self.merge_keep = prune_keep, merge_keep

    def __str__(self) -> str:
        return f"prune {self.prune_keep:g}, merge {self.merge_keep:g} from block {self.start}"

    def configs(
        self, i: int, x: Tensor, size: Tensor | None, quantile: float | None
    ) -> tuple[list[BlockConfig], Tensor]:
        config = self.largest[i]
        if i >= self.start:
            config = replace(config, keep_ratio=self.prune_keep, merge_ratio=self.merge_keep)
        return [config] * x.shape[0], torch.zeros((), dtype=torch.float64, device=x.device)


class PPTHeuristic(_FullWidthReduction):
    """PPT-style adaptive token reduction: at every block from `start`, each image keeps `keep_ratio` of its patch
    tokens, by pruning (lowest CLS attention first) when the variance of the CLS token's attention over its patch
    tokens exceeds the block's threshold, else by merging (into the most similar kept token). Full widths.

    The attention is the block's own, at all heads, computed on the tokens entering the block: its keys and the
    CLS query cost MACs that are counted with the image's. `calibrate` sets each block's threshold to a quantile of
    the variances met on some images (by default the median: half of them prune).
    """

    def __init__(self, model: ElasticViT, keep_ratio: float, start: int = 0, thresholds: Sequence[float] | None = None):
        super().__init__(model, start)
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio}")
        if thresholds is not None and len(thresholds) != model.depth:
            raise ValueError(f"expected one threshold per block ({model.depth}), got {len(thresholds)}")
        self.keep_ratio = keep_ratio
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]

    def __str__(self) -> str:
        return f"keep {self.keep_ratio:g} from block {self.start}"

    def variance(self, i: int, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per image, the (population) variance of block `i`'s CLS attention over the patch tokens x (B, 1 + N, C)
        (all heads, averaged), float32 (B,), and the MACs of computing it (keys, CLS query, its attention row)."""
        block = self.model.blocks[i]
        attn = block.attn
        B, T, C = x.shape
        weight, bias = attn.qkv_params(attn.num_heads)
        inner = attn.num_heads * attn.head_dim
        y = block.norm1(x)
        query = F.linear(y[:, 0], weight[:inner], None if bias is None else bias[:inner])
        keys = F.linear(y, weight[inner : 2 * inner], None if bias is None else bias[inner : 2 * inner])
        query = query.view(B, attn.num_heads, attn.head_dim)
        keys = keys.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
        scores = cls_attention(query, keys, attn.scale, None if size is None else size.log())
        macs = T * C * inner + C * inner + T * inner
        return scores.float().var(dim=1, correction=0), torch.tensor(float(macs), dtype=torch.float64, device=x.device)

    def calibrate(self, batches: Iterable[Tensor | tuple[Tensor, ...]], quantile: float = 0.5) -> PPTHeuristic:
        """Set each block's threshold to the `quantile` of the variances that the images of `batches` (images, or
        tuples of images and more) meet there, block by block, each threshold applied before the next is measured.
        Returns self."""
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
        images = torch.cat([b[0] if isinstance(b, (tuple, list)) else b for b in batches])
        self.thresholds = [float("inf")] * self.model.depth
        self._run(images, quantile)  # all the images as one batch: each threshold is set from all of them
        return self

    def configs(
        self, i: int, x: Tensor, size: Tensor | None, quantile: float | None
    ) -> tuple[list[BlockConfig], Tensor]:
        full = self.largest[i]
        if i < self.start:
            return [full] * x.shape[0], torch.zeros((), dtype=torch.float64, device=x.device)
        if self.thresholds is None:
            raise RuntimeError("PPTHeuristic needs thresholds: pass them or call calibrate(images) first")
        var, macs = self.variance(i, x, size)
        if quantile is not None:
            self.thresholds[i] = float(torch.quantile(var.double(), quantile))
        by_prune = replace(full, keep_ratio=self.keep_ratio, merge_ratio=1.0)
        by_merge = replace(full, keep_ratio=1.0, merge_ratio=self.keep_ratio)
        return [by_prune if p else by_merge for p in (var > self.thresholds[i]).tolist()], macs


__all__ = [
    "FullModelPolicy",
    "PPTHeuristic",
    "PruneMergeSchedule",
    "RandomPolicy",
    "StaticPolicy",
    "UniformMergePolicy",
]

"""Token reduction inside a block, written once for dense and per-sample batches, in ToMe's style.

Reduction runs in two steps:

1. `assign_tokens` ranks the patch tokens by CLS attention (`cls_attention`) and assigns each a *slot* of the
   reduced sequence, once: the `final` best keep their own slot (in position order), the next `pruned - final` are
   merged into the slot of their most similar kept token (cosine of keys; ties go to the first), the rest are
   pruned (slot -1). Counts are per sample, so one call serves samples of different lengths padded to the longest.
2. `Reduction.from_slots` turns the slots into a map from input rows to output rows, built once, and *applies* it:
   `mean` to tokens (the size-weighted mean of the tokens sent to a slot), `sum` to sizes and, for visualisation, to
   ToMe's source map.

Token counts are plain integers decided by `token_schedule`, so the model, the FLOPs count and the env all agree on
them. The ranking and the assignment are computed without gradients (as in ToMe and EViT); applying them is
differentiable, so gradients reach every kept or merged token. A dense batch (B, 1 + N, C) is the case of `vit.packed`'s
batches of per-sample lengths in which every sequence reduces alike.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BlockConfig


def kept_tokens(n: int, ratio: float) -> int:
    """Patch tokens kept out of `n` at keep ratio `ratio`: max(1, round(ratio * n)), rounding halves up."""
    if ratio >= 1.0 or n <= 1:
        return n
    return min(n, max(1, math.floor(round(ratio * n, 9) + 0.5)))  # round(., 9): 0.7 * 45 is 31.4999...


@functools.lru_cache(maxsize=4096)
def token_schedule(n: int, config: BlockConfig, token_mode: str) -> tuple[int, int]:
    """Patch tokens left after the pruning stage and after the merging stage of a block entered with `n`.

    `prune` mode only prunes and `merge` mode only merges (both at `keep_ratio`); `prune_merge` prunes at
    `keep_ratio`, then merges the survivors at `merge_ratio`.
    """
    if token_mode == "prune":
        return kept_tokens(n, config.keep_ratio), kept_tokens(n, config.keep_ratio)
    if token_mode == "merge":
        return n, kept_tokens(n, config.keep_ratio)
    pruned = kept_tokens(n, config.keep_ratio)
    return pruned, kept_tokens(pruned, config.merge_ratio)


def cls_attention(
    query: Tensor, keys: Tensor, scale: float, bias: Tensor | None = None, heads: Tensor | None = None
) -> Tensor:
    """The CLS token's attention to the patch tokens, averaged over the heads a sample runs.

    Only the CLS query row is computed, so the main attention can stay fused.
    query: (B, H, d), the CLS token's queries; keys: (B, H, T, d), token 0 the CLS token's; bias: (B, T) additive
    logits (log size, and -inf at padding) or None; heads: (B,) the first `heads[b]` heads count for sample b (None:
    all). Returns (B, T - 1).
    """
    logits = (query[:, :, None] * scale) @ keys.transpose(-2, -1)  # (B, H, 1, T)
    if bias is not None:
        logits = logits + bias[:, None, None]
    probs = logits.softmax(dim=-1)[:, :, 0, 1:]  # (B, H, T - 1)
    if heads is None:
        return probs.mean(dim=1)
    run = torch.arange(probs.shape[1], device=probs.device) < heads[:, None]
    return (probs * run[:, :, None]).sum(dim=1) / heads[:, None]


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for x (B, N) or (B, N, C) and index (B, K)."""
    if x.dim() == 2:
        return x.gather(1, index)
    B, N, C = x.shape  # rows of C values: one index_select over the flattened batch, far faster than gather
    flat = index + N * torch.arange(B, device=index.device)[:, None]
    return x.reshape(B * N, C).index_select(0, flat.view(-1)).view(B, index.shape[1], C)


@torch.no_grad()
def assign_tokens(
    scores: Tensor,
    keys: Tensor | None,
    pruned: Tensor | int,
    final: Tensor | int,
    valid: Tensor | None = None,
    bounds: tuple[int, int] | None = None,
) -> Tensor:
    """Rank the patch tokens and assign each its slot in the reduced sequence: (B, N) int64.

    The `final` tokens of highest score keep a slot each, 0..final-1 in position order; the tokens ranked
    final..pruned-1 go to the slot of their most similar kept token (cosine of `keys`, ties to the first); the rest,
    and padding, get -1 (pruned).

    scores: (B, N) CLS attention; keys: (B, N, D), needed when some sample merges (`pruned > final`); pruned, final:
    per-sample counts (B,) or one int for all; valid: (B, N) bool, False at padding (None: no padding); bounds: the
    largest `pruned - final` and `final` when the caller knows them (no device-to-host copies on a GPU).
    """
    B, N = scores.shape
    device = scores.device
    pruned, final = (torch.as_tensor(t, device=device).expand(B) for t in (pruned, final))
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=device).expand(B, N))
    kept = rank < final[:, None]
    slot = torch.where(kept, kept.cumsum(1) - 1, -1)
    S, K = (int((pruned - final).max()), int(final.max())) if bounds is None else bounds
    if S == 0:
        return slot
    # the merged tokens (ranks final..pruned-1) and the kept ones (position order, so a slot is an index here)
    targets = torch.arange(K, device=device) < final[:, None]
    targets_at = torch.where(targets, order[:, :K], N).sort(dim=-1).values.clamp_(max=N - 1)
    source_rank = final[:, None] + torch.arange(S, device=device)
    sources = source_rank < pruned[:, None]
    sources_at = order.gather(1, source_rank.clamp(max=N - 1))
    keys = F.normalize(keys, dim=-1)
    similarity = _gather_tokens(keys, sources_at) @ _gather_tokens(keys, targets_at).transpose(1, 2)  # (B, S, K)
    into = similarity.masked_fill_(~targets[:, None, :], float("-inf")).argmax(-1)
    slot = torch.cat([slot, slot.new_empty(B, 1)], dim=1)  # a last column for the sources beyond `pruned`
    slot.scatter_(1, torch.where(sources, sources_at, N), into)
    return slot[:, :N]


class Reduction:
    """The map of a token reduction from input rows to output rows, and its application to per-token tensors.

    Rows are those of a (T, ...) tensor of tokens: a dense batch flattened, or a packed one. `dst[r]` is the output
    row of input row r, `rows` (the number of output rows) for a pruned token. Every output row receives at least one
    input row, the first of which (by input row) keeps its place: `sum` and `mean` gather those, then scatter-add the
    merged rest.

    Args:
        dst: (T,) int64 output row of every input row.
        rows: number of output rows.
        merges: whether two input rows may share an output row (else `sum` and `mean` are plain gathers).
    """

    def __init__(self, dst: Tensor, rows: int, merges: bool) -> None:
        self.dst, self.rows, self.merges = dst, rows, merges
        T = dst.shape[0]
        position = torch.arange(T, device=dst.device)
        # the first input row of each output row
        self.src = dst.new_full((rows + 1,), T).scatter_reduce_(0, dst, position, "amin")[:rows]
        if merges:  # the other rows sent somewhere, and where
            first = torch.zeros(T + 1, dtype=torch.bool, device=dst.device)
            first[self.src] = True
            self.merged = ((dst < rows) & ~first[:T]).nonzero().squeeze(1)
            self.into = dst.index_select(0, self.merged)

    @classmethod
    def from_slots(
        cls,
        slot: Tensor,
        starts: Tensor,
        out_starts: Tensor,
        rows: int,
        merges: bool,
        valid: Tensor | None = None,
        dst: Tensor | None = None,
    ) -> Reduction:
        """The reduction that sends the patch tokens of b sequences to the slots `assign_tokens` gave them.

        slot: (b, N) from `assign_tokens`; starts: (b,) the input row of each sequence's CLS token, its patches in
        the rows after it; out_starts: (b,) the output row of its CLS token, its slots in the rows after it; rows:
        the number of output rows; merges: whether some slot receives several tokens; valid: (b, N) False at a
        padded sequence's padding (None: none padded). `dst` gives the output row of every input row for the rows
        not of these sequences (the others keep theirs; None: every input row is one of these sequences', as in a
        dense batch (B, 1 + N, ...) flattened)."""
        b, N = slot.shape
        target = torch.where(slot >= 0, out_starts[:, None] + 1 + slot, rows)
        if dst is None:
            return cls(torch.cat([out_starts[:, None], target], dim=1).view(-1), rows, merges)
        patch_rows = starts[:, None] + 1 + torch.arange(N, device=slot.device)
        dst = dst.clone()
        if valid is None:
            dst[patch_rows.view(-1)] = target.view(-1)
        else:
            dst[patch_rows[valid]] = target[valid]
        return cls(dst, rows, merges)

    def sum(self, t: Tensor) -> Tensor:
        """Per output row, the sum of the rows of t (T, ...) sent to it: sizes, ToMe's source map."""
        out = t.index_select(0, self.src)
        return out.index_add_(0, self.into, t.index_select(0, self.merged)) if self.merges else out

    def mean(self, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The tokens x (T, C) and their sizes (T,) or None after the reduction: each output token is the
        size-weighted mean of the tokens sent to it. Sizes stay None while no token merges."""
        if not self.merges:
            return x.index_select(0, self.src), None if size is None else size.index_select(0, self.src)
        size = x.new_ones(x.shape[0]) if size is None else size
        total = self.sum(size)
        kept = x.index_select(0, self.src) * size.index_select(0, self.src)[:, None].to(x.dtype)
        merged = x.index_select(0, self.merged) * size.index_select(0, self.merged)[:, None].to(x.dtype)
        return kept.index_add_(0, self.into, merged).div_(total[:, None].to(x.dtype)), total


__all__ = [
    "Reduction",
    "assign_tokens",
    "cls_attention",
    "kept_tokens",
    "token_schedule",
]

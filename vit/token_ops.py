"""Token reduction inside a block, written once for dense and per-sample batches, in ToMe's style.

Reduction runs in two steps:

1. `assign_tokens` ranks the patch tokens by CLS attention (`cls_attention`) and assigns each a *slot* of the
   reduced sequence, once: the `final` best keep their own slot (in position order), the next `pruned - final` are
   merged into the slot of their most similar kept token (cosine of keys; ties go to the first), the rest are
   pruned (slot -1). Counts are per sample, so one call serves samples of different lengths padded to the longest.
2. `Reduction` turns the slots into a map from input rows to output rows and *applies* it: `mean` to tokens (the
   size-weighted mean of the tokens sent to a slot), `sum` to sizes and, for visualisation, to ToMe's source map.

Token counts are plain integers decided by `token_schedule`, so the model, the FLOPs count and the env all agree on
them. The ranking and the assignment are computed without gradients (as in ToMe and EViT); applying them is
differentiable, so gradients reach every kept or merged token. `reduce_tokens` is the whole reduction of a dense
batch (B, 1 + N, C); `vit.packed` calls the same two steps on a batch of per-sample lengths.
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


def size_bias(size: Tensor | None) -> Tensor | None:
    """Additive attention bias log(size) for proportional attention, as an `F.scaled_dot_product_attention` mask
    (B, 1, 1, T); None when unmerged. (`cls_attention` takes the (B, T) log-sizes themselves.)"""
    return None if size is None else size.log()[:, None, None, :]


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


def reduce_tokens(
    x: Tensor,
    size: Tensor | None,
    scores: Tensor,
    keys: Tensor,
    schedule: tuple[int, int],
    token_mode: str | None = None,
    source: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Apply a block's token reduction to a dense batch, given its `token_schedule` (pruned count, final count).

    x: (B, 1 + N, C); size: (B, 1 + N) or None; scores: CLS attention (B, N); keys: patch keys (B, N, D).
    `token_mode` is implied by the schedule and kept for callers that pass it.

    Returns x (B, 1 + final, C) and size, and, when `source` is given, the source reduced as the tokens were
    (ToMe's source tracing). A source (B, 1 + N, S), float, maps each token to the original tokens it holds: start
    from the identity (B, 1 + N0, 1 + N0) at the embedding; pruning drops rows, merging sums them. Each original
    token then belongs to exactly one token unless pruned, and where sizes are tracked they equal the row sums.
    """
    B, L, C = x.shape
    pruned, final = schedule
    slot = assign_tokens(scores, keys, pruned, final)
    reduction = dense_reduction(slot, final, merges=final < pruned)
    x, size = reduction.mean(x.reshape(B * L, C), None if size is None else size.reshape(B * L))
    x, size = x.view(B, 1 + final, C), None if size is None else size.view(B, 1 + final)
    if source is None:
        return x, size
    return x, size, reduction.sum(source.reshape(B * L, -1)).view(B, 1 + final, -1)


def dense_reduction(slot: Tensor, final: int, merges: bool) -> Reduction:
    """The `Reduction` of a dense batch (B, 1 + N, ...) flattened to rows, its patches assigned `slot` (B, N) of
    `final` slots; `merges`: whether some slot receives more than one token."""
    B = slot.shape[0]
    out = 1 + final
    start = out * torch.arange(B, device=slot.device)[:, None]
    patches = torch.where(slot >= 0, start + 1 + slot, B * out)
    dst = torch.cat([start, patches], dim=1).view(-1)
    return Reduction(dst, B * out, merges)


__all__ = [
    "Reduction",
    "assign_tokens",
    "cls_attention",
    "dense_reduction",
    "kept_tokens",
    "reduce_tokens",
    "size_bias",
    "token_schedule",
]

"""Token reduction inside a block: pruning, merging, and both, ranked by CLS attention.

Every function works on a batch whose samples hold the same number of tokens, token 0 being CLS, which is always
kept. Token counts are plain integers decided by `token_schedule`, so the model, the FLOPs count and the env all
agree on them. Indices are computed under `torch.no_grad()` (the ranking is not differentiated, as in ToMe and
EViT); gathering and averaging the tokens is, so gradients reach every kept or merged token. An optional `source`
traces which original tokens each token holds (ToMe's source tracing, for visualisation); left out, it costs nothing.
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
    """Additive attention bias log(size) for proportional attention, shaped (B, 1, 1, T); None when unmerged."""
    return None if size is None else size.log()[:, None, None, :]


def cls_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """The CLS token's attention to the patch tokens, averaged over heads.

    Only the CLS query row is computed (q_cls . K^T), so the main attention can stay fused.
    q, k: (B, h, T, d); bias: (B, 1, 1, T) or None. Returns (B, T - 1).
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, h, 1, T)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for x (B, N) or (B, N, C) and index (B, K)."""
    if x.dim() == 2:
        return x.gather(1, index)
    B, N, C = x.shape  # rows of C values: one index_select over the flattened batch, far faster than gather
    flat = index + N * torch.arange(B, device=index.device)[:, None]
    return x.reshape(B * N, C).index_select(0, flat.view(-1)).view(B, index.shape[1], C)


@torch.no_grad()
def top_tokens(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Split patch positions by score: the top `k` (ascending position order) and the rest. scores: (B, N)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order[:, :k].sort(dim=-1).values, order[:, k:]


def prune(x: Tensor, size: Tensor | None, scores: Tensor, k: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """Keep CLS and the `k` patch tokens of highest score.

    x: (B, 1 + N, C); size: (B, 1 + N) or None; scores: (B, N). Returns x (B, 1 + k, C), size and the kept
    patch positions (B, k), so callers can carry other per-token tensors along.
    """
    keep, _ = top_tokens(scores, k)
    index = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)
    return _gather_tokens(x, index), None if size is None else _gather_tokens(size, index), keep


def _sum_into(t: Tensor, dst: Tensor, src: Tensor, assign: Tensor) -> Tensor:
    """The rows of t (B, N) or (B, N, D) at `dst` (B, k), each plus the rows at `src` assigned to it (B, N - k)."""
    index = assign if t.dim() == 2 else assign[..., None].expand(-1, -1, t.shape[-1])
    return _gather_tokens(t, dst).scatter_add(1, index, _gather_tokens(t, src))


def merge(
    x: Tensor, size: Tensor | None, scores: Tensor, keys: Tensor, k: int, source: Tensor | None = None
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Merge the patch tokens into the `k` of highest score.

    The top-k tokens by score are the destinations; every other token is averaged into its most similar
    destination (cosine of keys), weighted by token size. Returns x (B, 1 + k, C) and the new sizes (B, 1 + k).
    x: (B, 1 + N, C); size: (B, 1 + N) or None (all ones); scores: (B, N); keys: (B, N, D).
    source: optional float (B, 1 + N, S), the original tokens each token holds (see `reduce_tokens`); when given,
    its rows are summed like the sizes and returned as a third value (B, 1 + k, S).
    """
    if size is None:
        size = x.new_ones(x.shape[:2])
    dst, src = top_tokens(scores, k)
    with torch.no_grad():
        keys = F.normalize(keys, dim=-1)
        similarity = _gather_tokens(keys, src) @ _gather_tokens(keys, dst).transpose(-2, -1)  # (B, N - k, k)
        assign = similarity.argmax(dim=-1)  # (B, N - k): destination of each source
    patches, patch_size = x[:, 1:], size[:, 1:]
    merged = _sum_into(patches * patch_size[..., None], dst, src, assign)
    merged_size = _sum_into(patch_size, dst, src, assign)
    x = torch.cat([x[:, :1], merged / merged_size[..., None]], dim=1)
    size = torch.cat([size[:, :1], merged_size], dim=1)
    if source is None:
        return x, size
    return x, size, torch.cat([source[:, :1], _sum_into(source[:, 1:], dst, src, assign)], dim=1)


def reduce_tokens(
    x: Tensor,
    size: Tensor | None,
    scores: Tensor,
    keys: Tensor,
    schedule: tuple[int, int],
    token_mode: str,
    source: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Apply a block's token reduction, given its `token_schedule` (pruned count, final count).

    x: (B, 1 + N, C); size: (B, 1 + N) or None; scores: CLS attention (B, N); keys: patch keys (B, N, D).

    Returns x and size, and, when `source` is given, the source reduced as the tokens were (ToMe's source
    tracing). A source (B, 1 + N, S), float, maps each token to the original tokens it holds: start from the
    identity (B, 1 + N0, 1 + N0) at the embedding; pruning drops rows, merging sums them. Each original token then
    belongs to exactly one token unless pruned, and where sizes are tracked they equal the row sums.
    """
    pruned, final = schedule
    n = x.shape[1] - 1
    if pruned < n:
        x, size, keep = prune(x, size, scores, pruned)
        if source is not None:
            source = torch.cat([source[:, :1], _gather_tokens(source[:, 1:], keep)], dim=1)
        if final < pruned:
            scores, keys = _gather_tokens(scores, keep), _gather_tokens(keys, keep)
    if final < pruned:
        x, size, *traced = merge(x, size, scores, keys, final, source)
        source = traced[0] if traced else None
    return (x, size) if source is None else (x, size, source)


__all__ = [
    "cls_attention",
    "kept_tokens",
    "merge",
    "prune",
    "reduce_tokens",
    "size_bias",
    "token_schedule",
    "top_tokens",
]

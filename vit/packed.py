"""Per-sample execution on packed tokens.

A batch whose samples hold different numbers of tokens and run different widths is kept as one (T, C) matrix of
tokens, each sample's sequence contiguous (CLS first, then its patches in position order). A block runs in a few
dense operations whatever the mixture of configurations:

- the samples are reordered by number of heads, so that every width's linear layers run once, on a contiguous
  slice of the tokens and on prefix slices of the weights; they are reordered again by MLP width for the MLP;
- the attention core runs on (sample, head) pairs: the pairs of samples of similar token count are gathered into
  one padded (pairs, L, head_dim) batch, the padding keys masked out, so the only waste is the padding of the core
  and no sample pays for heads it does not run;
- token reduction (ranking by CLS attention, pruning, merging) runs on the same padded groups with per-sample
  token counts.

Each sample costs what its configuration costs, up to the padding of the attention core and of merging's key
similarity (`tests/test_flops.py` bounds the excess), and gets the result it gets alone up to floating-point
summation order. A batch whose samples share one configuration and token count runs the dense block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BlockConfig
from .token_ops import token_schedule

if TYPE_CHECKING:
    from .supernet import ElasticBlock, ElasticViT

#: Samples share a padded attention group while their token counts are within this factor of the group's largest.
GROUP_RATIO = 1.5


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim; for rows shorter than 16, where torch's CPU kernel is several times slower than
    this, by max, exp and sum."""
    if scores.shape[-1] >= 16 or scores.is_cuda:
        return scores.softmax(-1)
    e = (scores - scores.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def _ranges(starts: Tensor, lengths: Tensor, total: int) -> Tensor:
    """The concatenated ranges [starts[i], starts[i] + lengths[i]): (total,) int64."""
    offsets = lengths.cumsum(0) - lengths
    return torch.repeat_interleave(starts - offsets, lengths, output_size=total) + torch.arange(
        total, device=starts.device
    )


def _runs(order: list[int], key: list[int], lengths: list[int]) -> list[tuple[int, int, int]]:
    """(value, first token, tokens) of each run of equal `key[s]` along `order`."""
    runs, token = [], 0
    for s in order:
        if runs and runs[-1][0] == key[s]:
            runs[-1][2] += lengths[s]
        else:
            runs.append([key[s], token, lengths[s]])
        token += lengths[s]
    return [tuple(r) for r in runs]


class PackedBatch:
    """A batch of token sequences of per-sample length, packed into one (T, C) matrix.

    Functional: `apply_block` returns a new batch and leaves this one as it was, so a caller can branch (run the
    rest of the network from here) without copying.

    Attributes:
        x: (T, C) tokens; sample `order[0]`'s sequence first, CLS first in each.
        order: the samples in the order their sequences are stored.
        lengths: tokens (1 + patches) of each sample, in batch order.
        size: (T,) token sizes after merging, or None while every token has size 1.
    """

    def __init__(
        self,
        x: Tensor,
        lengths: Sequence[int] | None = None,
        size: Tensor | None = None,
        order: Sequence[int] | None = None,
    ) -> None:
        """Start from dense tokens x (B, 1 + N, C), or from packed tokens x (T, C) with their `lengths` (and
        `order`, batch order by default)."""
        if lengths is None:
            B, L, C = x.shape
            x, lengths = x.reshape(B * L, C), [L] * B
        self.x, self.size = x, size
        self.lengths = list(lengths)
        self.order = list(range(len(self.lengths))) if order is None else list(order)
        self._starts: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _start_list(self) -> list[int]:
        """Row of each sample's CLS token, in batch order."""
        if self._starts is None:
            starts, row = [0] * self.batch_size, 0
            for s in self.order:
                starts[s] = row
                row += self.lengths[s]
            self._starts = starts
        return self._starts

    def starts(self) -> Tensor:
        """Row of each sample's CLS token in `x`, in batch order: (B,) int64."""
        return torch.tensor(self._start_list(), device=self.x.device)

    def cls(self) -> Tensor:
        """The CLS token of every sample, in batch order: (B, C)."""
        return self.x.index_select(0, self.starts())

    def num_patches(self) -> Tensor:
        """Patch tokens alive per sample: (B,) int64."""
        return torch.tensor(self.lengths, device=self.x.device) - 1

    def reordered(self, order: list[int]) -> PackedBatch:
        """The same tokens stored in another sample order."""
        if order == self.order:
            return self
        device = self.x.device
        starts = self._start_list()
        rows = _ranges(
            torch.tensor([starts[s] for s in order], device=device),
            torch.tensor([self.lengths[s] for s in order], device=device),
            self.x.shape[0],
        )
        size = None if self.size is None else self.size.index_select(0, rows)
        return PackedBatch(self.x.index_select(0, rows), self.lengths, size, order)

    # --- one block ------------------------------------------------------------------------------------------------

    def apply_block(self, model: ElasticViT, i: int, configs: BlockConfig | Sequence[BlockConfig]) -> PackedBatch:
        """Run block `i` of `model`, at one `BlockConfig` for all samples or one per sample (batch order)."""
        B = self.batch_size
        configs = [configs] * B if isinstance(configs, BlockConfig) else list(configs)
        if len(set(self.lengths)) == 1 and len(set(configs)) == 1:  # one dense batch: the block as it is
            L, C = self.lengths[0], self.x.shape[1]
            size = None if self.size is None else self.size.view(B, L)
            x, size = model.forward_block(i, self.x.view(B, L, C), size, configs[0])
            size = None if size is None else size.reshape(-1)
            return PackedBatch(x.reshape(-1, C), [x.shape[1]] * B, size, self.order)
        block = model.blocks[i]
        heads = [c.heads for c in configs]
        batch = self.reordered(sorted(self.order, key=heads.__getitem__))
        attention = _Attention(batch, block, heads)
        x = batch.x + attention.run()
        schedules = [token_schedule(L - 1, c, model.token_mode) for L, c in zip(self.lengths, configs)]
        batch = batch._reduce(x, attention, schedules, model.token_mode)
        widths = [c.mlp_hidden for c in configs]
        batch = batch.reordered(sorted(batch.order, key=widths.__getitem__))
        return PackedBatch(batch.x + batch._mlp(block, widths), batch.lengths, batch.size, batch.order)

    def _mlp(self, block: ElasticBlock, widths: list[int]) -> Tensor:
        """The MLP branch at each sample's hidden width, the samples ordered by width: (T, C)."""
        mlp = block.mlp
        y = block.norm2(self.x)
        runs = _runs(self.order, widths, self.lengths)
        out = torch.empty_like(y) if len(runs) > 1 else None
        for m, first, n in runs:
            hidden = mlp.act(F.linear(y[first : first + n], mlp.fc1.weight[:m], mlp.fc1.bias[:m]))
            if out is None:
                return F.linear(hidden, mlp.fc2.weight[:, :m], mlp.fc2.bias)
            torch.addmm(mlp.fc2.bias, hidden, mlp.fc2.weight[:, :m].t(), out=out[first : first + n])
        return out

    def _reduce(self, x: Tensor, attention: _Attention, schedules: list, token_mode: str) -> PackedBatch:
        """Token reduction of the samples whose schedule asks for it: the batch of tokens x after it.

        Every token gets a destination row: itself when kept, its most similar kept token when merged, none when
        pruned; then each kept token becomes the size-weighted mean of the tokens sent to it.
        """
        T = x.shape[0]
        device = x.device
        lengths = list(self.lengths)
        if all(final == L - 1 for (_, final), L in zip(schedules, self.lengths)):
            return PackedBatch(x, lengths, self.size, self.order)
        pruned_t = torch.tensor([p for p, _ in schedules], device=device)
        final_t = torch.tensor([f for _, f in schedules], device=device)
        keep = torch.ones(T + 1, dtype=torch.bool, device=device)  # the extra row is where padding points
        destination = torch.arange(T + 1, device=device) if token_mode != "prune" else None
        for group in attention.groups:
            samples = [s for s in group.samples if schedules[s][1] < self.lengths[s] - 1]
            if not samples:
                continue
            for s in samples:
                lengths[s] = 1 + schedules[s][1]
            rows = group.samples_index(samples)
            index = group.index[rows]
            pos, scores = group.pos[rows, 1:], group.scores[rows]
            order = scores.masked_fill(pos == T, float("-inf")).argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=device).expand_as(order)
            )
            dst = rank < final_t.index_select(0, index)[:, None]
            keep[pos.masked_select(~dst)] = False  # padding included: it points at row T
            if destination is None:
                continue
            src = ~dst & (rank < pruned_t.index_select(0, index)[:, None])
            b, N = pos.shape
            keys = F.normalize(attention.keys(samples, N).view(b, N, -1), dim=-1)  # missing heads zero
            similarity = torch.bmm(keys, keys.transpose(1, 2)).masked_fill_(~dst[:, None, :], float("-inf"))
            destination[pos.masked_select(src)] = pos.gather(1, similarity.argmax(-1)).masked_select(src)
        keep = keep[:T]
        if destination is None:  # pruning only
            return PackedBatch(x[keep], lengths, None if self.size is None else self.size[keep], self.order)
        destination = destination[:T]
        dropped = ~keep & (destination == torch.arange(T, device=device))  # pruned: sent nowhere
        size = x.new_ones(T) if self.size is None else self.size
        weight = size.masked_fill(dropped, 0)
        total = torch.zeros_like(x).index_add_(0, destination, x * weight[:, None])
        total_size = torch.zeros_like(size).index_add_(0, destination, weight)
        total, total_size = total[keep], total_size[keep]
        return PackedBatch(total / total_size[:, None], lengths, total_size, self.order)


class _Group:
    """Samples whose attention runs together, padded to the longest of them."""

    def __init__(self, samples: list[int], length: int, starts: Tensor, lengths: Tensor, pad_row: int) -> None:
        device = starts.device
        self.samples, self.length = samples, length
        self.index = torch.tensor(samples, device=device)
        self.valid = torch.arange(length, device=device) < lengths.index_select(0, self.index)[:, None]  # (b, L)
        rows = starts.index_select(0, self.index)[:, None] + torch.arange(length, device=device)
        self.pos = torch.where(self.valid, rows, pad_row)  # (b, L): token rows, `pad_row` for padding
        self.scores: Tensor | None = None  # (b, L - 1): CLS attention to the patches, averaged over heads

    def samples_index(self, samples: list[int]) -> Tensor | slice:
        """Rows of this group's tensors that hold `samples` (a sub-list of `self.samples`, in order)."""
        if len(samples) == len(self.samples):
            return slice(None)
        where = {s: j for j, s in enumerate(self.samples)}
        return torch.tensor([where[s] for s in samples], device=self.index.device)


class _Attention:
    """The attention of one block over a batch stored in order of heads.

    q, k, v of every token are computed per number of heads into one buffer of head vectors (rows of head_dim):
    the tokens of a sample running h heads hold 3 h consecutive rows each (q heads, k heads, v heads). Padding
    reads zero rows at the end.
    """

    def __init__(self, batch: PackedBatch, block: ElasticBlock, heads: list[int]) -> None:
        attn = block.attn
        self.batch, self.attn, self.heads = batch, attn, heads
        x = batch.x
        T, C = x.shape
        H, d = attn.num_heads, attn.head_dim
        self.T, self.H, self.d = T, H, d
        self.runs = _runs(batch.order, heads, batch.lengths)
        rows = sum(3 * h * n for h, _, n in self.runs)
        self.pad = rows
        self.qkv = x.new_empty(rows + 2 * H + 1, d)
        self.qkv[rows:] = 0
        y = block.norm1(x)
        w, b = attn.qkv.weight.view(3, H * d, C), attn.qkv.bias
        b = None if b is None else b.view(3, H * d)
        base, row, head_row = {}, 0, 0
        for h, first, n in self.runs:
            wh = w[:, : h * d].reshape(3 * h * d, C)
            out = self.qkv[row : row + 3 * h * n].view(n, 3 * h * d)
            if b is None:
                torch.mm(y[first : first + n], wh.t(), out=out)
            else:
                torch.addmm(b[:, : h * d].reshape(3 * h * d), y[first : first + n], wh.t(), out=out)
            base[h] = (row, head_row, first)
            row += 3 * h * n
            head_row += h * n
        self.head_rows = head_row
        starts = batch._start_list()
        # per sample, for its first token's head 0: its row in qkv (q part) and in the projection's input
        first_q, first_out = [], []
        for s in range(batch.batch_size):
            h = heads[s]
            row, head_row, first = base[h]
            first_q.append(row + 3 * h * (starts[s] - first))
            first_out.append(head_row + h * (starts[s] - first))
        self.first = torch.tensor(first_q, device=x.device)
        self.first_out = torch.tensor(first_out, device=x.device)
        self.h = torch.tensor(heads, device=x.device)
        self.groups = self._groups()

    def _groups(self) -> list[_Group]:
        """Samples by decreasing token count, cut where counts fall below the group's largest / `GROUP_RATIO`."""
        batch = self.batch
        lengths = batch.lengths
        order = sorted(range(batch.batch_size), key=lambda s: -lengths[s])
        starts = batch.starts()
        lengths_t = torch.tensor(lengths, device=starts.device)
        groups, start = [], 0
        while start < len(order):
            top, end = lengths[order[start]], start
            while end < len(order) and lengths[order[end]] * GROUP_RATIO >= top:
                end += 1
            groups.append(_Group(order[start:end], top, starts, lengths_t, self.T))
            start = end
        return groups

    def run(self) -> Tensor:
        """The attention branch (before the residual): (T, C); sets every group's `scores`."""
        attn, d, T = self.attn, self.d, self.T
        pairs = [sum(self.heads[s] for s in g.samples) for g in self.groups]
        out = self.qkv.new_empty(sum(p * g.length for p, g in zip(pairs, self.groups)), d)
        inverse = torch.empty(self.head_rows + 1, dtype=torch.long, device=out.device)
        log_size = None if self.batch.size is None else torch.cat([self.batch.size, self.batch.size.new_ones(1)]).log()
        row = 0
        for P, group in zip(pairs, self.groups):
            b, L = group.valid.shape
            h = self.h.index_select(0, group.index)
            pair_sample = torch.repeat_interleave(torch.arange(b, device=out.device), h, output_size=P)
            pair_head = torch.arange(P, device=out.device) - (h.cumsum(0) - h).index_select(0, pair_sample)
            hp = h.index_select(0, pair_sample)[:, None]
            first = self.first.index_select(0, group.index).index_select(0, pair_sample)[:, None]
            position = torch.arange(L, device=out.device)
            valid = group.valid.index_select(0, pair_sample)
            q_row = torch.where(valid, first + pair_head[:, None] + 3 * hp * position, self.pad)  # (P, L)
            q, k, v = (self.qkv.index_select(0, (q_row + j * hp).view(-1)).view(P, L, d) for j in range(3))
            bias = group.valid.new_zeros(b, L, dtype=q.dtype) if log_size is None else log_size[group.pos]
            bias = bias.masked_fill(~group.valid, float("-inf")).index_select(0, pair_sample)[:, None, :]
            probs = _softmax(torch.baddbmm(bias.expand(P, L, L), q, k.transpose(1, 2), alpha=attn.scale))
            torch.bmm(probs, v, out=out[row : row + P * L].view(P, L, d))
            # where each (token, head) row of the projection's input is in `out`; padding goes to a spare row
            first_out = self.first_out.index_select(0, group.index).index_select(0, pair_sample)[:, None]
            out_row = torch.where(valid, first_out + pair_head[:, None] + hp * position, self.head_rows)
            inverse.index_copy_(0, out_row.view(-1), torch.arange(row, row + P * L, device=out.device))
            group.scores = (probs.new_zeros(b, L).index_add_(0, pair_sample, probs[:, 0]) / h[:, None])[:, 1:]
            row += P * L
        heads_out = out.index_select(0, inverse[:-1])  # (sum h n, d): each run's (token, head) rows in order
        result = self.qkv.new_empty(T, self.attn.proj.weight.shape[0]) if len(self.runs) > 1 else None
        row = 0
        for h, first, n in self.runs:
            o = heads_out[row : row + h * n].view(n, h * d)
            w = self.attn.proj.weight[:, : h * d]
            if result is None:
                return F.linear(o, w, self.attn.proj.bias)
            torch.addmm(self.attn.proj.bias, o, w.t(), out=result[first : first + n])
            row += h * n
        return result

    def keys(self, samples: list[int], N: int) -> Tensor:
        """Keys of the patches of `samples`, all H heads, those a sample does not run zero: (b, N, H, d)."""
        device = self.qkv.device
        index = torch.tensor(samples, device=device)
        h = self.h.index_select(0, index)[:, None, None]
        first = self.first.index_select(0, index)[:, None, None]
        patch = torch.arange(1, N + 1, device=device)[None, :, None]
        head = torch.arange(self.H, device=device)[None, None, :]
        lengths = torch.tensor([self.batch.lengths[s] for s in samples], device=device)[:, None, None]
        rows = first + 3 * h * patch + h + head
        rows = torch.where((head < h) & (patch < lengths), rows, self.pad)
        return self.qkv.index_select(0, rows.view(-1)).view(len(samples), N, self.H, self.d)


__all__ = ["PackedBatch"]

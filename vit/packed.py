"""Per-sample execution on packed tokens.

A batch whose samples hold different numbers of tokens and run different widths is kept as one (T, C) matrix of
tokens, each sample's sequence contiguous (CLS first, then its patches in position order). A block runs in a few
dense operations whatever the mixture of configurations:

- the samples are reordered by number of heads, then by decreasing token count, so that every width's linear
  layers run once, on a contiguous slice of the tokens and on prefix slices of the weights, and the q, k, v of the
  samples sharing a number of heads and a token count form one dense (samples, heads, tokens, head_dim) view that
  the attention core reads in place: no padding, and no sample pays for heads it does not run;
- token reduction (ranking by CLS attention, pruning, merging) runs on the reduced samples padded to the longest
  of them, and writes the surviving tokens straight into the order by MLP width, so that the MLP too runs once
  per width on a contiguous slice.

Each sample costs what its configuration costs, up to the padding of token reduction's CLS attention row and key
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
from .token_ops import _gather_tokens, size_bias, token_schedule
from .utils import long_tensor, matmul_dtype, single_threaded

if TYPE_CHECKING:
    from .supernet import ElasticBlock, ElasticViT


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
        return long_tensor(self._start_list(), self.x.device)

    def cls(self) -> Tensor:
        """The CLS token of every sample, in batch order: (B, C)."""
        return self.x.index_select(0, self.starts())

    def num_patches(self) -> Tensor:
        """Patch tokens alive per sample: (B,) int64."""
        return long_tensor(self.lengths, self.x.device) - 1

    def reordered(self, order: list[int]) -> PackedBatch:
        """The same tokens stored in another sample order."""
        if order == self.order:
            return self
        device = self.x.device
        starts = self._start_list()
        rows = _ranges(
            long_tensor([starts[s] for s in order], device),
            long_tensor([self.lengths[s] for s in order], device),
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
        batch = self.reordered(sorted(self.order, key=lambda s: (heads[s], -self.lengths[s])))
        schedules = [token_schedule(L - 1, c, model.token_mode) for L, c in zip(self.lengths, configs)]
        reduced = [final < L - 1 for (_, final), L in zip(schedules, self.lengths)]
        attention = _Attention(batch, block, heads)
        x = batch.x + attention.run()
        widths = [c.mlp_hidden for c in configs]
        mlp_order = sorted(batch.order, key=widths.__getitem__)
        with single_threaded(x.device):
            batch = batch._reduce(x, attention, schedules, reduced, model.token_mode, mlp_order)
        return PackedBatch(batch.x + batch._mlp(block, widths), batch.lengths, batch.size, batch.order)

    def _mlp(self, block: ElasticBlock, widths: list[int]) -> Tensor:
        """The MLP branch at each sample's hidden width, the samples ordered by width: (T, C)."""
        mlp = block.mlp
        y = block.norm2(self.x)
        runs = _runs(self.order, widths, self.lengths)
        dtype = matmul_dtype(y)  # out= operations are not autocast: their operands are cast here
        out = y.new_empty(y.shape, dtype=dtype) if len(runs) > 1 else None
        for m, first, n in runs:
            hidden = mlp.act(F.linear(y[first : first + n], mlp.fc1.weight[:m], mlp.fc1.bias[:m]))
            if out is None:
                return F.linear(hidden, mlp.fc2.weight[:, :m], mlp.fc2.bias)
            w, b = mlp.fc2.weight[:, :m].to(dtype), mlp.fc2.bias.to(dtype)
            torch.addmm(b, hidden.to(dtype), w.t(), out=out[first : first + n])
        return out

    def _reduce(
        self,
        x: Tensor,
        attention: _Attention,
        schedules: list,
        reduced: list[bool],
        token_mode: str,
        order: list[int],
    ) -> PackedBatch:
        """Token reduction of the samples `reduced` marks, by their `schedules`: the batch of tokens x after it,
        stored in sample `order`.

        The reduced samples are padded to the longest of them (the only arithmetic padded: the CLS query's row of
        attention and merging's key similarity). Every token gets a destination row: itself when kept, its most
        similar kept token when merged, none when pruned; then each kept token becomes the size-weighted mean of
        the tokens sent to it.
        """
        T, device = x.shape[0], x.device
        lengths = list(self.lengths)
        samples = [s for s in range(self.batch_size) if reduced[s]]
        if not samples:
            return PackedBatch(x, lengths, self.size, self.order).reordered(order)
        for s in samples:
            lengths[s] = 1 + schedules[s][1]
        index = long_tensor(samples, device)
        L = max(self.lengths[s] for s in samples)
        position = torch.arange(L, device=device)
        valid = position < long_tensor([self.lengths[s] for s in samples], device)[:, None]  # (b, L)
        pos = torch.where(valid, self.starts().index_select(0, index)[:, None] + position, T)  # T: padding
        h = attention.h.index_select(0, index)
        keys, query = attention.cls_query_keys(index, h, valid)  # (b, L, H d), (b, H, d); missing heads, padding 0
        b, H, d = query.shape
        # the CLS query's row of attention, every head at once: keys times a block-diagonal matrix of the queries
        blocks = torch.diag_embed(query.transpose(1, 2)).transpose(1, 2).reshape(b, H * d, H)
        logits = torch.bmm(keys, blocks).mul_(attention.attn.scale)  # (b, L, H)
        if self.size is not None:
            logits += torch.cat([self.size, self.size.new_ones(1)]).log()[pos][:, :, None]
        probs = logits.masked_fill_(~valid[:, :, None], float("-inf")).softmax(1)
        probs *= torch.arange(H, device=device) < h[:, None, None]  # the heads a sample runs
        scores = probs.sum(2)[:, 1:] / h[:, None]  # the CLS attention to the patches, averaged over heads
        pos = pos[:, 1:]
        order_by_score = scores.masked_fill(pos == T, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order_by_score).scatter_(
            1, order_by_score, torch.arange(L - 1, device=device).expand_as(order_by_score)
        )
        final = long_tensor([schedules[s][1] for s in samples], device)
        dst = rank < final[:, None]
        keep = torch.ones(T + 1, dtype=torch.bool, device=device)  # the extra row is where padding points
        keep[pos.masked_select(~dst)] = False
        # the kept rows, each sample's in position order, the samples in `order`
        kept = keep[:T].nonzero().squeeze(1)
        batch = PackedBatch(kept[:, None], lengths, None, self.order).reordered(order)
        rows = batch.x.squeeze(1)
        pruned = long_tensor([schedules[s][0] for s in samples], device)
        S, K, N = int((pruned - final).max()), int(final.max()), L - 1
        if S == 0:  # pruning only
            size = None if self.size is None else self.size.index_select(0, rows)
            return PackedBatch(x.index_select(0, rows), lengths, size, order)
        # merging: each source (ranks final..pruned-1) goes to its most similar destination (ranks below final,
        # in position order, so that ties go to the first as in `token_ops.merge`)
        keys = F.normalize(keys[:, 1:], dim=-1)
        targets = torch.arange(K, device=device) < final[:, None]
        targets_at = torch.where(targets, order_by_score[:, :K], N).sort(dim=-1).values.clamp_(max=N - 1)
        source_rank = final[:, None] + torch.arange(S, device=device)
        sources = source_rank < pruned[:, None]
        sources_at = order_by_score.gather(1, source_rank.clamp(max=N - 1))
        similarity = torch.bmm(_gather_tokens(keys, sources_at), _gather_tokens(keys, targets_at).transpose(1, 2))
        merged_into = targets_at.gather(1, similarity.masked_fill_(~targets[:, None, :], float("-inf")).argmax(-1))
        source_rows = pos.gather(1, sources_at)[sources]
        new_row = torch.empty(T, dtype=torch.long, device=device)
        new_row[rows] = torch.arange(rows.shape[0], device=device)
        into = new_row.index_select(0, pos.gather(1, merged_into)[sources])
        size = x.new_ones(T) if self.size is None else self.size
        source_size = size.index_select(0, source_rows)
        kept_size = size.index_select(0, rows)
        total_size = kept_size.index_add(0, into, source_size)
        total = (x.index_select(0, rows) * kept_size[:, None]).index_add_(
            0, into, x.index_select(0, source_rows) * source_size[:, None]
        )
        return PackedBatch(total.div_(total_size[:, None]), lengths, total_size, order)


class _Attention:
    """The attention of one block over a batch stored in order of heads, then of decreasing token count.

    q, k, v of every token are computed per number of heads into one buffer of head vectors (rows of head_dim):
    the tokens of a sample running h heads hold 3 h consecutive rows each (q heads, k heads, v heads), so the
    samples of one (heads, tokens) run are a dense (n, L, 3, h, d) view of it, which the attention core reads in
    place. Padding reads the zero row at the end (`pad`).
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
        dtype = matmul_dtype(x)  # out= operations are not autocast: their operands are cast here
        self.qkv = x.new_empty(rows + 1, d, dtype=dtype)
        self.qkv[rows:] = 0
        y = block.norm1(x).to(dtype)
        w, b = attn.qkv.weight.to(dtype).view(3, H * d, C), attn.qkv.bias
        b = None if b is None else b.to(dtype).view(3, H * d)
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
        self.base, self.head_rows = base, head_row
        starts = batch._start_list()
        # per sample, for its first token's head 0: its row in qkv (q part)
        self.first = long_tensor([base[h][0] + 3 * h * (starts[s] - base[h][2]) for s, h in enumerate(heads)], x.device)
        self.h = long_tensor(heads, x.device)

    def run(self) -> Tensor:
        """The attention branch (before the residual): (T, C)."""
        attn, d, batch = self.attn, self.d, self.batch
        heads_out = self.qkv.new_empty(self.head_rows, d)  # each heads run's (token, head) rows, in token order
        key = [(h, L) for h, L in zip(self.heads, batch.lengths)]
        with single_threaded(self.qkv.device):  # many small cores: threads cost more than they share
            self._core(heads_out, _runs(batch.order, key, batch.lengths))
        result = self.qkv.new_empty(self.T, attn.proj.weight.shape[0]) if len(self.runs) > 1 else None
        row = 0
        for h, first, n in self.runs:
            o = heads_out[row : row + h * n].view(n, h * d)
            w = attn.proj.weight[:, : h * d]
            if result is None:
                return F.linear(o, w, attn.proj.bias)
            torch.addmm(attn.proj.bias.to(o.dtype), o, w.to(o.dtype).t(), out=result[first : first + n])
            row += h * n
        return result

    def _core(self, heads_out: Tensor, runs: list[tuple[tuple[int, int], int, int]]) -> None:
        """The attention core of each (heads, tokens) run, written into `heads_out`."""
        d, batch = self.d, self.batch
        for (h, L), first, tokens in runs:
            n = tokens // L
            row, head_row, run_first = self.base[h]
            row += 3 * h * (first - run_first)
            q, k, v = self.qkv[row : row + 3 * h * tokens].view(n, L, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            bias = None if batch.size is None else size_bias(batch.size[first : first + tokens].view(n, L))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (n, h, L, d)
            head_row += h * (first - run_first)
            heads_out[head_row : head_row + h * tokens].view(n, L, h, d).copy_(out.transpose(1, 2))

    def cls_query_keys(self, index: Tensor, heads: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Keys, heads concatenated (b, L, H d), and CLS query (b, H, d) of the samples `index` running `heads`
        heads, padded to L tokens where `valid` (b, L) is False; the heads a sample does not run, and its padding,
        zero."""
        b, length = valid.shape
        h = heads[:, None, None]
        first = self.first.index_select(0, index)[:, None, None]
        token = torch.arange(length, device=valid.device)[None, :, None]
        head = torch.arange(self.H, device=valid.device)
        rows = torch.where((head < h) & valid[:, :, None], first + 3 * h * token + h + head, self.pad)
        query = torch.where(head < h[:, 0], first[:, 0] + head, self.pad)
        return (
            self.qkv.index_select(0, rows.view(-1)).view(b, length, self.H * self.d),
            self.qkv.index_select(0, query.view(-1)).view(b, self.H, self.d),
        )


__all__ = ["PackedBatch"]

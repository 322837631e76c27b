"""Per-sample execution: a batch whose samples run different widths and hold different numbers of tokens.

A batch is kept as one (T, C) matrix of tokens, each sample's sequence contiguous (CLS first, then its patches in
position order): `PackedBatch`. A dense batch (B, 1 + N, C) is the case of one run: every sample the same length
and configuration. `ElasticBlock.forward` runs a block on a packed batch in a few dense operations whatever the
mixture of configurations, with the helpers here:

- `BlockPlan` orders the samples by number of heads, then by decreasing token count, so that every width's linear
  layers run once on a contiguous slice of the tokens and on prefix slices of the weights (`stack_linear`); the
  attention core runs once per number of heads and *length class* (samples padded to the longest of the class and
  masked, a class growing while the padding wastes less than one more call costs: `attention_core`; on a CPU, where
  a call costs less than gathering a padded class, a class per length), so the number of calls stays small whatever
  the lengths;
- token reduction ranks and assigns the tokens of every reducing sample at once (`vit.token_ops.assign_tokens`,
  padded to the longest of them) and writes the survivors straight into the order by MLP width
  (`packed_reduction`), so that the MLP too runs once per width on a contiguous slice.

Each sample costs what its configuration costs, up to the padding of the attention cores and of token reduction's
CLS attention row and key similarity (`tests/test_flops.py` bounds the excess), and gets the result it gets alone up
to floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BlockConfig
from .token_ops import Reduction, assign_tokens, cls_attention, token_schedule
from .utils import long_tensor, matmul_dtype

#: The padding a length class of the attention core may waste, in MACs, by device type (see `length_classes`); other
#: devices take `PAD_WASTE_MACS`. On a CPU core one more attention call costs less than gathering a padded class's
#: q, k, v rows and its output rows, so samples share a call only when their lengths are equal.
CLASS_PAD_WASTE_MACS = {"cpu": 0}
#: The padding a length class may waste on devices without an entry in `CLASS_PAD_WASTE_MACS`: about what one more
#: attention call costs.
PAD_WASTE_MACS = 1_000_000


class PackedBatch:
    """A batch of token sequences of per-sample length, packed into one (T, C) matrix.

    Functional: a block returns a new batch and leaves this one as it was, so a caller can branch (run the rest of
    the network from here) without copying.

    Attributes:
        x: (T, C) tokens; sample `order[0]`'s sequence first, CLS first in each.
        order: the samples in the order their sequences are stored.
        lengths: tokens (1 + patches) of each sample, in batch order.
        size: (T,) token sizes after merging, or None while every token has size 1.
        source: (T, S) ToMe's source map (which original tokens each token holds), or None when not traced.
    """

    def __init__(
        self,
        x: Tensor,
        lengths: Sequence[int] | None = None,
        size: Tensor | None = None,
        order: Sequence[int] | None = None,
        source: Tensor | None = None,
    ) -> None:
        """Start from dense tokens x (B, 1 + N, C) (and sizes (B, 1 + N), source (B, 1 + N, S)), or from packed
        tokens x (T, C) with their `lengths` (and `order`, batch order by default)."""
        if lengths is None:
            B, L, C = x.shape
            x, lengths = x.reshape(B * L, C), [L] * B
            size = None if size is None else size.reshape(B * L)
            source = None if source is None else source.reshape(B * L, -1)
        self.x, self.size, self.source = x, size, source
        self.lengths = list(lengths)
        self.order = list(range(len(self.lengths))) if order is None else list(order)
        self._starts: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def is_dense(self) -> bool:
        """Whether the samples share one length and are stored in batch order (`dense` views them)."""
        return len(set(self.lengths)) <= 1 and self.order == sorted(self.order)

    def dense(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x (B, L, C), size (B, L) or None, source (B, L, S) or None of a dense batch (see `is_dense`)."""
        B = self.batch_size
        if not self.is_dense:
            self = self.reordered(list(range(B)))
            if len(set(self.lengths)) > 1:
                raise ValueError("the samples hold different numbers of tokens: there is no dense view")
        view = (B, self.x.shape[0] // max(B, 1))
        size = None if self.size is None else self.size.view(view)
        source = None if self.source is None else self.source.view(*view, -1)
        return self.x.view(*view, -1), size, source

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
        if self.is_dense:
            return self.x.view(self.batch_size, -1, self.x.shape[1])[:, 0]
        return self.x.index_select(0, self.starts())

    def num_patches(self) -> Tensor:
        """Patch tokens alive per sample: (B,) int64."""
        return long_tensor(self.lengths, self.x.device) - 1

    def patch_mean(self, norm: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Per sample, the mean of its patch tokens weighted by their sizes (the patches each token stands for),
        each token passed through `norm` first when given, in batch order: (B, C)."""
        order = np.asarray(self.order)
        n = np.asarray([self.lengths[s] for s in self.order])
        offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        sample = long_tensor(np.repeat(order, n), self.x.device)
        weight = self.x.new_ones(self.x.shape[0]) if self.size is None else self.size.to(self.x.dtype)
        weight = weight * torch.from_numpy(offset > 0).to(weight.device)  # CLS tokens left out
        B, C = self.batch_size, self.x.shape[1]
        x = self.x if norm is None else norm(self.x)
        total = x.new_zeros(B, C).index_add_(0, sample, x * weight[:, None])
        return total / self.x.new_zeros(B).index_add_(0, sample, weight)[:, None]

    def rows(self, order: Sequence[int]) -> np.ndarray:
        """The rows of the samples' tokens listed in `order`, concatenated."""
        starts = self._start_list()
        lengths = np.asarray([self.lengths[s] for s in order])
        firsts = np.asarray([starts[s] for s in order])
        return np.repeat(firsts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))

    def reordered(self, order: list[int]) -> PackedBatch:
        """The same tokens stored in another sample order."""
        if order == self.order:
            return self
        rows = long_tensor(self.rows(order), self.x.device)
        size = None if self.size is None else self.size.index_select(0, rows)
        source = None if self.source is None else self.source.index_select(0, rows)
        return PackedBatch(self.x.index_select(0, rows), self.lengths, size, order, source)

    def with_tokens(self, x: Tensor) -> PackedBatch:
        """The same samples, lengths, sizes and sources with new tokens x (T, C)."""
        return PackedBatch(x, self.lengths, self.size, self.order, self.source)

    def attention(self, y: Tensor, attn, plan: BlockPlan) -> tuple[Tensor, list[AttentionRun]]:
        """The attention branch of a block on normalised tokens y (T, C), the batch stored by number of heads
        (`plan.attention_order`): its output (T, C) and the q, k, v runs (one per number of heads), which token
        reduction ranks by. Each run's linear layers read a prefix slice of `attn`'s weights; its attention core
        runs length class by length class (`attention_core`)."""
        rows, d = plan.rows, attn.head_dim
        log_size = None if self.size is None else self.size.log()
        runs, cores = [], []
        for h, first, n, samples in sample_runs(self.order, plan.heads, self.lengths):
            qkv = F.linear(pad_rows(y[first : first + rows(n)], rows(n)), *attn.qkv_params(h))[:n]
            run = AttentionRun(qkv, h, first, samples, [self.lengths[s] for s in samples])
            runs.append(run)
            cores.append((attention_core(run, log_size, d, rows(n)), *attn.proj_params(h), n))
        return stack_linear(cores), runs

    def reduced(self, x: Tensor, runs: list[AttentionRun], attn, plan: BlockPlan, merge_variant: str) -> PackedBatch:
        """The batch of tokens x (T, C), stored as this one, after the block's token reduction, stored by MLP width.

        The reducing samples' patch tokens are ranked by CLS attention and assigned slots at once
        (`vit.token_ops.assign_tokens`), matched by the cosine of their keys (`tome`) or of their hidden states
        (`official`), then merged into size-weighted means (`tome`) or plain means with no sizes (`official`)."""
        order = self.order if plan.uniform else sorted(self.order, key=plan.widths.__getitem__)
        if not plan.reduced:
            return self.with_tokens(x).reordered(order)
        pruned, final = ([plan.schedules[s][k] for s in plan.reduced] for k in (0, 1))
        merges = pruned != final
        with torch.no_grad():  # ranking and matching are not differentiated
            scores, keys, valid = cls_ranking(runs, self, plan.reduced, attn.head_dim, attn.scale, plan.uniform)
            if merges and merge_variant == "official":  # match by the hidden states instead of the keys
                keys = sample_tokens(self, x, plan.reduced, scores.shape[1] + 1)[:, 1:]
            bounds = max(a - b for a, b in zip(pruned, final)), max(final)
            if plan.uniform:
                slot = assign_tokens(scores, keys if merges else None, pruned[0], final[0], bounds=bounds)
            else:
                p, f = long_tensor(pruned, x.device), long_tensor(final, x.device)
                slot = assign_tokens(scores, keys if merges else None, p, f, valid, bounds)
        reduction, lengths = packed_reduction(self, plan, slot, order, merges)
        if merge_variant == "official":  # plain means, no sizes: attention stays unweighted
            x, size = reduction.mean(x, None)[0], None
        else:
            x, size = reduction.mean(x, self.size)
        source = None if self.source is None else reduction.sum(self.source)
        return PackedBatch(x, lengths, size, order, source)

    def mlp(self, y: Tensor, mlp, plan: BlockPlan) -> Tensor:
        """The MLP branch of a block on normalised tokens y (T, C), the batch stored by MLP width: (T, C), each
        width's layers once on its contiguous rows and a prefix slice of `mlp`'s weights."""
        rows = plan.rows
        parts = [
            (mlp.hidden(pad_rows(y[first : first + rows(n)], rows(n)), m), *mlp.fc2_params(m), n)
            for m, first, n, _ in sample_runs(self.order, plan.widths, self.lengths)
        ]
        return stack_linear(parts)


class BlockPlan:
    """The bookkeeping of one block over a packed batch: per-sample configurations and token schedules, and the
    sample orders its steps run in. Plain Python on small lists; tensors are built only where needed."""

    def __init__(self, batch: PackedBatch, configs: BlockConfig | Sequence[BlockConfig], token_mode: str) -> None:
        B = batch.batch_size
        one = isinstance(configs, BlockConfig)
        self.configs = [configs] * B if one else list(configs)
        if len(self.configs) != B:
            raise ValueError(f"expected {B} block configurations, got {len(self.configs)}")
        lengths = batch.lengths
        self.uniform = batch.is_dense and (one or len(set(self.configs)) == 1)
        self.heads = [c.heads for c in self.configs]
        self.widths = [c.mlp_hidden for c in self.configs]
        if self.uniform:
            self.attention_order = batch.order
            self.schedules = [token_schedule(lengths[0] - 1, self.configs[0], token_mode)] * B
        else:
            self.attention_order = sorted(batch.order, key=lambda s: (self.heads[s], -lengths[s]))
            # a schedule depends on the length and the ratios only: keys of plain numbers hash faster than configs
            schedules: dict[tuple[int, float, float], tuple[int, int]] = {}
            self.schedules = []
            for L, c in zip(lengths, self.configs):
                key = (L, c.keep_ratio, c.merge_ratio)
                schedule = schedules.get(key)
                if schedule is None:
                    schedule = schedules[key] = token_schedule(L - 1, c, token_mode)
                self.schedules.append(schedule)
        self.reduced = [s for s in range(B) if self.schedules[s][1] < lengths[s] - 1]
        # on CPU in bf16, per-sample matmuls run on a ladder of row counts (a dense batch's shapes repeat already)
        self.rows = shape_ladder if repeat_shapes(batch.x) and not self.uniform else int


def stack_linear(parts: Sequence[tuple[Tensor, Tensor, Tensor | None, int]]) -> Tensor:
    """Several linear layers of one output width, each on its own rows: (input, weight, bias, rows) each, the first
    `rows` outputs of each stacked in order (an input may hold padding rows beyond them, see `repeat_shapes`).
    Without gradients they write into one buffer (no copy), a part's padding rows over the rows of the parts after it
    (before those write them) or into spare rows at the end; otherwise the outputs are concatenated."""
    if len(parts) == 1:
        y, w, b, n = parts[0]
        return F.linear(y, w, b)[:n]
    if torch.is_grad_enabled():
        return torch.cat([F.linear(y, w, b)[:n] for y, w, b, n in parts])
    x = parts[0][0]
    dtype = matmul_dtype(x)  # out= operations are not autocast: their operands are cast here
    firsts = np.cumsum([0] + [p[3] for p in parts])
    total, spare = int(firsts[-1]), max(int(f) + p[0].shape[0] for f, p in zip(firsts, parts))
    out = x.new_empty(max(total, spare), parts[0][1].shape[0], dtype=dtype)
    cast = dtype != x.dtype or dtype != parts[0][1].dtype
    row = 0
    for y, w, b, n in parts:
        if cast:
            y, w, b = y.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        target = out[row : row + y.shape[0]]
        torch.mm(y, w.t(), out=target) if b is None else torch.addmm(b, y, w.t(), out=target)
        row += n
    return out[:total]


def repeat_shapes(x: Tensor) -> bool:
    """Whether the matmuls on x should run at repeating row counts: on CPU in bf16 or fp16 (weights or autocast),
    where oneDNN builds a kernel for every new matrix shape (about a millisecond each) and per-sample execution
    would meet new row counts at every batch. They then run on `shape_ladder` rows, padding included."""
    return x.device.type == "cpu" and matmul_dtype(x) in (torch.bfloat16, torch.float16)


def shape_ladder(n: int) -> int:
    """n rounded up to a size of a fixed ladder: multiples of 8 up to 64, then four sizes per octave (at most a
    quarter more rows), so that a few dozen row counts serve every batch."""
    if n <= 64:
        return -(-n // 8) * 8
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """t (n, ...) with zero rows appended up to `rows`."""
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def sample_runs(order: Sequence[int], key: Sequence, lengths: Sequence[int]) -> list[tuple]:
    """(value, first token, tokens, samples) of each run of equal `key[s]` along `order`."""
    runs, token = [], 0
    for s in order:
        if runs and runs[-1][0] == key[s]:
            runs[-1][2] += lengths[s]
            runs[-1][3].append(s)
        else:
            runs.append([key[s], token, lengths[s], [s]])
        token += lengths[s]
    return [tuple(r) for r in runs]


def length_classes(lengths: Sequence[int], width: int, budget: int = PAD_WASTE_MACS) -> list[tuple[int, int]]:
    """Split samples sorted by decreasing length into classes padded to their first: (first sample, samples).

    A class grows until the arithmetic its padding wastes (QK and AV products of `width` = heads x head_dim) passes
    `budget` MACs, about the cost of one more attention call: short sequences share one call, long ones of
    differing lengths get their own. A budget of 0 pads nothing: a class per length."""
    classes, first, waste = [], 0, 0
    for j in range(1, len(lengths) + 1):
        if j < len(lengths):
            waste += 2 * (lengths[first] ** 2 - lengths[j] ** 2) * width
        if j == len(lengths) or waste > budget:
            classes.append((first, j - first))
            first, waste = j, 0
    return classes


class AttentionRun:
    """q, k, v of the samples of one number of heads `h`, stored (tokens, 3, h, d) from row `first` of the batch."""

    def __init__(self, qkv: Tensor, h: int, first: int, samples: list[int], lengths: list[int]) -> None:
        self.qkv, self.h, self.first, self.samples, self.lengths = qkv, h, first, samples, lengths


def attention_core(run: AttentionRun, log_size: Tensor | None, d: int, rows: int | None = None) -> Tensor:
    """The attention core of one heads run, length class by length class: (tokens, h d), heads concatenated, with
    zero rows appended up to `rows` (see `repeat_shapes`). `log_size`: (T,) log of the batch's token sizes
    (proportional attention), or None."""
    h, qkv, lengths = run.h, run.qkv, run.lengths
    device = qkv.device
    rows = qkv.shape[0] if rows is None else rows
    classes = length_classes(lengths, h * d, CLASS_PAD_WASTE_MACS.get(qkv.device.type, PAD_WASTE_MACS))
    # without gradients, the classes write their rows into one buffer; otherwise they are concatenated
    buffered = (len(classes) > 1 or rows > qkv.shape[0]) and not torch.is_grad_enabled()
    out, parts, row = None, [], 0
    for first, m in classes:
        L = lengths[first]
        members = lengths[first : first + m]
        tokens = sum(members)
        if all(n == L for n in members):  # equal lengths: a view, no padding
            q, k, v = qkv[row : row + tokens].view(m, L, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            bias = None if log_size is None else log_size[run.first + row : run.first + row + tokens].view(m, L)
            core = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias[:, None, None])
            core = core.transpose(1, 2)  # (m, L, h, d)
            if buffered:
                out = _row_buffer(core, qkv.shape[0], rows, h * d) if out is None else out
                out[row : row + tokens].view(m, L, h, d).copy_(core)
            else:
                parts.append(core.reshape(tokens, h * d))
        else:  # padded to L: padding reads the sample's last token and is masked out of the keys
            n = np.asarray(members)
            starts = row + np.cumsum(n) - n
            position = np.arange(L)
            valid = position < n[:, None]
            index = (starts[:, None] + np.minimum(position, n[:, None] - 1)).reshape(-1)
            q, k, v = (
                qkv.index_select(0, long_tensor(index, device)).view(m, L, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            )
            mask = torch.from_numpy(np.where(valid, 0.0, -np.inf).astype(np.float32)).to(device=device, dtype=q.dtype)
            if log_size is not None:
                mask = log_size.index_select(0, long_tensor(index + run.first, device)).view(m, L).to(q.dtype) + mask
            core = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])
            core = core.transpose(1, 2).reshape(m * L, h * d)
            keep = long_tensor(np.flatnonzero(valid), device)  # padding dropped
            if buffered:
                out = _row_buffer(core, qkv.shape[0], rows, h * d) if out is None else out
                torch.index_select(core, 0, keep, out=out[row : row + tokens])
            else:
                parts.append(core.index_select(0, keep))
        row += tokens
    return out if buffered else pad_rows(parts[0] if len(parts) == 1 else torch.cat(parts), rows)


def _row_buffer(like: Tensor, tokens: int, rows: int, width: int) -> Tensor:
    """An empty (rows, width) buffer of `like`'s dtype and device, its rows from `tokens` on zero."""
    out = like.new_empty(rows, width)
    out[tokens:].zero_()
    return out


def cls_ranking(
    runs: list[AttentionRun], batch: PackedBatch, samples: list[int], d: int, scale: float, uniform: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """CLS attention to the patches (b, N) and patch keys (b, N, H d) of the `samples` that reduce, padded to the
    longest of them, with their validity mask (b, N) (None for a uniform batch, which has no padding)."""
    if uniform:  # one run, every sample alike: views of its q, k, v
        run = runs[0]
        B, L = batch.batch_size, batch.lengths[0]
        qkv = run.qkv.view(B, L, 3, run.h, d)
        keys, query = qkv[:, :, 1], qkv[:, 0, 0]  # (B, L, h, d), (B, h, d)
        bias = None if batch.size is None else batch.size.view(B, L).log()
        scores = cls_attention(query, keys.transpose(1, 2), scale, bias)
        return scores, keys[:, 1:].reshape(B, L - 1, -1), None
    device = batch.x.device
    where = {}  # sample -> (run, its first row in the run)
    for run in runs:
        row = 0
        for s, n in zip(run.samples, run.lengths):
            where[s] = (run, row)
            row += n
    H = max(where[s][0].h for s in samples)
    L = max(batch.lengths[s] for s in samples)
    n = np.asarray([batch.lengths[s] for s in samples])
    heads = np.asarray([where[s][0].h for s in samples])
    valid = np.arange(L) < n[:, None]  # (b, L)
    b = len(samples)
    # every member's keys and CLS query, copied token by token from its run's q, k, v; zero at padding and beyond
    # its heads, so that padding and missing heads add nothing to the logits or the keys' cosine similarity
    keys = torch.zeros(b * L, H * d, dtype=runs[0].qkv.dtype, device=device)
    query = torch.zeros(b, H * d, dtype=keys.dtype, device=device)
    for run in {id(where[s][0]): where[s][0] for s in samples}.values():
        members = np.asarray([j for j, s in enumerate(samples) if where[s][0] is run])
        rows = np.asarray([where[samples[j]][1] for j in members])
        inner, counts = run.h * d, n[members]
        position = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        qkv = run.qkv.view(-1, 3, inner)
        src = long_tensor(np.repeat(rows, counts) + position, device)
        dst = long_tensor(np.repeat(members * L, counts) + position, device)
        keys[:, :inner].index_copy_(0, dst, qkv[:, 1].index_select(0, src))
        query[:, :inner].index_copy_(
            0, long_tensor(members, device), qkv[:, 0].index_select(0, long_tensor(rows, device))
        )
    keys, query = keys.view(b, L, H, d), query.view(b, H, d)
    valid_t = torch.from_numpy(valid).to(device)
    mask = torch.from_numpy(np.where(valid, 0.0, -np.inf).astype(np.float32))  # -inf at padding
    if batch.size is None:
        bias = mask.to(device=device, dtype=keys.dtype)
    else:
        bias = batch.size.index_select(0, _sample_rows(batch, samples, L)).view(b, L).log()
        bias = bias + mask.to(device=device, dtype=bias.dtype)
    heads_t = None if (heads == H).all() else long_tensor(heads, device)
    scores = cls_attention(query, keys.transpose(1, 2), scale, bias, heads_t)
    return scores, keys[:, 1:].reshape(b, L - 1, H * d), valid_t[:, 1:]


def sample_tokens(batch: PackedBatch, x: Tensor, samples: list[int], L: int) -> Tensor:
    """The rows of x (T, C), stored as `batch`, of the `samples`' tokens, padded to L (repeating each sample's last
    token): (b, L, C); a view when they are every sample of a dense batch."""
    if batch.is_dense and L == batch.lengths[0] and samples == list(range(batch.batch_size)):
        return x.view(batch.batch_size, L, x.shape[1])
    return x.index_select(0, _sample_rows(batch, samples, L)).view(len(samples), L, x.shape[1])


def _sample_rows(batch: PackedBatch, samples: list[int], L: int) -> Tensor:
    """(b * L,) rows of the `samples`' tokens in `batch`, padded to L by repeating each sample's last row."""
    starts = np.asarray([batch._start_list()[s] for s in samples])
    n = np.asarray([batch.lengths[s] for s in samples])
    rows = starts[:, None] + np.minimum(np.arange(L), n[:, None] - 1)
    return long_tensor(rows.reshape(-1), batch.x.device)


def packed_reduction(
    batch: PackedBatch, plan: BlockPlan, slot: Tensor, order: list[int], merges: bool
) -> tuple[Reduction, list[int]]:
    """The `Reduction` of a block on `batch` (stored in attention order) whose reducing samples (`plan.reduced`)
    got `slot` (b, N) from `assign_tokens`, writing the batch in sample `order`; and the new lengths."""
    lengths = list(batch.lengths)
    for s in plan.reduced:
        lengths[s] = 1 + plan.schedules[s][1]
    device = batch.x.device
    if plan.uniform:  # every sample reduces, in place: each output row follows from the slots alone
        B, L = batch.batch_size, batch.lengths[0]
        samples = torch.arange(B, device=device)
        return Reduction.from_slots(slot, samples * L, samples * lengths[0], B * lengths[0], merges), lengths
    out_starts = np.zeros(batch.batch_size, dtype=np.int64)
    n_order = np.asarray([lengths[s] for s in order])
    out_starts[order] = np.cumsum(n_order) - n_order
    # every input row to its own place in the output (CLS and unreduced tokens); the slots place the rest
    in_order = batch.order
    n_in = np.asarray([batch.lengths[s] for s in in_order])
    offset = np.arange(int(n_in.sum())) - np.repeat(np.cumsum(n_in) - n_in, n_in)
    dst = long_tensor(np.repeat(out_starts[in_order], n_in) + offset, device)
    samples = plan.reduced
    n = long_tensor([batch.lengths[s] - 1 for s in samples], device)
    valid = torch.arange(slot.shape[1], device=device) < n[:, None]
    starts = long_tensor([batch._start_list()[s] for s in samples], device)
    rows = int(n_order.sum())
    reduction = Reduction.from_slots(slot, starts, long_tensor(out_starts[samples], device), rows, merges, valid, dst)
    return reduction, lengths


__all__ = ["PackedBatch"]

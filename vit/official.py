"""The official PRANCE meta-networks (arXiv 2407.05010) with their weights' names, and per-image execution of them.

The released meta-network is an AutoFormer-style supernet whose blocks each take an embedding width (a prefix of
the residual stream's channels) and an MLP ratio, with a fixed number of 64-wide heads, `lln` maps at the ends of
the groups of three blocks (blocks 2, 5, 8), and token pruning or merging at the decision blocks 3, 6 and 9.
`OfficialViT` holds the official state-dict layout (`checkpoint.pth` loads as it is) and computes what their
batch-inference forward computes for one configuration, quirks included: the interleaved `qkv` rows with the
plainly sliced bias, LayerNorms scaled by sqrt(E / E_super), a block's output width as known when it runs, the
ranking by CLS attention, and merging into plain means by the cosine of hidden states. Unlike the release, every
image may run its own configuration (`forward(x, [subnet, ...])`): images that share a block's configuration and
token count run it together, so each image gets what it gets alone, at what its configuration costs.

A configuration is a `vit.Subnet` whose blocks carry `embed_dim`; `subnets_from_config` and `config_from_subnets`
translate the official config dicts (`set_sample_config`'s arrays of samples x blocks). `get_complexity` is the
official FLOPs count, `count_macs` ours (what runs, exact against `torch.utils.flop_counter`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import check_state_dict, read_state_dict
from .config import TOKEN_MODES, BlockConfig, InvalidSubnetError, Subnet, check_token_mode
from .registry import register_supernet
from .supernet import PatchEmbed, model_pretrained_cfg

HEAD_DIM = 64  # the official attention's head width, whatever the embedding width
DECISION_BLOCKS = (3, 6, 9)  # blocks before which the selector decides, and that reduce tokens
LLN_BLOCKS = (2, 5, 8)  # the last blocks of the groups, whose residual goes through `lln`
GROUP = 3  # blocks per decision
STATE_DIM = 197  # the selector's state: one value per token of a 224-px image, zero-padded


@dataclass(frozen=True)
class OfficialShape:
    """A released supernet's shape and search space (`configs/0_supernet/supernet-{T,S,B}.yaml`)."""

    embed_dim: int
    num_heads: int
    mlp_ratio: float
    embed_choices: tuple[int, ...]
    mlp_ratio_choices: tuple[float, ...]

    @property
    def ratios(self) -> tuple[int, ...]:
        """The MLP ratios that run: the official config arrays are integer, so 3.5 runs as 3."""
        return tuple(int(r) for r in self.mlp_ratio_choices)


OFFICIAL_SHAPES = {
    "tiny": OfficialShape(256, 3, 6.0, (176, 192, 216, 240), (2, 4, 6)),
    "small": OfficialShape(448, 7, 5.0, (320, 352, 368, 384, 400, 416), (2, 3.5, 5)),
    "base": OfficialShape(768, 12, 5.0, (672, 696, 720, 744, 768), (2, 3.5, 5)),
}


#: keep ratios `OfficialSpace.sample` draws from (the official selector's are continuous: any in (0, 1] runs)
SAMPLED_KEEP_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class OfficialSpace:
    """The configurations an official meta-network runs: per block an embedding width and an MLP ratio from the
    shape's choices, the fixed heads, and keep ratios in [0, 1] at the decision blocks (1.0 elsewhere; a block keeps
    at least the CLS token)."""

    def __init__(self, shape: OfficialShape, depth: int, token_mode: str) -> None:
        self.shape, self.depth, self.token_mode = shape, depth, check_token_mode(token_mode)
        self.heads = shape.num_heads
        #: per block, the choices of each field (`vit.SearchSpace`'s layout; keep ratios: the sampled ones)
        self.embed_dim = (shape.embed_choices,) * depth
        self.mlp_ratio = (shape.ratios,) * depth
        self.keep_ratio = tuple(SAMPLED_KEEP_RATIOS if i in DECISION_BLOCKS else (1.0,) for i in range(depth))
        self.merge_ratio = self.keep_ratio if self.token_mode == "prune_merge" else ((1.0,),) * depth

    def block(self, embed_dim: int, ratio: int, keep: float = 1.0, merge: float = 1.0) -> BlockConfig:
        """The `BlockConfig` of an embedding width, an (integer) MLP ratio and keep ratios."""
        return BlockConfig(self.heads, int(embed_dim * ratio), float(keep), float(merge), int(embed_dim))

    def ratio(self, config: BlockConfig) -> int:
        """The MLP ratio of a block's configuration."""
        return config.mlp_hidden // config.embed_dim

    def offers(self, field: str, block: int, value) -> bool:
        """Whether `block` runs `value` for `field` (one of `fields`): a width among the choices, any keep ratio in
        [0, 1] at a decision block (1.0 elsewhere)."""
        if field in ("keep_ratio", "merge_ratio"):
            if field == "merge_ratio" and self.token_mode != "prune_merge":
                return value == 1.0
            return 0.0 <= value <= 1.0 if block in DECISION_BLOCKS else value == 1.0
        return value in getattr(self, field)[block]

    def from_values(self, values: dict) -> BlockConfig:
        """The `BlockConfig` of field values, by `fields`' names (a keep ratio not given is 1.0)."""
        return self.block(
            values["embed_dim"], values["mlp_ratio"], values.get("keep_ratio", 1.0), values.get("merge_ratio", 1.0)
        )

    def check(self, i: int, config: BlockConfig) -> BlockConfig:
        """`config` if block `i` can run it, else an `InvalidSubnetError` saying what does not fit."""
        shape = self.shape
        if not isinstance(config, BlockConfig):
            raise InvalidSubnetError(f"block {i}: expected a vit.BlockConfig, got {type(config).__name__}")
        if config.embed_dim not in shape.embed_choices:
            raise InvalidSubnetError(f"block {i}: embed_dim={config.embed_dim} is not one of {shape.embed_choices}")
        if config.heads != self.heads:
            raise InvalidSubnetError(f"block {i}: the official supernet runs {self.heads} heads, not {config.heads}")
        widths = [config.embed_dim * r for r in shape.ratios]
        if config.mlp_hidden not in widths:
            raise InvalidSubnetError(f"block {i}: mlp_hidden={config.mlp_hidden} is not one of {widths}")
        ratios = (config.keep_ratio, config.merge_ratio)
        if any(not 0.0 <= r <= 1.0 for r in ratios):
            raise InvalidSubnetError(f"block {i}: keep ratios must lie in [0, 1], got {ratios}")
        if i not in DECISION_BLOCKS and ratios != (1.0, 1.0):
            raise InvalidSubnetError(f"block {i}: tokens are reduced at blocks {DECISION_BLOCKS} only")
        if self.token_mode != "prune_merge" and config.merge_ratio != 1.0:
            raise InvalidSubnetError(f"block {i}: merge_ratio needs token_mode='prune_merge'; use keep_ratio")
        return config

    def validate(self, subnet: Subnet) -> Subnet:
        """`subnet` if every block can run its configuration, else an `InvalidSubnetError` naming the block."""
        if not isinstance(subnet, Subnet):
            raise InvalidSubnetError(f"expected a vit.Subnet, got {type(subnet).__name__}")
        if len(subnet) != self.depth:
            raise InvalidSubnetError(f"subnet has {len(subnet)} blocks, the model has {self.depth}")
        for i, config in enumerate(subnet):
            self.check(i, config)
        return subnet

    def validate_all(self, subnets: Sequence[Subnet]) -> None:
        """`validate` each of `subnets`, each distinct one once."""
        for subnet in set(subnets) if all(isinstance(s, Subnet) for s in subnets) else subnets:
            self.validate(subnet)

    def uniform(self, embed_dim: int, ratio: int, keep: float = 1.0, merge: float = 1.0) -> Subnet:
        """One embedding width and MLP ratio at every block, the keep ratios at the decision blocks."""
        return Subnet(
            tuple(
                self.block(embed_dim, ratio, *((keep, merge) if i in DECISION_BLOCKS else (1.0, 1.0)))
                for i in range(self.depth)
            )
        )

    # the index API of `vit.SearchSpace`, over the keep ratios of `keep_ratio` at the decision blocks
    @property
    def fields(self) -> tuple[str, ...]:
        """The per-block decisions, in action order."""
        return ("embed_dim", "mlp_ratio", "keep_ratio") + (("merge_ratio",) if self.token_mode == "prune_merge" else ())

    def choices(self, block: int) -> tuple[tuple, ...]:
        """The choice lists of `block`, one per field (keep ratios: the sampled ones at decision blocks, else 1.0)."""
        return tuple(getattr(self, f)[block] for f in self.fields)

    def num_choices(self, block: int) -> tuple[int, ...]:
        """The number of choices of `block`, one per field."""
        return tuple(len(c) for c in self.choices(block))

    def config(self, block: int, indices) -> BlockConfig:
        """The `BlockConfig` of `block` at the given choice indices (one per field)."""
        choices = self.choices(block)
        if len(indices) != len(choices) or any(not 0 <= int(i) < len(c) for i, c in zip(indices, choices)):
            raise InvalidSubnetError(f"block {block}: indices {tuple(indices)} outside the choices {choices}")
        values = [c[int(i)] for c, i in zip(choices, indices)]
        return self.check(block, self.block(*values))

    def indices(self, block: int, config: BlockConfig) -> tuple[int, ...]:
        """The choice indices of `config` at `block`; an `InvalidSubnetError` for a value that is not a choice."""
        self.check(block, config)
        values = (config.embed_dim, self.ratio(config), config.keep_ratio, config.merge_ratio)
        out = []
        for field, value, choices in zip(self.fields, values, self.choices(block)):
            if value not in choices:
                raise InvalidSubnetError(f"block {block}: {field}={value} is not one of the choices {choices}")
            out.append(choices.index(value))
        return tuple(out)

    def from_indices(self, indices) -> Subnet:
        """The subnet whose block `i` takes the choice indices `indices[i]`."""
        if len(indices) != self.depth:
            raise InvalidSubnetError(f"expected indices for {self.depth} blocks, got {len(indices)}")
        return Subnet(tuple(self.config(i, idx) for i, idx in enumerate(indices)))

    def largest(self) -> Subnet:
        """The widest configuration with no token reduction."""
        return self.uniform(self.shape.embed_choices[-1], self.shape.ratios[-1])

    def smallest(self) -> Subnet:
        """The first choice of every field: the narrowest widths, the lowest keep ratios."""
        return self.from_indices([[0] * len(self.fields)] * self.depth)

    def static_grid(self, tied: bool = False) -> list[Subnet]:
        """Uniform subnets: every embedding width x MLP ratio x keep ratio, or with `tied` the two widths at the same
        level (aligned on the largest), times the keep ratios."""
        embeds, ratios = self.shape.embed_choices, self.shape.ratios
        if tied:
            levels = min(len(embeds), len(ratios))
            widths = list(zip(embeds[-levels:], ratios[-levels:]))
        else:
            widths = [(e, r) for e in embeds for r in ratios]
        return [
            self.uniform(e, r, k, k if self.token_mode == "prune_merge" else 1.0)
            for e, r in widths
            for k in SAMPLED_KEEP_RATIOS
        ]

    def sample(self, rng: np.random.Generator | int | None = None, keep: Sequence[float] | None = None) -> Subnet:
        """Widths drawn uniformly per block (embedding widths per group of three blocks, as the official
        supernet training draws them), keep ratios from `keep` (default `keep_ratio`) at the decision blocks."""
        rng = np.random.default_rng(rng)
        keep = SAMPLED_KEEP_RATIOS if keep is None else keep
        shape, blocks = self.shape, []
        for i in range(self.depth):
            if i % GROUP == 0:
                embed = shape.embed_choices[rng.integers(len(shape.embed_choices))]
            ratios = [float(rng.choice(keep)) if i in DECISION_BLOCKS else 1.0 for _ in range(2)]
            if self.token_mode != "prune_merge":
                ratios[1] = 1.0
            blocks.append(self.block(embed, shape.ratios[rng.integers(len(shape.ratios))], *ratios))
        return Subnet(tuple(blocks))

    def __str__(self) -> str:
        s = self.shape
        return (
            f"OfficialSpace(depth={self.depth}, token_mode={self.token_mode!r}, heads={self.heads}, "
            f"embed_dim={s.embed_choices}, mlp_ratio={s.ratios}, keep ratios at blocks {DECISION_BLOCKS})"
        )


def output_width(subnet: Subnet, i: int, widest: int) -> int:
    """Block `i`'s output width, as the official forward knows it when the block runs: the next block's embedding
    width inside a group, the widest choice at the groups' last blocks (the next group is not decided yet), the
    block's own width at the last block."""
    if i == len(subnet) - 1:
        return subnet[i].embed_dim
    return widest if i in LLN_BLOCKS else subnet[i + 1].embed_dim


def output_widths(subnet: Subnet, widest: int) -> list[int]:
    """Every block's `output_width`."""
    return [output_width(subnet, i, widest) for i in range(len(subnet))]


def token_counts(subnet: Subnet, tokens: int, token_mode: str) -> list[tuple[int, int, int]]:
    """Per block: the tokens (CLS included) it attends over, after its pruning, and after its merging.

    As the official code counts: prune keeps int(p * N) tokens (at least one: the CLS token), merge int(m * N') of
    the N' it sees (none: no merge, as the release's merge does; the release then carries a token count of 0 into
    its later decisions and FLOPs, which are not reproduced: later blocks see the tokens they hold)."""
    counts = []
    for i, config in enumerate(subnet):
        pruned = merged = tokens
        if i in DECISION_BLOCKS:
            _, pruned, merged = _counts(config, tokens, token_mode)
        counts.append((tokens, pruned, merged))
        tokens = merged
    return counts


class OfficialAttention(nn.Module):
    """The official attention's weights (`qkv`, `proj`, super width in and out) and its forward at a width."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.inner = num_heads, num_heads * HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        rows = torch.arange(3 * self.inner).view(self.inner, 3).t().reshape(-1)
        self.register_buffer("qkv_rows", rows, persistent=False)  # their rows 0::3, 1::3, 2::3 of the first 3*inner

    def forward(self, x: Tensor, size: Tensor, embed_dim: int, probs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (B, N, C) normalised tokens, size (B, N) token sizes: the output (B, N, embed_dim), the key profile
        (B, N) (the mean of the keys over heads and channels: the selector's state) and, with `probs`, the
        attention probabilities (B, h, N, N)."""
        B, N, C = x.shape
        weight = self.qkv.weight.index_select(0, self.qkv_rows)[:, :C]
        qkv = F.linear(x, weight, self.qkv.bias[: 3 * self.inner])
        q, k, v = qkv.view(B, N, 3, self.num_heads, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
        bias = size.log()[:, None, None, :]  # proportional attention
        attn = None
        if probs:
            attn = ((q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5 + bias).softmax(dim=-1)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.transpose(1, 2).reshape(B, N, self.inner)
        return (
            F.linear(out, self.proj.weight[:embed_dim, : self.inner], self.proj.bias[:embed_dim]),
            k.mean((1, 3)),
            attn,
        )


def scaled_norm(norm: nn.LayerNorm, x: Tensor, embed_dim: int, super_dim: int) -> Tensor:
    """The official LayerNorm: over the C channels x has, times sqrt(embed_dim / super_dim), then the first C
    weights and biases."""
    C = x.shape[-1]
    y = F.layer_norm(x, (C,), eps=norm.eps) * math.sqrt(embed_dim / super_dim)
    return y * norm.weight[:C] + norm.bias[:C]


def fit_width(x: Tensor, width: int) -> Tensor:
    """x cut or zero-padded to `width` channels."""
    C = x.shape[-1]
    return x[..., :width] if C >= width else F.pad(x, (0, width - C))


class OfficialBlock(nn.Module):
    """One official block: its weights under the official names and its forward at a configuration."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, lln: bool) -> None:
        super().__init__()
        self.dim = dim
        hidden = int(mlp_ratio * dim)
        self.attn = OfficialAttention(dim, num_heads)
        self.attn_layer_norm = nn.LayerNorm(dim)
        self.ffn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        if lln:
            self.lln = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, size: Tensor, config: BlockConfig, out_dim: int, reduce: str | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens x (B, N, C) of sizes (B, N) through the block at `config`, all samples alike; `reduce` is the
        token mode at a decision block, None elsewhere. Returns the tokens (B, N', out_dim), their sizes and the key
        profile (B, N) of the attention."""
        E = config.embed_dim
        attended, profile, attn = self.attn(scaled_norm(self.attn_layer_norm, x, E, self.dim), size, E, reduce)
        x = x[..., :E] + attended
        if reduce is not None:
            x, size = reduce_tokens(x, size, attn, config, reduce)
        h = scaled_norm(self.ffn_layer_norm, x, E, self.dim)
        h = F.gelu(F.linear(h, self.fc1.weight[: config.mlp_hidden, :E], self.fc1.bias[: config.mlp_hidden]))
        h = F.linear(h, self.fc2.weight[:out_dim, : config.mlp_hidden], self.fc2.bias[:out_dim])
        if hasattr(self, "lln"):
            return F.linear(x, self.lln.weight[:out_dim, :E], self.lln.bias[:out_dim]) + h, size, profile
        return fit_width(x, out_dim) + h, size, profile


def reduce_tokens(x: Tensor, size: Tensor, attn: Tensor, config: BlockConfig, token_mode: str) -> tuple[Tensor, Tensor]:
    """The official token reduction after attention: tokens ranked by the CLS row of the attention (mean over
    heads), then pruned to the first int(p * N), and/or merged: each other token into its most similar (cosine of
    hidden states) of the first int(m * N), a plain mean including that token; sizes add."""
    B, N, C = x.shape
    order = attn[:, :, 0, 1:].mean(dim=1).sort(dim=-1, descending=True).indices + 1
    order = torch.cat([order.new_zeros(B, 1), order], dim=1)
    x = x.gather(1, order[..., None].expand(-1, -1, C))
    size = size.gather(1, order)
    _, pruned, merged = _counts(config, N, token_mode)
    x, size = x[:, :pruned], size[:, :pruned]
    if merged == pruned:
        return x, size
    metric = x / x.norm(dim=-1, keepdim=True)
    similarity = metric[:, merged:] @ metric[:, :merged].transpose(1, 2)
    similarity[..., 0] = -math.inf  # nothing merges into the CLS token
    target = similarity.argmax(dim=-1)  # (B, pruned - merged)
    x = x[:, :merged].scatter_reduce(1, target[..., None].expand(-1, -1, C), x[:, merged:], reduce="mean")
    size = size[:, :merged].scatter_add(1, target, size[:, merged:])
    return x, size


def _counts(config: BlockConfig, tokens: int, token_mode: str) -> tuple[int, int, int]:
    """`token_counts` of one decision block that sees `tokens` tokens."""
    pruned = merged = tokens
    if token_mode in ("prune", "prune_merge"):
        pruned = merged = max(1, int(config.keep_ratio * tokens))
    if token_mode != "prune":
        merged = int((config.keep_ratio if token_mode == "merge" else config.merge_ratio) * pruned)
        merged = merged or pruned  # merging into no token leaves them all, as the release's merge does
    return tokens, pruned, merged


class OfficialPatchEmbed(PatchEmbed):
    """The official patch embedding (`patch_embed_super.proj`): a strided convolution at the super width, run for
    the first channels only."""

    def forward(self, x: Tensor, width: int) -> Tensor:
        """Images (B, C_in, H, W) to (B, N, width): the first `width` output channels only, computed alone."""
        w, b = self.proj.weight[:width], self.proj.bias[:width]
        return F.conv2d(x, w, b, stride=self.patch_size).flatten(2).transpose(1, 2)


class OfficialViT(nn.Module):
    """An official PRANCE meta-network: the release's state dict, its forward at one configuration, and per-image
    configurations.

    `forward(x)` runs the largest configuration, `forward(x, subnet)` one `vit.Subnet` (blocks with `embed_dim`)
    for the whole batch, `forward(x, [s_0, s_1, ...])` one per image. The stepwise API the selector drives is
    `embed`, `run_blocks` and `classify` on an `OfficialTokens`.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 3,
        mlp_ratio: float = 6.0,
        embed_choices: Sequence[int] = (176, 192, 216, 240),
        mlp_ratio_choices: Sequence[float] = (2, 4, 6),
        depth: int = 12,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        token_mode: str = "prune",
        pretrained_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        shape = OfficialShape(embed_dim, num_heads, mlp_ratio, tuple(embed_choices), tuple(mlp_ratio_choices))
        if max(shape.embed_choices) > embed_dim or int(max(shape.mlp_ratio_choices) * embed_dim) > int(
            mlp_ratio * embed_dim
        ):
            raise ValueError("the search space's widths must fit the supernet's")
        if depth <= max(LLN_BLOCKS + DECISION_BLOCKS):
            raise ValueError(f"the official supernet has decisions at blocks {DECISION_BLOCKS}: depth must exceed 9")
        self.shape = shape
        self.search_space = OfficialSpace(shape, depth, token_mode)
        self.token_mode = token_mode
        self.depth, self.embed_dim, self.num_classes = depth, embed_dim, num_classes
        self.pretrained_cfg = model_pretrained_cfg(pretrained_cfg, num_classes, in_chans, img_size)
        self.patch_embed_super = OfficialPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed_super.num_patches
        self.num_tokens = self.num_patches + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            OfficialBlock(embed_dim, num_heads, mlp_ratio, i in LLN_BLOCKS) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def default_cfg(self) -> dict:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    @property
    def patch_embed(self) -> OfficialPatchEmbed:
        """The patch embedding under `vit.ElasticViT`'s name (its weights stay `patch_embed_super`'s)."""
        return self.patch_embed_super

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay: the embeddings (timm's interface; norms and biases go by shape)."""
        return {"cls_token", "pos_embed"}

    def check_input(self, x: Tensor) -> None:
        """A `ValueError` unless x is a batch of finite images of the model's input shape."""
        expected = tuple(self.pretrained_cfg["input_size"])
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shown = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {shown}")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")

    def embed(self, x: Tensor, widths: Sequence[int] | int) -> OfficialTokens:
        """Images to tokens: patch embedding, CLS token and position embedding at the first block's embedding width
        (one for all or one per image)."""
        self.check_input(x)
        B = x.shape[0]
        widths = [int(widths)] * B if isinstance(widths, int) else [int(w) for w in widths]
        if len(widths) != B:
            raise ValueError(f"got {len(widths)} widths for a batch of {B} images")
        buckets = []
        for width, index in _group(range(B), widths).items():
            rows = torch.as_tensor(index, device=x.device)
            t = self.patch_embed_super(x.index_select(0, rows), width)
            t = torch.cat([self.cls_token[..., :width].expand(len(index), -1, -1), t], dim=1)
            t = t + self.pos_embed[..., :width]
            buckets.append(Bucket(rows, t, t.new_ones(t.shape[:2]), None))
        return OfficialTokens(B, buckets, 0)

    def run_blocks(self, tokens: OfficialTokens, subnets: Sequence[Subnet], stop: int | None = None) -> OfficialTokens:
        """Run blocks `tokens.block` up to `stop` (default: the end), image b at `subnets[b]` (only these blocks of
        it are read, and block `stop`'s embedding width where a block's output width needs it). Images sharing a
        block's configuration, output width and token count run it as one batch."""
        stop = self.depth if stop is None else stop
        widest = self.shape.embed_choices[-1]
        buckets = tokens.buckets
        for i in range(tokens.block, stop):
            reduce = self.token_mode if i in DECISION_BLOCKS else None
            keys: dict[tuple, list[tuple[Bucket, Tensor]]] = defaultdict(list)
            for bucket in buckets:
                samples = bucket.rows.tolist()
                for key, members in _group(
                    range(len(samples)), [_block_key(subnets[s], i, widest) for s in samples]
                ).items():
                    keys[key + (tuple(bucket.x.shape[1:]),)].append(
                        (bucket, torch.as_tensor(members, device=bucket.x.device))
                    )
            buckets = []
            for (config, out_dim, _), parts in keys.items():
                bucket = Bucket.cat([b.select(m) for b, m in parts])
                x, size, profile = self.blocks[i](bucket.x, bucket.size, config, out_dim, reduce)
                buckets.append(Bucket(bucket.rows, x, size, profile))
        return OfficialTokens(tokens.batch_size, buckets, stop)

    def classify(self, tokens: OfficialTokens) -> Tensor:
        """Logits (B, classes) of tokens that ran every block: the scaled final norm of the CLS token, the head."""
        if tokens.block != self.depth:
            raise ValueError(f"the tokens ran {tokens.block} of {self.depth} blocks")
        logits = None
        for bucket in tokens.buckets:
            cls = bucket.x[:, :1]
            E = cls.shape[-1]
            out = F.linear(
                scaled_norm(self.norm, cls, E, self.embed_dim)[:, 0], self.head.weight[:, :E], self.head.bias
            )
            if logits is None:
                logits = out.new_empty(tokens.batch_size, out.shape[-1])
            logits[bucket.rows] = out
        return logits

    def forward(self, x: Tensor, subnet: Subnet | Sequence[Subnet] | None = None, layout: str = "bucketed") -> Tensor:
        """Logits (B, num_classes) of the largest configuration, of one `Subnet` for the batch, or of one per image.

        Per-image subnets run in buckets of images that share a block's configuration, output width and token
        count (`layout` `bucketed`; `packed`, the `ElasticViT` layout, runs the same buckets here)."""
        if layout not in ("packed", "bucketed"):
            raise ValueError(f"unknown layout {layout!r}; expected 'packed' or 'bucketed'")
        if subnet is None:
            subnet = self.search_space.largest()
        if isinstance(subnet, Subnet):
            subnets = [self.search_space.validate(subnet)] * x.shape[0]
        elif isinstance(subnet, str) or not isinstance(subnet, Sequence):
            raise InvalidSubnetError(f"expected a vit.Subnet or one per image, got {type(subnet).__name__}")
        else:
            subnets = list(subnet)
            if len(subnets) != x.shape[0]:
                raise ValueError(f"got {len(subnets)} subnets for a batch of {x.shape[0]} images")
            self.search_space.validate_all(subnets)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.num_classes)
        tokens = self.embed(x, [s[0].embed_dim for s in subnets])
        return self.classify(self.run_blocks(tokens, subnets))


def _block_key(subnet: Subnet, i: int, widest: int) -> tuple[BlockConfig, int]:
    """What block `i` runs for an image: its configuration and its output width."""
    return subnet[i], output_width(subnet, i, widest)


def _group(items, keys) -> dict:
    """`items` grouped by their `keys`, in order of first appearance."""
    groups: dict = {}
    for item, key in zip(items, keys):
        groups.setdefault(key, []).append(item)
    return groups


@dataclass
class Bucket:
    """Images of a batch that hold the same token count and width: their batch rows, tokens (b, N, C), token sizes
    (b, N) and the key profile (b, N) of the last block they ran (None before the first)."""

    rows: Tensor
    x: Tensor
    size: Tensor
    profile: Tensor | None

    def select(self, members: Tensor) -> Bucket:
        """The bucket of `members` (positions in this bucket)."""
        profile = None if self.profile is None else self.profile.index_select(0, members)
        return Bucket(
            self.rows.index_select(0, members),
            self.x.index_select(0, members),
            self.size.index_select(0, members),
            profile,
        )

    @staticmethod
    def cat(parts: Sequence[Bucket]) -> Bucket:
        """Buckets of equal token shapes, as one, to run a block (which gives it its own key profile)."""
        if len(parts) == 1:
            return parts[0]
        return Bucket(*(torch.cat([getattr(p, f) for p in parts]) for f in ("rows", "x", "size")), None)


@dataclass
class OfficialTokens:
    """A batch's tokens between blocks of an `OfficialViT`: buckets of images, and the next block to run."""

    batch_size: int
    buckets: list[Bucket]
    block: int

    def num_patches(self) -> Tensor:
        """(B,) int64: the patch tokens (CLS not counted) each image holds."""
        first = self.buckets[0].x
        counts = torch.empty(self.batch_size, dtype=torch.long, device=first.device)
        for b in self.buckets:
            counts[b.rows] = b.x.shape[1] - 1
        return counts

    def cls(self, width: int | None = None) -> Tensor:
        """(B, width) the CLS token of each image, zero-padded to `width` (default: the widest bucket's)."""
        width = max(b.x.shape[-1] for b in self.buckets) if width is None else width
        first = self.buckets[0].x
        out = first.new_zeros(self.batch_size, width)
        for b in self.buckets:
            out[b.rows] = fit_width(b.x[:, 0], width)
        return out

    def state(self, dim: int = STATE_DIM) -> Tensor:
        """The official selector's state (B, dim): each image's key profile of the last block run, zero-padded."""
        if any(b.profile is None for b in self.buckets):
            raise ValueError("the state is the key profile of a block: run one first")
        first = self.buckets[0].profile
        state = first.new_zeros(self.batch_size, dim)
        for b in self.buckets:
            state[b.rows, : b.profile.shape[1]] = b.profile[:, :dim]
        return state


# ------------------------------------------------------------------ their actions, their configurations, FLOPs, files


def action_dim(token_mode: str) -> int:
    """The official action's size: 3 MLP ratios, 3 embedding widths, one keep ratio (two in `prune_merge`)."""
    return 8 if token_mode == "prune_merge" else 7


def decode_actions(space: OfficialSpace, actions: np.ndarray, block: int) -> list[tuple[BlockConfig, ...]]:
    """Each image's configurations of blocks `block` to `block + 2` from its official action (B, 7 or 8), as the
    release's `action_to_config` reads it: a[0:3] the MLP-ratio and a[3:6] the embedding-width indices of the three
    blocks, `round(clip(a, 0, 1) * (n - 1))` (halves to even), then the keep ratio (prune, merge; in `prune_merge`
    the two) of the decision block, clipped to [0, 1] and used raw."""
    if block not in DECISION_BLOCKS:
        raise ValueError(f"the official actions decide at blocks {DECISION_BLOCKS}, not {block}")
    actions = np.asarray(actions, dtype=np.float64)
    dim = action_dim(space.token_mode)
    if actions.ndim != 2 or actions.shape[1] != dim:
        raise ValueError(f"expected official actions (B, {dim}), got {actions.shape}")
    shape = space.shape
    ratios = np.asarray(shape.ratios)[_index(actions[:, 0:3], len(shape.ratios))]
    embeds = np.asarray(shape.embed_choices)[_index(actions[:, 3:6], len(shape.embed_choices))]
    keep = actions[:, -2] if space.token_mode == "prune_merge" else actions[:, -1]
    merge = actions[:, -1] if space.token_mode == "prune_merge" else np.ones(len(actions))
    return [
        tuple(
            space.block(int(e), int(r), *((k, m) if j == 0 else (1.0, 1.0)))
            for j, (e, r) in enumerate(zip(embeds[b], ratios[b]))
        )
        for b, (k, m) in enumerate(zip(np.clip(keep, 0.0, 1.0), np.clip(merge, 0.0, 1.0)))
    ]


def batch_mean_configs(space: OfficialSpace, actions: np.ndarray, block: int) -> tuple[BlockConfig, ...]:
    """The configurations the release's batch inference runs for a whole batch (`set_sample_config_batch`): per
    block the decoded embedding widths and MLP ratios averaged over the batch, rounded and snapped to the nearest
    choice (the first of two as near), the pruning ratio averaged, the merging ratio the first image's."""
    per_image = decode_actions(space, actions, block)
    shape, out = space.shape, []
    for j in range(GROUP):
        configs = [c[j] for c in per_image]
        embed = _snap(np.mean([c.embed_dim for c in configs]), shape.embed_choices)
        ratio = int(_snap(np.mean([space.ratio(c) for c in configs]), shape.mlp_ratio_choices))
        keep, merge = np.mean([c.keep_ratio for c in configs]), configs[0].merge_ratio
        if space.token_mode == "merge":
            keep = configs[0].keep_ratio
        out.append(space.block(int(embed), ratio, float(keep), float(merge)))
    return tuple(out)


def _index(values: np.ndarray, n: int) -> np.ndarray:
    """`round(clip(a, 0, 1) * (n - 1))` per value, numpy's rounding (halves to even)."""
    return np.round(np.clip(values, 0.0, 1.0) * (n - 1)).astype(int)


def _snap(value: float, choices: Sequence[float]) -> float:
    """The choice nearest to `value` rounded (halves to even), the first of two as near."""
    choices = np.asarray(choices, dtype=np.float64)
    return float(choices[np.argmin(np.abs(choices - np.round(value)))])


def subnets_from_config(model: OfficialViT, config: dict) -> list[Subnet]:
    """One `vit.Subnet` per sample of an official config dict (`set_sample_config`'s: `embed_dim`, `mlp_ratio`,
    `prune_granularity`, `merge_granularity` as arrays of samples x blocks, `num_heads`, `layer_num`), checked
    against the model's search space. Keep ratios are read at the decision blocks, where the official code reads
    them; the MLP ratios as the official integer arrays hold them (3.5 runs as 3)."""
    space = model.search_space
    missing = [k for k in ("embed_dim", "mlp_ratio", "prune_granularity", "merge_granularity") if k not in config]
    if missing:
        raise ValueError(f"the config has no {', '.join(missing)}")
    arrays = {k: np.atleast_2d(np.asarray(config[k])) for k in ("embed_dim", "mlp_ratio")}
    arrays |= {
        k: np.atleast_2d(np.asarray(config[k], dtype=np.float64)) for k in ("prune_granularity", "merge_granularity")
    }
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) != 1 or next(iter(shapes.values()))[1] != space.depth:
        raise ValueError(f"the config's arrays must all be samples x {space.depth} blocks, got {shapes}")
    if config.get("num_heads", space.heads) != space.heads or config.get("layer_num", space.depth) != space.depth:
        raise ValueError(f"the config asks for {config.get('num_heads')} heads and {config.get('layer_num')} blocks")
    prune, merge = arrays["prune_granularity"], arrays["merge_granularity"]
    keep = {"prune": prune, "merge": merge, "prune_merge": prune}[space.token_mode]
    second = merge if space.token_mode == "prune_merge" else np.ones_like(merge)
    subnets = []
    for s in range(prune.shape[0]):
        blocks = []
        for i in range(space.depth):
            ratios = (keep[s, i], second[s, i]) if i in DECISION_BLOCKS else (1.0, 1.0)
            blocks.append(
                space.check(i, space.block(int(arrays["embed_dim"][s, i]), int(arrays["mlp_ratio"][s, i]), *ratios))
            )
        subnets.append(Subnet(tuple(blocks)))
    return subnets


def config_from_subnets(model: OfficialViT, subnets: Sequence[Subnet]) -> dict:
    """The official config dict of per-sample subnets: `subnets_from_config`'s inverse."""
    space = model.search_space
    space.validate_all(subnets)
    ratio = np.array([[space.ratio(c) for c in s] for s in subnets], dtype=int)
    keep = np.array([[c.keep_ratio for c in s] for s in subnets])
    second = np.array([[c.merge_ratio for c in s] for s in subnets])
    ones = np.ones_like(keep)
    prune, merge = {"prune": (keep, ones), "merge": (ones, keep), "prune_merge": (keep, second)}[space.token_mode]
    return {
        "embed_dim": np.array([[c.embed_dim for c in s] for s in subnets], dtype=int),
        "mlp_ratio": ratio,
        "num_heads": space.heads,
        "layer_num": space.depth,
        "prune_granularity": prune,
        "merge_granularity": merge,
    }


def get_complexity(model: OfficialViT, subnet: Subnet) -> float:
    """The official FLOPs count of a configuration (their `get_complexity`, multiply-accumulates): LayerNorms and
    the position embedding counted, `lln` not, the head once per token of the last block; in `prune_merge` a
    decision block's attention counted on the tokens left after pruning, as theirs is."""
    space = model.search_space
    space.validate(subnet)
    embed = model.patch_embed_super
    inner = space.heads * HEAD_DIM
    e0 = subnet[0].embed_dim
    total = e0 * (1 + embed.num_patches * embed.in_chans * embed.patch_size**2) + model.num_tokens / 2 * e0
    outs = output_widths(subnet, model.shape.embed_choices[-1])
    counts = token_counts(subnet, model.num_tokens, model.token_mode)
    for i, (config, out, (before, pruned, after)) in enumerate(zip(subnet, outs, counts)):
        E, Fh = config.embed_dim, config.mlp_hidden
        t_b = pruned if (i in DECISION_BLOCKS and model.token_mode == "prune_merge") else before
        total += t_b * E + t_b * E * 3 * inner + 2 * t_b * t_b * inner + t_b * inner * E
        total += after * E + after * E * Fh + after * Fh * out
    last = (
        counts[-1][0]
        if not (model.depth - 1 in DECISION_BLOCKS and model.token_mode == "prune_merge")
        else counts[-1][1]
    )
    return float(total + last * subnet[-1].embed_dim * model.num_classes)


def count_macs(model: OfficialViT, subnet: Subnet | Sequence[Subnet] | None = None) -> int | list[int]:
    """The multiply-accumulates `OfficialViT` runs for one image at `subnet` (largest when None; a list for a
    sequence): patch embedding at the first width, qkv on the input's width, attention, proj, the merge
    similarity, the MLP, `lln`, the head on the CLS token. Norms and element-wise work are not counted, as
    `torch.utils.flop_counter` counts none; it counts exactly this."""
    if subnet is not None and not isinstance(subnet, Subnet):
        return [count_macs(model, s) for s in subnet]
    space = model.search_space
    subnet = space.largest() if subnet is None else space.validate(subnet)
    width, tokens = subnet[0].embed_dim, model.num_tokens
    total = embed_macs(model, width)
    for i, (config, out) in enumerate(zip(subnet, output_widths(subnet, model.shape.embed_choices[-1]))):
        macs, tokens = block_macs(model, i, config, width, out, tokens)
        total += macs
        width = out
    return total + head_macs(model, subnet[-1].embed_dim)


def embed_macs(model: OfficialViT, width: int) -> int:
    """MACs of the patch embedding of one image at the first block's embedding width."""
    embed = model.patch_embed_super
    return embed.num_patches * embed.in_chans * embed.patch_size**2 * width


def head_macs(model: OfficialViT, width: int) -> int:
    """MACs of the head on the CLS token of the last block's width."""
    return width * model.num_classes


def block_macs(model: OfficialViT, i: int, config: BlockConfig, width: int, out: int, tokens: int) -> tuple[int, int]:
    """MACs of block `i` for one image entering it with `tokens` tokens (CLS included) `width` wide, running
    `config` to an output `out` wide, and the tokens it leaves: qkv on the input's width, attention, proj, the merge
    similarity, the MLP and `lln`."""
    inner = model.search_space.heads * HEAD_DIM
    before = pruned = after = tokens
    if i in DECISION_BLOCKS:
        before, pruned, after = _counts(config, tokens, model.token_mode)
    E, Fh = config.embed_dim, config.mlp_hidden
    macs = before * width * 3 * inner + 2 * before * before * inner + before * inner * E
    macs += (pruned - after) * after * E  # cosine similarity of the merged tokens to the kept ones
    macs += after * (E * Fh + Fh * out + (E * out if i in LLN_BLOCKS else 0))
    return macs, after


def count_params(model: OfficialViT, subnet: Subnet | Sequence[Subnet] | None = None) -> int | list[int]:
    """The parameters `subnet` (largest when None; a list for a sequence) reads: the slices of every weight its
    widths take."""
    if subnet is not None and not isinstance(subnet, Subnet):
        return [count_params(model, s) for s in subnet]
    space = model.search_space
    subnet = space.largest() if subnet is None else space.validate(subnet)
    embed, inner = model.patch_embed_super, space.heads * HEAD_DIM
    width = subnet[0].embed_dim
    total = width * (embed.in_chans * embed.patch_size**2 + 1) + width * (1 + model.num_tokens)
    for i, (config, out) in enumerate(zip(subnet, output_widths(subnet, model.shape.embed_choices[-1]))):
        E, Fh = config.embed_dim, config.mlp_hidden
        total += 2 * width + 3 * inner * (width + 1) + E * (inner + 1)  # norm, qkv, proj
        total += 2 * E + Fh * (E + 1) + out * (Fh + 1) + (out * (E + 1) if i in LLN_BLOCKS else 0)
        width = out
    return total + 2 * width + model.num_classes * (width + 1)


def load_official(model: OfficialViT, path: str | Path) -> OfficialViT:
    """Load an official `checkpoint.pth` into `model` after checking every key and shape; returns `model`."""
    state = read_state_dict(path)
    check_state_dict(model, state, source=f"{path} (an official PRANCE meta-network?)")
    model.load_state_dict(state)
    return model


def create_official(
    size: str, token_mode: str = "prune", checkpoint: str | Path | None = None, **kwargs: Any
) -> OfficialViT:
    """The official meta-network `size` (`tiny`, `small`, `base`), with the weights of an official `checkpoint.pth`
    if given."""
    if size not in OFFICIAL_SHAPES:
        raise ValueError(f"unknown official size {size!r}; expected one of {', '.join(OFFICIAL_SHAPES)}")
    model = OfficialViT(**dataclasses.asdict(OFFICIAL_SHAPES[size]), token_mode=token_mode, **kwargs)
    if checkpoint is not None:
        load_official(model, checkpoint)
    return model


#: the registered names of the official meta-networks
OFFICIAL_PRESETS = ("prance_official_tiny", "prance_official_small", "prance_official_base")

#: where the release publishes its checkpoints (`checkpoints/meta-network/<size>/checkpoint.pth`, ...)
OFFICIAL_HUB = "childtang/PRANCE"


def _preset(size: str, pretrained: bool, kwargs: dict) -> OfficialViT:
    """The official meta-network `size`; `pretrained` downloads the release's meta-network from its hub."""
    cache_dir = kwargs.pop("cache_dir", None)
    model = create_official(size, **kwargs)
    if pretrained:
        import huggingface_hub

        file = f"checkpoints/meta-network/{size}/checkpoint.pth"
        load_official(model, huggingface_hub.hf_hub_download(OFFICIAL_HUB, file, cache_dir=cache_dir))
    return model


def _hub_tag(size: str) -> dict[str, dict]:
    return {"meta": {"hf_hub_id": OFFICIAL_HUB, "description": f"the release's {size} meta-network (downloads)"}}


@register_supernet(tags=_hub_tag("tiny"))
def prance_official_tiny(pretrained: bool = False, **kwargs) -> OfficialViT:
    """The official PRANCE T meta-network (256 wide, 3 heads, embed widths 176-240, MLP ratios 2/4/6)."""
    return _preset("tiny", pretrained, kwargs)


@register_supernet(tags=_hub_tag("small"))
def prance_official_small(pretrained: bool = False, **kwargs) -> OfficialViT:
    """The official PRANCE S meta-network (448 wide, 7 heads, embed widths 320-416, MLP ratios 2/3/5)."""
    return _preset("small", pretrained, kwargs)


@register_supernet(tags=_hub_tag("base"))
def prance_official_base(pretrained: bool = False, **kwargs) -> OfficialViT:
    """The official PRANCE B meta-network (768 wide, 12 heads, embed widths 672-768, MLP ratios 2/3/5)."""
    return _preset("base", pretrained, kwargs)


__all__ = [
    "DECISION_BLOCKS",
    "OFFICIAL_PRESETS",
    "STATE_DIM",
    "action_dim",
    "batch_mean_configs",
    "block_macs",
    "decode_actions",
    "LLN_BLOCKS",
    "OFFICIAL_SHAPES",
    "TOKEN_MODES",
    "OfficialShape",
    "OfficialSpace",
    "OfficialTokens",
    "OfficialViT",
    "config_from_subnets",
    "count_macs",
    "count_params",
    "create_official",
    "get_complexity",
    "load_official",
    "prance_official_base",
    "prance_official_small",
    "prance_official_tiny",
    "output_width",
    "output_widths",
    "subnets_from_config",
    "token_counts",
]

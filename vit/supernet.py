"""The elastic Vision Transformer: one set of timm-named weights that runs at any per-block width and token count.

Read top to bottom: elastic attention and MLP (prefix slices of the full weights), the block (attention, token
reduction, MLP), then the model. Parameter names and shapes are those of timm's `VisionTransformer`, so
`load_state_dict(timm_model.state_dict())` works and the largest subnet with no token reduction computes exactly
what timm computes.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .bucketed import BucketedBatch
from .config import BlockConfig, InvalidSubnetError, SearchSpace, Subnet, channel_statistics, check_token_mode
from .packed import BlockPlan, PackedBatch
from .token_ops import token_schedule

MERGE_VARIANTS = ("tome", "official")
#: The batch layouts of per-sample execution: how `ElasticViT.forward` and `vit.inference.InferenceRunner` hold a
#: batch whose samples run different configurations.
TOKEN_BATCHES = {"packed": PackedBatch, "bucketed": BucketedBatch}
LAYOUTS = tuple(TOKEN_BATCHES)
#: The data config a model's `pretrained_cfg` starts from: DeiT's ImageNet evaluation (224/256 centre crop, bicubic,
#: ImageNet statistics) and the license of DeiT's weights and of this package.
IMAGENET_CFG = {
    "crop_pct": 0.875,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "license": "apache-2.0",
}


class ElasticAttention(nn.Module):
    """Multi-head self-attention whose first `heads` heads run; the head dim stays fixed.

    Slicing keeps the first `heads * head_dim` rows of each of the q, k and v blocks of `qkv` and the same
    columns of `proj`, so a narrower attention is a real, smaller computation. `ElasticBlock` runs it.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_params(self, heads: int) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of `qkv` at `heads` heads: the prefix of each of its q, k, v row blocks."""
        w, b = self.qkv.weight, self.qkv.bias
        if heads == self.num_heads:
            return w, b
        C, inner = w.shape[1], heads * self.head_dim
        b = None if b is None else b.view(3, C)[:, :inner].reshape(-1)
        return w.view(3, C, C)[:, :inner].reshape(3 * inner, C), b

    def proj_params(self, heads: int) -> tuple[Tensor, Tensor]:
        """Weight and bias of `proj` at `heads` heads."""
        return self.proj.weight[:, : heads * self.head_dim], self.proj.bias

    def forward(self, x: Tensor) -> Tensor:
        """Every head on dense tokens (B, T, C), as timm's `Attention`: the default forward's."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class ElasticMlp(nn.Module):
    """Two-layer MLP whose first `hidden` neurons run (rows of `fc1`, columns of `fc2`). `ElasticBlock` runs it."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: Tensor, hidden: int) -> Tensor:
        """The first `hidden` neurons' activations."""
        return self.act(F.linear(x, self.fc1.weight[:hidden], self.fc1.bias[:hidden]))

    def fc2_params(self, hidden: int) -> tuple[Tensor, Tensor]:
        """Weight and bias of `fc2` at `hidden` neurons."""
        return self.fc2.weight[:, :hidden], self.fc2.bias

    def forward(self, x: Tensor) -> Tensor:
        """Every neuron, as timm's `Mlp`: the default forward's."""
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (training only), on dense tokens or on a packed batch's rows."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """x (B, ...): one draw per sample."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    @torch.jit.unused
    def packed(self, x: Tensor, batch: PackedBatch) -> Tensor:
        """x (T, C): rows of `batch`'s samples, in its order."""
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(batch.batch_size).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        order = torch.as_tensor(batch.order, device=x.device)
        lengths = torch.as_tensor([batch.lengths[s] for s in batch.order], device=x.device)
        return x * keep[order].repeat_interleave(lengths, output_size=x.shape[0])[:, None]


class ElasticBlock(nn.Module):
    """Pre-norm transformer block: attention, then token reduction, then MLP.

    `run` is the elastic block: one implementation for a dense batch and for a batch whose samples run different
    configurations and hold different numbers of tokens (`vit.PackedBatch`; a dense batch is its case of one run).
    `forward` is the block at full width with no reduction on dense tokens, timm's `Block`: the default forward's,
    which TorchScript, FX and `torch.export` (ONNX) can follow.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ElasticAttention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ElasticMlp(dim, mlp_hidden)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """The full block on dense tokens (B, T, C)."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    @torch.jit.unused
    def run(
        self,
        batch: PackedBatch,
        configs: BlockConfig | Sequence[BlockConfig],
        token_mode: str,
        merge_variant: str = "tome",
    ) -> PackedBatch:
        """The batch after the block, sample b at `configs[b]` (or every sample at one `BlockConfig`).

        Token sizes and the source map (`PackedBatch.size`, `.source`) follow the tokens. `merge_variant`: `tome`
        matches tokens by the cosine of their keys and merges them into size-weighted means (sizes then bias later
        attention); `official` (the PRANCE release's) by the cosine of their hidden states, into plain means."""
        plan = BlockPlan(batch, configs, token_mode)
        batch = batch.reordered(plan.attention_order)  # (T, C), samples by number of heads
        attended, runs = batch.attention(self.norm1(batch.x), self.attn, plan)
        x = batch.x + self.drop_path1.packed(attended, batch)
        batch = batch.reduced(x, runs, self.attn, plan, merge_variant)  # samples now by MLP width
        x = batch.x + self.drop_path2.packed(batch.mlp(self.norm2(batch.x), self.mlp, plan), batch)
        return batch.with_tokens(x)


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution (timm's `patch_embed.proj`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


def _init_weights(m: nn.Module) -> None:
    """timm's ViT initialisation of a layer: truncated normal (std .02) linear weights, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def model_pretrained_cfg(given: dict | None, num_classes: int, in_chans: int, img_size: int) -> dict:
    """timm's `pretrained_cfg` of a model of these shapes: `given` over `IMAGENET_CFG`, the shape keys the model's."""
    cfg = {**IMAGENET_CFG, **(given or {})}
    for key in ("mean", "std"):  # e.g. RGB statistics for a grey model: their average on every channel
        cfg[key] = channel_statistics(cfg[key], in_chans)
    return {
        **cfg,
        "num_classes": num_classes,
        "input_size": (in_chans, img_size, img_size),
        "fixed_input_size": True,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


class ElasticViT(nn.Module):
    """A weight-sharing ViT supernet (timm `VisionTransformer` names) with per-block widths and token reduction.

    `forward(x)` runs the largest subnet; `forward(x, subnet)` one subnet for the batch; `forward(x, [s_0, ...])`
    one subnet per sample, held as packed tokens (`vit.PackedBatch`) or in buckets of equal configuration and token
    count (`layout="bucketed"`, `vit.BucketedBatch`). `run_block` runs one block on either layout.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the
            shape of the full model, as in timm.
        token_mode: `prune`, `merge` or `prune_merge`.
        merge_variant: how tokens merge: `tome` (cosine of keys, size-weighted means, proportional attention) or
            `official` (the PRANCE release's: cosine of the hidden states, plain means).
        head_choices, mlp_hidden_choices, keep_ratio_choices, merge_ratio_choices: ascending choices, the same
            at every block, ending with the full width and 1.0; or pass a whole `search_space`.
        drop_rate: dropout before the head, as timm's `drop_rate`.
        drop_path_rate: stochastic depth for supernet training (linearly increasing over blocks).
        pretrained_cfg: timm's data config (mean, std, crop_pct, interpolation, ...) over `IMAGENET_CFG`; the keys
            that describe the model's shape (`num_classes`, `input_size`, `first_conv`, `classifier`) are always
            the model's own, and statistics of another channel count are averaged onto `in_chans` channels.

    timm's model interface is here too: `reset_classifier`, `get_classifier`, `no_weight_decay`,
    `set_grad_checkpointing`, `group_matcher`, and `pretrained_cfg` (alias `default_cfg`).
    """

    __jit_unused_properties__ = ["default_cfg"]  # a dict of mixed values: not for TorchScript

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        token_mode: str = "merge",
        merge_variant: str = "tome",
        head_choices: Sequence[int] | None = None,
        mlp_hidden_choices: Sequence[int] | None = None,
        keep_ratio_choices: Sequence[float] = (1.0,),
        merge_ratio_choices: Sequence[float] | None = None,
        search_space: SearchSpace | None = None,
        global_pool: str = "token",
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pretrained_cfg: dict | None = None,
    ) -> None:
        super().__init__()
        check_token_mode(token_mode)
        _check_global_pool(global_pool)
        if merge_variant not in MERGE_VARIANTS:
            raise ValueError(f"unknown merge_variant {merge_variant!r}; expected one of {', '.join(MERGE_VARIANTS)}")
        mlp_hidden = int(embed_dim * mlp_ratio)
        if search_space is None:
            search_space = SearchSpace.uniform(
                depth,
                heads=head_choices or (num_heads,),
                mlp_hidden=mlp_hidden_choices or (mlp_hidden,),
                keep_ratio=keep_ratio_choices,
                merge_ratio=keep_ratio_choices if merge_ratio_choices is None else merge_ratio_choices,
                token_mode=token_mode,
            )
        full = search_space.largest()
        if search_space.depth != depth or search_space.token_mode != token_mode:
            raise ValueError("search_space does not match the model's depth or token_mode")
        if any(b.heads != num_heads or b.mlp_hidden != mlp_hidden for b in full):
            raise ValueError(f"search space choices must end with the full widths: {num_heads} heads, {mlp_hidden}")
        self.search_space = search_space
        self.token_mode = token_mode
        self.merge_variant = merge_variant
        self.num_classes = num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 1
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.pretrained_cfg = model_pretrained_cfg(pretrained_cfg, num_classes, in_chans, img_size)

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(ElasticBlock(embed_dim, num_heads, mlp_hidden, qkv_bias, r) for r in rates)
        # as timm's VisionTransformer: average pooling normalises the pooled features (`fc_norm`), not the tokens
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def default_cfg(self) -> dict:
        """Alias of `pretrained_cfg`, for timm's data helpers."""
        return self.pretrained_cfg

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    @property
    def num_patches(self) -> int:
        """Patch tokens of an image (CLS excluded)."""
        return self.patch_embed.num_patches

    def reset_parameters(self) -> None:
        """timm's ViT initialisation: truncated normal (std .02) for weights and embeddings, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_weights)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's interface)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a freshly initialised one for `num_classes` classes; 0 leaves none, so the model
        returns its pooled features (timm's interface). `global_pool` (`token`, `avg` or `''`, as timm's
        `VisionTransformer`) replaces the pooling when given."""
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        like = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}
        self.head = nn.Linear(self.embed_dim, num_classes, **like) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)
        self.num_classes = self.pretrained_cfg["num_classes"] = num_classes

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay: the embeddings (timm's interface; norms and biases go by shape)."""
        return {"cls_token", "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, str | list]:
        """Regular expressions grouping the parameters for layer-wise learning rates, in timm's format (timm's
        `group_parameters` reads it): the stem, then one group per block, the final norm with the last block; the
        head, matched by none, comes last. A block is the smallest group, so `coarse` changes nothing."""
        return {
            "stem": r"^cls_token|pos_embed|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them, when training
        (`torch.utils.checkpoint`): memory for compute, whatever the subnet or per-sample subnets."""
        self.grad_checkpointing = enable

    @torch.jit.unused
    def check_input(self, x: Tensor) -> None:
        """Raise a `TypeError`/`ValueError` naming the problem when x is not a batch of finite images."""
        pe = self.patch_embed
        expected = (pe.in_chans, pe.img_size, pe.img_size)
        if not isinstance(x, Tensor):
            raise TypeError(f"expected images as a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point images, got dtype {x.dtype} (convert and normalise first)")
        weight = pe.proj.weight
        if x.device != weight.device:
            raise ValueError(f"images are on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"images are {x.dtype} but the model's weights are {weight.dtype} (cast one to the other)")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C_in, H, W) to tokens (B, 1 + N, C): patch embedding, CLS token, position embedding; images
        are checked (`check_input`) unless the model is scripted or traced."""
        if not torch.jit.is_scripting():
            if not _traced():
                self.check_input(x)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    @torch.jit.unused
    def run_block(
        self,
        i: int,
        tokens: PackedBatch | BucketedBatch,
        configs: BlockConfig | Sequence[BlockConfig],
        token_mode: str | None = None,
    ) -> PackedBatch | BucketedBatch:
        """Run block `i` on a batch layout, at one configuration or one per sample (batch order); the batch after it.

        Every elastic forward runs its blocks here (`ElasticBlock.run`), so `set_grad_checkpointing` covers one
        subnet and per-sample subnets alike. A `BucketedBatch` runs the block once per group of samples sharing a
        configuration and a token count, each a dense `PackedBatch`. `token_mode` (default: the model's) says how
        the block reduces tokens."""
        if tokens.batch_size == 0:
            return tokens
        block, mode = self.blocks[i], token_mode or self.token_mode
        if isinstance(tokens, BucketedBatch):
            groups = tokens.groups(configs)
            return tokens.regrouped([(index, self.run_block(i, part, config, mode)) for index, part, config in groups])
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block.run, tokens, configs, mode, self.merge_variant, use_reentrant=False)
        return block.run(tokens, configs, mode, self.merge_variant)

    def forward_features(self, x: Tensor, subnet: Any | None = None) -> Tensor:
        """Normalised tokens (B, 1 + N', C) of one subnet for the whole batch; without one, the full model's, timm's
        `VisionTransformer.forward_features` (scriptable and traceable)."""
        if not torch.jit.is_scripting():
            if subnet is not None:
                return self._subnet_features(x, subnet)
        x = self.embed(x)
        if not torch.jit.is_scripting():
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                for block in self.blocks:
                    x = checkpoint(block, x, use_reentrant=False)
                return self.norm(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.jit.unused
    def _subnet_features(self, x: Tensor, subnet: Subnet) -> Tensor:
        """`forward_features` of one subnet: its blocks on a dense `PackedBatch`; an empty batch's embedding."""
        subnet = self.search_space.validate(subnet)
        x = self.embed(x)
        if x.shape[0] == 0:
            return self.norm(x)
        tokens = PackedBatch(x)
        for i, config in enumerate(subnet):
            tokens = self.run_block(i, tokens, config)
        return self.norm(tokens.dense()[0])

    def pool(self, x: Tensor) -> Tensor:
        """Tokens (B, T, C) pooled as `global_pool` says: the CLS token (`token`), the mean of the patch tokens
        (`avg`), or every token (`''`)."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class logits (or, with `pre_logits`, the features the head reads) from tokens (B, T, C), pooled as
        `global_pool` says. Tokens alone carry no sizes: `avg` takes the plain mean here, where `model(x, subnet)`
        weights merged tokens by the patches they stand for."""
        return self._classify(self.pool(x), pre_logits)

    def _classify(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The head on pooled features (B, C): `fc_norm`, dropout, the classifier."""
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    @torch.jit.unused
    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        subnet: Subnet | None = None,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The tokens after the blocks `indices` (the last n blocks for an int n, all when None) and, unless
        `intermediates_only`, the final normalised tokens, as timm's `VisionTransformer.forward_intermediates`:
        patch tokens as (B, C, H, W) maps (`output_fmt="NCHW"`) or (B, N, C) (`"NLC"`), with their CLS tokens when
        `return_prefix_tokens`, normalised with `norm`. `subnet`: one subnet for the batch instead of the full model,
        one that reduces no tokens (a reduced map has no grid: a `ValueError`)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, max_index = take_indices(len(self.blocks), indices)
        if subnet is not None:
            subnet = self.search_space.validate(subnet)
            reducing = [
                i
                for i, c in enumerate(subnet)
                if token_schedule(self.num_patches, c, self.token_mode)[1] < self.num_patches
            ]
            if reducing:
                raise ValueError(
                    f"forward_intermediates takes subnets that reduce no tokens; this one reduces at blocks {reducing} "
                    "(per-token maps of reduced tokens have no grid)"
                )
        B, _, height, width = x.shape
        x = self.embed(x)
        tokens = PackedBatch(x) if subnet is not None else None
        intermediates = []
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        for i, block in enumerate(blocks):
            if subnet is None:
                x = block(x)
            else:
                tokens = self.run_block(i, tokens, subnet[i])
                x = tokens.dense()[0]
            if i in taken:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            side = self.patch_embed.patch_size
            grid = (height // side, width // side)
            intermediates = [y.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of `indices` (the norm with `prune_norm`, the head with `prune_head`) for
        a model that only gives intermediates (timm's `features_only`); the indices taken, as timm returns them."""
        taken, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.search_space = self.search_space.prefix(max_index + 1)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return taken

    @torch.jit.unused
    def forward_tokens(
        self,
        tokens: PackedBatch | BucketedBatch,
        start: int,
        subnets: Sequence[Subnet] | Subnet | None = None,
        token_mode: str | None = None,
    ) -> Tensor:
        """Logits (B, num_classes) of a batch layout run from block `start` to the end.

        `subnets` gives the configuration of the remaining blocks: one `Subnet` for all samples, one per sample,
        or None for the full width with no token reduction. Only blocks `start:` of each subnet are used. The
        samples are pooled by their CLS token or, with `global_pool="avg"`, by the size-weighted mean of their patch
        tokens (what each token stands for).
        """
        if subnets is None:
            subnets = self.search_space.largest()
        for i in range(start, self.depth):
            configs = subnets[i] if isinstance(subnets, Subnet) else [s[i] for s in subnets]
            tokens = self.run_block(i, tokens, configs, token_mode)
        if self.global_pool == "token":
            pooled = self.norm(tokens.cls())
        elif self.global_pool == "avg":
            pooled = tokens.patch_mean(self.norm)
        else:
            raise ValueError("global_pool='' returns every token: per-sample subnets hold different token counts")
        return self._classify(pooled)

    def forward(
        self, x: Tensor, subnet: Any | None = None, layout: str = "packed", execution: str | None = None
    ) -> Tensor:
        """Logits (B, num_classes).

        Args:
            x: images (B, C_in, H, W).
            subnet: None (the full model: timm's `VisionTransformer` forward, which TorchScript, FX and
                `torch.export` follow), a `Subnet` for the whole batch, or a sequence of B subnets.
            layout: for per-sample subnets, `packed` or `bucketed` (each the exact per-sample result; `packed` runs
                a block in a few dense operations whatever the mixture, `bucketed` one dense group per configuration
                and token count; both record gradients when enabled). `consensus`, deprecated, runs one subnet for
                the batch (per block and field the median choice of the samples: `SearchSpace.consensus`).
            execution: the deprecated name of `layout`.
        """
        if not torch.jit.is_scripting():
            if isinstance(subnet, torch.fx.Proxy) or isinstance(execution, torch.fx.Proxy):
                subnet, execution = None, None  # FX traces every argument: the default forward is the traced one
            if subnet is not None or execution is not None:
                return self._forward_elastic(x, subnet, _deprecated_execution(layout, execution))
        elif subnet is not None:
            raise RuntimeError(
                "a scripted ElasticViT runs the full model; run subnets eagerly, or script one taken out "
                "with vit.extract_subnet"
            )
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def _forward_elastic(self, x: Tensor, subnet: Subnet | Sequence[Subnet] | None, layout: str) -> Tensor:
        """`forward` of a subnet or of per-sample subnets."""
        if isinstance(subnet, Subnet) and self.global_pool == "avg":  # merged tokens pool by their sizes
            return self.forward_tokens(PackedBatch(self.embed(x)), 0, self.search_space.validate(subnet))
        if subnet is None or isinstance(subnet, Subnet):
            return self.forward_head(self.forward_features(x, subnet))
        if isinstance(subnet, str) or not isinstance(subnet, Iterable):
            raise InvalidSubnetError(f"expected a vit.Subnet or one per image, got {type(subnet).__name__}")
        subnets = list(subnet)
        if layout == "consensus":
            warnings.warn(
                "layout='consensus' is deprecated: run model(x, model.search_space.consensus(subnets))",
                DeprecationWarning,
                stacklevel=3,
            )
        elif layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        if len(subnets) != x.shape[0]:
            raise ValueError(f"got {len(subnets)} subnets for a batch of {x.shape[0]} images")
        self.search_space.validate_all(subnets)
        if not subnets:  # an empty batch
            return self.forward_head(self.forward_features(x, self.search_space.largest()))
        if layout == "consensus":
            return self.forward_head(self.forward_features(x, self.search_space.consensus(subnets)))
        return self.forward_tokens(TOKEN_BATCHES[layout](self.embed(x)), 0, subnets)


# FX copies `forward`'s annotations into the code it generates, which TorchScript then reads: types, not the strings
# of postponed evaluation
ElasticViT.forward.__annotations__ = typing.get_type_hints(ElasticViT.forward)

GLOBAL_POOLS = ("token", "avg", "")


def _check_global_pool(global_pool: str) -> str:
    """`global_pool` if it is one of `GLOBAL_POOLS`, else a `ValueError` naming them."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"unknown global_pool {global_pool!r}; expected one of 'token', 'avg', ''")
    return global_pool


def take_indices(depth: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """The blocks `indices` names, as timm reads them (an int n: the last n blocks; None: all; negative indices
    count from the end), and the last of them; a `ValueError` for an index outside the `depth` blocks."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices must take 1 to {depth} blocks, got {indices}")
        taken = list(range(depth - indices, depth))
    else:
        taken = [depth + i if i < 0 else i for i in indices]
        if not taken or any(not 0 <= i < depth for i in taken):
            raise ValueError(f"block indices must lie in [-{depth}, {depth}), got {list(indices)}")
    return taken, max(taken)


def _traced() -> bool:
    """Whether FX, `torch.compile` or `torch.export` (ONNX) traces the model: no data-dependent checks then."""
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


@torch.jit.unused
def _deprecated_execution(layout: str, execution: str | None) -> str:
    """The layout of a call that still names it `execution` (deprecated)."""
    if execution is None:
        return layout
    warnings.warn("forward(execution=...) is now forward(layout=...)", DeprecationWarning, stacklevel=3)
    return execution


__all__ = [
    "GLOBAL_POOLS",
    "LAYOUTS",
    "MERGE_VARIANTS",
    "IMAGENET_CFG",
    "TOKEN_BATCHES",
    "ElasticAttention",
    "ElasticBlock",
    "ElasticMlp",
    "ElasticViT",
    "PatchEmbed",
]

"""A static subnet taken out of the supernet: a timm `VisionTransformer` that holds just that subnet's weights.

`extract_subnet(model, subnet)` slices every block's weights to the subnet's heads and MLP neurons and loads them
into a model of timm's own classes: a `VisionTransformer` whose blocks are timm `Block`s with timm's `Attention`
(`attn_head_dim`: the head dim stays the supernet's) and `Mlp` at the subnet's widths. It computes the logits the
supernet computes for that subnet and costs the MACs `vit.count_macs` gives it. A subnet that reduces tokens
becomes a `TokenReducingViT`, ToMe's way of patching timm's ViT: its blocks carry token sizes from block to block
and reduce the tokens after attention as the supernet does (`vit.token_ops`).

The model is registered with timm as `prance_subnet`: `save_subnet` writes it as a timm model folder
(`config.json` with its shape, `model.safetensors`), which `timm.create_model("local-dir:DIR", pretrained=True)`
reads back once `vit` is imported. A model without token reduction is plain timm from there on: it scripts, traces
and exports (ONNX) as timm's ViTs do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, save_for_hf
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from .config import Subnet
from .supernet import ElasticViT, model_pretrained_cfg
from .token_ops import Reduction, assign_tokens, cls_attention, token_schedule

#: The timm architecture of extracted subnets.
SUBNET_ARCHITECTURE = "prance_subnet"


class TokenReducingBlock(Block):
    """timm's `Block` that reduces its tokens between attention and MLP, as the supernet's block does.

    `forward(x, size)` takes the tokens (B, 1 + N, C) and their sizes (B, 1 + N) or None and returns both after the
    block: `pruned` patch tokens survive pruning (ranked by CLS attention), of which `final` remain after merging
    (the rest of the survivors merged into their most similar kept token). With `merge_variant="tome"` tokens are
    matched by their keys and merged into size-weighted means, and sizes bias the attention (proportional
    attention); with `official`, matched by their hidden states and merged into plain means, with no sizes.
    """

    pruned: int
    final: int
    merge_variant: str = "tome"

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        B, L, C = x.shape
        attn = self.attn
        qkv = attn.qkv(self.norm1(x)).reshape(B, L, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d)
        bias = None if size is None else size.log()
        mask = None if bias is None else bias[:, None, None].to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, -1)
        x = x + self.drop_path1(self.ls1(attn.proj(y)))
        if self.final < L - 1:
            x, size = self._reduce(x, size, q[:, :, 0], k, bias)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), size

    def _reduce(
        self, x: Tensor, size: Tensor | None, query: Tensor, keys: Tensor, bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The tokens and sizes after pruning to `pruned` and merging to `final` patch tokens."""
        B, L, C = x.shape
        merges = self.final < self.pruned
        with torch.no_grad():  # ranking and matching are not differentiated, as in the supernet
            scores = cls_attention(query, keys, self.attn.scale, bias)
            if not merges:
                similar = None
            elif self.merge_variant == "official":
                similar = x[:, 1:]
            else:
                similar = keys[:, :, 1:].transpose(1, 2).reshape(B, L - 1, -1)
            slot = assign_tokens(
                scores, similar, self.pruned, self.final, bounds=(self.pruned - self.final, self.final)
            )
        samples = torch.arange(B, device=x.device)
        out = 1 + self.final
        reduction = Reduction.from_slots(slot, samples * L, samples * out, B * out, merges)
        if self.merge_variant == "official":  # plain means, no sizes: attention stays unweighted
            return reduction.mean(x.reshape(B * L, C), None)[0].view(B, out, C), None
        x, size = reduction.mean(x.reshape(B * L, C), None if size is None else size.reshape(-1))
        return x.view(B, out, C), None if size is None else size.view(B, out)


class TokenReducingViT(VisionTransformer):
    """timm's `VisionTransformer` with `TokenReducingBlock`s: a static subnet that reduces tokens.

    `tokens[i]` is block i's (pruned, final) patch-token counts. Features are the reduced tokens; average pooling
    (`global_pool="avg"`) weights each patch token by its size, as the supernet does. Intermediate maps are refused:
    reduced tokens have no grid.
    """

    def __init__(self, tokens: Sequence[Sequence[int]], merge_variant: str = "tome", **kwargs) -> None:
        super().__init__(block_fn=TokenReducingBlock, **kwargs)
        if len(tokens) != len(self.blocks):
            raise ValueError(f"got token counts for {len(tokens)} blocks, the model has {len(self.blocks)}")
        for block, (pruned, final) in zip(self.blocks, tokens):
            block.pruned, block.final, block.merge_variant = int(pruned), int(final), merge_variant

    def reduced_features(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The normalised tokens (B, 1 + N', C) after the blocks and their sizes (B, 1 + N') (None: all 1)."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        size = None
        for block in self.blocks:
            x, size = block(x, size)
        return self.norm(x), size

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a token-reducing model takes no attention mask")
        return self.reduced_features(x)[0]

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a token-reducing model takes no attention mask")
        x, size = self.reduced_features(x)
        if self.global_pool != "avg" or size is None:
            return self.forward_head(x)
        weight = size[:, self.num_prefix_tokens :, None].to(x.dtype)
        pooled = (x[:, self.num_prefix_tokens :] * weight).sum(dim=1) / weight.sum(dim=1)
        return self.head(self.head_drop(self.fc_norm(pooled)))

    def forward_intermediates(self, *args, **kwargs):
        raise ValueError("a token-reducing model has no intermediate maps: its reduced tokens have no grid")


def _subnet_vit(
    heads: Sequence[int],
    mlp_hidden: Sequence[int],
    head_dim: int,
    tokens: Sequence[Sequence[int]] | None = None,
    merge_variant: str = "tome",
    weight_init: str = "",
    **kwargs,
) -> VisionTransformer:
    """A ViT whose block i runs `heads[i]` heads of `head_dim` and `mlp_hidden[i]` MLP neurons, reducing tokens
    as `tokens` says (None: no block reduces); kwargs are `VisionTransformer`'s."""
    if len(heads) != len(mlp_hidden):
        raise ValueError(f"got heads for {len(heads)} blocks and MLP widths for {len(mlp_hidden)}")
    embed_dim, qkv_bias = kwargs.get("embed_dim", 768), kwargs.get("qkv_bias", True)
    kwargs.update(depth=len(heads), num_heads=embed_dim // head_dim, qkv_bias=qkv_bias, weight_init="skip")
    if tokens is None:
        model = VisionTransformer(**kwargs)
    else:
        model = TokenReducingViT([tuple(t) for t in tokens], merge_variant, **kwargs)
    like = {"device": model.cls_token.device, "dtype": model.cls_token.dtype}
    for block, h, m in zip(model.blocks, heads, mlp_hidden):  # timm's Block has no head dim of its own
        block.attn = Attention(embed_dim, h, attn_head_dim=head_dim, qkv_bias=qkv_bias, **like)
        block.mlp = Mlp(embed_dim, m, **like)
    if weight_init != "skip" and model.cls_token.device.type != "meta":
        model.init_weights(weight_init)
    return model


#: timm's config of `prance_subnet` without arguments (DeiT-Tiny's full model); an extracted subnet carries its own
default_cfgs = generate_default_cfgs(
    {SUBNET_ARCHITECTURE: model_pretrained_cfg(None, num_classes=1000, in_chans=3, img_size=224)}
)


@register_model
def prance_subnet(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A static subnet of a PRANCE supernet as a timm ViT (`vit.extract_subnet` makes one from a supernet).

    Its shape is in the keyword arguments: `heads` and `mlp_hidden` (one per block), `head_dim`, and `tokens`
    ((pruned, final) patch tokens per block) with `merge_variant` when it reduces tokens, beside
    `VisionTransformer`'s own (`embed_dim`, `img_size`, `patch_size`, `in_chans`, `num_classes`, `global_pool`,
    ...). Without them, the full DeiT-Tiny (192 wide, 3 heads of 64, MLP 768, 12 blocks)."""
    kwargs.setdefault("embed_dim", 192)
    kwargs.setdefault("head_dim", 64)
    kwargs.setdefault("heads", [kwargs["embed_dim"] // kwargs["head_dim"]] * 12)
    kwargs.setdefault("mlp_hidden", [4 * kwargs["embed_dim"]] * len(kwargs["heads"]))
    return build_model_with_cfg(
        _subnet_vit, SUBNET_ARCHITECTURE, pretrained, feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs
    )


def subnet_args(model: ElasticViT, subnet: Subnet) -> dict:
    """The keyword arguments of `prance_subnet` that build `subnet` of `model` (plain values, for `config.json`)."""
    subnet = model.search_space.validate(subnet)
    pe = model.patch_embed
    attn = model.blocks[0].attn
    args = {
        "img_size": pe.img_size,
        "patch_size": pe.patch_size,
        "in_chans": pe.in_chans,
        "num_classes": model.num_classes,
        "embed_dim": model.embed_dim,
        "global_pool": model.global_pool,
        "fc_norm": isinstance(model.fc_norm, torch.nn.LayerNorm),
        "qkv_bias": attn.qkv.bias is not None,
        "head_dim": attn.head_dim,
        "heads": [c.heads for c in subnet],
        "mlp_hidden": [c.mlp_hidden for c in subnet],
    }
    tokens, n = [], model.num_patches
    for config in subnet:
        pruned, final = token_schedule(n, config, model.token_mode)
        tokens.append([pruned, final])
        n = final
    if n < model.num_patches:
        args.update(tokens=tokens, merge_variant=model.merge_variant)
    return args


def subnet_state_dict(model: ElasticViT, subnet: Subnet) -> dict[str, Tensor]:
    """The supernet's weights that `subnet` reads, under the names and at the shapes of `prance_subnet`'s model."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for i, (block, config) in enumerate(zip(model.blocks, model.search_space.validate(subnet))):
        attn, mlp = block.attn, block.mlp
        qkv_w, qkv_b = attn.qkv_params(config.heads)
        proj_w, proj_b = attn.proj_params(config.heads)
        fc2_w, fc2_b = mlp.fc2_params(config.mlp_hidden)
        sliced = {
            "attn.qkv.weight": qkv_w,
            "attn.qkv.bias": qkv_b,
            "attn.proj.weight": proj_w,
            "attn.proj.bias": proj_b,
            "mlp.fc1.weight": mlp.fc1.weight[: config.mlp_hidden],
            "mlp.fc1.bias": mlp.fc1.bias[: config.mlp_hidden],
            "mlp.fc2.weight": fc2_w,
            "mlp.fc2.bias": fc2_b,
        }
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            sliced[name] = block.get_parameter(name)
        state.update({f"blocks.{i}.{k}": v.detach().clone() for k, v in sliced.items() if v is not None})
    return state


def extract_subnet(model: ElasticViT, subnet: Subnet | str) -> VisionTransformer:
    """`subnet` of `model` (a `Subnet`, or its text: `h2-m128-r1` for every block) as a timm `VisionTransformer`
    holding just its weights, on the model's device and dtype, in the model's training mode: the same logits as
    `model(x, subnet)` and the MACs of `vit.count_macs(model, subnet)`. A subnet that reduces tokens gives a
    `TokenReducingViT`."""
    if isinstance(subnet, str):
        subnet = model.search_space.parse(subnet)
    weight = model.cls_token
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("architecture", "file", "hf_hub_id", "url")}
    # through timm's factory, which records the arguments for `save_subnet`'s config
    out = timm.create_model(
        SUBNET_ARCHITECTURE, pretrained_cfg_overlay=cfg, device="meta", **subnet_args(model, subnet)
    )
    out.load_state_dict(subnet_state_dict(model, subnet), assign=True)
    out = out.to(device=weight.device, dtype=weight.dtype)
    return out.train(model.training)


def save_subnet(model: VisionTransformer, directory: str | os.PathLike) -> Path:
    """Write an extracted subnet as a timm model folder (`config.json`, `model.safetensors`); the folder.
    `timm.create_model(f"local-dir:{directory}", pretrained=True)` builds it again (with `vit` imported)."""
    if model.pretrained_cfg.get("architecture") != SUBNET_ARCHITECTURE:
        raise ValueError(f"expected a model of vit.extract_subnet (timm's {SUBNET_ARCHITECTURE}), got another")
    directory = Path(directory)
    save_for_hf(model, directory, safe_serialization=True)
    return directory


__all__ = [
    "SUBNET_ARCHITECTURE",
    "TokenReducingBlock",
    "TokenReducingViT",
    "extract_subnet",
    "prance_subnet",
    "save_subnet",
    "subnet_args",
    "subnet_state_dict",
]

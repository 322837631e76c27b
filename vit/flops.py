"""Analytic multiply-accumulates (MACs, the "FLOPs" of the ViT literature) of any subnet, per sample.

The count covers every matrix product the model runs: patch embedding, q/k/v, attention (QK^T and AV), the
output projection, the MLP, the token-reduction overhead (the CLS attention row and, when merging, the key
similarity of sources and destinations) and the head. Element-wise work (norms, softmax, GELU, residuals) is not
counted, as in `torch.utils.flop_counter`. Token counts come from `token_schedule`, the same function the model
uses, so the count is exact for every configuration.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import BlockConfig, Subnet
from .supernet import ElasticViT
from .token_ops import token_schedule


def embed_macs(model: ElasticViT) -> int:
    """MACs of the patch embedding of one image."""
    pe = model.patch_embed
    return pe.num_patches * pe.in_chans * pe.patch_size**2 * model.embed_dim


def head_macs(model: ElasticViT) -> int:
    """MACs of the classifier on the CLS token."""
    return model.embed_dim * model.num_classes


def block_macs(model: ElasticViT, num_patches: int, config: BlockConfig) -> tuple[int, int]:
    """MACs of one block entered with `num_patches` patch tokens, and the patch tokens it leaves."""
    C, d = model.embed_dim, model.blocks[0].attn.head_dim
    inner = config.heads * d
    T = num_patches + 1
    pruned, final = token_schedule(num_patches, config, model.token_mode)
    macs = T * C * 3 * inner + 2 * T * T * inner + T * inner * C  # qkv, QK^T and AV, proj
    if final < num_patches:
        macs += T * inner  # the CLS attention row
    if final < pruned:
        macs += (pruned - final) * final * inner  # key similarity of merged sources and destinations
    macs += 2 * (final + 1) * C * config.mlp_hidden  # fc1, fc2
    return macs, final


def count_flops(model: ElasticViT, subnet: Subnet | Sequence[Subnet] | None = None) -> int | list[int]:
    """Per-sample MACs of `subnet` (largest when None); a list of counts for a sequence of subnets."""
    if subnet is not None and not isinstance(subnet, Subnet):
        return [count_flops(model, s) for s in subnet]
    subnet = model.search_space.largest() if subnet is None else model.search_space.validate(subnet)
    macs, n = embed_macs(model), model.num_patches
    for config in subnet:
        block, n = block_macs(model, n, config)
        macs += block
    return macs + head_macs(model)


__all__ = ["block_macs", "count_flops", "embed_macs", "head_macs"]

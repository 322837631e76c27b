"""Analytic multiply-accumulates (MACs, the "FLOPs" of the ViT literature) of any subnet, per sample.

The count covers every matrix product the model runs: patch embedding, q/k/v, attention (QK^T and AV), the
output projection, the MLP, the token-reduction overhead (the CLS attention row and, when merging, the key
similarity of sources and destinations) and the head. Element-wise work (norms, softmax, GELU, residuals) is not
counted, as in `torch.utils.flop_counter`. Token counts come from `token_schedule`, the same function the model
uses, so the count is exact for every configuration. `count_params` counts the parameters a subnet reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

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


def block_macs(
    model: ElasticViT, num_patches: int, config: BlockConfig, token_mode: str | None = None
) -> tuple[int, int]:
    """MACs of one block entered with `num_patches` patch tokens, and the patch tokens it leaves, the block
    reducing tokens as `token_mode` says (default: the model's)."""
    C, d = model.embed_dim, model.blocks[0].attn.head_dim
    inner = config.heads * d
    T = num_patches + 1
    pruned, final = token_schedule(num_patches, config, token_mode or model.token_mode)
    macs = T * C * 3 * inner + 2 * T * T * inner + T * inner * C  # qkv, QK^T and AV, proj
    if final < num_patches:
        macs += T * inner  # the CLS attention row
    if final < pruned:  # similarity of merged sources and destinations: of keys, or of hidden states (`official`)
        macs += (pruned - final) * final * (C if model.merge_variant == "official" else inner)
    macs += 2 * (final + 1) * C * config.mlp_hidden  # fc1, fc2
    return macs, final


def count_macs(model: ElasticViT, subnet: Subnet | Sequence[Subnet] | None = None) -> int | list[int]:
    """Per-sample MACs of `subnet` (largest when None); a list of counts for a sequence of subnets. An official
    meta-network (`vit.official.OfficialViT`) is counted by `vit.official.count_macs`."""
    if _official(model):
        from .official import count_macs as official_macs

        return official_macs(model, subnet)
    if subnet is not None and not isinstance(subnet, Subnet):
        return [count_macs(model, s) for s in subnet]
    subnet = model.search_space.largest() if subnet is None else model.search_space.validate(subnet)
    macs, n = embed_macs(model), model.num_patches
    for config in subnet:
        block, n = block_macs(model, n, config)
        macs += block
    return macs + head_macs(model)


def _official(model) -> bool:
    """Whether `model` is an official meta-network (`vit.official.OfficialViT`)."""
    return type(model).__name__ == "OfficialViT" and hasattr(model, "shape")


def count_flops(model: ElasticViT, subnet: Subnet | Sequence[Subnet] | None = None) -> int | list[int]:
    """Deprecated name of `count_macs`, which it returns: the field calls multiply-accumulates "FLOPs"."""
    warnings.warn("vit.count_flops is now vit.count_macs (it counts multiply-accumulates)", DeprecationWarning, 2)
    return count_macs(model, subnet)


def count_params(model: ElasticViT, subnet: Subnet | Sequence[Subnet] | None = None) -> int | list[int]:
    """Parameters `subnet` (largest when None) reads: the whole model less the weight rows and columns of the
    heads and MLP neurons it leaves out (token reduction reads none); a list of counts for a sequence of subnets.
    An official meta-network is counted by `vit.official.count_params`."""
    if _official(model):
        from .official import count_params as official_params

        return official_params(model, subnet)
    total = sum(p.numel() for p in model.parameters())  # once for a whole sequence of subnets
    if subnet is not None and not isinstance(subnet, Subnet):
        return [_params(model, total, s) for s in subnet]
    return _params(model, total, subnet)


def _params(model: ElasticViT, total: int, subnet: Subnet | None) -> int:
    """`count_params` of one subnet, `total` being the whole model's parameter count."""
    subnet = model.search_space.largest() if subnet is None else model.search_space.validate(subnet)
    for block, config in zip(model.blocks, subnet):
        attn, mlp = block.attn, block.mlp
        unused_inner = (attn.num_heads - config.heads) * attn.head_dim
        per_inner = attn.qkv.in_features * 3 + (3 if attn.qkv.bias is not None else 0) + attn.proj.out_features
        unused_hidden = mlp.fc1.out_features - config.mlp_hidden
        per_hidden = mlp.fc1.in_features + (1 if mlp.fc1.bias is not None else 0) + mlp.fc2.out_features
        total -= unused_inner * per_inner + unused_hidden * per_hidden  # q, k, v rows and proj columns; fc1, fc2
    return total


def sample_subnets(
    model: ElasticViT,
    n: int,
    flops_ratio: float,
    rng: np.random.Generator | int | None = None,
    tolerance: float = 0.05,
    max_steps: int = 10_000,
) -> list[Subnet]:
    """`n` random subnets, each within `tolerance` of `flops_ratio` of the full model's MACs (so their mean is
    about `flops_ratio`): per-sample decisions of a given cost, without a selector.

    Each starts as `SearchSpace.sample` (choices drawn uniformly per block and field) and walks towards the target:
    a random field of a random block moves one choice up while the subnet is too cheap, one choice down while it is
    too dear, until a step crosses the target and lands within `tolerance` of it (so that the subnets fall on both
    sides of the target, not on the edge they start from). Raises a `ValueError` when the target lies outside the
    search space's range of MACs.
    """
    space, rng = model.search_space, np.random.default_rng(rng)
    full = count_macs(model)
    ratios = [count_macs(model, s) / full for s in (space.smallest(), space.largest())]
    if not ratios[0] <= flops_ratio <= ratios[1]:
        raise ValueError(f"a MACs ratio of {flops_ratio} lies outside this search space's {ratios[0]:.3f} to 1")
    subnets = []
    for _ in range(n):
        indices = [list(space.indices(i, c)) for i, c in enumerate(space.sample(rng))]
        side = None
        for _ in range(max_steps):
            ratio = count_macs(model, space.from_indices(indices)) / full
            crossed = side is not None and (ratio >= flops_ratio) != side
            if ratio == flops_ratio or (crossed and abs(ratio - flops_ratio) <= tolerance):
                break
            side = ratio >= flops_ratio
            block = int(rng.integers(space.depth))
            field = int(rng.integers(len(space.fields)))
            step = 1 if ratio < flops_ratio else -1
            indices[block][field] = min(max(indices[block][field] + step, 0), space.num_choices(block)[field] - 1)
        else:
            raise RuntimeError(f"no subnet within {tolerance} of a MACs ratio of {flops_ratio} in {max_steps} steps")
        subnets.append(space.from_indices(indices))
    return subnets


__all__ = ["block_macs", "count_flops", "count_macs", "count_params", "embed_macs", "head_macs", "sample_subnets"]

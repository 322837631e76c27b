"""Rewiring: reorder the heads and MLP neurons of trained weights so that prefix slices keep the most important.

Elastic widths keep a prefix of each layer, so with off-the-shelf weights (DeiT) a narrow subnet would keep
arbitrary heads and neurons. Rewiring permutes them by importance, most important first. A permutation of heads
(q, k and v row blocks of `qkv` with the matching input columns of `proj`) or of MLP neurons (rows of `fc1`,
columns of `fc2`) leaves the full-width function unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .supernet import ElasticBlock, ElasticViT


def head_importance(block: ElasticBlock) -> Tensor:
    """Importance of each head: norm of its value rows times norm of its output-projection columns. (heads,)"""
    attn = block.attn
    C, h, d = attn.proj.weight.shape[0], attn.num_heads, attn.head_dim
    v = attn.qkv.weight.view(3, h, d, C)[2]
    out = attn.proj.weight.view(C, h, d)
    return v.flatten(1).norm(dim=1) * out.transpose(0, 1).flatten(1).norm(dim=1)


def neuron_importance(block: ElasticBlock) -> Tensor:
    """Importance of each MLP hidden neuron: norm of its `fc1` row times norm of its `fc2` column. (hidden,)"""
    return block.mlp.fc1.weight.norm(dim=1) * block.mlp.fc2.weight.norm(dim=0)


@torch.no_grad()
def permute_heads(block: ElasticBlock, order: Tensor) -> None:
    """Reorder the heads of `block` in place: new head j is old head `order[j]`."""
    attn = block.attn
    C, h, d = attn.proj.weight.shape[0], attn.num_heads, attn.head_dim
    qkv = attn.qkv.weight.view(3, h, d, C)
    qkv.copy_(qkv[:, order])
    if attn.qkv.bias is not None:
        bias = attn.qkv.bias.view(3, h, d)
        bias.copy_(bias[:, order])
    proj = attn.proj.weight.view(C, h, d)
    proj.copy_(proj[:, order])


@torch.no_grad()
def permute_neurons(block: ElasticBlock, order: Tensor) -> None:
    """Reorder the MLP hidden neurons of `block` in place: new neuron j is old neuron `order[j]`."""
    mlp = block.mlp
    mlp.fc1.weight.copy_(mlp.fc1.weight[order])
    mlp.fc1.bias.copy_(mlp.fc1.bias[order])
    mlp.fc2.weight.copy_(mlp.fc2.weight[:, order])


@torch.no_grad()
def rewire(model: ElasticViT) -> ElasticViT:
    """Sort every block's heads and MLP neurons by decreasing importance, in place; returns `model`."""
    for block in model.blocks:
        permute_heads(block, head_importance(block).argsort(descending=True, stable=True))
        permute_neurons(block, neuron_importance(block).argsort(descending=True, stable=True))
    return model


__all__ = ["head_importance", "neuron_importance", "permute_heads", "permute_neurons", "rewire"]

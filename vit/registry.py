"""Registered supernet presets: `create_supernet(name, ...)` builds one in a call, as timm's `create_model` does."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .checkpoint import check_state_dict, load_checkpoint, read_state_dict
from .rewire import rewire
from .supernet import ElasticViT

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_KEEP_RATIOS = (0.6, 0.7, 0.8, 0.9, 1.0)
IMAGENET_CFG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bicubic",
}

_SUPERNETS: dict[str, Callable[..., ElasticViT]] = {}


def register_supernet(fn: Callable[..., ElasticViT]) -> Callable[..., ElasticViT]:
    """Register a preset under its function name."""
    _SUPERNETS[fn.__name__] = fn
    return fn


def list_supernets() -> list[str]:
    """The registered preset names."""
    return sorted(_SUPERNETS)


def create_supernet(
    name: str, pretrained: bool = False, checkpoint: str | os.PathLike | None = None, **kwargs
) -> ElasticViT:
    """Build the preset `name`; `pretrained` loads its reference weights, `checkpoint` a weights file of yours.

    kwargs override the preset's arguments of `ElasticViT` (e.g. `token_mode`, `keep_ratio_choices`).
    """
    if name not in _SUPERNETS:
        raise ValueError(f"unknown supernet {name!r}; registered: {', '.join(list_supernets())}")
    model = _SUPERNETS[name](pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _build(name: str, defaults: dict, kwargs: dict) -> ElasticViT:
    model = ElasticViT(**{**defaults, **kwargs})
    model.pretrained_cfg["architecture"] = name
    return model


def load_pretrained(model: ElasticViT, source: str | os.PathLike) -> ElasticViT:
    """Initialise `model` from `timm:NAME` (timm's hub weights) or a weights file, then rewire it; returns it.

    The weights must have the model's shapes (timm's `VisionTransformer` names); rewiring reorders heads and MLP
    neurons by importance so that narrow subnets keep the most important ones.
    """
    source = str(source)
    if source.startswith("timm:"):
        import timm  # only needed for hub weights

        state = timm.create_model(source[len("timm:") :], pretrained=True).state_dict()
    else:
        state = read_state_dict(source)
    check_state_dict(model, state, source=source)
    model.load_state_dict(state)
    return rewire(model)


def _deit(name: str, timm_name: str, defaults: dict, pretrained: bool, kwargs: dict) -> ElasticViT:
    model = _build(name, {**defaults, "pretrained_cfg": dict(IMAGENET_CFG)}, kwargs)
    return load_pretrained(model, f"timm:{timm_name}") if pretrained else model


@register_supernet
def prance_deit_tiny(pretrained: bool = False, **kwargs) -> ElasticViT:
    """DeiT-Tiny shapes (192 wide, 3 heads, 12 blocks, 224 px); `pretrained` loads timm's DeiT-T and rewires."""
    defaults = dict(
        embed_dim=192,
        depth=12,
        num_heads=3,
        head_choices=(1, 2, 3),
        mlp_hidden_choices=(384, 512, 640, 768),
        keep_ratio_choices=DEFAULT_KEEP_RATIOS,
    )
    return _deit("prance_deit_tiny", "deit_tiny_patch16_224", defaults, pretrained, kwargs)


@register_supernet
def prance_deit_small(pretrained: bool = False, **kwargs) -> ElasticViT:
    """DeiT-Small shapes (384 wide, 6 heads, 12 blocks, 224 px); `pretrained` loads timm's DeiT-S and rewires."""
    defaults = dict(
        embed_dim=384,
        depth=12,
        num_heads=6,
        head_choices=(3, 4, 5, 6),
        mlp_hidden_choices=(768, 1024, 1280, 1536),
        keep_ratio_choices=DEFAULT_KEEP_RATIOS,
    )
    return _deit("prance_deit_small", "deit_small_patch16_224", defaults, pretrained, kwargs)


@register_supernet
def prance_deit_base(pretrained: bool = False, **kwargs) -> ElasticViT:
    """DeiT-Base shapes (768 wide, 12 heads, 12 blocks, 224 px); `pretrained` loads timm's DeiT-B and rewires."""
    defaults = dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        head_choices=(6, 8, 10, 12),
        mlp_hidden_choices=(1536, 2048, 2560, 3072),
        keep_ratio_choices=DEFAULT_KEEP_RATIOS,
    )
    return _deit("prance_deit_base", "deit_base_patch16_224", defaults, pretrained, kwargs)


@register_supernet
def prance_fmnist(pretrained: bool = False, **kwargs) -> ElasticViT:
    """A small ViT for Fashion-MNIST (28 px grey, 4 px patches, 64 wide, 4 heads, 12 blocks); `pretrained`: shipped."""
    defaults = dict(
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=12,
        num_heads=4,
        head_choices=(1, 2, 3, 4),
        mlp_hidden_choices=(64, 128, 192, 256),
        keep_ratio_choices=DEFAULT_KEEP_RATIOS,
        pretrained_cfg={"input_size": (1, 28, 28), "mean": (0.2860,), "std": (0.3530,)},
    )
    model = _build("prance_fmnist", defaults, kwargs)
    if pretrained:
        path = CHECKPOINT_DIR / "prance_fmnist.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"the shipped prance_fmnist checkpoint is missing ({path}); train one with "
                "scripts/train_supernet.py and pass checkpoint=PATH"
            )
        load_checkpoint(model, path)
    return model


__all__ = ["CHECKPOINT_DIR", "create_supernet", "list_supernets", "load_pretrained", "register_supernet"]

"""Registered supernet presets: `create_supernet(name, ...)` builds one in a call, and so does timm's
`timm.create_model(name, ...)`, as every preset is registered with timm's model registry too, with its pretrained
configs (`timm.get_pretrained_cfg`, tags, `timm.list_models(pretrained=True)` for those with weights) and timm's
`features_only` wrapper (`FeatureGetterNet`, over `ElasticViT.forward_intermediates`).

A preset is a function `preset(pretrained=False, **kwargs) -> ElasticViT` whose kwargs override its arguments of
`ElasticViT`; `register_supernet` registers it under its function name, with the tags of its weights.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import huggingface_hub
import torch

from .checkpoint import check_state_dict, load_checkpoint, read_state_dict, recorded_model
from .imports import after_import
from .rewire import rewire
from .supernet import ElasticViT

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_KEEP_RATIOS = (0.6, 0.7, 0.8, 0.9, 1.0)

_SUPERNETS: dict[str, Callable[..., ElasticViT]] = {}
_TAGS: dict[str, dict[str, dict] | None] = {}
_TIMM_KNOWS: list[bool] = []  # non-empty once the presets are registered with timm
#: timm's pretrained configs of the presets, by name (timm's registry reads them from this module when a preset is
#: registered, as it reads a model module's `default_cfgs`)
default_cfgs: dict = {}


def register_supernet(
    fn: Callable[..., ElasticViT] | None = None, *, tags: dict[str, dict] | None = None
) -> Callable[..., ElasticViT]:
    """Register a preset under its function name, for `create_supernet` and for `timm.create_model`.

    timm also gets the preset's pretrained config, read off the preset built on the `meta` device (nothing is
    allocated): input size, classes, data statistics; `tags` names its weights, each tag with the keys timm's
    `PretrainedCfg` takes (`hf_hub_id`, `file`, `description`, ...), the first the default: `prance_fmnist.shipped`.
    timm hears of the preset as soon as timm is imported (now, if it is already), so that importing `vit` does not
    import timm. Registering a name again replaces the preset. A name timm holds for a model of its own is refused,
    so that a preset never shadows one of timm's models. Use it as `@register_supernet` or
    `@register_supernet(tags=...)`.
    """
    if fn is None:
        return lambda fn: register_supernet(fn, tags=tags)
    name = fn.__name__
    new = name not in _SUPERNETS  # timm's entry point looks the preset up by name: a replaced one needs no new one
    if new and _TIMM_KNOWS:
        _register_with_timm(name, fn, tags)
    _SUPERNETS[name], _TAGS[name] = fn, tags
    return fn


def _register_with_timm(name: str, fn: Callable[..., ElasticViT], tags: dict[str, dict] | None) -> None:
    """Register preset `name` with timm's model registry, with its pretrained configs."""
    from timm.models import DefaultCfg, PretrainedCfg, is_model, register_model

    if is_model(name):
        raise ValueError(f"{name!r} is one of timm's models; register the preset under another name")
    with torch.device("meta"):
        cfg = fn(pretrained=False).pretrained_cfg
    known = {f.name for f in fields(PretrainedCfg)}
    base = {k: v for k, v in cfg.items() if k in known}
    named = tags or {"": {}}
    default_cfgs[name] = DefaultCfg(
        tags=deque(named), cfgs={tag: PretrainedCfg(**{**base, **weights}) for tag, weights in named.items()}
    )
    register_model(_timm_entrypoint(name, fn))


def register_all_with_timm() -> None:
    """Tell timm of every preset and of extracted subnets' architecture (`vit.extract`): run once, when timm is
    imported."""
    from . import extract  # noqa: F401  (registers prance_subnet)

    for name, fn in _SUPERNETS.items():
        _register_with_timm(name, fn, _TAGS[name])
    _TIMM_KNOWS.append(True)


def _timm_entrypoint(name: str, preset: Callable[..., ElasticViT]) -> Callable[..., ElasticViT]:
    """The function timm's `create_model(name, ...)` calls: timm's keywords in, `create_supernet(name, ...)` out,
    wrapped in timm's `FeatureGetterNet` with `features_only=True` (`out_indices`: the blocks whose tokens it
    gives, by default the last 3, as timm's ViTs)."""

    def entrypoint(
        pretrained: bool = False,
        pretrained_cfg: str | dict | None = None,
        pretrained_cfg_overlay: dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        features_only: bool = False,
        out_indices: int | list[int] = 3,
        feature_cls: str = "getter",
        feature_cfg: dict | None = None,
        **kwargs,
    ):
        from timm.models import PretrainedCfg
        from timm.models._features import FeatureGetterNet  # timm's features_only wrapper of ViTs (not re-exported)

        kwargs.pop("pretrained_model_args", None)  # what a local-dir config says it was built with: kwargs hold it
        if isinstance(pretrained_cfg, str):  # a tag, as in "prance_fmnist.shipped"
            known = list(default_cfgs[name].tags)
            if pretrained_cfg not in known:
                shown = ", ".join(f"{name}.{t}" if t else name for t in known)
                raise ValueError(f"{name} has no pretrained tag {pretrained_cfg!r}; registered: {shown}")
            pretrained_cfg = None
        if isinstance(pretrained_cfg, PretrainedCfg):
            pretrained_cfg = pretrained_cfg.to_dict()
        cfg = {**(pretrained_cfg or {}), **(pretrained_cfg_overlay or {})}
        # as timm's builder does, a given config sets the defaults of the shapes it describes
        if "num_classes" in cfg:
            kwargs.setdefault("num_classes", cfg["num_classes"])
        if "input_size" in cfg:
            in_chans, height, width = cfg["input_size"]
            if height != width:
                raise ValueError(f"{name} takes square images; pretrained_cfg asks for {height}x{width}")
            kwargs.setdefault("in_chans", in_chans)
            kwargs.setdefault("img_size", width)
        weights = cfg.get("file") if pretrained else None  # a file of the config's own (a local-dir model's)
        if cfg:
            kwargs["pretrained_cfg"] = {k: v for k, v in cfg.items() if v is not None}
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        model = create_supernet(name, pretrained=pretrained and weights is None, **kwargs)
        if weights is not None:
            path = Path(weights) / "model.safetensors" if Path(weights).is_dir() else Path(weights)
            _load_adapted(model, read_state_dict(path), str(path))
        model = model.to(device=device, dtype=dtype)
        if not features_only:
            return model
        if feature_cls != "getter":
            raise ValueError(
                f"{name} offers timm's feature_cls='getter' (over forward_intermediates), not {feature_cls!r}"
            )
        features = FeatureGetterNet(model, out_indices=out_indices, **(feature_cfg or {}))
        features.pretrained_cfg = features.default_cfg = model.pretrained_cfg
        return features

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__  # timm reads the pretrained configs from this module's `default_cfgs`
    entrypoint.__doc__ = preset.__doc__
    return entrypoint


#: the shape arguments of a preset that a supernet file records and that follow the data
SHAPE_KEYS = ("num_classes", "img_size", "in_chans")


def preset_name(name: str | None, checkpoint: str | os.PathLike | None = None) -> str:
    """The preset to build: `name`, else the one the `checkpoint` file records, else `prance_fmnist`."""
    if name is not None:
        return name
    return (recorded_model(checkpoint) if checkpoint is not None else {}).get("architecture") or "prance_fmnist"


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
    if checkpoint is not None:  # the shape the file records, where none is asked
        recorded = recorded_model(checkpoint)
        asked = {k: kwargs[k] for k in SHAPE_KEYS if k in kwargs and k in recorded and kwargs[k] != recorded[k]}
        if asked:
            flags = ", ".join(f"--{k.replace('_', '-')} {recorded[k]}" for k in asked)
            raise ValueError(
                f"{checkpoint} holds a {recorded.get('architecture', 'supernet')} of "
                f"{', '.join(f'{k}={recorded[k]}' for k in SHAPE_KEYS if k in recorded)}, not "
                f"{', '.join(f'{k}={v}' for k, v in asked.items())}: leave the shape to the file or pass {flags}"
            )
        kwargs = {k: recorded[k] for k in SHAPE_KEYS if k in recorded} | kwargs
    model = _SUPERNETS[name](pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.pretrained_cfg["architecture"] = name
    return model


@dataclass
class SupernetShape:
    """The shape arguments of a preset, in timm's names: a base of the command-line configs that build one.

    None keeps the preset's value. The data config follows the model built (`load_dataset(..., model=m)`), so an
    ImageFolder is read at the size, channel count and statistics these give.
    """

    num_classes: int | None = field(default=None, metadata={"help": "classes of the head (default: the preset's)"})
    img_size: int | None = field(default=None, metadata={"help": "image side in pixels (default: the preset's)"})
    in_chans: int | None = field(default=None, metadata={"help": "image channels, 1 or 3 (default: the preset's)"})

    def shape_kwargs(self) -> dict:
        """The shape arguments given, as keyword arguments of `create_supernet`."""
        shape = {"num_classes": self.num_classes, "img_size": self.img_size, "in_chans": self.in_chans}
        return {key: value for key, value in shape.items() if value is not None}


def _build(defaults: dict, kwargs: dict, load: Callable[[ElasticViT], object] | None = None) -> ElasticViT:
    """A preset's model: its `defaults` under `kwargs`, data configs merged; then its weights from `load`, if given.

    Loaded weights come with their head, which a fresh one replaces when `num_classes` asks for another (timm's rule
    for fine-tuning a pretrained model on a new task).
    """
    cfg = {**defaults.get("pretrained_cfg", {}), **(kwargs.get("pretrained_cfg") or {})}
    args = {**defaults, **kwargs, "pretrained_cfg": cfg}
    if load is None:
        return ElasticViT(**args)
    model = ElasticViT(**{**args, "num_classes": defaults["num_classes"]})
    load(model)
    if args["num_classes"] != model.num_classes:
        model.reset_classifier(args["num_classes"])
    return model


def load_pretrained(
    model: ElasticViT, source: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> ElasticViT:
    """Initialise `model` from `timm:NAME` (timm's hub weights, cached in `cache_dir` if given) or a weights file,
    then rewire it; returns it.

    The weights must have the model's shapes (timm's `VisionTransformer` names) but for the image size, the input
    channels and the classes, which are adapted as timm adapts pretrained weights (`adapt_to_model`). Rewiring
    reorders heads and MLP neurons by importance so that narrow subnets keep the most important ones.
    """
    source = str(source)
    if source.startswith("timm:"):
        state = hub_state_dict(source[len("timm:") :], cache_dir)
    else:
        state = read_state_dict(source)
    _load_adapted(model, state, source)
    return rewire(model)


def hub_state_dict(timm_name: str, cache_dir: str | os.PathLike | None = None, timeout: float = 3.0) -> dict:
    """The weights of timm's pretrained `timm_name`, from the Hugging Face hub cache or the hub. When they are not
    cached and the hub does not answer within `timeout` seconds (or `HF_HUB_OFFLINE` is set), a one-line
    `ConnectionError` saying how to go on without it, instead of the hub client's retries and traceback."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None)
    found = [
        huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        for name in ("model.safetensors", "pytorch_model.bin")
        if repo is not None
    ]
    cached = next((path for path in found if isinstance(path, str)), None)
    if cached is not None:  # no request to the hub at all
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached}).state_dict()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not _hub_reachable(timeout):
        why = "HF_HUB_OFFLINE is set" if offline else f"{huggingface_hub.constants.ENDPOINT} did not answer"
        raise ConnectionError(
            f"timm's {timm_name} weights are not in the hub cache and {why}: pass a local weights file instead "
            "(--init FILE, a timm state dict or .safetensors), or download them once where there is a network"
        )
    return timm.create_model(timm_name, pretrained=True, cache_dir=cache_dir).state_dict()


def _hub_reachable(timeout: float) -> bool:
    """Whether the Hugging Face hub's host accepts a connection within `timeout` seconds."""
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_adapted(model: ElasticViT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load pretrained weights `state` into `model`, adapted to its shapes (`adapt_to_model`) and checked."""
    state = adapt_to_model(model, state)
    if "norm.weight" in state and "fc_norm.weight" in model.state_dict() and "fc_norm.weight" not in state:
        raise ValueError(
            f"{source} normalises the tokens before pooling (global_pool='token'); to pool its weights by average "
            "pass fc_norm=False too, which keeps that norm (timm's rule)"
        )
    check_state_dict(model, state, source=source)
    model.load_state_dict(state)


def adapt_to_model(model: ElasticViT, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` for `model`'s image size, input channels and classes, as timm adapts pretrained weights: the position
    embedding of the patches resampled (bicubic) to the model's grid, the patch projection's input channels summed or
    repeated (`timm.models.adapt_input_conv`), and for another number of classes the model's own (fresh) head. Other
    keys are left as they are."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    state = dict(state)
    pos, own = state.get("pos_embed"), model.pos_embed
    if pos is not None and pos.ndim == 3 and pos.shape[1] != own.shape[1] and pos.shape[2] == own.shape[2]:
        side = model.patch_embed.img_size // model.patch_embed.patch_size
        state["pos_embed"] = resample_abs_pos_embed(pos, [side, side], num_prefix_tokens=1)
    proj = state.get("patch_embed.proj.weight")
    in_chans = model.patch_embed.in_chans
    if proj is not None and proj.ndim == 4 and proj.shape[1] != in_chans:
        with contextlib.suppress(NotImplementedError):  # a conversion timm lacks: left for the shape check to name
            state["patch_embed.proj.weight"] = adapt_input_conv(in_chans, proj, base_chans=proj.shape[1])
    own_state = model.state_dict()
    if any(k in state and state[k].shape != own_state[k].shape for k in ("head.weight", "head.bias")):
        state.update({k: own_state[k] for k in ("head.weight", "head.bias")})  # another task: the model's own head
    return state


def _deit(timm_name: str, defaults: dict, pretrained: bool, kwargs: dict) -> ElasticViT:
    """A DeiT-shaped preset (ImageNet: 224 px, 1000 classes); `pretrained` loads timm's `timm_name` and rewires."""
    cache_dir = kwargs.pop("cache_dir", None)
    load = (lambda model: load_pretrained(model, f"timm:{timm_name}", cache_dir)) if pretrained else None
    return _build({**defaults, "num_classes": 1000}, kwargs, load)


def _timm_weights(timm_name: str) -> dict[str, dict]:
    """The tag of a DeiT preset's weights: timm's `timm_name` weights (Facebook's ImageNet-1k), rewired."""
    return {
        "fb_in1k": {
            "hf_hub_id": f"timm/{timm_name}.fb_in1k",
            "description": f"timm's {timm_name}.fb_in1k weights, heads and MLP neurons rewired by importance",
        }
    }


@register_supernet(tags=_timm_weights("deit_tiny_patch16_224"))
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
    return _deit("deit_tiny_patch16_224", defaults, pretrained, kwargs)


@register_supernet(tags=_timm_weights("deit_small_patch16_224"))
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
    return _deit("deit_small_patch16_224", defaults, pretrained, kwargs)


@register_supernet(tags=_timm_weights("deit_base_patch16_224"))
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
    return _deit("deit_base_patch16_224", defaults, pretrained, kwargs)


FMNIST_DEFAULTS = dict(
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
    # Fashion-MNIST's statistics; its images are used whole (no crop at 28 px)
    pretrained_cfg={"mean": (0.2860,), "std": (0.3530,), "crop_pct": 1.0},
)


def _shipped_weights(name: str, description: str) -> dict[str, dict]:
    """The tag of weights shipped in the package."""
    return {"shipped": {"file": str(CHECKPOINT_DIR / f"{name}.safetensors"), "description": description}}


@register_supernet(tags=_shipped_weights("prance_fmnist", "supernet and selector jointly fine-tuned on Fashion-MNIST"))
def prance_fmnist(pretrained: bool = False, **kwargs) -> ElasticViT:
    """A small ViT for Fashion-MNIST (28 px grey, 4 px patches, 64 wide, 4 heads, 12 blocks); `pretrained`: shipped,
    the supernet jointly fine-tuned under its shipped selector (`scripts/finetune.py`)."""
    kwargs.pop("cache_dir", None)  # the weights ship with the package: nothing to download
    return _build(FMNIST_DEFAULTS, kwargs, _shipped("prance_fmnist") if pretrained else None)


@register_supernet(tags=_shipped_weights("prance_fmnist_stage1", "supernet training alone, on Fashion-MNIST"))
def prance_fmnist_stage1(pretrained: bool = False, **kwargs) -> ElasticViT:
    """`prance_fmnist` as supernet training left it, before joint fine-tuning (`pretrained`: shipped), to compare."""
    kwargs.pop("cache_dir", None)
    return _build(FMNIST_DEFAULTS, kwargs, _shipped("prance_fmnist_stage1") if pretrained else None)


def _shipped(name: str) -> Callable[[ElasticViT], None]:
    """Loads the weights shipped for preset `name`."""

    def load(model: ElasticViT) -> None:
        path = CHECKPOINT_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(
                f"the shipped {name} checkpoint is missing ({path}); train one with scripts/train_supernet.py and "
                "pass checkpoint=PATH"
            )
        _load_adapted(model, read_state_dict(path), str(path))

    return load


__all__ = [
    "CHECKPOINT_DIR",
    "default_cfgs",
    "SupernetShape",
    "adapt_to_model",
    "create_supernet",
    "list_supernets",
    "load_pretrained",
    "preset_name",
    "register_supernet",
]


after_import("timm", register_all_with_timm)  # now, if timm is imported already

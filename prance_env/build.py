"""The env's keyword arguments, once (`EnvConfig`), and what they build: the supernet, the MDP and the image source."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch.utils.data import Dataset

import vit
from vit.inference import DecisionSchedule
from vit.official import OFFICIAL_PRESETS, OfficialViT
from vit.utils import resolve_device

from .core import BatchedMDP
from .mdp import MDPConfig
from .source import ImageSource, build_source

MDP = MDPConfig()
#: the supernet modules the env runs: the elastic ViT and the official meta-networks
SUPERNETS = (vit.ElasticViT, OfficialViT)
CHOICE_KEYS = {
    "heads": "head_choices",
    "mlp_hidden": "mlp_hidden_choices",
    "keep_ratio": "keep_ratio_choices",
    "merge_ratio": "merge_ratio_choices",
}


@dataclass(frozen=True)
class EnvConfig:
    """The keyword arguments PranceViT-v1 and its vector env share (see `prance_env.PranceViTEnv`, Arguments).

    The MDP's defaults are `MDPConfig`'s: the MDP the shipped selector was trained on.
    """

    supernet: str | vit.ElasticViT | None = None
    checkpoint: str | os.PathLike | None = None
    data: str | Dataset = "fashion-mnist"
    data_dir: str | os.PathLike | None = None
    split: str = "train"
    device: str | torch.device = "auto"
    token_mode: str | None = None
    choices: Mapping[str, Sequence] | None = None
    reward: str = MDP.reward
    quality: str = MDP.quality
    price_range: Sequence[float] = MDP.price_range
    token_penalty: float = MDP.token_penalty
    official_state: bool = MDP.official_state
    decisions: str | DecisionSchedule = "per-block"
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    stem_blocks: int | None = None
    blocks_per_step: int | None = None
    layout: str = "packed"
    amp: bool = False
    workers: int | None = None

    @classmethod
    def of(cls, **kwargs) -> EnvConfig:
        """The config of the env's keyword arguments, the deprecated `data_path` read as `data_dir`."""
        if "data_path" in kwargs:
            warnings.warn("the env's data_path is now data_dir, as in the scripts", DeprecationWarning, stacklevel=3)
            if kwargs.get("data_dir") is not None:
                raise TypeError("pass data_dir or its old name data_path, not both")
            kwargs["data_dir"] = kwargs.pop("data_path")
        return cls(**kwargs)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The keyword arguments."""
        return tuple(f.name for f in fields(cls))

    def mdp_config(self) -> MDPConfig:
        """The MDP these arguments define."""
        return MDPConfig(
            schedule=DecisionSchedule.named(self.decisions, self.stem_blocks, self.blocks_per_step),
            reward=self.reward,
            quality=self.quality,
            price_range=tuple(self.price_range),
            token_penalty=self.token_penalty,
            official_state=self.official_state,
        )

    def build(self) -> tuple[BatchedMDP, ImageSource]:
        """The MDP over the supernet, and its image source."""
        config = self.mdp_config()
        device = resolve_device(self.device)
        shape = {k: getattr(self, k) for k in vit.registry.SHAPE_KEYS if getattr(self, k) is not None}
        supernet = self.supernet
        if not isinstance(supernet, SUPERNETS):
            supernet = vit.registry.preset_name(supernet, self.checkpoint)
        model = build_supernet(supernet, self.checkpoint, self.token_mode, self.choices, device, config.schedule, shape)
        source = build_source(self.data, self.data_dir, self.split, model, device, self.workers)
        return BatchedMDP(model, config, self.layout, self.amp), source


def build_supernet(
    supernet: str | vit.ElasticViT,
    checkpoint: str | os.PathLike | None,
    token_mode: str | None,
    choices: Mapping[str, Sequence] | None,
    device: torch.device,
    schedule: DecisionSchedule = DecisionSchedule(),
    shape: Mapping[str, int] | None = None,
) -> vit.ElasticViT:
    """A supernet module as given, or the registered preset `supernet` with its shipped or given weights, offering
    the ratios the decisions of `schedule` choose (`DecisionSchedule.supernet_kwargs`) unless `choices` says
    otherwise, at the `shape` given (`num_classes`, `img_size`, `in_chans`; by default the checkpoint's or the
    preset's)."""
    if isinstance(supernet, SUPERNETS):
        if shape:
            raise ValueError(
                "num_classes, img_size and in_chans apply to a supernet built by name; your module has its own"
            )
        if token_mode not in (None, supernet.token_mode) or choices:
            raise ValueError("token_mode and choices apply to a supernet built by name; configure your module instead")
        if checkpoint is not None:
            raise ValueError("checkpoint applies to a supernet built by name; load weights into your module instead")
        return supernet.to(device)
    if not isinstance(supernet, str):
        raise TypeError(
            f"supernet must be a registered name, a vit.ElasticViT or an official meta-network, got "
            f"{type(supernet).__name__}"
        )
    if supernet in OFFICIAL_PRESETS:
        if choices:
            raise ValueError(f"{supernet} has the release's search space: choices do not apply")
        if checkpoint is None:
            raise ValueError(
                f"{supernet} has no weights shipped here: pass checkpoint= the release's checkpoint.pth (or a "
                f"module: vit.create_supernet({supernet!r}, pretrained=True) downloads the release's)"
            )
        kwargs = ({} if token_mode is None else {"token_mode": token_mode}) | dict(shape or {})
        return vit.create_supernet(supernet, checkpoint=checkpoint, **kwargs).to(device)
    unknown = set(choices or {}) - set(CHOICE_KEYS)
    if unknown:
        raise ValueError(f"unknown choices {sorted(unknown)}; expected keys among {sorted(CHOICE_KEYS)}")
    kwargs = schedule.supernet_kwargs() | {CHOICE_KEYS[k]: tuple(v) for k, v in (choices or {}).items()}
    if token_mode is not None:
        kwargs["token_mode"] = token_mode
    kwargs |= dict(shape or {})
    model = vit.create_supernet(supernet, pretrained=checkpoint is None, checkpoint=checkpoint, **kwargs)
    return model.to(device)


__all__ = ["EnvConfig", "build_supernet"]

"""Trained selectors on disk: the SB3 model (`.zip`) and, beside it, the env settings it was trained with (`.json`).

The settings name the supernet, its shape arguments (`num_classes`, `img_size`, `in_chans`) and weights file, and the
shape of the MDP (embedding width, action choices, token mode, decisions, stem and blocks per step, price range):
`load_adaptive` rebuilds the supernet and the loop from them alone, and a selector is never silently run on a
supernet it was not trained for.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.base_class import BaseAlgorithm

import vit
from vit.checkpoint import atomic_write
from vit.inference import DecisionSchedule
from vit.official import OFFICIAL_PRESETS
from vit.train import held_out_batches, subset_batches

from .adaptive import AdaptiveViT, Calibration, calibration_curve

SHIPPED = Path(__file__).resolve().parent / "checkpoints"
SHAPE_KEYS = vit.registry.SHAPE_KEYS  # the preset arguments a signature records


def resolve_selector(path: str | os.PathLike) -> Path:
    """`PATH` (without suffix) of a saved selector; `shipped:NAME` names the selector shipped for supernet NAME
    (`shipped:prance_fmnist`). Raises `FileNotFoundError` naming what is missing."""
    text = str(path)
    if text.startswith("shipped:"):
        name = text.split(":", 1)[1]
        found = SHIPPED / name
        if not found.with_suffix(".zip").is_file():
            shipped = sorted(p.stem for p in SHIPPED.glob("*.zip"))
            raise FileNotFoundError(f"no shipped selector for {name!r}; shipped: {', '.join(shipped) or 'none'}")
        return found
    found = Path(path).with_suffix("") if Path(path).suffix in (".zip", ".json") else Path(path)
    missing = [str(f) for f in (found.with_suffix(".zip"), found.with_suffix(".json")) if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"selector file not found: {', '.join(missing)} (train one with `python scripts/train_selector.py "
            "--out DIR`, then pass DIR/selector)"
        )
    return found


def algorithms() -> dict[str, type[BaseAlgorithm]]:
    """The algorithms a selector can be trained with; sb3-contrib's appear when it is installed."""
    algos: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C}
    try:
        from sb3_contrib import MaskablePPO, RecurrentPPO
    except ImportError:
        return algos
    return algos | {"maskable_ppo": MaskablePPO, "recurrent_ppo": RecurrentPPO}


def algorithm(name: str) -> type[BaseAlgorithm]:
    """The SB3 class of algorithm `name`, or a clear error (naming the extra to install for sb3-contrib's)."""
    algos = algorithms()
    if name not in algos:
        hint = (
            " (install sb3-contrib: pip install prance-vit[contrib])"
            if name in ("maskable_ppo", "recurrent_ppo")
            else ""
        )
        raise ValueError(f"unknown algo {name!r}{hint}; available: {', '.join(algos)}")
    return algos[name]


def supernet_signature(model: vit.ElasticViT) -> dict:
    """What a selector depends on in a supernet: its name, width, depth, token mode and choices; and its shape
    arguments, to rebuild it."""
    space = model.search_space
    in_chans, img_size, _ = model.pretrained_cfg["input_size"]
    return {
        "supernet": model.pretrained_cfg.get("architecture"),
        "num_classes": model.num_classes,
        "img_size": img_size,
        "in_chans": in_chans,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "token_mode": model.token_mode,
        "choices": [[list(c) for c in space.choices(i)] for i in range(space.depth)],
    }


def recorded_space(signature: dict) -> vit.SearchSpace:
    """The search space a supernet signature records (its per-block choices, e.g. the keep ratios grouped decisions
    widened it with)."""
    fields = [list(map(tuple, f)) for f in zip(*signature["choices"])]  # per field, per block
    merge = fields[3] if len(fields) > 3 else [(1.0,)] * len(fields[0])
    return vit.SearchSpace(*fields[:3], merge, token_mode=signature["token_mode"])


def save_selector(model: BaseAlgorithm, path: str | os.PathLike, settings: dict) -> Path:
    """Write `PATH.zip` (the SB3 model) and `PATH.json` (`settings`: algo, supernet signature, env settings)."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path.with_suffix(".zip"), model.save)  # a kill mid-write leaves the previous files whole
    write_settings(path, settings)
    return path.with_suffix(".zip")


def write_settings(path: Path, settings: dict) -> None:
    """Write a selector's `PATH.json` (atomically)."""
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))


def read_settings(path: Path, required: tuple[str, ...] = ("algo", "signature")) -> dict:
    """The settings `save_selector` wrote at `PATH.json`; a `ValueError` naming the file when it is not such."""
    file = path.with_suffix(".json")
    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not a selector's settings file (truncated or not JSON): {e}") from e
    missing = [k for k in required if not isinstance(settings, dict) or k not in settings]
    if missing:
        raise ValueError(f"{file} was not written by save_selector: it lacks {', '.join(missing)}")
    return settings


def load_selector(path: str | os.PathLike, supernet: vit.ElasticViT | None = None, device: str = "auto"):
    """Load a selector and its settings; with `supernet`, check it is the one the selector was trained for.

    `path` is `PATH` of `PATH.zip` + `PATH.json`, or `shipped:NAME`. Returns (model, settings). Raises
    `FileNotFoundError` for missing files and `ValueError` for unreadable ones or when the supernet does not match.
    """
    path = resolve_selector(path)
    settings = read_settings(path)
    if supernet is not None:
        check_supernet(settings, supernet)
    file = path.with_suffix(".zip")
    try:
        model = algorithm(settings["algo"]).load(file, device=device)
    except (AssertionError, KeyError, ValueError, zipfile.BadZipFile, RuntimeError, EOFError) as e:
        raise ValueError(f"{file} is not a readable stable-baselines3 save (truncated or foreign): {e}") from e
    return model, settings


def check_supernet(settings: dict, supernet: vit.ElasticViT) -> None:
    """Raise a `ValueError` naming the difference when `supernet` is not the one in `settings`."""
    expected, actual = settings["signature"], supernet_signature(supernet)
    for key in ("embed_dim", "depth", "token_mode", "choices"):
        if expected[key] != actual[key]:
            raise ValueError(
                f"this selector was trained on supernet {expected['supernet']!r} with {key}={expected[key]}, but the "
                f"given supernet ({actual['supernet']!r}) has {key}={actual[key]}"
            )


def selector_data(
    selector: str | os.PathLike, data: str | None = None, data_dir: str | None = None
) -> tuple[str, str | None]:
    """(dataset name, folder) of the dataset a saved selector was trained on; `data` and `data_dir` override them."""
    env = read_settings(resolve_selector(selector), required=("env",))["env"]
    return data or env.get("data") or "fashion-mnist", data_dir or env.get("data_dir", env.get("data_path"))


def selector_batches(
    selector: str | os.PathLike,
    split: str,
    model: vit.ElasticViT,
    count: int | None,
    batch_size: int,
    device: torch.device,
    data: str | None = None,
    data_dir: str | None = None,
    workers: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded, class-stratified subset of `count` images (all when None) of the `held-out` or `train` split of a
    selector's dataset (`selector_data`), through the eval transform, in batches on `device`."""
    name, root = selector_data(selector, data, data_dir)
    if split == "held-out":
        return held_out_batches(name, root, model, count, batch_size, device, workers=workers)
    dataset = vit.load_dataset(name, split=split, root=root, model=model)
    return subset_batches(dataset, count, batch_size, device, workers=workers)


def recorded_supernet(
    settings: dict, checkpoint: str | os.PathLike | None = None, name: str | None = None
) -> vit.ElasticViT:
    """The supernet a selector's `settings` record, rebuilt at its shape arguments and search space: the preset
    `name` (default: the recorded one) with the weights of `checkpoint` (default: the recorded ones, else the
    preset's reference weights)."""
    signature = settings["signature"]
    name = name or signature["supernet"]
    if name is None:
        raise ValueError(
            "the selector's settings record no supernet name (it was trained on a module built without "
            "vit.create_supernet): pass supernet="
        )
    checkpoint = settings["env"].get("checkpoint") if checkpoint is None else checkpoint
    shape = {key: signature[key] for key in SHAPE_KEYS if key in signature}  # older files record none
    if name in OFFICIAL_PRESETS:  # the release's search space: nothing to rebuild but the token mode
        if checkpoint is None:
            raise ValueError(f"{name} has no weights shipped here: pass checkpoint= the meta-network's weights")
        return vit.create_supernet(name, checkpoint=checkpoint, token_mode=signature["token_mode"], **shape)
    return vit.create_supernet(
        name,
        pretrained=checkpoint is None,
        checkpoint=checkpoint,
        token_mode=signature["token_mode"],
        search_space=recorded_space(signature),
        **shape,
    )


def load_adaptive(
    path: str | os.PathLike,
    supernet: vit.ElasticViT | None = None,
    price: float | None = None,
    device: str = "auto",
    amp: bool = False,
    checkpoint: str | os.PathLike | None = None,
    precision: str = "fp32",
    budget: float | None = None,
    **kwargs,
) -> AdaptiveViT:
    """An `AdaptiveViT` from a saved selector, on `supernet` (default: the recorded supernet, rebuilt at its shape
    arguments with the weights of `checkpoint`, default its recorded or shipped weights; a preset of
    `vit.register_supernet` must be registered first), at the price range and decision schedule it was trained on.
    `price` (default `MDPConfig.price`), `budget` (a MACs ratio, priced by the calibration the file records), `amp`
    and `kwargs` (`layout`, `snap`, `prototypes`) are `AdaptiveViT`'s;
    `precision` (`fp32` or `bf16`) is the dtype the supernet's weights are cast to (`vit.utils.weights_dtype`), like
    `device` in place when `supernet` is given."""
    dtype = vit.utils.weights_dtype(precision)
    path = resolve_selector(path)
    settings = read_settings(path, required=("algo", "signature", "env"))
    if supernet is None:
        supernet = recorded_supernet(settings, checkpoint)
    elif checkpoint is not None:
        raise ValueError("pass the supernet or the checkpoint to build it with, not both")
    supernet = supernet.to(vit.utils.resolve_device(device), dtype)
    model, settings = load_selector(path, supernet, device=device)
    env = settings["env"]
    schedule = DecisionSchedule.named(env.get("decisions", "per-block"), env["stem_blocks"], env["blocks_per_step"])
    return AdaptiveViT(
        supernet,
        model,
        price=settings.get("price") if price is None and budget is None else price,
        price_range=tuple(env["price_range"]),
        schedule=schedule,
        amp=amp,
        budget=budget,
        calibration=settings.get("calibration"),
        **kwargs,
    )


def calibrate_selector(
    path: str | os.PathLike,
    images: int = 1000,
    batch_size: int = 256,
    device: str = "auto",
    points: int = 25,
    adaptive: AdaptiveViT | None = None,
) -> Calibration:
    """Measure what a saved selector spends over its trained prices (`agents.calibration_curve` at `points` prices)
    on `images` class-stratified training images of its dataset, record it in its `.json`, and return it: what
    `AdaptiveViT(..., budget=)` and `load_adaptive(..., budget=)` price budgets with. Training and fine-tuning call
    it on the selectors they save. `adaptive`: the selector as loaded already (default: `load_adaptive(path)`), e.g.
    on a supernet module that cannot be rebuilt by name."""
    path = resolve_selector(path)
    adaptive = load_adaptive(path, device=device) if adaptive is None else adaptive
    batches = selector_batches(path, "train", adaptive.supernet, images, batch_size, adaptive.supernet.pos_embed.device)
    calibration = calibration_curve(adaptive, batches, points)
    write_settings(path, read_settings(path) | {"calibration": calibration.to_dict()})
    return calibration


__all__ = [
    "algorithm",
    "calibrate_selector",
    "algorithms",
    "check_supernet",
    "load_adaptive",
    "load_selector",
    "recorded_space",
    "recorded_supernet",
    "resolve_selector",
    "save_selector",
    "selector_batches",
    "selector_data",
]

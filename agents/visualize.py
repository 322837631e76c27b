"""Pictures of a policy's decisions: token maps of a few held-out images, or the decisions over a dataset.

Token maps (`OUT/tokens.png`): one row per image, the image (true class, predicted class, MACs ratio), then the patch
grid after each decided block, titled with the block's choice (`b3 h2 m128 r0.8`: block, heads, MLP width, keep
ratio) and the patch tokens left; kept, merged (one colour per token) and pruned patches
(`agents.plots.token_map_figure`).

Decisions (`stats`: `OUT/decisions.png` and `OUT/decisions.json`): per decided block, the share of images taking each
heads, MLP width and keep ratio choice, and the mean MACs ratio and Top-1 per class (`agents.plots.decision_stats`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

import vit
from prance_env.mdp import MDPConfig
from vit.bench import setup_cpu
from vit.cli import device_field, threads_field
from vit.data import stratified_subset
from vit.registry import SupernetShape
from vit.train import subset_batches
from vit.utils import resolve_device

from .adaptive import AdaptiveViT
from .baselines import FullModelPolicy, RandomPolicy, UniformMergePolicy
from .plots import decision_stats, decisions_figure, save_figure, token_map_figure
from .selector import load_adaptive, read_settings, resolve_selector, selector_data

POLICIES = ("selector", "full", "random", "uniform")
DEFAULT_PRICE = MDPConfig().price  # the registered MDP's: one home for every default
TOKEN_MAP_ROWS = 6


@dataclass
class VisualizeConfig(SupernetShape):
    """Draw a policy's decisions: token maps of a few held-out images, or with --stats the decisions over a dataset."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + .json)"})
    policy: str = field(default="selector", metadata={"help": "selector | full | random | uniform (no selector)"})
    price: float | None = field(
        default=None, metadata={"help": f"compute price (default: the selector's, else {DEFAULT_PRICE})"}
    )
    budget: float | None = field(
        default=None,
        metadata={"help": "instead of --price, the mean MACs ratio to run at (priced by the selector's calibration)"},
    )
    stats: bool = field(default=False, metadata={"help": "draw the decisions over --images images, not token maps"})
    images: int | None = field(
        default=None,
        metadata={"help": f"held-out images (default: {TOKEN_MAP_ROWS} token-map rows; with --stats the whole split)"},
    )
    batch_size: int = field(default=256, metadata={"help": "images per forward (--stats)"})
    data: str | None = field(default=None, metadata={"help": "dataset name (default: the selector's, else FMNIST)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name of a baseline policy"})
    checkpoint: str | None = field(default=None, metadata={"help": "baseline supernet weights (default: shipped)"})
    token_mode: str | None = field(default=None, metadata={"help": "baseline token mode (default: the preset's)"})
    keep_index: int = field(default=0, metadata={"help": "keep-ratio choice of --policy uniform (0: smallest)"})
    every: int = field(default=1, metadata={"help": "token maps: draw every k-th decided block (and the last)"})
    seed: int = field(default=0, metadata={"help": "seed of --policy random"})
    device: str = device_field()
    threads: int = threads_field()
    out: str = field(
        default="runs/visualize", metadata={"help": "output folder (tokens.png; decisions.png, .json with --stats)"}
    )


def load_policy(cfg: VisualizeConfig) -> tuple[AdaptiveViT, str]:
    """The adaptive model to draw, and a line describing it; a `SystemExit` saying how to get a selector when the
    one asked for is missing."""
    if cfg.policy not in POLICIES:
        raise SystemExit(f"unknown --policy {cfg.policy!r}; expected one of {', '.join(POLICIES)}")
    if cfg.policy == "selector":
        try:
            path = resolve_selector(cfg.selector)
        except FileNotFoundError as e:
            raise SystemExit(
                f"no selector at {cfg.selector}: {e}. Train one with `python scripts/train_selector.py` "
                "(it writes runs/selector/selector.zip), pass --selector PATH, or draw a baseline with "
                "--policy full|random|uniform."
            ) from None
        if cfg.budget is not None:
            if cfg.price is not None:
                raise SystemExit("pass --price or --budget, not both")
            adaptive = load_adaptive(path, budget=cfg.budget, device=cfg.device)
            return adaptive, f"selector {path}, budget {cfg.budget:g} (price {adaptive.price:.3g})"
        settings = read_settings(path)
        price = cfg.price if cfg.price is not None else settings.get("price", DEFAULT_PRICE)
        return load_adaptive(path, price=price, device=cfg.device), f"selector {path}, price {price:g}"
    if cfg.budget is not None:
        raise SystemExit(f"--budget prices a calibrated selector; --policy {cfg.policy} takes --price")
    overrides = cfg.shape_kwargs() | ({} if cfg.token_mode is None else {"token_mode": cfg.token_mode})
    model = vit.create_supernet(
        cfg.supernet, pretrained=cfg.checkpoint is None, checkpoint=cfg.checkpoint, **overrides
    ).to(resolve_device(cfg.device))
    nvec = model.search_space.num_choices(model.depth - 1)
    policy = {
        "full": lambda: FullModelPolicy(nvec),
        "random": lambda: RandomPolicy(nvec, seed=cfg.seed),
        "uniform": lambda: UniformMergePolicy(nvec, cfg.keep_index),
    }[cfg.policy]()
    price = DEFAULT_PRICE if cfg.price is None else cfg.price
    return AdaptiveViT(model, policy, price=price), f"{cfg.policy} policy on {cfg.supernet}, price {price:g}"


def held_out(cfg: VisualizeConfig, model: vit.ElasticViT) -> tuple[Dataset, str]:
    """The held-out split of the selector's dataset (a baseline's: `data`), and the dataset's name."""
    if cfg.policy == "selector":
        name, root = selector_data(cfg.selector, cfg.data, cfg.data_dir)
    else:
        name, root = cfg.data or "fashion-mnist", cfg.data_dir
    return vit.load_dataset(name, split="held-out", root=root, model=model), name


def visualize(cfg: VisualizeConfig) -> Path:
    """Draw the token maps (or with `stats` the decisions) as `cfg` says; returns the PNG's path."""
    if (cfg.images is not None and cfg.images < 1) or cfg.every < 1:
        raise SystemExit("--images and --every must be at least 1")
    setup_cpu(cfg.threads, keep_memory=False)
    adaptive, described = load_policy(cfg)
    model = adaptive.supernet
    device = model.pos_embed.device
    data, dataset = held_out(cfg, model)
    classes = getattr(data, "classes", None)
    out = Path(cfg.out)
    architecture = f"{model.pretrained_cfg['architecture']} ({model.token_mode} mode)"

    if cfg.stats:
        stats = decision_stats(adaptive, subset_batches(data, cfg.images, cfg.batch_size, device))
        title = f"Decisions of the {described} on {stats['images']} {dataset} held-out images, {architecture}"
        save_figure(decisions_figure(stats, title, classes), out / "decisions.png")
        (out / "decisions.json").write_text(json.dumps({"title": title, **stats}, indent=2))
        print(f"{stats['images']} images, mean MACs ratio {stats['macs_ratio']:.3f}")
        print(f"wrote {out / 'decisions.png'} and {out / 'decisions.json'}")
        return out / "decisions.png"

    # one image of each class in turn (a class-stratified subset), not the split's first images
    picked = stratified_subset(data, min(cfg.images or TOKEN_MAP_ROWS, len(data))).indices
    items = sorted((data[int(i)] for i in picked), key=lambda item: int(item[1]))
    images = torch.stack([image for image, _ in items]).to(device)
    labels = [label for _, label in items]
    logits, macs, decisions = adaptive(images, return_decisions=True)
    preds = logits.argmax(-1).tolist()
    ratios = (macs / adaptive.full_macs).tolist()
    shown = list(range(adaptive.schedule.stem_blocks, model.depth, cfg.every))
    if shown[-1] != model.depth - 1:
        shown.append(model.depth - 1)
    name = (lambda k: classes[k]) if classes else str
    fig, final = token_map_figure(
        model,
        images,
        decisions.subnets,
        titles=[f"{name(y)}\n→ {name(p)}" for y, p in zip(labels, preds)],
        correct=[p == y for y, p in zip(labels, preds)],
        footers=[f"MACs {r:.2f}" for r in ratios],
        blocks=shown,
        title=f"{described}, {architecture}: the tokens after each decided block",
    )
    for b, (y, p, r, tokens) in enumerate(zip(labels, preds, ratios, final)):
        print(f"image {b}: {name(y)} -> {name(p)}, MACs ratio {r:.3f}, {tokens}/{model.num_patches} patch tokens left")
    save_figure(fig, out / "tokens.png")
    print(f"wrote {out / 'tokens.png'}")
    return out / "tokens.png"


__all__ = ["VisualizeConfig", "held_out", "load_policy", "visualize"]

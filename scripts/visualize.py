"""Which patches each block keeps, prunes or merges, and the widths chosen, for a few test images, in one PNG.

One row per image: the image (true class, predicted class, MACs ratio), then the patch grid after each decided
block, titled with the block's choice (`b3 h2 m128 r0.8`: block, heads, MLP width, keep ratio) and the patch
tokens left. A patch still alone in its token shows the image, merged patches take the colour of the token they
now form (one colour per token, lines between tokens), pruned patches are greyed out. The fates come from ToMe's
source tracing (`forward_block(..., source=...)`), replayed image by image on the configurations the policy chose.

    python scripts/visualize.py                                   # runs/selector/selector at its price
    python scripts/visualize.py --price 0.03 --out runs/visualize_0.03.png
    python scripts/visualize.py --policy uniform --keep-index 0   # a baseline: no selector needed
"""

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import hsv_to_rgb
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

import agents
from agents.selector import read_settings, resolve_selector
from vit.utils import parse_dataclass, resolve_device

matplotlib.use("Agg")

POLICIES = ("selector", "full", "random", "uniform")
DEFAULT_PRICE = 0.01
PRUNED_GREY = 0.8
PRUNED_HATCH = dict(fill=False, hatch="////", edgecolor="0.6", linewidth=0)
GOLDEN = 0.618033988749895  # hue step between token colours: neighbouring indices get distant hues


@dataclass
class Args:
    """Draw the tokens each block keeps, prunes or merges, and the widths chosen, for a few test images."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + .json)"})
    policy: str = field(default="selector", metadata={"help": "selector | full | random | uniform (no selector)"})
    price: float | None = field(
        default=None, metadata={"help": f"compute price (default: the selector's, else {DEFAULT_PRICE})"}
    )
    images: int = field(default=6, metadata={"help": "test images, one row each"})
    data_path: str | None = field(default=None, metadata={"help": "Fashion-MNIST folder"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet of a baseline policy"})
    checkpoint: str | None = field(default=None, metadata={"help": "baseline supernet weights (default: shipped)"})
    token_mode: str | None = field(default=None, metadata={"help": "baseline token mode (default: the preset's)"})
    keep_index: int = field(default=0, metadata={"help": "keep-ratio choice of --policy uniform (0: smallest)"})
    every: int = field(default=1, metadata={"help": "draw every k-th decided block (and always the last)"})
    seed: int = field(default=0, metadata={"help": "seed of --policy random"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    out: str = field(default="runs/visualize.png", metadata={"help": "PNG to write"})


def load_policy(args: Args) -> tuple[agents.AdaptiveViT, str]:
    """The adaptive model to draw, and a line describing it."""
    if args.policy not in POLICIES:
        raise SystemExit(f"unknown --policy {args.policy!r}; expected one of {', '.join(POLICIES)}")
    if args.policy == "selector":
        try:
            path = resolve_selector(args.selector)
        except FileNotFoundError as e:
            raise SystemExit(
                f"no selector at {args.selector}: {e}. Train one with `python scripts/train_selector.py` "
                "(it writes runs/selector/selector.zip), pass --selector PATH, or draw a baseline with "
                "--policy full|random|uniform."
            ) from None
        settings = read_settings(path)
        price = args.price if args.price is not None else settings.get("price", DEFAULT_PRICE)
        return agents.load_adaptive(path, price=price, device=args.device), f"selector {path}, price {price:g}"
    overrides = {} if args.token_mode is None else {"token_mode": args.token_mode}
    model = vit.create_supernet(
        args.supernet, pretrained=args.checkpoint is None, checkpoint=args.checkpoint, **overrides
    ).to(resolve_device(args.device))
    nvec = model.search_space.num_choices(model.depth - 1)
    policy = {
        "full": lambda: agents.FullModelPolicy(nvec),
        "random": lambda: agents.RandomPolicy(nvec, seed=args.seed),
        "uniform": lambda: agents.UniformMergePolicy(nvec, args.keep_index),
    }[args.policy]()
    price = DEFAULT_PRICE if args.price is None else args.price
    return agents.AdaptiveViT(model, policy, price=price), f"{args.policy} policy on {args.supernet}"


@torch.inference_mode()
def trace_sources(model: vit.ElasticViT, image: Tensor, subnet: vit.Subnet) -> list[Tensor]:
    """After each block of `subnet`, which original patches each patch token holds: (tokens, patches), CLS left out."""
    x, size = model.embed(image[None]), None
    source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)[None]  # (1, 1 + N, 1 + N)
    sources = []
    for i, config in enumerate(subnet):
        x, size, source = model.forward_block(i, x, size, config, source)
        sources.append(source[0, 1:, 1:])
    return sources


def patch_owner(source: Tensor) -> np.ndarray:
    """Per original patch, the patch token holding it, or -1 where it was pruned. source: (tokens, patches)."""
    return torch.where(source.sum(0) > 0, source.argmax(0), -1).cpu().numpy()


def merged_colours(owners: Sequence[np.ndarray]) -> list[dict[int, int]]:
    """Per panel of a row, a colour number for each token holding several patches.

    A token takes the colour of the largest coloured token it took patches from in the previous panel (unless a
    larger token took it first), so a growing token keeps its colour from block to block; others get new ones.
    """
    panels: list[dict[int, int]] = []
    fresh = 0
    for k, owner in enumerate(owners):
        counts = np.bincount(owner[owner >= 0])
        colours: dict[int, int] = {}
        for token in np.argsort(-counts, kind="stable"):
            if counts[token] < 2:
                break
            heirs = []
            if k:
                before = owners[k - 1][owner == token]
                tokens, shared = np.unique(before[before >= 0], return_counts=True)
                heirs = [panels[-1][t] for t in tokens[np.argsort(-shared, kind="stable")] if t in panels[-1]]
            taken = set(colours.values())
            heir = next((c for c in heirs if c not in taken), None)
            if heir is None:
                heir, fresh = fresh, fresh + 1
            colours[int(token)] = heir
        panels.append(colours)
    return panels


def colour(number: int) -> np.ndarray:
    """The RGB colour of colour number `number`: hues a golden-ratio step apart, so neighbours differ."""
    return hsv_to_rgb(((number * GOLDEN) % 1.0, 0.8, 1.0))


def draw_grid(ax, picture: np.ndarray, owner: np.ndarray, colours: dict[int, int], grid: int) -> None:
    """The patches of `picture` (H, W, 3 in [0, 1]) by fate, with lines between tokens.

    owner: per patch, its token or -1 (pruned); colours: the colour number of each merged token.
    """
    patch = picture.shape[0] // grid
    owners = owner.reshape(grid, grid)
    rgb = picture.copy()
    for (r, c), token in np.ndenumerate(owners):
        cell = rgb[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
        if token < 0:
            cell[:] = PRUNED_GREY
            ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, **PRUNED_HATCH))
        elif token in colours:
            cell[:] = 0.6 * colour(colours[token]) + 0.4 * cell
    ax.imshow(rgb, interpolation="nearest")
    lo = -0.5
    segments = [
        [(lo + (c + 1) * patch, lo + r * patch), (lo + (c + 1) * patch, lo + (r + 1) * patch)]
        for r in range(grid)
        for c in range(grid - 1)
        if owners[r, c] != owners[r, c + 1]
    ] + [
        [(lo + c * patch, lo + (r + 1) * patch), (lo + (c + 1) * patch, lo + (r + 1) * patch)]
        for r in range(grid - 1)
        for c in range(grid)
        if owners[r, c] != owners[r + 1, c]
    ]
    ax.add_collection(LineCollection(segments, colors="white", linewidths=0.5, alpha=0.7))


def pictures(model: vit.ElasticViT, images: Tensor) -> np.ndarray:
    """Normalised images (B, C, H, W) back to RGB in [0, 1]: (B, H, W, 3)."""
    cfg = model.pretrained_cfg
    channels = images.shape[1]
    mean = torch.tensor(cfg.get("mean", (0.0,) * channels), device=images.device)[:, None, None]
    std = torch.tensor(cfg.get("std", (1.0,) * channels), device=images.device)[:, None, None]
    out = (images * std + mean).clamp(0, 1).expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def main(argv: Sequence[str] | None = None) -> Path:
    """Draw the figure as `argv` (command-line flags) says; returns the PNG's path."""
    args = parse_dataclass(Args, argv)
    if args.images < 1 or args.every < 1:
        raise SystemExit("--images and --every must be at least 1")
    adaptive, described = load_policy(args)
    model = adaptive.supernet
    device = model.pos_embed.device
    data = vit.load_dataset("fashion-mnist", split="test", root=args.data_path, model=model)
    items = [data[i] for i in range(min(args.images, len(data)))]
    images = torch.stack([image for image, _ in items]).to(device)
    labels = [label for _, label in items]
    logits, macs = adaptive(images)
    preds = logits.argmax(-1).tolist()
    ratios = (macs / adaptive.full_macs).tolist()
    subnets = [vit.Subnet(tuple(c)) for c in adaptive.inference.choices]
    stem = adaptive.inference.config.stem_blocks
    shown = list(range(stem, model.depth, args.every))
    if shown[-1] != model.depth - 1:
        shown.append(model.depth - 1)
    classes = getattr(data, "classes", None)
    name = (lambda k: classes[k]) if classes else str
    grid = math.isqrt(model.num_patches)  # patches per side

    rows, cols = len(items), 1 + len(shown)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.0 * cols + 0.2, 1.45 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for b, picture in enumerate(pictures(model, images)):
        sources = trace_sources(model, images[b], subnets[b])
        owners = [patch_owner(sources[i]) for i in shown]
        ax = axes[b, 0]
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(
            f"{name(labels[b])}\n→ {name(preds[b])}",
            fontsize=7,
            color="tab:green" if preds[b] == labels[b] else "tab:red",
        )
        ax.set_xlabel(f"MACs {ratios[b]:.2f}", fontsize=7)
        for i, owner, colours, panel in zip(shown, owners, merged_colours(owners), axes[b, 1:]):
            draw_grid(panel, picture, owner, colours, grid)
            tokens = sources[i].shape[0]
            panel.set_title(f"b{i} {str(subnets[b][i]).replace('-', ' ')}", fontsize=6, pad=2)
            panel.set_xlabel(f"{tokens} token{'s' * (tokens != 1)}", fontsize=6, labelpad=1)
        print(
            f"image {b}: {name(labels[b])} -> {name(preds[b])}, MACs ratio {ratios[b]:.3f}, "
            f"{sources[-1].shape[0]}/{grid * grid} patch tokens at the end"
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(f"{described} ({model.token_mode} mode): the tokens after each decided block", fontsize=9)
    legend = [
        Patch(facecolor="0.1", edgecolor="white", label="kept: a patch of its own"),
        Patch(facecolor=colour(0), label="merged: one colour per token"),
        Patch(facecolor=str(PRUNED_GREY), **{**PRUNED_HATCH, "fill": True}, label="pruned"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

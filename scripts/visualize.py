"""Pictures of a policy's decisions: token maps of a few held-out images, or (`--stats`) the decisions over a
dataset.

Token maps (`OUT/tokens.png`): one row per image, the image (true class, predicted class, MACs ratio), then the
patch grid after each decided block, titled with the block's choice (`b3 h2 m128 r0.8`: block, heads, MLP width,
keep ratio) and the patch tokens left; kept, merged (one colour per token) and pruned patches
(`agents.plots.token_map_figure`).

Decisions (`--stats`: `OUT/decisions.png` and `OUT/decisions.json`): per decided block, the share of images taking
each heads, MLP width and keep ratio choice, and the mean MACs ratio and Top-1 per class
(`agents.plots.decision_stats`).

    python scripts/visualize.py                                   # runs/selector/selector at its price
    python scripts/visualize.py --price 0.03 --out runs/visualize_0.03
    python scripts/visualize.py --stats --images 2000             # the decisions over 2000 held-out images
    python scripts/visualize.py --policy uniform --keep-index 0   # a baseline: no selector needed
"""

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import agents
from agents.plots import decision_stats, decisions_figure, save_figure, token_map_figure
from agents.selector import read_settings, resolve_selector, selector_dataset
from vit.registry import SupernetShape
from vit.train import subset_batches
from vit.utils import parse_dataclass, resolve_device, setup_cpu

POLICIES = ("selector", "full", "random", "uniform")
DEFAULT_PRICE = 0.01
TOKEN_MAP_ROWS = 6


@dataclass
class Args(SupernetShape):
    """Draw a policy's decisions: token maps of a few held-out images, or with --stats the decisions over a dataset."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + .json)"})
    policy: str = field(default="selector", metadata={"help": "selector | full | random | uniform (no selector)"})
    price: float | None = field(
        default=None, metadata={"help": f"compute price (default: the selector's, else {DEFAULT_PRICE})"}
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
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    out: str = field(
        default="runs/visualize", metadata={"help": "output folder (tokens.png; decisions.png, .json with --stats)"}
    )


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
    overrides = args.shape_kwargs() | ({} if args.token_mode is None else {"token_mode": args.token_mode})
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
    return agents.AdaptiveViT(model, policy, price=price), f"{args.policy} policy on {args.supernet}, price {price:g}"


def held_out(args: Args, model: vit.ElasticViT) -> tuple[torch.utils.data.Dataset, str]:
    """The held-out split of the selector's dataset (a baseline's: `--data`), and the dataset's name."""
    if args.policy == "selector":
        name = args.data or read_settings(resolve_selector(args.selector))["env"].get("data", "fashion-mnist")
        return selector_dataset(args.selector, "held-out", model, args.data, args.data_dir), name
    name = args.data or "fashion-mnist"
    return vit.load_dataset(name, split=vit.data.held_out_split(name), root=args.data_dir, model=model), name


def main(argv: Sequence[str] | None = None) -> Path:
    """Draw the figure as `argv` (command-line flags) says; returns the PNG's path."""
    args = parse_dataclass(Args, argv)
    if (args.images is not None and args.images < 1) or args.every < 1:
        raise SystemExit("--images and --every must be at least 1")
    setup_cpu(args.threads, keep_memory=False)
    adaptive, described = load_policy(args)
    model = adaptive.supernet
    device = model.pos_embed.device
    data, dataset = held_out(args, model)
    classes = getattr(data, "classes", None)
    out = Path(args.out)
    architecture = f"{model.pretrained_cfg['architecture']} ({model.token_mode} mode)"

    if args.stats:
        stats = decision_stats(adaptive, subset_batches(data, args.images, args.batch_size, device))
        title = f"Decisions of the {described} on {stats['images']} {dataset} held-out images, {architecture}"
        save_figure(decisions_figure(stats, title, classes), out / "decisions.png")
        (out / "decisions.json").write_text(json.dumps({"title": title, **stats}, indent=2))
        print(f"{stats['images']} images, mean MACs ratio {stats['macs_ratio']:.3f}")
        print(f"wrote {out / 'decisions.png'} and {out / 'decisions.json'}")
        return out / "decisions.png"

    items = [data[i] for i in range(min(args.images or TOKEN_MAP_ROWS, len(data)))]
    images = torch.stack([image for image, _ in items]).to(device)
    labels = [label for _, label in items]
    logits, macs, decisions = adaptive(images, return_decisions=True)
    preds = logits.argmax(-1).tolist()
    ratios = (macs / adaptive.full_macs).tolist()
    subnets = decisions.subnets
    shown = list(range(adaptive.shape.stem_blocks, model.depth, args.every))
    if shown[-1] != model.depth - 1:
        shown.append(model.depth - 1)
    name = (lambda k: classes[k]) if classes else str
    fig, final = token_map_figure(
        model,
        images,
        subnets,
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


if __name__ == "__main__":
    main()

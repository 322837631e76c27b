"""Evaluate a trained selector on held-out images against the full model and static baselines.

Rows, all measured in this run on the same images with the same batch size:

- the full model;
- the selector at a few MACs budgets, each calibrated (`agents.calibrate`) on training images, not test ones;
- the static subnet of the grid of `scripts/eval_supernet.py` (uniform width level x keep ratio) with the best
  Top-1 at matched MACs, and uniform token merging (full widths, one keep ratio at every block, like ToMe) at
  matched MACs. "Matched" means the best baseline whose MACs ratio lies in [m - 0.02, m + 0.10], m being the
  selector's; when none does, the nearest one;
- random decisions.

Held-out images are Fashion-MNIST's test split or an ImageFolder's val split (the selector's dataset by default).
It writes `OUT/results.md` (the table), `OUT/results.json` (every row, the whole static grid included) and
`OUT/pareto.png` (Top-1 against GMACs and against measured images/s, `agents.plots.pareto_figure`), and prints the
table.

    python scripts/evaluate.py                                   # runs/selector/selector on Fashion-MNIST
    python scripts/evaluate.py --selector runs/demo/selector/selector --budgets 0.4 0.5 0.6 --out runs/demo
"""

from __future__ import annotations

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

import agents
from agents.baselines import RandomPolicy
from agents.plots import pareto_figure, save_figure
from agents.selector import read_settings, resolve_selector, selector_dataset
from vit.data import default_workers
from vit.token_ops import token_schedule
from vit.train import subset_batches
from vit.utils import autocast, parse_dataclass, resolve_device, setup_cpu, timed, use_tf32

MATCH_BELOW, MATCH_ABOVE = 0.02, 0.10


@dataclass
class Args:
    """Evaluate a selector against the full model, static subnets, uniform merging and random decisions."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + PATH.json)"})
    budgets: tuple[float, ...] = field(default=(0.3, 0.5, 0.7), metadata={"help": "mean MACs ratios to calibrate to"})
    data: str | None = field(default=None, metadata={"help": "dataset name (default: the selector's)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    images: int | None = field(default=None, metadata={"help": "held-out images (default: the whole split)"})
    calib_images: int = field(default=2048, metadata={"help": "training images used to calibrate the price"})
    tolerance: float = field(default=0.01, metadata={"help": "calibration stops this close to the budget"})
    batch_size: int = field(default=256, metadata={"help": "images per forward (every row)"})
    workers: int = field(default_factory=default_workers, metadata={"help": "data loader workers (ImageFolder)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads (0: the default; 1 suits per-sample execution on few cores)"}
    )
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "glibc: keep freed memory in the process, so timed forwards do not page-fault"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random-decision baseline"})
    amp: bool = field(default=False, metadata={"help": "every row under bf16 autocast (CUDA or CPU)"})
    out: str = field(default="runs/evaluate", metadata={"help": "output folder (results.md, results.json, pareto.png)"})


def load_batches(args, model: vit.ElasticViT, split: str, images: int | None, device) -> list:
    """A seeded, class-stratified subset of `images` images (all when None) of a split (`train` or `held-out`) of
    the selector's dataset, through the eval transform, in batches of `args.batch_size` on `device`."""
    dataset = selector_dataset(args.selector, split, model, args.data, args.data_dir)
    return subset_batches(dataset, images, args.batch_size, device, workers=args.workers)


def final_tokens(model: vit.ElasticViT, subnet: vit.Subnet) -> int:
    """Patch tokens left after the last block of a static subnet."""
    n = model.num_patches
    for config in subnet:
        n = token_schedule(n, config, model.token_mode)[1]
    return n


@torch.inference_mode()
def measure_static(model: vit.ElasticViT, subnet: vit.Subnet, batches: list, full_macs: int, amp: bool = False) -> dict:
    """Top-1, Top-5, MACs ratio, tokens kept, parameters and images/s of a plain forward pass of one subnet."""
    device = model.pos_embed.device

    def run() -> list[tuple[Tensor, Tensor]]:
        with autocast(device, amp):
            return [(model(x, subnet).topk(min(5, model.num_classes), dim=-1).indices, y) for x, y in batches]

    top5, seconds = timed(run, device)
    seen = sum(len(y) for _, y in batches)
    macs = vit.count_flops(model, subnet)
    return {
        "top1": sum(int((k[:, 0] == y).sum()) for k, y in top5) / seen,
        "top5": sum(int((k == y[:, None]).any(-1).sum()) for k, y in top5) / seen,
        "params": vit.count_params(model, subnet),
        "flops_ratio": macs / full_macs,
        "gmacs": macs / 1e9,
        "tokens_kept": final_tokens(model, subnet) / model.num_patches,
        "images_per_s": seen / seconds,
    }


def measure_adaptive(adaptive: agents.AdaptiveViT, batches: list, price: float | None = None) -> dict:
    """`agents.measure` at `price` (None: `adaptive.price`) with GMACs and images/s."""
    device = adaptive.supernet.pos_embed.device
    row, seconds = timed(lambda: agents.measure(adaptive, batches, price=price), device)
    seen = sum(len(y) for _, y in batches)
    return {**row, "gmacs": row["flops_ratio"] * adaptive.full_macs / 1e9, "images_per_s": seen / seconds}


def matched(rows: list[dict], ratio: float) -> dict:
    """The best-Top-1 row whose MACs ratio lies in [ratio - 0.02, ratio + 0.10]; else the nearest in MACs."""
    window = [r for r in rows if ratio - MATCH_BELOW <= r["flops_ratio"] <= ratio + MATCH_ABOVE]
    if window:
        return max(window, key=lambda r: (r["top1"], -r["flops_ratio"]))
    return min(rows, key=lambda r: abs(r["flops_ratio"] - ratio))


def markdown(rows: list[dict], batch_size: int, images: int, amp: bool = False) -> str:
    """The table of `rows`; params are those each image's subnet reads, averaged over the images."""
    precision = "bf16 autocast" if amp else "fp32"
    lines = [
        f"Held-out split, {images} images, batch {batch_size}, {precision}; images/s measured in the same run.",
        "",
        "| method | setting | Top-1 (%) | Top-5 (%) | GMACs | MACs ratio | params (M) | tokens kept | images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['top1'] * 100:.2f} | {r['top5'] * 100:.2f} | {r['gmacs']:.4f} "
            f"| {r['flops_ratio']:.3f} | {r['params'] / 1e6:.3f} | {r['tokens_kept']:.3f} | {r['images_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(args: Args) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_cpu(args.threads, args.keep_freed_memory)
    device = resolve_device(args.device)
    if device.type == "cuda":
        use_tf32()
    adaptive = agents.load_adaptive(args.selector, device=str(device), amp=args.amp)
    model = adaptive.supernet
    test = load_batches(args, model, "held-out", args.images, device)
    calibration = load_batches(args, model, "train", args.calib_images, device)
    images = sum(len(y) for _, y in test)
    full_macs = vit.count_flops(model)
    space = model.search_space

    grid = []
    subnets = list(dict.fromkeys([space.largest(), space.smallest(), *space.static_grid(tied=True)]))
    for subnet in tqdm(subnets, desc="static subnets"):
        grid.append(
            {
                "method": "static subnet",
                "setting": f"`{subnet.blocks[-1]}` every block",
                **measure_static(model, subnet, test, full_macs, args.amp),
            }
        )
    full = {**grid[0], "method": "full model", "setting": f"`{space.largest().blocks[-1]}` every block"}
    widest = space.largest().blocks[-1]
    uniform = [
        {**r, "method": "uniform merging"}
        for r, s in zip(grid, subnets)
        if all(c.heads == widest.heads and c.mlp_hidden == widest.mlp_hidden for c in s) and r is not grid[0]
    ]

    selector, table = [], [full]
    for budget in tqdm(args.budgets, desc="budgets"):
        price = agents.calibrate(adaptive, calibration, budget, tolerance=args.tolerance)
        row = {
            "method": "PRANCE selector",
            "setting": f"budget {budget:g}, price {price:.3g}",
            "budget": budget,
            "price": price,
            **measure_adaptive(adaptive, test, price),
        }
        selector.append(row)
        table += [
            row,
            {**matched(grid, row["flops_ratio"]), "method": "best static subnet at matched MACs"},
            {**matched(uniform, row["flops_ratio"]), "method": "uniform merging at matched MACs"},
        ]
    random = agents.AdaptiveViT(model, RandomPolicy(adaptive.nvec, seed=args.seed), shape=adaptive.shape, amp=args.amp)
    table.append(
        {"method": "random decisions", "setting": "uniform over the choices", **measure_adaptive(random, test)}
    )

    text = markdown(table, args.batch_size, images, args.amp)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"table": table, "grid": grid}, indent=2))
    dataset = args.data or read_settings(resolve_selector(args.selector))["env"].get("data", "fashion-mnist")
    title = f"{dataset} held-out split, {images} images: {model.pretrained_cfg['architecture']} ({model.token_mode})"
    save_figure(pareto_figure(grid, uniform, selector, [full, table[-1]], title), out / "pareto.png")
    print(text)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'pareto.png'}")
    return table


if __name__ == "__main__":
    main(parse_dataclass(Args))

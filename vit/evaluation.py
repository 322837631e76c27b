"""Top-1 and MACs of a supernet's static subnets on the held-out split: the grid of `scripts/eval_supernet.py`.

The largest, the smallest, and a grid of uniform width levels x keep ratios (`SearchSpace.static_grid`), for every
token mode asked (the same weights run in each mode) and, in the modes that merge, every merge variant asked (ToMe's,
and the PRANCE release's), on the whole held-out split or a class-stratified subset of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .bench import setup_cpu
from .config import TOKEN_MODES
from .data import default_workers, load_dataset, stratified_subset
from .flops import count_macs
from .registry import SupernetShape, create_supernet
from .train import Batches, evaluate
from .utils import resolve_device


@dataclass
class GridConfig(SupernetShape):
    """Evaluate a grid of static subnets."""

    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    modes: tuple[str, ...] = field(default=TOKEN_MODES, metadata={"help": "token modes to evaluate"})
    merge_variants: tuple[str, ...] = field(
        default=("tome",), metadata={"help": "merge variants of the modes that merge: tome | official"}
    )
    images: int | None = field(
        default=None, metadata={"help": "held-out images, a class-stratified subset (default: the whole split)"}
    )
    batch_size: int = field(default=500, metadata={"help": "images per forward"})
    workers: int = field(default_factory=default_workers, metadata={"help": "data loader workers (ImageFolder)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    out: str = field(default="runs/eval_supernet", metadata={"help": "output folder (static_grid.md)"})


def grid_rows(cfg: GridConfig) -> list[dict]:
    """One row per (token mode and variant, subnet): `mode` (the table's label), `name` (largest, smallest or
    empty), `block` (the configuration of every block), `macs`, `flops_ratio` and `top1`; sorted by mode, then
    MACs."""
    device = resolve_device(cfg.device)
    rows = []
    runs = [(m, v) for m in cfg.modes for v in (cfg.merge_variants if m != "prune" else cfg.merge_variants[:1])]
    for mode, variant in runs:
        model = create_supernet(
            cfg.supernet,
            pretrained=cfg.checkpoint is None,
            checkpoint=cfg.checkpoint,
            token_mode=mode,
            merge_variant=variant,
            **cfg.shape_kwargs(),
        ).to(device)
        space = model.search_space
        data = load_dataset(cfg.data, split="held-out", root=cfg.data_dir, model=model)
        if cfg.images is not None:
            data = stratified_subset(data, cfg.images)
        # streamed: a whole ImageNet split does not fit in memory as decoded batches
        batches = Batches(data, cfg.batch_size, device, rank=0, world=1, workers=cfg.workers, seed=0)
        subnets = list(dict.fromkeys([space.largest(), space.smallest(), *space.static_grid(tied=True)]))
        label = mode if mode == "prune" else f"{mode} ({variant})"
        top1 = evaluate(model, lambda b=batches: b.epoch(0, shuffle=False), subnets, device, desc=label)
        full = count_macs(model)
        for subnet, acc in zip(subnets, top1):
            name = "largest" if subnet == space.largest() else "smallest" if subnet == space.smallest() else ""
            macs = count_macs(model, subnet)
            row = {"mode": label, "name": name, "block": str(subnet.blocks[-1]), "macs": macs}
            rows.append(row | {"flops_ratio": macs / full, "top1": acc})
    return sorted(rows, key=lambda r: (r["mode"], r["macs"]))


def grid_markdown(rows: list[dict]) -> str:
    """The Markdown table of `grid_rows`."""
    lines = ["| token mode | subnet | every block | MMACs | MACs ratio | Top-1 |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['mode']} | {r['name']} | `{r['block']}` | {r['macs'] / 1e6:.2f} | {r['flops_ratio']:.3f} "
        f"| {r['top1'] * 100:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def evaluate_grid(cfg: GridConfig) -> str:
    """Evaluate the static grid as `cfg` says: print its table, write it to `OUT/static_grid.md` and return it."""
    setup_cpu(cfg.threads, keep_memory=False)
    table = grid_markdown(grid_rows(cfg))
    print(table)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_grid.md").write_text(table + "\n")
    return table


__all__ = ["GridConfig", "evaluate_grid", "grid_markdown", "grid_rows"]

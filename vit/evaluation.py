"""Top-1 and MACs of a supernet's static subnets on the held-out split: the grid of `scripts/eval_supernet.py`, and
its `--extract`, which writes one subnet as a timm model (`vit.extract_subnet`) and checks it against the supernet.

The largest, the smallest, and a grid of uniform width levels x keep ratios (`SearchSpace.static_grid`), for every
token mode asked (the same weights run in each mode) and, in the modes that merge, every merge variant asked (ToMe's,
and the PRANCE release's), on the whole held-out split or a class-stratified subset of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from tqdm.auto import tqdm

from .bench import interleaved_rounds, processor_name, setup_cpu
from .cli import device_field, threads_field, workers_field
from .config import TOKEN_MODES
from .data import load_dataset, stratified_subset
from .extract import SUBNET_ARCHITECTURE, extract_subnet, save_subnet
from .flops import count_macs
from .registry import SupernetShape, create_supernet, preset_name
from .train import Batches, evaluate
from .utils import resolve_device


@dataclass
class GridConfig(SupernetShape):
    """Evaluate a grid of static subnets."""

    supernet: str | None = field(
        default=None, metadata={"help": "registered supernet name (default: the checkpoint's, else prance_fmnist)"}
    )
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
    workers: int = workers_field()
    device: str = device_field()
    threads: int = threads_field()
    out: str = field(
        default="runs/eval_supernet",
        metadata={"help": "output folder (static_grid.md; the model folder with --extract)"},
    )
    extract: str | None = field(
        default=None,
        metadata={
            "help": "instead of the grid, write this subnet as a timm model folder in --out and check it: a block "
            "for every block (h2-m128-r1) or one per block, in the preset's token mode or the one --modes names"
        },
    )
    rounds: int = field(default=10, metadata={"help": "--extract: timed rounds of the speed comparison"})


def grid_rows(cfg: GridConfig) -> list[dict]:
    """One row per (token mode and variant, subnet): `mode` (the table's label), `name` (largest, smallest or
    empty), `block` (the configuration of every block), `macs`, `flops_ratio` and `top1`; sorted by mode, then
    MACs."""
    device = resolve_device(cfg.device)
    rows = []
    runs = [(m, v) for m in cfg.modes for v in (cfg.merge_variants if m != "prune" else cfg.merge_variants[:1])]
    for mode, variant in runs:
        model = create_supernet(
            preset_name(cfg.supernet, cfg.checkpoint),
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


def extract_and_check(cfg: GridConfig) -> dict:
    """Write `cfg.extract` of the supernet as a timm model folder in `cfg.out` (`vit.save_subnet`), load it back
    with timm, and compare it with the supernet running that subnet on the held-out images: Top-1 of both, the
    largest logit difference, and images/s of both on one batch in `cfg.rounds` interleaved rounds. Prints the
    report, writes it to `OUT/extraction.json` and returns it."""
    setup_cpu(cfg.threads)
    device = resolve_device(cfg.device)
    mode = {"token_mode": cfg.modes[0]} if len(cfg.modes) == 1 else {}
    variant = {"merge_variant": cfg.merge_variants[0]} if len(cfg.merge_variants) == 1 else {}
    model = (
        create_supernet(
            preset_name(cfg.supernet, cfg.checkpoint),
            pretrained=cfg.checkpoint is None,
            checkpoint=cfg.checkpoint,
            **mode,
            **variant,
            **cfg.shape_kwargs(),
        )
        .to(device)
        .eval()
    )
    subnet = model.search_space.parse(cfg.extract)  # checked before anything is written
    out = save_subnet(extract_subnet(model, subnet), cfg.out)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).to(device).eval()
    data = load_dataset(cfg.data, split="held-out", root=cfg.data_dir, model=model)
    if cfg.images is not None:
        data = stratified_subset(data, cfg.images)
    batches = Batches(data, cfg.batch_size, device, rank=0, world=1, workers=cfg.workers, seed=0)
    correct, difference, first = torch.zeros(2), 0.0, None
    with torch.inference_mode():
        for x, y in tqdm(batches.epoch(0, shuffle=False), desc="held-out", leave=False):
            x, y = x.to(device), y.to(device)
            first = x if first is None else first
            ours, theirs = model(x, subnet), loaded(x)
            difference = max(difference, (ours - theirs).abs().max().item())
            correct += torch.stack([(ours.argmax(-1) == y).sum(), (theirs.argmax(-1) == y).sum()]).cpu()
    with torch.inference_mode():
        runs = {"supernet": lambda: model(first, subnet), "extracted": lambda: loaded(first)}
        timer = interleaved_rounds(runs, cfg.rounds, device)
    speed = timer.speed("extracted", "supernet", len(first) * cfg.rounds)
    full = count_macs(model)
    report = {
        "folder": str(out),
        "subnet": _text(subnet),
        "token_mode": model.token_mode,
        "merge_variant": model.merge_variant,
        "architecture": type(loaded).__name__,
        "macs": count_macs(model, subnet),
        "flops_ratio": count_macs(model, subnet) / full,
        "params": sum(p.numel() for p in loaded.parameters()),
        "images": len(data),
        "top1_supernet": correct[0].item() / len(data),
        "top1_extracted": correct[1].item() / len(data),
        "max_logit_difference": difference,
        "batch": len(first),
        "processor": processor_name(device),
        "supernet_images_per_s": timer.speed("supernet", "supernet", len(first) * cfg.rounds)["images_per_s"],
        **{f"extracted_{k}": v for k, v in speed.items()},
    }
    (out / "extraction.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}: timm's {SUBNET_ARCHITECTURE} ({report['architecture']}), {report['params']:,} parameters")
    print(f"  load it: import vit, timm; timm.create_model('local-dir:{out}', pretrained=True)")
    print(f"subnet ({model.token_mode}): {report['subnet']}")
    print(f"MACs {report['macs'] / 1e6:.2f} M, {report['flops_ratio']:.3f} of the full model")
    print(
        f"held-out Top-1 on {len(data)} images: supernet {report['top1_supernet'] * 100:.2f}, extracted "
        f"{report['top1_extracted'] * 100:.2f}; largest logit difference {difference:.2e}"
    )
    low, high = speed["speedup_range"]
    print(
        f"images/s at batch {len(first)} ({report['processor']}, {cfg.rounds} rounds): supernet "
        f"{report['supernet_images_per_s']:.0f}, extracted {speed['images_per_s']:.0f}, "
        f"speed-up {speed['speedup']:.2f}x [{low:.2f}, {high:.2f}] (CPU time {speed['cpu_speedup']:.2f}x)"
    )
    return report


def _text(subnet) -> str:
    """A subnet as `SearchSpace.parse` reads it: one block's text when every block is alike."""
    return str(subnet.blocks[0]) if len(set(subnet.blocks)) == 1 else str(subnet)


def eval_supernet(cfg: GridConfig) -> str | dict:
    """`scripts/eval_supernet.py`: the static grid (`evaluate_grid`), or with `cfg.extract`, `extract_and_check`."""
    return extract_and_check(cfg) if cfg.extract else evaluate_grid(cfg)


def evaluate_grid(cfg: GridConfig) -> str:
    """Evaluate the static grid as `cfg` says: print its table, write it to `OUT/static_grid.md` and return it."""
    setup_cpu(cfg.threads, keep_memory=False)
    table = grid_markdown(grid_rows(cfg))
    print(table)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_grid.md").write_text(table + "\n")
    return table


__all__ = ["GridConfig", "eval_supernet", "evaluate_grid", "extract_and_check", "grid_markdown", "grid_rows"]

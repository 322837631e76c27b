"""Top-1 and MACs of static subnets of a supernet on the held-out split, as a Markdown table.

The largest, the smallest, and a grid of uniform width levels x keep ratios, for every token mode (the same
weights run in each mode) and, in the modes that merge, every merge variant asked (`--merge-variants`: ToMe's, and
the PRANCE release's), on the whole held-out split or a class-stratified subset of it (`--images`). It prints the
table and writes it to `OUT/static_grid.md`.

    python scripts/eval_supernet.py                                  # the shipped prance_fmnist
    python scripts/eval_supernet.py --checkpoint runs/fmnist_supernet/supernet.safetensors --out runs/grid
    python scripts/eval_supernet.py --modes merge --merge-variants tome official   # the two ways of merging
"""

from dataclasses import dataclass, field
from pathlib import Path

import vit
from vit.data import default_workers, held_out_split, stratified_subset
from vit.registry import SupernetShape
from vit.train import Batches, evaluate
from vit.utils import parse_dataclass, resolve_device, setup_cpu


@dataclass
class Args(SupernetShape):
    """Evaluate a grid of static subnets."""

    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    modes: tuple[str, ...] = field(default=vit.TOKEN_MODES, metadata={"help": "token modes to evaluate"})
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


def main(args: Args) -> str:
    setup_cpu(args.threads, keep_memory=False)
    device = resolve_device(args.device)
    rows = []
    runs = [(m, v) for m in args.modes for v in (args.merge_variants if m != "prune" else args.merge_variants[:1])]
    for mode, variant in runs:
        model = vit.create_supernet(
            args.supernet,
            pretrained=args.checkpoint is None,
            checkpoint=args.checkpoint,
            token_mode=mode,
            merge_variant=variant,
            **args.shape_kwargs(),
        ).to(device)
        space = model.search_space
        data = vit.load_dataset(args.data, split=held_out_split(args.data), root=args.data_dir, model=model)
        if args.images is not None:
            data = stratified_subset(data, args.images)
        # streamed: a whole ImageNet split does not fit in memory as decoded batches
        batches = Batches(data, args.batch_size, device, rank=0, world=1, workers=args.workers, seed=0)
        subnets = list(dict.fromkeys([space.largest(), space.smallest(), *space.static_grid(tied=True)]))
        label = mode if mode == "prune" else f"{mode} ({variant})"
        top1 = evaluate(model, lambda b=batches: b.epoch(0, shuffle=False), subnets, device, desc=label)
        full = vit.count_flops(model)
        for subnet, acc in zip(subnets, top1):
            name = "largest" if subnet == space.largest() else "smallest" if subnet == space.smallest() else ""
            macs = vit.count_flops(model, subnet)
            rows.append((label, name, str(subnet.blocks[-1]), macs, macs / full, acc))
    rows.sort(key=lambda r: (r[0], r[3]))
    lines = ["| token mode | subnet | every block | MMACs | MACs ratio | Top-1 |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {m} | {n} | `{b}` | {macs / 1e6:.2f} | {ratio:.3f} | {acc * 100:.2f} |"
        for m, n, b, macs, ratio, acc in rows
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_grid.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main(parse_dataclass(Args))

"""Top-1 and MACs of static subnets of a supernet on the test split, as a Markdown table.

The largest, the smallest, and a grid of uniform width levels x keep ratios, for every token mode (the same
weights run in each mode).

    python scripts/eval_supernet.py                                  # the shipped prance_fmnist
    python scripts/eval_supernet.py --checkpoint runs/fmnist_supernet/supernet.safetensors --out grid.md
"""

from dataclasses import dataclass, field
from pathlib import Path

import vit
from vit.train import Batches, evaluate
from vit.utils import parse_dataclass, resolve_device


@dataclass
class Args:
    """Evaluate a grid of static subnets."""

    model: str = field(default="prance_fmnist", metadata={"help": "registered supernet"})
    checkpoint: str | None = field(default=None, metadata={"help": "weights file (default: the shipped ones)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagenet"})
    data_path: str | None = field(default=None, metadata={"help": "dataset folder"})
    modes: tuple[str, ...] = field(default=vit.TOKEN_MODES, metadata={"help": "token modes to evaluate"})
    batch_size: int = field(default=500, metadata={"help": "images per batch"})
    limit: int | None = field(default=None, metadata={"help": "evaluate on the first LIMIT batches only"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    out: str | None = field(default=None, metadata={"help": "also write the table to this Markdown file"})


def main(args: Args) -> str:
    device = resolve_device(args.device)
    rows = []
    for mode in args.modes:
        model = vit.create_supernet(
            args.model, pretrained=args.checkpoint is None, checkpoint=args.checkpoint, token_mode=mode
        ).to(device)
        space = model.search_space
        split = "val" if args.data in ("imagenet", "imagefolder") else "test"
        data = Batches(
            vit.load_dataset(args.data, split=split, root=args.data_path, model=model),
            args.batch_size,
            device,
            rank=0,
            world=1,
            workers=4,
            seed=0,
        )
        subnets = list(dict.fromkeys([space.largest(), space.smallest(), *space.static_grid(tied=True)]))
        top1 = evaluate(model, lambda d=data: d.epoch(0, shuffle=False, limit=args.limit), subnets, device, desc=mode)
        full = vit.count_flops(model)
        for subnet, acc in zip(subnets, top1):
            name = "largest" if subnet == space.largest() else "smallest" if subnet == space.smallest() else ""
            macs = vit.count_flops(model, subnet)
            rows.append((mode, name, str(subnet.blocks[-1]), macs, macs / full, acc))
    rows.sort(key=lambda r: (r[0], r[3]))
    lines = ["| token mode | subnet | every block | MMACs | MACs ratio | Top-1 |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {m} | {n} | `{b}` | {macs / 1e6:.2f} | {ratio:.3f} | {acc * 100:.2f} |"
        for m, n, b, macs, ratio, acc in rows
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return table


if __name__ == "__main__":
    main(parse_dataclass(Args))

"""Wall-clock cost of elastic execution on this machine, as ratios taken in one run.

1. A static subnet with about half the MACs of the full model: throughput ratio against the full model.
2. Per-sample execution, packed and bucketed: the batch split over k different subnets, against one subnet for
   the batch, both as MACs per second (so the ratio is the efficiency of per-sample execution; 1.0 means free).

    python scripts/benchmark_supernet.py                     # prance_fmnist, batch 256
    python scripts/benchmark_supernet.py --supernet prance_deit_tiny --batch-size 64 --device cpu --threads 1
"""

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

from dataclasses import dataclass, field

import numpy as np
import torch

from vit.registry import SupernetShape
from vit.utils import parse_dataclass, resolve_device, seconds_per_call, setup_cpu


@dataclass
class Args(SupernetShape):
    """Benchmark of elastic and per-sample (packed, bucketed) execution."""

    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name (random weights)"})
    token_mode: str = field(default="merge", metadata={"help": "prune | merge | prune_merge"})
    batch_size: int = field(default=256, metadata={"help": "images per forward"})
    target: float = field(default=0.5, metadata={"help": "MACs ratio of the static subnet"})
    repeats: int = field(default=7, metadata={"help": "timed calls per measurement (median)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "glibc: keep freed memory in the process, so timed forwards do not page-fault"}
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = field(default=0, metadata={"help": "random seed (images and sampled subnets)"})


def main(args: Args) -> None:
    setup_cpu(args.threads, args.keep_freed_memory)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model = vit.create_supernet(args.supernet, token_mode=args.token_mode, **args.shape_kwargs()).to(device).eval()
    space = model.search_space
    x = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"], device=device)
    full = vit.count_flops(model)
    grid = space.static_grid()
    half = min(grid, key=lambda s: abs(vit.count_flops(model, s) / full - args.target))

    def seconds(subnet, execution: str = "packed") -> float:
        with torch.inference_mode():
            return seconds_per_call(lambda: model(x, subnet, execution), repeats=1, warmup=0, device=device)

    def interleaved(*runs) -> list[float]:
        """Median seconds of each forward (a subnet, or (subnets, execution)) over rounds that run them in turn
        (this machine drifts), then the median ratio of each to the first."""
        runs = [r if isinstance(r, tuple) else (r,) for r in runs]
        for r in runs:
            seconds(*r)
        rounds = [[seconds(*r) for r in runs] for _ in range(args.repeats)]
        return [float(np.median([r[k] for r in rounds])) for k in range(len(runs))] + [
            float(np.median([r[k] / r[0] for r in rounds])) for k in range(1, len(runs))
        ]

    print(f"{args.supernet} ({args.token_mode}), batch {args.batch_size}, {device}, {torch.get_num_threads()} threads")
    print(f"full model: {full / 1e6:.1f} MMACs/image")
    full_s, half_s, slowdown = interleaved(None, half)
    half_ratio = vit.count_flops(model, half) / full
    print("\n| subnet | MACs ratio | images/s | speed-up |\n|---|---|---|---|")
    print(f"| full | 1.000 | {args.batch_size / full_s:.0f} | 1.00x |")
    print(
        f"| static `{half.blocks[0]}` x{space.depth} | {half_ratio:.3f} | {args.batch_size / half_s:.0f} | "
        f"{1 / slowdown:.2f}x |"
    )
    print(
        f"\nrealised speed-up {1 / slowdown:.2f}x for a MACs ratio of {half_ratio:.3f} "
        f"(the MACs ratio alone predicts {1 / half_ratio:.2f}x)"
    )

    rng = np.random.default_rng(args.seed)
    print(
        "\n| per-sample subnets | mean MACs ratio | images/s, packed | images/s, bucketed "
        "| MACs/s vs one subnet, packed | bucketed |\n|---|---|---|---|---|---|"
    )
    for k in sorted({1, 4, 16, 64, args.batch_size}):
        pool = [half] if k == 1 else [space.sample(rng) for _ in range(k)]
        subnets = [pool[i % k] for i in range(args.batch_size)]
        relative = float(np.mean(vit.count_flops(model, subnets))) / vit.count_flops(model, half)
        _, packed_s, bucketed_s, packed, bucketed = interleaved(half, (subnets, "packed"), (subnets, "bucketed"))
        print(
            f"| {k} distinct | {relative * half_ratio:.3f} | {args.batch_size / packed_s:.0f} | "
            f"{args.batch_size / bucketed_s:.0f} | {relative / packed:.2f} | {relative / bucketed:.2f} |"
        )


if __name__ == "__main__":
    main(parse_dataclass(Args))

"""Real speed of the adaptive model: `AdaptiveViT` against the full model and the static subnet of equal MACs.

The selector is calibrated to a MACs budget on training images, then one batch of test images goes through, in
interleaved rounds (this machine's speed drifts, so every ratio is a median of per-round ratios):

- the full model and the static grid subnet nearest to the selector's measured MACs ratio (plain forwards);
- `AdaptiveViT` with per-sample decisions executed on packed tokens (the default) and by bucketing (the same
  decisions and results), and with `consensus` execution (one median choice per step for the whole batch),
  calibrated to the same budget on its own.

It reports images/s, the realised speed-up (median and range of the per-round values) next to the MACs ratio,
and the share of the packed adaptive forward spent deciding (the selector's forward passes, observation to
action).

Freed memory is kept in the process (`vit.utils.keep_freed_memory`; `--no-keep-freed-memory` to leave glibc's
default), so that no model pays page faults that depend on the allocation history of the process.

`--amp` runs every model under bf16 autocast (`vit.utils.autocast`); on CUDA, fp32 matmuls use TF32.

It writes the table to `OUT/benchmark.md`.

    python scripts/benchmark.py                         # runs/selector/selector, budget 0.5, batch 256
    python scripts/benchmark.py --device cpu --threads 1 --out runs/benchmark_1thread
"""

from __future__ import annotations

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import agents
from agents.selector import selector_dataset
from vit.data import default_workers
from vit.train import subset_batches
from vit.utils import autocast, parse_dataclass, resolve_device, setup_cpu, timed, use_tf32


@dataclass
class Args:
    """Throughput of AdaptiveViT against the full model and a static subnet of equal MACs."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + .json)"})
    budget: float = field(default=0.5, metadata={"help": "mean MACs ratio the selector is calibrated to"})
    batch_size: int = field(default=256, metadata={"help": "images per forward"})
    workers: int = field(default_factory=default_workers, metadata={"help": "data loader workers (ImageFolder)"})
    calib_images: int = field(default=2048, metadata={"help": "training images used to calibrate the price"})
    rounds: int = field(default=9, metadata={"help": "interleaved timing rounds (medians are reported)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "glibc: keep freed memory in the process, so timed forwards do not page-fault"}
    )
    data: str | None = field(default=None, metadata={"help": "dataset name (default: the selector's)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    amp: bool = field(default=False, metadata={"help": "every model under bf16 autocast (CUDA or CPU)"})
    out: str = field(default="runs/benchmark", metadata={"help": "output folder (benchmark.md)"})


class DecisionTimer:
    """Wraps `adaptive.decide` to add up the seconds spent deciding (CUDA synchronised)."""

    def __init__(self, adaptive: agents.AdaptiveViT, device: torch.device) -> None:
        self.decide, self.device, self.seconds = adaptive.decide, device, 0.0
        adaptive.decide = self

    def __call__(self, *args, **kwargs):
        out, seconds = timed(lambda: self.decide(*args, **kwargs), self.device)
        self.seconds += seconds
        return out


@torch.inference_mode()
def wall_seconds(fn, device: torch.device) -> float:
    return timed(fn, device)[1]


def main(args: Args) -> dict[str, float]:
    kept = setup_cpu(args.threads, args.keep_freed_memory)
    device = resolve_device(args.device)
    if device.type == "cuda":
        use_tf32()
    packed = agents.load_adaptive(args.selector, device=str(device), amp=args.amp)
    model = packed.supernet
    dataset = selector_dataset(args.selector, "train", model, args.data, args.data_dir)
    calibration = subset_batches(dataset, args.calib_images, args.batch_size, device, workers=args.workers)
    adaptive = {
        execution: agents.AdaptiveViT(
            model,
            packed.policy,
            price_range=packed.price_range,
            shape=packed.shape,
            execution=execution,
            amp=args.amp,
        )
        for execution in agents.adaptive.EXECUTIONS
    }
    prices = {"packed": agents.calibrate(adaptive["packed"], calibration, args.budget)}
    prices["bucketed"] = prices["packed"]  # the same decisions, executed otherwise
    prices["consensus"] = agents.calibrate(adaptive["consensus"], calibration, args.budget)
    dataset = selector_dataset(args.selector, "held-out", model, args.data, args.data_dir)
    images = subset_batches(dataset, args.batch_size, args.batch_size, device, workers=args.workers)[0][0]
    full_macs = vit.count_flops(model)
    ratio = {name: float(a(images, price=prices[name])[1].mean()) / full_macs for name, a in adaptive.items()}
    grid = model.search_space.static_grid(tied=True)
    static = min(grid, key=lambda s: abs(vit.count_flops(model, s) / full_macs - ratio["packed"]))
    ratio |= {"full": 1.0, "static": vit.count_flops(model, static) / full_macs}

    def plain(subnet: vit.Subnet | None = None):
        with autocast(device, args.amp):
            return model(images, subnet)

    runs = {
        "full": plain,
        "static": lambda: plain(static),
        **{name: (lambda a=a, p=prices[name]: a(images, price=p)) for name, a in adaptive.items()},
    }
    timer = DecisionTimer(adaptive["packed"], device)
    for fn in runs.values():  # warm-up
        wall_seconds(fn, device)
    rounds, deciding = [], []
    for _ in range(args.rounds):
        row = {}
        for name, fn in runs.items():
            before = timer.seconds
            row[name] = wall_seconds(fn, device)
            if name == "packed":
                deciding.append((timer.seconds - before) / row[name])
        rounds.append(row)
    seconds = {name: float(np.median([r[name] for r in rounds])) for name in runs}
    per_round = {name: [r["full"] / r[name] for r in rounds] for name in runs}
    speedup = {name: float(np.median(v)) for name, v in per_round.items()}
    names = {
        "full": "full model",
        "static": f"static `{static.blocks[-1]}` every block (nearest grid subnet in MACs)",
        "packed": f"AdaptiveViT, packed (budget {args.budget:g}, price {prices['packed']:.3g})",
        "bucketed": "AdaptiveViT, bucketed (same decisions)",
        "consensus": f"AdaptiveViT, consensus (budget {args.budget:g}, price {prices['consensus']:.3g})",
    }
    lines = [
        f"{device}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{'bf16 autocast' if args.amp else 'fp32'}, "
        f"median of {args.rounds} interleaved rounds, freed memory {'kept' if kept else 'returned (glibc default)'}",
        "",
        "| model | MACs ratio | images/s | speed-up vs full | per-round range | speed-up predicted by MACs |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {names[n]} | {ratio[n]:.3f} | {args.batch_size / seconds[n]:.0f} | {speedup[n]:.2f}x "
        f"| {min(per_round[n]):.2f}-{max(per_round[n]):.2f}x | {1 / ratio[n]:.2f}x |"
        for n in runs
    ]
    share = float(np.median(deciding))
    lines += ["", f"deciding (the selector's forward passes): {share * 100:.1f}% of the packed adaptive forward"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(text + "\n")
    print(f"\nwrote {out / 'benchmark.md'}")
    return {
        **{f"speedup_{n}": speedup[n] for n in runs},
        **{f"ratio_{n}": ratio[n] for n in runs},
        **{f"images_per_s_{n}": args.batch_size / seconds[n] for n in runs},
        "deciding": share,
    }


if __name__ == "__main__":
    main(parse_dataclass(Args))

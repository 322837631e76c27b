"""Timing on a shared machine: CPU set-up, clocks, and the one interleaved timer of every benchmark.

A machine shared with other work drifts by tens of percent within minutes, so speed is measured as ratios between
runs interleaved in one process: `Rounds` runs every run once per round, starting one further along the list than the
round before, and keeps each run's wall-clock and process CPU seconds, round by round; a speed-up is the median of the
per-round ratios, reported with their range (`Rounds.speed`). `benchmark_supernet` measures what elastic and
per-sample execution cost on this machine with it.
"""

from __future__ import annotations

import ctypes
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli import device_field, threads_field
from .flops import count_macs
from .registry import SupernetShape, create_supernet
from .utils import resolve_device


def processor_name(device: torch.device | str = "cpu") -> str:
    """The processor a speed figure was taken on: the CUDA device's name, or the CPU's model name and whether it has
    native bf16 (AVX512-BF16 or AMX; without, bf16 matmuls are emulated), from /proc/cpuinfo where there is one."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = "native bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "no native bf16"
    return f"{name or platform.machine()}, {bf16}"


def keep_freed_memory(keep_bytes: int = 1 << 30) -> bool:
    """Have glibc's malloc keep freed memory in the process (Linux), so that repeated CPU forwards stop
    page-faulting; returns whether it applied (False on other C libraries and systems).

    By default glibc hands freed blocks of a few MiB and more back to the system, and a forward that allocates them
    again takes a page fault per 4 KiB on first touch: tens of thousands per forward of the full model at batch
    256, a third of its time in some processes and none in others, depending on the allocation history. With this,
    blocks up to 32 MiB come from the heap and up to `keep_bytes` of free heap is kept, as jemalloc and tcmalloc do
    (PyTorch's CPU tuning guide suggests those). Process-wide; the timing scripts call it before measuring.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_TRIM_THRESHOLD, keep_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def setup_cpu(threads: int = 0, keep_memory: bool = True) -> bool:
    """What the timing scripts set before measuring: torch's CPU thread count (0 keeps torch's default) and, with
    `keep_memory`, `keep_freed_memory()`. Returns whether freed memory is kept."""
    if threads:
        torch.set_num_threads(threads)
    return keep_memory and keep_freed_memory()


def timed(fn, device: torch.device | str | None = None):
    """`fn()`'s result and the wall-clock seconds it took (CUDA synchronised on a CUDA `device`)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def clocked(fn, device: torch.device | str | None = None):
    """`fn()`'s result, the wall-clock seconds it took (CUDA synchronised on a CUDA `device`) and the process CPU
    seconds (`time.process_time`: every thread of the process, none of other processes, so it drifts less than wall
    clock on a shared machine)."""
    cpu = time.process_time()
    out, wall = timed(fn, device)
    return out, wall, time.process_time() - cpu


class Rounds:
    """Interleaved timing rounds of named runs: wall-clock and process CPU seconds of each, round by round.

    Every `round` calls each run once, starting one further along the list than the round before, so that a
    machine's drift and the effects of call order (caches, allocations) spread over all runs. A round may give each
    run its own inputs (a batch per round) and returns what the runs returned; an untimed round (a warm-up) runs them
    without recording.

    Args:
        names: the runs, in order.
        device: CUDA is synchronised around every timed call on a CUDA device.
    """

    def __init__(self, names: Sequence[str], device: torch.device | str | None = None) -> None:
        self.names = list(names)
        self.device = device
        self.seconds = {name: {"wall": [], "cpu": []} for name in self.names}
        self.rounds = 0

    def round(self, runs: dict[str, Callable[[], object]], timed: bool = True) -> dict[str, object]:
        """Call each of `runs` (keyed by name, every name) once, in this round's order; their results by name."""
        start = self.rounds % len(self.names)
        results = {}
        for name in self.names[start:] + self.names[:start]:
            results[name], wall, cpu = clocked(runs[name], self.device)
            if timed:
                self.seconds[name]["wall"].append(wall)
                self.seconds[name]["cpu"].append(cpu)
        self.rounds += 1
        return results

    def speed(self, name: str, reference: str, items: int) -> dict:
        """`name`'s speed over its timed rounds, `items` images in all: `images_per_s` (wall clock),
        `images_per_cpu_s` (process CPU time) and, against `reference`, `speedup` and `cpu_speedup`, the medians of
        the per-round ratios of the reference's seconds to the run's, with their range (`speedup_range`,
        `cpu_speedup_range`)."""
        row = {}
        for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
            spent = [max(s, 1e-9) for s in self.seconds[name][clock]]
            median, low, high = round_ratios(self.seconds[reference][clock], spent)
            row["images_per_s" if clock == "wall" else "images_per_cpu_s"] = items / sum(spent)
            row[f"{prefix}speedup"], row[f"{prefix}speedup_range"] = median, (low, high)
        return row


def interleaved_rounds(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device | str | None = None,
    warmup: int = 1,
) -> Rounds:
    """`rounds` timed `Rounds` of `runs` after `warmup` untimed ones."""
    timer = Rounds(runs, device)
    for r in range(warmup + rounds):
        timer.round(runs, timed=r >= warmup)
    return timer


def round_ratios(reference: Sequence[float], other: Sequence[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the per-round ratios reference / other (of seconds: the speed-up of `other`)."""
    ratios = [a / b for a, b in zip(reference, other)]
    return statistics.median(ratios), min(ratios), max(ratios)


@dataclass
class SupernetBenchConfig(SupernetShape):
    """Benchmark of elastic and per-sample (packed, bucketed) execution."""

    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name (random weights)"})
    token_mode: str = field(default="merge", metadata={"help": "prune | merge | prune_merge"})
    batch_size: int = field(default=256, metadata={"help": "images per forward"})
    target: float = field(default=0.5, metadata={"help": "MACs ratio of the static subnet"})
    repeats: int = field(default=7, metadata={"help": "timed calls per measurement (median)"})
    threads: int = threads_field()
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "glibc: keep freed memory in the process, so timed forwards do not page-fault"}
    )
    device: str = device_field()
    seed: int = field(default=0, metadata={"help": "random seed (images and sampled subnets)"})


def benchmark_supernet(cfg: SupernetBenchConfig) -> dict:
    """Wall-clock cost of elastic execution on this machine, as ratios taken in one run; prints two tables.

    1. The static grid subnet nearest to `cfg.target` of the full model's MACs against the full model: `static`, its
       `flops_ratio`, `images_per_s` and `speedup` (`Rounds.speed`), and the full model's `full_images_per_s`.
    2. Per-sample execution, packed and bucketed: the batch split over k different subnets against the static subnet
       for the whole batch, as MACs per second (the efficiency of per-sample execution; 1.0 means free): one row of
       `per_sample` per k, with its `distinct` subnets, mean `flops_ratio`, `images_per_s` and `efficiency` of each
       layout.

    Every measurement is `cfg.repeats` interleaved rounds after a warm-up (`interleaved_rounds`) on random weights
    and images.
    """
    setup_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = create_supernet(cfg.supernet, token_mode=cfg.token_mode, **cfg.shape_kwargs()).to(device).eval()
    space, batch = model.search_space, cfg.batch_size
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], device=device)
    full = count_macs(model)
    half = min(space.static_grid(), key=lambda s: abs(count_macs(model, s) / full - cfg.target))
    half_ratio = count_macs(model, half) / full

    def forward(subnet, layout: str = "packed") -> Callable[[], object]:
        @torch.inference_mode()
        def run() -> object:
            return model(x, subnet, layout)

        return run

    timer = interleaved_rounds({"full": forward(None), "static": forward(half)}, cfg.repeats, device)
    static = timer.speed("static", "full", batch * cfg.repeats)
    result = {"full_mmacs": full / 1e6, "static": str(half), "flops_ratio": half_ratio}
    result |= {"full_images_per_s": timer.speed("full", "full", batch * cfg.repeats)["images_per_s"], **static}
    print(f"{cfg.supernet} ({cfg.token_mode}), batch {batch}, {device}, {torch.get_num_threads()} threads")
    print(f"full model: {full / 1e6:.1f} MMACs/image")
    print("\n| subnet | MACs ratio | images/s | speed-up |\n|---|---|---|---|")
    print(f"| full | 1.000 | {result['full_images_per_s']:.0f} | 1.00x |")
    print(
        f"| static `{half.blocks[0]}` x{space.depth} | {half_ratio:.3f} | {static['images_per_s']:.0f} | "
        f"{static['speedup']:.2f}x |"
    )
    print(
        f"\nrealised speed-up {static['speedup']:.2f}x for a MACs ratio of {half_ratio:.3f} "
        f"(the MACs ratio alone predicts {1 / half_ratio:.2f}x)"
    )

    rng = np.random.default_rng(cfg.seed)
    print(
        "\n| per-sample subnets | mean MACs ratio | images/s, packed | images/s, bucketed "
        "| MACs/s vs one subnet, packed | bucketed |\n|---|---|---|---|---|---|"
    )
    result["per_sample"] = []
    for k in sorted({min(k, batch) for k in (1, 4, 16, 64, batch)}):  # a batch runs at most one subnet per image
        pool = [half] if k == 1 else [space.sample(rng) for _ in range(k)]
        subnets = [pool[i % k] for i in range(batch)]
        relative = float(np.mean(count_macs(model, subnets))) / count_macs(model, half)
        runs = {"static": forward(half), "packed": forward(subnets, "packed"), "bucketed": forward(subnets, "bucketed")}
        timer = interleaved_rounds(runs, cfg.repeats, device)
        row = {"distinct": k, "flops_ratio": relative * half_ratio}
        for layout in ("packed", "bucketed"):
            speed = timer.speed(layout, "static", batch * cfg.repeats)
            # MACs per second against the static subnet's: the speed-up scaled by the MACs each image runs
            row[layout] = {"images_per_s": speed["images_per_s"], "efficiency": relative * speed["speedup"]}
        result["per_sample"].append(row)
        print(
            f"| {k} distinct | {row['flops_ratio']:.3f} | {row['packed']['images_per_s']:.0f} | "
            f"{row['bucketed']['images_per_s']:.0f} | {row['packed']['efficiency']:.2f} | "
            f"{row['bucketed']['efficiency']:.2f} |"
        )
    return result


__all__ = [
    "Rounds",
    "SupernetBenchConfig",
    "benchmark_supernet",
    "clocked",
    "interleaved_rounds",
    "keep_freed_memory",
    "processor_name",
    "round_ratios",
    "setup_cpu",
    "timed",
]

"""Timing on a shared machine: CPU set-up, clocks, and the one interleaved timer of every benchmark.

A machine shared with other work drifts by tens of percent within minutes, so speed is measured as ratios between
runs interleaved in one process: `Rounds` runs every run once per round, starting one further along the list than the
round before, and keeps each run's wall-clock and process CPU seconds, round by round; a speed-up is the median of the
per-round ratios, reported with their range (`Rounds.speed`).
"""

from __future__ import annotations

import ctypes
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch


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


__all__ = ["Rounds", "clocked", "interleaved_rounds", "keep_freed_memory", "round_ratios", "setup_cpu", "timed"]

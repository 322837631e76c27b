"""Resident memory of the batched PranceViT-v1 over many episodes: does a long run stay within its budget?

Builds `gymnasium.make_vec("PranceViT-v1", num_envs=N)` on a supernet (the shipped prance_fmnist by default) and
Fashion-MNIST, plays `episodes` episodes with random actions (an episode: every sub-env infers one image; the batch
ends together and resets at the next step) and reads the process's resident set size (VmRSS) after each one.
Reports the peak against a limit, the RSS after episodes 1, 5, 10 and the last, the growth from episode 5 to the last
and over the second half: the first episodes fill caches and the allocator's pools, a leak goes on growing. `--trim`
also reads RSS once glibc's allocator has returned its free heap to the OS, which separates the memory still in use
from what the allocator keeps for later. Writes `OUT/memory.md` (the report), `OUT/memory.json` (the per-episode
series) and `OUT/memory.png` (the plot).

    python scripts/benchmark_memory.py                       # 1024 sub-envs, 100 episodes, delta reward
    python scripts/benchmark_memory.py --reward terminal --out runs/memory_terminal  # no Result-to-Go completion
    python scripts/benchmark_memory.py --trim --out runs/memory_trim  # memory in use, without the free pages
    python scripts/benchmark_memory.py --threads 1           # a CPU shared with other jobs: no threads left waiting
"""

import ctypes
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import prance_env  # noqa: F401  (registers PranceViT-v1; before torch, so that vit's OpenMP wait policy applies)

# isort: split
import gymnasium
import numpy as np
import torch
from tqdm.auto import tqdm

from vit.utils import parse_dataclass, resolve_device

MIB = 2**20


@dataclass
class Args:
    """Resident memory of the batched env over many episodes of random actions."""

    num_envs: int = field(default=1024, metadata={"help": "sub-envs (images per batch)"})
    episodes: int = field(default=100, metadata={"help": "episodes to play"})
    reward: str = field(default="delta", metadata={"help": "delta | direct | terminal"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    split: str = field(default="train", metadata={"help": "dataset split the episodes draw images from"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    limit_gib: float = field(default=4.0, metadata={"help": "resident memory budget (GiB)"})
    trim: bool = field(default=False, metadata={"help": "also read RSS with the free heap returned to the OS (glibc)"})
    plot: bool = field(default=True, metadata={"help": "write a PNG of RSS against episodes"})
    out: str = field(default="runs/benchmark_memory", metadata={"help": "output folder (memory.md, .json, .png)"})
    seed: int = field(default=0, metadata={"help": "random seed (images, prices and actions)"})


def memory() -> tuple[float, float]:
    """The process's resident set size now and its peak so far, in MiB (Linux's /proc, else `resource`)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):  # no /proc: only the peak is known (ru_maxrss is KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / MIB
        return peak, peak


def heap_trimmer() -> Callable[[], None]:
    """A call that returns the C allocator's free heap to the OS (glibc's `malloc_trim`)."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is None:
        raise ValueError("--trim needs glibc's malloc_trim, which this C library lacks")
    return lambda: malloc_trim(0)


def change(values: list[float], start: int) -> tuple[float, float]:
    """The change from episode `start` (1-based) to the last, and the least-squares trend per 100 episodes."""
    span = np.asarray(values[start - 1 :])
    slope = np.polyfit(np.arange(len(span)), span, 1)[0] if len(span) > 1 else 0.0
    return float(span[-1] - span[0]), float(100 * slope)


def report(args: Args, device: torch.device, decisions: int, base: dict[str, float], series: list[dict]) -> dict:
    """The figures of a run and their Markdown summary, for each measure of `base`: `rss` and, with `--trim`,
    `trimmed` (RSS once the allocator's free heap is returned to the OS)."""
    n = len(series)
    marks = sorted({e for e in (1, 5, 10, n) if e <= n})
    first, half = (5 if n > 5 else 1), max(1, n // 2)
    limit, peak = args.limit_gib * 1024, max(row["peak_mib"] for row in series)
    figures: dict = {"limit_mib": limit, "peak_rss_mib": peak, "within_limit": peak <= limit}
    figures |= {"growth_from_episode": first, "late_from_episode": half}
    rows: dict[str, list[str]] = {}
    for key in base:
        values = [row[f"{key}_mib"] for row in series]
        growth, _ = change(values, first)
        late_growth, late_trend = change(values, half)
        prefix = "" if key == "rss" else f"{key}_"
        figures |= {
            f"{prefix}rss_after_setup_mib": base[key],
            f"{prefix}rss_after_episode_mib": {e: values[e - 1] for e in marks},
            f"{prefix}growth_mib": growth,
            f"{prefix}late_growth_mib": late_growth,
            f"{prefix}late_trend_mib_per_100_episodes": late_trend,
        }
        cells = {
            "after building the env": f"{base[key]:.0f}",
            **{f"after episode {e}": f"{values[e - 1]:.0f}" for e in marks},
            f"growth, episode {first} to {n}": f"{growth:+.1f}",
            f"growth over the second half, episode {half} to {n}": f"{late_growth:+.1f}",
            "trend over the second half (least squares), per 100 episodes": f"{late_trend:+.1f}",
        }
        for name, cell in cells.items():
            rows.setdefault(name, []).append(cell)
    headers = {"rss": "RSS (MiB)", "trimmed": "RSS, free heap returned to the OS (MiB)"}
    lines = [
        f"# Resident memory of PranceViT-v1: {args.num_envs} sub-envs, {n} episodes, `{args.reward}` reward",
        "",
        f"{args.supernet} ({args.checkpoint or 'shipped weights'}), {args.data} {args.split} split, {device}, "
        f"torch threads: {torch.get_num_threads()}, random actions, {decisions} decisions an episode, "
        f"{sum(r['seconds'] for r in series) / n:.2f} s an episode.",
        "",
        "| measure | " + " | ".join(headers[k] for k in base) + " |",
        "|---|" + "---|" * len(base),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()),
        f"| peak (VmHWM) | {peak:.0f} |" + " |" * (len(base) - 1),
        "",
        f"Peak {peak:.0f} MiB against a limit of {limit:.0f} MiB ({args.limit_gib:g} GiB): "
        f"**{'within the limit' if peak <= limit else 'OVER THE LIMIT'}**. A leak shows as growth over the second "
        "half; the first episodes fill caches and the allocator's pools.",
    ]
    if "trimmed" in base:
        lines.append(
            "\nWith `--trim`, glibc's `malloc_trim` returns the allocator's free heap to the OS after every episode: "
            "the second column is the memory the process still uses (the trims lower the first column too)."
        )
    if device.type == "cuda":
        cuda = [row["cuda_mib"] for row in series]
        lines.append(f"\nCUDA memory allocated: {cuda[0]:.0f} MiB after episode 1, {cuda[-1]:.0f} MiB at the end.")
    figures["markdown"] = "\n".join(lines) + "\n"
    return figures


def plot(series: list[dict], base: dict[str, float], limit: float, title: str, path: Path) -> None:
    """RSS (and with `--trim` RSS with the free heap returned) against episodes, with the RSS after setup and,
    when near, the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    episodes = [row["episode"] for row in series]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(episodes, [row["rss_mib"] for row in series], marker=".", label="RSS after the episode")
    if "trimmed" in base:
        ax.plot(episodes, [row["trimmed_mib"] for row in series], marker=".", label="free heap returned to the OS")
    ax.axhline(base["rss"], color="grey", linestyle=":", label="after building the env")
    if max(row["peak_mib"] for row in series) > limit / 2:
        ax.axhline(limit, color="red", linestyle="--", label="limit")
    ax.set(xlabel="episode", ylabel="resident memory (MiB)", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    envs = gymnasium.make_vec(
        "PranceViT-v1",
        num_envs=args.num_envs,
        supernet=args.supernet,
        checkpoint=args.checkpoint,
        data=args.data,
        data_path=args.data_dir,
        split=args.split,
        device=device,
        reward=args.reward,
    )
    nvec = envs.single_action_space.nvec
    rng = np.random.default_rng(args.seed)
    trim = heap_trimmer() if args.trim else None
    envs.reset(seed=args.seed)
    base = {"rss": memory()[0]}
    if trim is not None:
        trim()
        base["trimmed"] = memory()[0]
    series = []
    started = time.perf_counter()
    with tqdm(total=args.episodes, desc=f"episodes ({args.num_envs} sub-envs)", unit="episode") as bar:
        while len(series) < args.episodes:
            # every choice is valid: a sample down to one token keeps it whatever the ratio
            _, _, terminated, truncated, _ = envs.step(rng.integers(0, nvec, (args.num_envs, len(nvec))))
            if (terminated | truncated).all():  # the next step resets every sub-env (next-step autoreset)
                rss, peak = memory()
                now = time.perf_counter()
                row = {"episode": len(series) + 1, "rss_mib": rss, "peak_mib": peak, "seconds": now - started}
                if trim is not None:
                    trim()
                    row["trimmed_mib"] = memory()[0]
                if device.type == "cuda":
                    row["cuda_mib"] = torch.cuda.memory_allocated(device) / MIB
                series.append(row)
                started = now
                bar.update()
                bar.set_postfix(rss=f"{rss:.0f} MiB")
    envs.close()

    figures = report(args, device, envs.unwrapped.inference.num_steps, base, series)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "memory"
    (out / f"{name}.md").write_text(figures["markdown"])
    record = {"args": asdict(args), **{k: v for k, v in figures.items() if k != "markdown"}, "episodes": series}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    if args.plot:
        title = f"PranceViT-v1, {args.num_envs} sub-envs, {args.reward} reward"
        plot(series, base, figures["limit_mib"], title, out / f"{name}.png")
    print(figures["markdown"])
    print(f"written to {out / name}.md, .json" + (", .png" if args.plot else ""))
    return figures


if __name__ == "__main__":
    main(parse_dataclass(Args))

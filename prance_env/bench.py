"""The batched env's speed and memory: its overhead over a plain forward pass, and its resident memory over many
episodes.

`benchmark_env` times whole episodes (reset + every step) of `num_envs` images and seeded random actions in
`terminal` mode (no Result-to-Go completion: the env's own overhead) and in `delta` mode (a completion after every
step), then a per-sample forward pass (packed) of the subnets those episodes chose, on the same images, in interleaved
rounds (`vit.bench.Rounds`).

`benchmark_memory` plays many episodes of random actions (an episode: every sub-env infers one image; the batch ends
together and resets at the next step) and reads the process's resident set size (VmRSS) after each one: the peak
against a limit, the RSS after episodes 1, 5, 10 and the last, the growth from episode 5 to the last and over the
second half (the first episodes fill caches and the allocator's pools, a leak goes on growing). With `trim` it also
reads RSS once glibc's allocator has returned its free heap to the OS, which separates the memory still in use from
what the allocator keeps for later.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium
import numpy as np
import torch
from tqdm.auto import tqdm

from vit.bench import interleaved_rounds, round_ratios, setup_cpu
from vit.cli import device_field, threads_field
from vit.utils import resolve_device

MIB = 2**20


@dataclass
class EnvBenchConfig:
    """Env steps per second and the env's overhead over a plain forward pass."""

    num_envs: int = field(default=256, metadata={"help": "sub-envs (images per batch)"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    policy: str = field(default="random", metadata={"help": "random | full (every action at its maximum)"})
    repeats: int = field(default=5, metadata={"help": "timed episodes per measurement (median)"})
    device: str = device_field()
    threads: int = threads_field()
    seed: int = field(default=0, metadata={"help": "random seed (actions)"})


def batched_env(cfg: EnvBenchConfig | MemoryConfig, **kwargs) -> gymnasium.vector.VectorEnv:
    """`gymnasium.make_vec("PranceViT-v1")` of a benchmark's sub-envs, supernet and data, with `kwargs`."""
    supernet = dict(supernet=cfg.supernet, checkpoint=cfg.checkpoint, data=cfg.data, data_dir=cfg.data_dir)
    return gymnasium.make_vec("PranceViT-v1", num_envs=cfg.num_envs, **supernet, **kwargs)


def benchmark_env(cfg: EnvBenchConfig) -> dict:
    """Time the env's episodes against a forward pass of the same subnets as `cfg` says; prints the medians.

    Returns `episode_seconds` and `steps_per_s` of the `terminal` and `delta` episodes, `forward_seconds` and
    `ratio_to_forward` (per reward mode, the median over rounds of an episode's time over the forward's).
    """
    setup_cpu(cfg.threads, keep_memory=False)
    with contextlib.ExitStack() as closing:  # the envs are closed however the run ends
        envs = {}
        for reward in ("terminal", "delta"):
            envs[reward] = batched_env(cfg, device=cfg.device, reward=reward, split="held-out")
            closing.callback(envs[reward].close)
        return time_episodes(envs, cfg.repeats, cfg.seed, cfg.policy)


def time_episodes(envs: dict, rounds: int, seed: int = 0, policy: str = "random") -> dict:
    """Whole episodes (reset and every step, the first `num_envs` images) of the `terminal` and `delta` vector envs
    of `envs` against a per-sample forward pass of the subnets they chose, in `rounds` interleaved rounds; prints the
    medians. Actions are seeded random ones (`policy="full"`: every field at its largest choice); a non-finite
    reward raises `FloatingPointError`.

    Returns `episode_seconds` and `steps_per_s` of each reward mode, `forward_seconds` and `ratio_to_forward` (per
    reward mode, the median over rounds of an episode's time over the forward's).
    """
    some = envs["terminal"].unwrapped
    num_envs = some.num_envs
    rng = np.random.default_rng(seed)
    nvec = np.array(some.codec.nvec)
    plan = [rng.integers(0, nvec, (num_envs, len(nvec))) for _ in range(some.codec.num_steps)]
    if policy == "full":
        plan = [np.broadcast_to(nvec - 1, p.shape) for p in plan]

    def episode(env) -> dict:
        env.reset(options={"indices": np.arange(num_envs)})
        for actions in plan:
            _, rewards, _, _, info = env.step(actions)
            if not np.all(np.isfinite(rewards)):
                raise FloatingPointError(f"non-finite rewards in {env.unwrapped.mdp.config.reward} mode")
        return info

    subnets = list(episode(some)["subnet"])
    images = some.source.get(np.arange(num_envs))[0]

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        return some.model(images, subnets)

    calls = {"terminal": lambda: episode(envs["terminal"]), "delta": lambda: episode(envs["delta"]), "forward": forward}
    # interleaved rounds: a machine's speed drifts by tens of percent, so ratios are taken within a round
    timer = interleaved_rounds(calls, rounds, images.device)
    wall = {k: timer.seconds[k]["wall"] for k in calls}
    median = {k: statistics.median(wall[k]) for k in calls}
    steps = len(plan) * num_envs
    ratios = {k: round_ratios(wall[k], wall["forward"])[0] for k in ("terminal", "delta")}
    print(f"{num_envs} sub-envs, {policy} actions, {rounds} interleaved rounds (medians)")
    for k in ("terminal", "delta"):
        print(f"{k:>8}: {median[k] * 1e3:.0f} ms an episode, {steps / median[k]:.0f} env steps/s")
    print(f"{'forward':>8}: {median['forward'] * 1e3:.0f} ms for the same subnets (per-sample forward pass, packed)")
    print(f"\nepisode without completion / forward: {ratios['terminal']:.2f} (target <= 1.15)")
    print(f"episode with Result-to-Go completion / forward: {ratios['delta']:.2f}")
    return {
        "episode_seconds": {k: median[k] for k in ("terminal", "delta")},
        "steps_per_s": {k: steps / median[k] for k in ("terminal", "delta")},
        "forward_seconds": median["forward"],
        "ratio_to_forward": ratios,
    }


@dataclass
class MemoryConfig:
    """Resident memory of the batched env over many episodes of random actions."""

    num_envs: int = field(default=1024, metadata={"help": "sub-envs (images per batch)"})
    episodes: int = field(default=100, metadata={"help": "episodes to play"})
    reward: str = field(default="delta", metadata={"help": "delta | direct | terminal"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    split: str = field(default="train", metadata={"help": "dataset split the episodes draw images from"})
    device: str = device_field()
    threads: int = threads_field()
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


def memory_report(
    cfg: MemoryConfig, device: torch.device, decisions: int, base: dict[str, float], series: list[dict]
) -> dict:
    """The figures of a run and their Markdown summary (`markdown`), for each measure of `base`: `rss` and, with
    `trim`, `trimmed` (RSS once the allocator's free heap is returned to the OS)."""
    n = len(series)
    marks = sorted({e for e in (1, 5, 10, n) if e <= n})
    first, half = (5 if n > 5 else 1), max(1, n // 2)
    limit, peak = cfg.limit_gib * 1024, max(row["peak_mib"] for row in series)
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
        f"# Resident memory of PranceViT-v1: {cfg.num_envs} sub-envs, {n} episodes, `{cfg.reward}` reward",
        "",
        f"{cfg.supernet} ({cfg.checkpoint or 'shipped weights'}), {cfg.data} {cfg.split} split, {device}, "
        f"torch threads: {torch.get_num_threads()}, random actions, {decisions} decisions an episode, "
        f"{sum(r['seconds'] for r in series) / n:.2f} s an episode.",
        "",
        "| measure | " + " | ".join(headers[k] for k in base) + " |",
        "|---|" + "---|" * len(base),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()),
        f"| peak (VmHWM) | {peak:.0f} |" + " |" * (len(base) - 1),
        "",
        f"Peak {peak:.0f} MiB against a limit of {limit:.0f} MiB ({cfg.limit_gib:g} GiB): "
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


def plot_memory(series: list[dict], base: dict[str, float], limit: float, title: str, path: Path) -> None:
    """RSS (and with `trim` RSS with the free heap returned) against episodes, with the RSS after setup and, when
    near, the limit, as a PNG at `path`."""
    from matplotlib.figure import Figure

    episodes = [row["episode"] for row in series]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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


def benchmark_memory(cfg: MemoryConfig) -> dict:
    """Play `cfg.episodes` episodes of random actions, reading RSS after each; print the report and write
    `OUT/memory.md` (the report), `OUT/memory.json` (the figures and the per-episode series) and, with `plot`,
    `OUT/memory.png`. Returns the figures of `memory_report`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    envs = batched_env(cfg, device=device, reward=cfg.reward, split=cfg.split)
    nvec = envs.single_action_space.nvec
    rng = np.random.default_rng(cfg.seed)
    trim = heap_trimmer() if cfg.trim else None
    envs.reset(seed=cfg.seed)
    base = {"rss": memory()[0]}
    if trim is not None:
        trim()
        base["trimmed"] = memory()[0]
    series = []
    started = time.perf_counter()
    with tqdm(total=cfg.episodes, desc=f"episodes ({cfg.num_envs} sub-envs)", unit="episode") as bar:
        while len(series) < cfg.episodes:
            # every choice is valid: a sample down to one token keeps it whatever the ratio
            _, _, terminated, truncated, _ = envs.step(rng.integers(0, nvec, (cfg.num_envs, len(nvec))))
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

    figures = memory_report(cfg, device, envs.unwrapped.codec.num_steps, base, series)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.md").write_text(figures["markdown"])
    record = {"args": asdict(cfg), **{k: v for k, v in figures.items() if k != "markdown"}, "episodes": series}
    (out / "memory.json").write_text(json.dumps(record, indent=2))
    if cfg.plot:
        title = f"PranceViT-v1, {cfg.num_envs} sub-envs, {cfg.reward} reward"
        plot_memory(series, base, figures["limit_mib"], title, out / "memory.png")
    print(figures["markdown"])
    print(f"written to {out / 'memory'}.md, .json" + (", .png" if cfg.plot else ""))
    return figures


__all__ = [
    "EnvBenchConfig",
    "MemoryConfig",
    "benchmark_env",
    "benchmark_memory",
    "change",
    "heap_trimmer",
    "memory",
    "memory_report",
    "plot_memory",
    "time_episodes",
]

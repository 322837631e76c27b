"""Real speed of the adaptive model, as speed-ups over the full model of the same precision, in one run.

Two parts, each timed in interleaved rounds (`vit.bench.Rounds`: every round runs every model once, the order
rotating; a machine drifts, so every speed-up is the median of per-round ratios, with their range), by wall clock and
by process CPU time (`time.process_time`, which other processes on a shared machine disturb less):

1. The trained selector's supernet (`prance_fmnist` with `selector="shipped:prance_fmnist"`) on one batch of
   held-out images: the full model, the static grid subnet nearest to the selector's MACs ratio (plain forwards),
   and `AdaptiveViT` in each execution mode of `executions`: `packed` (per-image decisions on packed tokens),
   `bucketed` (the same decisions, one dense group per configuration and token count) and `prototypes` (each
   step's decisions snapped to at most K configurations for the batch, one row per K of `prototypes`; K=1 is the
   batch's median choice, formerly `consensus`). `packed` and each K are calibrated to `budget` on training
   images on their own (`bucketed` runs packed's price), in fp32; the bf16 rows run the same prices.
2. `supernet` (DeiT-Small shapes by default) with random weights, no download: random per-sample subnets of mean
   MACs ratio about `budget` (`vit.flops.sample_subnets`) executed packed, the full model and the static grid
   subnet nearest in MACs, on `supernet_batch_size` random images.

Each part runs in every precision of `precisions`: `fp32`, `bf16` (the weights cast to bfloat16, images cast on
entry; logits float32). `amp` runs every model under bf16 autocast besides; on CUDA, fp32 matmuls use TF32. On
CPUs, bf16 matmuls run as oneDNN primitives built for each new shape (about 1 ms each; fp32 matmuls run in MKL):
per-sample execution's matmuls take as many rows as a batch's images of one width hold tokens, so each new batch
builds over 200 of them (`prance_fmnist`, batch 256), and so does a batch seen before once the runs interleaved
with it have filled oneDNN's primitive cache (1024 by default), as they do here: the cost on a stream of new
batches. The share of the packed adaptive forward spent deciding (the selector's forward passes,
`AdaptiveViT.decide_seconds`) is reported for the first precision. Freed memory is kept in the process
(`vit.bench.keep_freed_memory`), so that no model pays page faults that depend on the allocation history of the
process.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vit
from vit.bench import Rounds, setup_cpu
from vit.cli import amp_field, device_field, threads_field, workers_field
from vit.flops import sample_subnets
from vit.official import OfficialViT
from vit.utils import autocast, resolve_device, use_tf32, weights_dtype

from .adaptive import AdaptiveViT, calibrate
from .evaluation import execution_modes, in_execution_mode, mode_name
from .selector import load_adaptive, selector_batches


@dataclass
class BenchmarkConfig:
    """Speed-ups of AdaptiveViT's execution modes and of per-sample subnets over the full model, fp32 and bf16."""

    selector: str = field(
        default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + .json); 'none' skips part 1"}
    )
    budget: float = field(default=0.5, metadata={"help": "mean MACs ratio of the selector and the random subnets"})
    batch_size: int = field(default=256, metadata={"help": "images per forward of the selector's supernet"})
    executions: tuple[str, ...] = field(
        default=("packed", "bucketed", "prototypes"),
        metadata={"help": "AdaptiveViT execution modes: packed | bucketed | prototypes"},
    )
    prototypes: tuple[int, ...] = field(
        default=(1, 4), metadata={"help": "K of each prototypes row: at most K configurations per decision and batch"}
    )
    precisions: tuple[str, ...] = field(default=("fp32", "bf16"), metadata={"help": "weights: fp32 | bf16"})
    supernet: str = field(
        default="prance_deit_small",
        metadata={
            "help": "registered supernet name of part 2, random weights ('none' skips the part; "
            "prance_official_small: the official S meta-network, per-image configurations in buckets)"
        },
    )
    supernet_batch_size: int = field(default=32, metadata={"help": "images per forward of part 2"})
    workers: int = workers_field()
    calib_images: int = field(default=2048, metadata={"help": "training images used to calibrate the price"})
    rounds: int = field(default=9, metadata={"help": "interleaved timing rounds (medians are reported)"})
    threads: int = threads_field()
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "glibc: keep freed memory in the process, so timed forwards do not page-fault"}
    )
    data: str | None = field(default=None, metadata={"help": "dataset name (default: the selector's)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    device: str = device_field()
    amp: bool = amp_field("every model under bf16 autocast (CUDA or CPU)")
    seed: int = field(default=0, metadata={"help": "seed of part 2's weights, images and subnets"})
    out: str = field(default="runs/benchmark", metadata={"help": "output folder (benchmark.md, benchmark.json)"})


def in_precision(model: vit.ElasticViT, precision: str) -> vit.ElasticViT:
    """`model` itself in fp32, else a copy with its weights cast."""
    dtype = weights_dtype(precision)
    return model if dtype == model.pos_embed.dtype else copy.deepcopy(model).to(dtype)


def plain(
    model: vit.ElasticViT, images: torch.Tensor, subnet: vit.Subnet | list[vit.Subnet] | None, amp: bool
) -> Callable[[], torch.Tensor]:
    """A forward of `model` on `images` (cast to its weights) at one subnet or per-sample subnets."""
    x = images.to(model.pos_embed.dtype)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        with autocast(x.device, amp):
            return model(x, subnet)

    return run


def timed_rounds(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device,
    desc: str,
    after_warmup: Callable[[], None] | None = None,
) -> Rounds:
    """`rounds` timed `Rounds` of `runs` after an untimed warm-up one (then `after_warmup()`), with a progress bar."""
    timer = Rounds(runs, device)
    timer.round(runs, timed=False)  # first calls pay one-off costs
    if after_warmup is not None:
        after_warmup()
    for _ in tqdm(range(rounds), desc=desc, unit="round"):
        timer.round(runs)
    return timer


def speed_rows(
    part: str, keys: list[str], ratios: dict[str, float], timer: Rounds, images: int, names: dict[str, str]
) -> list[dict]:
    """A row per run of `keys` ("precision name"): MACs ratio, images/s and speed-ups over the full model of its
    precision (median and range of the per-round ratios), by wall clock and by CPU time; `images` per round."""
    rows = []
    for key in keys:
        precision, name = key.split(" ", 1)
        row = {"part": part, "run": name, "model": names[name], "precision": precision, "flops_ratio": ratios[key]}
        rounds = len(timer.seconds[key]["wall"])
        rows.append(row | timer.speed(key, f"{precision} full", images * rounds))
    return rows


def table(rows: list[dict], title: str) -> list[str]:
    """The Markdown lines of a part's `speed_rows` under `title`."""
    lines = [
        title,
        "",
        "| model | precision | MACs ratio | images/s | speed-up, wall | per-round range | speed-up, CPU time "
        "| per-round range | predicted by MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['flops_ratio']:.3f} | {r['images_per_s']:.0f} "
            f"| {r['speedup']:.2f}x | {r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}x "
            f"| {r['cpu_speedup']:.2f}x | {r['cpu_speedup_range'][0]:.2f}-{r['cpu_speedup_range'][1]:.2f}x "
            f"| {1 / r['flops_ratio']:.2f}x |"
        )
    return lines + [""]


def selector_part(cfg: BenchmarkConfig, device: torch.device) -> tuple[list[dict], list[str]]:
    """Part 1: the selector's supernet, its execution modes against the full model and a static subnet."""
    modes = execution_modes(cfg.executions, cfg.prototypes)

    def load(precision: str) -> AdaptiveViT:
        return load_adaptive(cfg.selector, device=str(device), amp=cfg.amp, precision=precision)

    base = {p: load(p) for p in cfg.precisions}
    fp32 = base["fp32"] if "fp32" in base else load("fp32")  # calibration, MACs ratios and the static subnet
    model = fp32.supernet
    read = dict(model=model, batch_size=cfg.batch_size, device=device, data=cfg.data, data_dir=cfg.data_dir)
    calibration = selector_batches(cfg.selector, "train", count=cfg.calib_images, workers=cfg.workers, **read)
    prices = {}
    for mode in modes:
        same = ("packed", 1) if mode == ("bucketed", 1) and ("packed", 1) in modes else mode  # the same decisions
        if same not in prices:
            prices[same] = calibrate(in_execution_mode(fp32, *same), calibration, cfg.budget)
        prices[mode] = prices[same]
    images = selector_batches(cfg.selector, "held-out", count=cfg.batch_size, workers=cfg.workers, **read)[0][0]
    full_macs = vit.count_macs(model)

    runs, ratios, deciding = {}, {}, {}
    static = None
    for precision in cfg.precisions:
        for mode in modes:
            adaptive = in_execution_mode(base[precision], *mode)
            key = f"{precision} {mode_name(*mode)}"
            runs[key] = lambda a=adaptive, p=prices[mode]: a(images, price=p)
            ratios[key] = float(adaptive(images, price=prices[mode])[1].mean()) / full_macs
            if mode == ("packed", 1) and not deciding:
                deciding[key] = adaptive
        if static is None:  # the grid subnet nearest to the selector's MACs ratio (its first mode's), in fp32
            target = ratios[f"{precision} {mode_name(*modes[0])}"]
            grid = model.search_space.static_grid(tied=True)
            static = min(grid, key=lambda s: abs(vit.count_macs(model, s) / full_macs - target))
        for name, subnet in (("full", None), ("static", static)):
            runs[f"{precision} {name}"] = plain(base[precision].supernet, images, subnet, cfg.amp)
            ratios[f"{precision} {name}"] = vit.count_macs(model, subnet) / full_macs

    def count_timed_rounds_only() -> None:
        for adaptive in deciding.values():
            adaptive.decide_seconds = 0.0

    timer = timed_rounds(runs, cfg.rounds, device, "selector part, interleaved rounds", count_timed_rounds_only)
    names = {
        "full": "full model",
        "static": f"static `{static.blocks[-1]}` every block (nearest grid subnet in MACs)",
        **{mode_name(*m): f"AdaptiveViT, {mode_name(*m)} (price {prices[m]:.3g})" for m in modes},
    }
    order = ["full", "static", *(mode_name(*m) for m in modes)]
    keys = [f"{p} {n}" for p in cfg.precisions for n in order]
    rows = speed_rows("selector", keys, ratios, timer, cfg.batch_size, names)
    title = f"**{cfg.selector}** ({model.pretrained_cfg['architecture']}), batch {cfg.batch_size}, budget "
    title += f"{cfg.budget:g} (prices calibrated in fp32 on {cfg.calib_images} training images):"
    lines = table(rows, title)
    for key, adaptive in deciding.items():
        share = adaptive.decide_seconds / sum(timer.seconds[key]["wall"])
        rows.append({"part": "selector", "run": "deciding", "precision": key.split()[0], "share": share})
        lines += [f"deciding (the selector's forward passes): {share * 100:.1f}% of the packed adaptive forward", ""]
    return rows, lines


def supernet_part(cfg: BenchmarkConfig, device: torch.device) -> tuple[list[dict], list[str]]:
    """Part 2: random per-sample subnets on random weights, packed, against the full model and a static subnet."""
    torch.manual_seed(cfg.seed)
    model = vit.create_supernet(cfg.supernet).to(device).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randn(cfg.supernet_batch_size, *model.pretrained_cfg["input_size"], generator=generator)
    images = images.to(device)
    subnets = sample_subnets(model, cfg.supernet_batch_size, cfg.budget, rng=cfg.seed)
    full_macs = vit.count_macs(model)
    mean = sum(vit.count_macs(model, subnets)) / len(subnets) / full_macs
    grid = model.search_space.static_grid(tied=True)
    layout = "bucketed" if isinstance(model, OfficialViT) else "packed"
    static = min(grid, key=lambda s: abs(vit.count_macs(model, s) / full_macs - mean))
    runs, ratios = {}, {}
    for precision in cfg.precisions:
        weighted = in_precision(model, precision)
        for name, subnet, ratio in (
            ("full", None, 1.0),
            ("static", static, vit.count_macs(model, static) / full_macs),
            ("packed", subnets, mean),
        ):
            runs[f"{precision} {name}"] = plain(weighted, images, subnet, cfg.amp)
            ratios[f"{precision} {name}"] = ratio
    timer = timed_rounds(runs, cfg.rounds, device, "supernet part, interleaved rounds")
    names = {
        "full": "full model",
        "static": f"static `{static.blocks[-1]}` every block (nearest grid subnet in MACs)",
        "packed": f"random per-sample subnets ({len(set(subnets))} distinct), {layout}",
    }
    rows = speed_rows("supernet", list(runs), ratios, timer, cfg.supernet_batch_size, names)
    title = f"**{cfg.supernet}** (random weights), batch {cfg.supernet_batch_size}, per-sample subnets drawn to a "
    title += f"MACs ratio of {cfg.budget:g} each (mean {mean:.3f}):"
    return rows, table(rows, title)


def benchmark(cfg: BenchmarkConfig) -> dict:
    """Both parts as `cfg` says (see the module's docstring; `supernet="none"` skips part 2): prints the tables,
    writes them to `OUT/benchmark.md` and every number to `OUT/benchmark.json`. Returns `{"rows": [...]}`: one row
    per part, precision and run (`flops_ratio`, `images_per_s`, `speedup`, `speedup_range`, `cpu_speedup`, ...),
    and a `deciding` row with the share of the packed adaptive forward spent deciding."""
    kept = setup_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        use_tf32()
    for precision in cfg.precisions:
        weights_dtype(precision)  # an unknown precision fails before any work
    rows, lines = selector_part(cfg, device) if cfg.selector != "none" else ([], [])
    if cfg.supernet != "none":
        more, more_lines = supernet_part(cfg, device)
        rows, lines = rows + more, lines + more_lines
    header = (
        f"{device}, {torch.get_num_threads()} threads, {'bf16 autocast, ' if cfg.amp else ''}median of {cfg.rounds} "
        f"interleaved rounds, speed-ups over the full model of the same precision, freed memory "
        f"{'kept' if kept else 'returned (glibc default)'}"
    )
    text = "\n".join([header, "", *lines]).rstrip()
    print(text)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(text + "\n")
    (out / "benchmark.json").write_text(json.dumps({"rows": rows}, indent=2))
    print(f"\nwrote {out / 'benchmark.md'} and {out / 'benchmark.json'}")
    return {"rows": rows}


__all__ = ["BenchmarkConfig", "benchmark", "in_precision", "plain", "speed_rows", "table", "timed_rounds"]

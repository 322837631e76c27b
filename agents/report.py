"""A trained selector against the full model and static baselines on held-out images: the evaluation report.

Rows, all measured in one run on the same images with the same batch size:

- the full model;
- the selector at a few MACs budgets, each calibrated (`agents.calibrate`) on training images, not test ones, in
  each execution mode of `executions`: `packed` (per-image decisions on packed tokens), `bucketed` (the same
  decisions, one dense group per configuration and token count) and `prototypes` (each step's decisions snapped to
  at most K configurations for the batch, one row per K of `prototypes`; K=1 is the batch's median choice, the
  former `consensus`). The price is calibrated with the first mode listed and shared by the others, so each mode's
  MACs ratio shows what it does to the cost at that price (`calibrate_each` calibrates every mode on its own);
- the static subnet of the grid of `vit.evaluation` (uniform width level x keep ratio) with the best Top-1 at
  matched MACs, and uniform token merging (full widths, one keep ratio at every block, like ToMe) at matched MACs,
  both matched to the first mode. "Matched" means the best baseline whose MACs ratio lies in [m - 0.02, m + 0.10],
  m being the selector's; when none does, the nearest one (`matched`);
- the token-reduction heuristics of `agents.baselines` at full width, each swept over a small grid and matched the
  same way (`heuristics=False` leaves them out): PPT-style (per image, prune when the CLS attention's variance is
  high, merge when it is low; thresholds calibrated on the training images) and Prune-and-Merge-style static
  schedules (prune, then merge, at fixed keep rates);
- random decisions.

The `official` protocol evaluates as the PRANCE release does: batch 64, each step's decisions averaged over the batch
and snapped to the nearest choice (the `batch-mean` execution); Top-1, Top-5 and parameter counts are in every table.

Speed is measured on the same pass (`agents.evaluation.evaluate_methods`): every batch runs every row in turn, the
order rotating from batch to batch, so each batch is one round of interleaved timing; images/s is by wall clock and
"speed-up" the median of the per-batch ratios to the full model (process CPU time in `results.json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vit
from vit.bench import setup_cpu
from vit.cli import amp_field, device_field, workers_field
from vit.utils import resolve_device, use_tf32

from .adaptive import AdaptiveViT, calibrate
from .baselines import PPTHeuristic, PruneMergeSchedule, RandomPolicy
from .evaluation import (
    Method,
    adaptive_method,
    evaluate_methods,
    execution_modes,
    in_execution_mode,
    mode_name,
    static_method,
)
from .plots import pareto_figure, save_figure
from .selector import load_adaptive, selector_batches, selector_data

MATCH_BELOW, MATCH_ABOVE = 0.02, 0.10
# the heuristics' sweeps: PPT-style (keep ratio, first block); Prune-and-Merge-style (prune keep, merge keep, first
# block), pure merging (prune keep 1) being the uniform merging rows
PPT_SWEEP = [(r, start) for r in (0.7, 0.8, 0.9) for start in (0, 3, 6)]
PRUNE_MERGE_SWEEP = [(p, m, start) for p in (0.8, 0.9) for m in (0.8, 0.9, 1.0) for start in (0, 3, 6)]
PROTOCOLS = {"ours": {}, "official": {"batch_size": 64, "executions": ("batch-mean",)}}


@dataclass
class EvaluateConfig:
    """Evaluate a selector against the full model, static subnets, uniform merging and random decisions."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + PATH.json)"})
    budgets: tuple[float, ...] = field(default=(0.3, 0.5, 0.7), metadata={"help": "mean MACs ratios to calibrate to"})
    data: str | None = field(default=None, metadata={"help": "dataset name (default: the selector's)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    images: int | None = field(default=None, metadata={"help": "held-out images (default: the whole split)"})
    calib_images: int = field(default=2048, metadata={"help": "training images used to calibrate the price"})
    tolerance: float = field(default=0.01, metadata={"help": "calibration stops this close to the budget"})
    batch_size: int = field(default=256, metadata={"help": "images per forward (every row)"})
    workers: int = workers_field()
    device: str = device_field()
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads (0: the default; 1 suits per-sample execution on few cores)"}
    )
    keep_freed_memory: bool = field(
        default=True, metadata={"help": "glibc: keep freed memory in the process, so timed forwards do not page-fault"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random-decision baseline"})
    executions: tuple[str, ...] = field(
        default=("packed", "prototypes"),
        metadata={"help": "selector execution modes, one row each per budget: packed | bucketed | prototypes"},
    )
    prototypes: tuple[int, ...] = field(
        default=(1,), metadata={"help": "K of each prototypes row: at most K configurations per decision and batch"}
    )
    calibrate_each: bool = field(
        default=False, metadata={"help": "calibrate every execution mode on its own, not only the first"}
    )
    precision: str = field(default="fp32", metadata={"help": "weights of every row: fp32 | bf16"})
    amp: bool = amp_field("every row under bf16 autocast (CUDA or CPU)")
    heuristics: bool = field(default=True, metadata={"help": "rows of the PPT- and Prune-and-Merge-style heuristics"})
    protocol: str = field(
        default="ours",
        metadata={"help": "ours | official: batch 64 and batch-mean decisions (overrides --batch-size, --executions)"},
    )
    out: str = field(default="runs/evaluate", metadata={"help": "output folder (results.md, results.json, pareto.png)"})
    actor: str | None = field(
        default=None, metadata={"help": "an official PRANCE actor.pth: evaluate it with --checkpoint on --data-dir"}
    )
    checkpoint: str | None = field(default=None, metadata={"help": "with --actor: the official checkpoint.pth"})
    supernet: str | None = field(
        default=None, metadata={"help": "registered supernet name, with --actor (default: prance_official_small)"}
    )
    token_mode: str = field(default="prune", metadata={"help": "with --actor: prune | merge | prune_merge"})


def matched(rows: list[dict], ratio: float) -> dict:
    """The best-Top-1 row whose MACs ratio lies in [ratio - 0.02, ratio + 0.10]; else the nearest in MACs."""
    window = [r for r in rows if ratio - MATCH_BELOW <= r["flops_ratio"] <= ratio + MATCH_ABOVE]
    if window:
        return max(window, key=lambda r: (r["top1"], -r["flops_ratio"]))
    return min(rows, key=lambda r: abs(r["flops_ratio"] - ratio))


def markdown(rows: list[dict], batch_size: int, images: int, precision: str, top5: bool = True) -> str:
    """The table of `rows`; params are those each image's subnet reads, averaged over the images. `top5`: a Top-5
    column (meaningless at 5 classes or fewer, where it is always 100)."""
    five = ("Top-5 (%) | ", "---|") if top5 else ("", "")
    lines = [
        f"Held-out split, {images} images, batch {batch_size}, {precision}; images/s measured in the same run, every "
        "batch running every row in turn; speed-up: the median over batches of the full model's time over the row's.",
        "",
        f"| method | setting | Top-1 (%) | {five[0]}GMACs | MACs ratio | params (M) | tokens kept | images/s "
        "| speed-up |",
        f"|---|---|---|{five[1]}---|---|---|---|---|---|",
    ]
    for r in rows:
        top5_cell = f"{r['top5'] * 100:.2f} | " if top5 else ""
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['top1'] * 100:.2f} | {top5_cell}{r['gmacs']:.4f} "
            f"| {r['flops_ratio']:.3f} | {r['params'] / 1e6:.3f} | {r['tokens_kept']:.3f} | {r['images_per_s']:.0f} "
            f"| {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def budget_setting(budget: float, price: float, reached: float, price_range: tuple[float, float]) -> str:
    """A selector row's setting: the budget asked and the price it was given, or, when calibration stopped at an
    end of the trained prices short of the budget, the budget marked out of reach with the ratio reached."""
    at_end = any(math.isclose(price, end, rel_tol=1e-9) for end in price_range)
    if at_end and abs(reached - budget) > 0.02:
        return f"budget {budget:g} out of reach (reached {reached:.3f}), price {price:.3g}"
    return f"budget {budget:g}, price {price:.3g}"


def heuristic_methods(model: vit.ElasticViT, calibration: list) -> dict[str, tuple[str, Method]]:
    """The heuristics' sweeps as methods, by key: (heuristic name, method); PPT's thresholds calibrated on (at most
    1024 of) the `calibration` batches."""
    images = torch.cat([x for x, _ in calibration])[:1024]
    methods = {}
    for r, start in PPT_SWEEP:
        methods[f"ppt {r} {start}"] = ("PPT-style heuristic", PPTHeuristic(model, r, start).calibrate([images]))
    for p, m, start in PRUNE_MERGE_SWEEP:
        methods[f"prune-merge {p} {m} {start}"] = ("Prune-and-Merge schedule", PruneMergeSchedule(model, p, m, start))
    return methods


def calibrated_prices(
    selectors: dict[tuple[str, int], AdaptiveViT],
    calibration: list,
    budgets: tuple[float, ...],
    tolerance: float,
    each: bool = False,
) -> dict[tuple[float, tuple[str, int]], float]:
    """The price of each (budget, mode) of `selectors`: calibrated with the first mode and shared by the others, or
    with `each` calibrated for every mode on its own (`bucketed` shares `packed`'s: the same decisions)."""
    modes, prices = list(selectors), {}
    for budget in tqdm(budgets, desc="budgets"):
        for i, mode in enumerate(modes):
            same_decisions = mode == ("bucketed", 1) and ("packed", 1) in modes[:i]
            if i == 0 or (each and not same_decisions):
                price = calibrate(selectors[mode], calibration, budget, tolerance=tolerance)
            prices[budget, mode] = prices[budget, ("packed", 1)] if same_decisions else price
    return prices


def report_rows(
    measured: dict[str, dict],
    model: vit.ElasticViT,
    subnets: list[vit.Subnet],
    prices: dict[tuple[float, tuple[str, int]], float],
    heuristics: dict[str, tuple[str, Method]],
    price_range: tuple[float, float] = (0.0, 0.0),
) -> dict[str, list[dict] | dict[str, list[dict]]]:
    """The report's rows from the measured methods (keyed as `evaluate_selector` names them): `table` (the printed
    table, in order), `grid` (every static subnet, the full model first), `uniform` (the grid's full-width rows),
    `selector` (every budget and mode) and `heuristics` (each heuristic's whole sweep, by name)."""
    grid = [
        {"method": "static subnet", "setting": f"`{s.blocks[-1]}` every block", **measured[f"static {s}"]}
        for s in subnets
    ]
    widest = model.search_space.largest().blocks[-1]
    full = {**grid[0], "method": "full model", "setting": f"`{widest}` every block"}
    uniform = [
        {**r, "method": "uniform merging"}
        for r, s in zip(grid, subnets)
        if all(c.heads == widest.heads and c.mlp_hidden == widest.mlp_hidden for c in s) and r is not grid[0]
    ]
    swept: dict[str, list[dict]] = {}
    for key, (name, method) in heuristics.items():
        swept.setdefault(name, []).append({"method": name, "setting": str(method), **measured[key]})
    budgets = list(dict.fromkeys(budget for budget, _ in prices))
    modes = list(dict.fromkeys(mode for _, mode in prices))
    selector_rows, table = [], [full]
    for budget in budgets:
        for mode in modes:
            price, result = prices[budget, mode], measured[f"selector {budget} {mode}"]
            row = {
                "method": f"PRANCE selector, {mode_name(*mode)}",
                "setting": budget_setting(budget, price, result["flops_ratio"], price_range),
                "mode": mode_name(*mode),
                "execution": mode[0],
                "prototypes": mode[1] if mode[0] == "prototypes" else None,
                "budget": budget,
                "price": price,
                **measured[f"selector {budget} {mode}"],
            }
            selector_rows.append(row)
            table.append(row)
        ratio = selector_rows[-len(modes)]["flops_ratio"]  # the first mode's
        table += [
            {**matched(grid, ratio), "method": "best static subnet at matched MACs"},
            {**matched(uniform, ratio), "method": "uniform merging at matched MACs"},
        ]
        table += [{**matched(rows, ratio), "method": f"{name} at matched MACs"} for name, rows in swept.items()]
    table.append({"method": "random decisions", "setting": "uniform over the choices", **measured["random"]})
    return {"table": table, "grid": grid, "uniform": uniform, "selector": selector_rows, "heuristics": swept}


def evaluate_selector(cfg: EvaluateConfig) -> list[dict]:
    """Evaluate a selector as `cfg` says (see the module's docstring): print the table and write `OUT/results.md`
    (the table), `OUT/results.json` (every row, the whole static grid and each heuristic's sweep included) and
    `OUT/pareto.png` (Top-1 against GMACs and against measured images/s, `agents.plots.pareto_figure`). Returns the
    table's rows."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {cfg.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if cfg.actor is not None:
        from .official import evaluate_official

        return evaluate_official(cfg)
    cfg = replace(cfg, **PROTOCOLS[cfg.protocol])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        use_tf32()
    runs = execution_modes(cfg.executions, cfg.prototypes)
    adaptive = load_adaptive(cfg.selector, device=str(device), amp=cfg.amp, precision=cfg.precision)
    model = adaptive.supernet
    read = dict(model=model, batch_size=cfg.batch_size, device=device, data=cfg.data, data_dir=cfg.data_dir)
    test = selector_batches(cfg.selector, "held-out", count=cfg.images, workers=cfg.workers, **read)
    calibration = selector_batches(cfg.selector, "train", count=cfg.calib_images, workers=cfg.workers, **read)
    images = sum(len(y) for _, y in test)
    space = model.search_space

    selectors = {mode: in_execution_mode(adaptive, *mode) for mode in runs}
    prices = calibrated_prices(selectors, calibration, cfg.budgets, cfg.tolerance, cfg.calibrate_each)
    subnets = list(dict.fromkeys([space.largest(), space.smallest(), *space.static_grid(tied=True)]))
    methods = {f"static {s}": static_method(model, s, cfg.amp) for s in subnets}
    methods |= {
        f"selector {budget} {mode}": adaptive_method(selectors[mode], prices[budget, mode])
        for budget in cfg.budgets
        for mode in runs
    }
    random = AdaptiveViT(model, RandomPolicy(adaptive.nvec, seed=cfg.seed), schedule=adaptive.schedule, amp=cfg.amp)
    methods["random"] = adaptive_method(random)
    heuristics = heuristic_methods(model, calibration) if cfg.heuristics else {}
    methods |= {key: method for key, (_, method) in heuristics.items()}
    measured = evaluate_methods(methods, test, model, desc="evaluating every row, batch by batch")
    rows = report_rows(measured, model, subnets, prices, heuristics, adaptive.price_range)
    table = rows["table"]

    precision = f"{cfg.precision} weights" + (", bf16 autocast" if cfg.amp else "")
    text = markdown(table, cfg.batch_size, images, precision, top5=model.num_classes > 5)
    (out / "results.md").write_text(text + "\n")
    saved = {"table": table, "grid": rows["grid"], "heuristics": rows["heuristics"]}
    (out / "results.json").write_text(json.dumps(saved, indent=2))
    name, folder = selector_data(cfg.selector, cfg.data, cfg.data_dir)
    dataset = f"ImageFolder {Path(folder).name}" if vit.data.is_image_folder(name) and folder else name
    title = (
        f"{dataset} held-out split, {images} images: "
        f"{model.pretrained_cfg['architecture']} ({model.token_mode}), {precision}"
    )
    others = [table[0], table[-1]]  # the full model and random decisions
    figure = pareto_figure(rows["grid"], rows["uniform"], rows["selector"], others, title, rows["heuristics"])
    save_figure(figure, out / "pareto.png")
    print(text)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'pareto.png'}")
    return table


__all__ = [
    "EvaluateConfig",
    "calibrated_prices",
    "evaluate_selector",
    "heuristic_methods",
    "budget_setting",
    "markdown",
    "matched",
    "report_rows",
]

"""Evaluate a trained selector on held-out images against the full model and static baselines.

Rows, all measured in this run on the same images with the same batch size:

- the full model;
- the selector at a few MACs budgets, each calibrated (`agents.calibrate`) on training images, not test ones, in
  each execution mode of `--executions`: `packed` (per-image decisions on packed tokens), `bucketed` (the same
  decisions, one dense group per configuration and token count) and `prototypes` (each step's decisions snapped to
  at most K configurations for the batch, one row per K of `--prototypes`; K=1 is the batch's median choice, the
  former `consensus`). The price is calibrated with the first mode listed and shared by the others, so each mode's
  MACs ratio shows what it does to the cost at that price (`--calibrate-each` calibrates every mode on its own);
- the static subnet of the grid of `scripts/eval_supernet.py` (uniform width level x keep ratio) with the best
  Top-1 at matched MACs, and uniform token merging (full widths, one keep ratio at every block, like ToMe) at
  matched MACs, both matched to the first mode. "Matched" means the best baseline whose MACs ratio lies in
  [m - 0.02, m + 0.10], m being the selector's; when none does, the nearest one;
- the token-reduction heuristics of `agents.baselines` at full width, each swept over a small grid and matched
  the same way (`--no-heuristics` leaves them out): PPT-style (per image, prune when the CLS attention's variance
  is high, merge when it is low; thresholds calibrated on the training images) and Prune-and-Merge-style static
  schedules (prune, then merge, at fixed keep rates);
- random decisions.

`--protocol official` evaluates as the PRANCE release does: batch 64, each step's decisions averaged over the batch
and snapped to the nearest choice (the `batch-mean` execution); Top-1, Top-5 and parameter counts are in every table.

Speed is measured on the same pass (`agents.evaluation.evaluate_methods`): every batch runs every row in turn, the
order rotating from batch to batch, so each batch is one round of interleaved timing; images/s is by wall clock and
"speed-up" the median of the per-batch ratios to the full model (process CPU time in `results.json`). Use
`--threads 1` for per-sample execution on a small CPU. `--precision bf16` runs every row with bf16 weights (images
cast on entry), `--amp` under bf16 autocast.

Held-out images are Fashion-MNIST's test split or an ImageFolder's val split (the selector's dataset by default).
It writes `OUT/results.md` (the table), `OUT/results.json` (every row, the whole static grid included) and
`OUT/pareto.png` (Top-1 against GMACs and against measured images/s, `agents.plots.pareto_figure`), and prints the
table.

    python scripts/evaluate.py                                   # runs/selector/selector on Fashion-MNIST
    python scripts/evaluate.py --selector runs/demo/selector/selector --budgets 0.4 0.5 0.6 --out runs/demo
    python scripts/evaluate.py --executions packed bucketed prototypes --prototypes 1 4 --threads 1
    python scripts/evaluate.py --protocol official --out runs/evaluate_official
"""

from __future__ import annotations

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import agents
from agents.baselines import PPTHeuristic, PruneMergeSchedule, RandomPolicy
from agents.evaluation import (
    adaptive_method,
    evaluate_methods,
    execution_modes,
    in_execution_mode,
    mode_name,
    static_method,
)
from agents.plots import pareto_figure, save_figure
from agents.selector import read_settings, resolve_selector, selector_dataset
from vit.data import default_workers
from vit.train import subset_batches
from vit.utils import parse_dataclass, resolve_device, setup_cpu, use_tf32

MATCH_BELOW, MATCH_ABOVE = 0.02, 0.10
# the heuristics' sweeps: PPT-style (keep ratio, first block); Prune-and-Merge-style (prune keep, merge keep, first
# block), pure merging (prune keep 1) being the uniform merging rows
PPT_SWEEP = [(r, start) for r in (0.7, 0.8, 0.9) for start in (0, 3, 6)]
PRUNE_MERGE_SWEEP = [(p, m, start) for p in (0.8, 0.9) for m in (0.8, 0.9, 1.0) for start in (0, 3, 6)]
PROTOCOLS = {"ours": {}, "official": {"batch_size": 64, "executions": ("batch-mean",)}}


@dataclass
class Args:
    """Evaluate a selector against the full model, static subnets, uniform merging and random decisions."""

    selector: str = field(default="runs/selector/selector", metadata={"help": "saved selector (PATH.zip + PATH.json)"})
    budgets: tuple[float, ...] = field(default=(0.3, 0.5, 0.7), metadata={"help": "mean MACs ratios to calibrate to"})
    data: str | None = field(default=None, metadata={"help": "dataset name (default: the selector's)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    images: int | None = field(default=None, metadata={"help": "held-out images (default: the whole split)"})
    calib_images: int = field(default=2048, metadata={"help": "training images used to calibrate the price"})
    tolerance: float = field(default=0.01, metadata={"help": "calibration stops this close to the budget"})
    batch_size: int = field(default=256, metadata={"help": "images per forward (every row)"})
    workers: int = field(default_factory=default_workers, metadata={"help": "data loader workers (ImageFolder)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
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
    amp: bool = field(default=False, metadata={"help": "every row under bf16 autocast (CUDA or CPU)"})
    heuristics: bool = field(default=True, metadata={"help": "rows of the PPT- and Prune-and-Merge-style heuristics"})
    protocol: str = field(
        default="ours",
        metadata={"help": "ours | official: batch 64 and batch-mean decisions (overrides --batch-size, --executions)"},
    )
    out: str = field(default="runs/evaluate", metadata={"help": "output folder (results.md, results.json, pareto.png)"})


def load_batches(args, model: vit.ElasticViT, split: str, images: int | None, device) -> list:
    """A seeded, class-stratified subset of `images` images (all when None) of a split (`train` or `held-out`) of
    the selector's dataset, through the eval transform, in batches of `args.batch_size` on `device`."""
    dataset = selector_dataset(args.selector, split, model, args.data, args.data_dir)
    return subset_batches(dataset, images, args.batch_size, device, workers=args.workers)


def matched(rows: list[dict], ratio: float) -> dict:
    """The best-Top-1 row whose MACs ratio lies in [ratio - 0.02, ratio + 0.10]; else the nearest in MACs."""
    window = [r for r in rows if ratio - MATCH_BELOW <= r["flops_ratio"] <= ratio + MATCH_ABOVE]
    if window:
        return max(window, key=lambda r: (r["top1"], -r["flops_ratio"]))
    return min(rows, key=lambda r: abs(r["flops_ratio"] - ratio))


def markdown(rows: list[dict], batch_size: int, images: int, precision: str) -> str:
    """The table of `rows`; params are those each image's subnet reads, averaged over the images."""
    lines = [
        f"Held-out split, {images} images, batch {batch_size}, {precision}; images/s measured in the same run, every "
        "batch running every row in turn; speed-up: the median over batches of the full model's time over the row's.",
        "",
        "| method | setting | Top-1 (%) | Top-5 (%) | GMACs | MACs ratio | params (M) | tokens kept | images/s "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['top1'] * 100:.2f} | {r['top5'] * 100:.2f} | {r['gmacs']:.4f} "
            f"| {r['flops_ratio']:.3f} | {r['params'] / 1e6:.3f} | {r['tokens_kept']:.3f} | {r['images_per_s']:.0f} "
            f"| {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def heuristic_methods(model: vit.ElasticViT, calibration: list) -> dict[str, tuple[str, object]]:
    """The heuristics' sweeps as methods, by key: (heuristic name, method); PPT's thresholds calibrated on (at most
    1024 of) the `calibration` batches."""
    images = torch.cat([x for x, _ in calibration])[:1024]
    methods = {}
    for r, start in PPT_SWEEP:
        methods[f"ppt {r} {start}"] = ("PPT-style heuristic", PPTHeuristic(model, r, start).calibrate([images]))
    for p, m, start in PRUNE_MERGE_SWEEP:
        methods[f"prune-merge {p} {m} {start}"] = ("Prune-and-Merge schedule", PruneMergeSchedule(model, p, m, start))
    return methods


def main(args: Args) -> list[dict]:
    if args.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {args.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    args = replace(args, **PROTOCOLS[args.protocol])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_cpu(args.threads, args.keep_freed_memory)
    device = resolve_device(args.device)
    if device.type == "cuda":
        use_tf32()
    runs = execution_modes(args.executions, args.prototypes)
    adaptive = agents.load_adaptive(args.selector, device=str(device), amp=args.amp, precision=args.precision)
    model = adaptive.supernet
    test = load_batches(args, model, "held-out", args.images, device)
    calibration = load_batches(args, model, "train", args.calib_images, device)
    images = sum(len(y) for _, y in test)
    space = model.search_space

    selectors = {mode: in_execution_mode(adaptive, *mode) for mode in runs}
    prices = {}
    for budget in tqdm(args.budgets, desc="budgets"):
        for i, mode in enumerate(runs):
            same_decisions = mode == ("bucketed", 1) and ("packed", 1) in runs[:i]
            if i == 0 or (args.calibrate_each and not same_decisions):
                price = agents.calibrate(selectors[mode], calibration, budget, tolerance=args.tolerance)
            prices[budget, mode] = prices[budget, ("packed", 1)] if same_decisions else price

    subnets = list(dict.fromkeys([space.largest(), space.smallest(), *space.static_grid(tied=True)]))
    methods = {f"static {s}": static_method(model, s, args.amp) for s in subnets}
    methods |= {
        f"selector {budget} {mode}": adaptive_method(selectors[mode], prices[budget, mode])
        for budget in args.budgets
        for mode in runs
    }
    random = agents.AdaptiveViT(model, RandomPolicy(adaptive.nvec, seed=args.seed), shape=adaptive.shape, amp=args.amp)
    methods["random"] = adaptive_method(random)
    heuristics = heuristic_methods(model, calibration) if args.heuristics else {}
    methods |= {key: method for key, (_, method) in heuristics.items()}
    measured = evaluate_methods(methods, test, model, desc="evaluating every row, batch by batch")

    grid = [
        {"method": "static subnet", "setting": f"`{s.blocks[-1]}` every block", **measured[f"static {s}"]}
        for s in subnets
    ]
    full = {**grid[0], "method": "full model", "setting": f"`{space.largest().blocks[-1]}` every block"}
    widest = space.largest().blocks[-1]
    uniform = [
        {**r, "method": "uniform merging"}
        for r, s in zip(grid, subnets)
        if all(c.heads == widest.heads and c.mlp_hidden == widest.mlp_hidden for c in s) and r is not grid[0]
    ]
    swept: dict[str, list[dict]] = {}
    for key, (name, method) in heuristics.items():
        swept.setdefault(name, []).append({"method": name, "setting": str(method), **measured[key]})
    selector_rows, table = [], [full]
    for budget in args.budgets:
        for mode in runs:
            price = prices[budget, mode]
            row = {
                "method": f"PRANCE selector, {mode_name(*mode)}",
                "setting": f"budget {budget:g}, price {price:.3g}",
                "mode": mode_name(*mode),
                "execution": mode[0],
                "prototypes": mode[1] if mode[0] == "prototypes" else None,
                "budget": budget,
                "price": price,
                **measured[f"selector {budget} {mode}"],
            }
            selector_rows.append(row)
            table.append(row)
        first = selector_rows[-len(runs)]
        table += [
            {**matched(grid, first["flops_ratio"]), "method": "best static subnet at matched MACs"},
            {**matched(uniform, first["flops_ratio"]), "method": "uniform merging at matched MACs"},
        ]
        table += [
            {**matched(rows, first["flops_ratio"]), "method": f"{name} at matched MACs"} for name, rows in swept.items()
        ]
    table.append({"method": "random decisions", "setting": "uniform over the choices", **measured["random"]})

    precision = f"{args.precision} weights" + (", bf16 autocast" if args.amp else "")
    text = markdown(table, args.batch_size, images, precision)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"table": table, "grid": grid, "heuristics": swept}, indent=2))
    dataset = args.data or read_settings(resolve_selector(args.selector))["env"].get("data", "fashion-mnist")
    title = (
        f"{dataset} held-out split, {images} images: {model.pretrained_cfg['architecture']} ({model.token_mode}), "
        f"{precision}"
    )
    others = [full, next(r for r in table if r["method"] == "random decisions")]
    save_figure(pareto_figure(grid, uniform, selector_rows, others, title, swept), out / "pareto.png")
    print(text)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'pareto.png'}")
    return table


if __name__ == "__main__":
    main(parse_dataclass(Args))

"""Figures of an evaluation: Top-1 against compute and measured speed (the Pareto plot), the decisions a policy
takes over a dataset (per decided block: heads, MLP width and keep ratio; MACs per class), and the token maps of a
few images (which patches each block keeps, prunes or merges; the fates come from ToMe's source tracing).

Figures are built on `matplotlib.figure.Figure`, not pyplot, so that importing this module selects no backend and
drawing needs no display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

import vit
from prance_env.render import PRUNED_GREY, colour, draw_grid, merged_colours, patch_owner, pictures, trace_sources

from .adaptive import AdaptiveViT

DECISION_FIELDS = ("heads", "mlp_hidden", "keep_ratio")
FIELD_TITLES = {"heads": "attention heads", "mlp_hidden": "MLP width", "keep_ratio": "keep ratio"}
OTHER_MARKERS = {"random decisions": ("x", "tab:red"), "full model": ("*", "black")}
# the selector's execution modes, in the order given: the first solid and annotated with its budgets
MODE_STYLES = (("o-", "tab:blue"), ("^--", "tab:purple"), ("v-.", "tab:cyan"), ("D:", "tab:olive"), ("<--", "brown"))
HEURISTIC_STYLES = (("P-.", "tab:brown"), ("X:", "tab:pink"), ("h--", "tab:gray"))  # each heuristic's Pareto front
PRUNED_HATCH = dict(hatch="////", edgecolor="0.6", linewidth=0)  # the legend's swatch of a pruned patch
TOKEN_MAP_SCALE = 4  # a token map is drawn 4 times the image size, so the lines between tokens stay thin


def pareto_front(rows: Sequence[dict], x: str, higher_x_is_better: bool = False) -> list[dict]:
    """The rows that no other row beats in both Top-1 and `x` (lower `x` is better unless `higher_x_is_better`),
    sorted by `x`."""
    sign = -1 if higher_x_is_better else 1
    front, best = [], -np.inf
    for row in sorted(rows, key=lambda r: (sign * r[x], -r["top1"])):
        if row["top1"] > best:
            front.append(row)
            best = row["top1"]
    return sorted(front, key=lambda r: r[x])


#: the least height between two budget labels, in points (their font is 7 pt)
LABEL_GAP_POINTS = 9.0


def _annotate_budgets(ax, selector: Sequence[dict], x: str) -> None:
    """One label per distinct selector point; budgets landing on the same point share it ("budget 0.3 = 0.5").
    Labels sit level with their point, right of it on the GMACs axis and left of it on the images/s axis (where the
    selector's points are the slowest and the faster rows lie to their right); a label that would overprint the one
    below it is raised to `LABEL_GAP_POINTS` above it. Call it once the axis' limits are set."""
    points: dict[tuple[float, float], list[dict]] = {}
    for row in selector:
        key = (round(row[x], 4 if x == "gmacs" else 0), round(row["top1"] * 100, 2))
        points.setdefault(key, []).append(row)
    side = 1 if x == "gmacs" else -1
    low, high = ax.get_ylim()
    points_per_unit = ax.bbox.height * 72 / ax.figure.dpi / max(high - low, 1e-9)  # the axis' final limits
    placed: list[float] = []
    for rows in sorted(points.values(), key=lambda rows: rows[0]["top1"]):
        level = rows[0]["top1"] * 100 * points_per_unit  # the point's height, in points
        label_at = level if not placed else max(level, placed[-1] + LABEL_GAP_POINTS)  # stacked, never overprinted
        placed.append(label_at)
        ax.annotate(
            "budget " + " = ".join(f"{r['budget']:g}" for r in rows),
            (rows[0][x], rows[0]["top1"] * 100),
            textcoords="offset points",
            xytext=(6 * side, label_at - level),
            ha="left" if side > 0 else "right",
            va="center",
            fontsize=7,
            color="tab:blue",
        )


def selector_modes(selector: Sequence[dict]) -> dict[str, list[dict]]:
    """The selector's rows by execution mode (`mode`; rows without one form the mode ""), in order of appearance."""
    modes: dict[str, list[dict]] = {}
    for row in selector:
        modes.setdefault(row.get("mode") or "", []).append(row)
    return modes


def _pareto_panel(
    ax,
    grid: list[dict],
    uniform: list[dict],
    selector: list[dict],
    others: list[dict],
    x: str,
    heuristics: dict[str, list[dict]],
) -> None:
    """One panel of the Pareto figure: Top-1 against `x` (`gmacs` or `images_per_s`)."""
    faster_is_better = x == "images_per_s"
    ax.scatter([r[x] for r in grid], [r["top1"] * 100 for r in grid], c="0.65", s=16, label="static subnets (grid)")
    front = pareto_front(grid, x, faster_is_better)
    ax.plot([r[x] for r in front], [r["top1"] * 100 for r in front], ":", c="0.35", lw=1.2, label="grid Pareto front")
    modes = selector_modes(selector)
    lines = [(uniform, "s--", "tab:orange", 1.2, "uniform merging")]
    for k, (name, rows) in enumerate(heuristics.items()):  # a sweep each: its best settings
        style, line_colour = HEURISTIC_STYLES[k % len(HEURISTIC_STYLES)]
        lines.append((pareto_front(rows, x, faster_is_better), style, line_colour, 1.2, f"{name} (Pareto front)"))
    for k, (mode, rows) in enumerate(modes.items()):
        style, line_colour = MODE_STYLES[k % len(MODE_STYLES)]
        label = "PRANCE selector" + (f", {mode}" if mode else "")
        lines.append((rows, style, line_colour, 2 if k == 0 else 1.2, label))
    for rows, style, line_colour, width, label in lines:
        ordered = sorted(rows, key=lambda r: r[x])
        ax.plot(
            [r[x] for r in ordered],
            [r["top1"] * 100 for r in ordered],
            style,
            c=line_colour,
            lw=width,
            ms=4,
            label=label,
        )
    for row in others:
        marker, line_colour = OTHER_MARKERS.get(row["method"], ("d", "tab:green"))
        ax.scatter([row[x]], [row["top1"] * 100], marker=marker, c=line_colour, s=70, label=row["method"], zorder=3)
    top1 = [r["top1"] * 100 for r in grid + uniform + selector + others]
    margin = max(0.5, 0.04 * (max(top1) - min(top1)))
    # every point visible, the static grid's included; a heuristic's fronts may fall below it
    ax.set_ylim(min(top1) - margin, max(top1) + margin)
    _annotate_budgets(ax, next(iter(modes.values()), []), x)
    ax.set_ylabel("Top-1 (%)")
    ax.grid(alpha=0.3)


def pareto_figure(
    grid: list[dict],
    uniform: list[dict],
    selector: list[dict],
    others: list[dict],
    title: str,
    heuristics: dict[str, list[dict]] | None = None,
) -> Figure:
    """Top-1 against mean GMACs per image (left) and against measured images/s (right), for the static grid (with
    its Pareto front), uniform merging, the selector's budgets (one line per execution mode, the first annotated
    with its budgets), the Pareto front of each heuristic's sweep in `heuristics` (name: rows) and single rows such
    as the full model and random decisions. Rows carry `top1` (a fraction), `gmacs`, `images_per_s` and, for the
    selector, `budget` and optionally `mode` (e.g. `packed`, `prototypes K=4`)."""
    heuristics = heuristics or {}
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    _pareto_panel(left, grid, uniform, selector, others, "gmacs", heuristics)
    left.set_xlabel("mean GMACs per image (lower is cheaper)")
    _pareto_panel(right, grid, uniform, selector, others, "images_per_s", heuristics)
    right.set_xlabel("images/s measured in this run (higher is faster)")
    handles, labels = left.get_legend_handles_labels()
    columns = len(labels) if len(labels) <= 7 else (len(labels) + 1) // 2
    fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return fig


@torch.inference_mode()
def decision_stats(adaptive: AdaptiveViT, batches: Iterable[tuple[Tensor, Tensor]], price: float | None = None) -> dict:
    """What `adaptive` decides over `batches` at compute price `price` (None: `adaptive.price`): per decided block,
    the share of images taking each choice of heads, MLP width and keep ratio, and per class the number of images,
    the mean MACs ratio and Top-1.

    Returns a JSON-able dict: `blocks` (the decided block indices), `choices[field]` (per block, the values on
    offer), `shares[field]` (per block, the share of images per choice; each row sums to 1), `images`, `classes`
    (the labels seen, ascending), `images_per_class`, `macs_ratio_per_class`, `top1_per_class`, `macs_ratio`.
    """
    model = adaptive.supernet
    space = model.search_space
    blocks = list(range(adaptive.schedule.stem_blocks, model.depth))
    choices = {f: [list(getattr(space, f)[i]) for i in blocks] for f in DECISION_FIELDS}
    counts = {f: np.zeros((len(blocks), max(map(len, choices[f])))) for f in DECISION_FIELDS}
    labels, ratios, correct = [], [], []
    for x, y in batches:
        logits, macs, decisions = adaptive(x, price=price, return_decisions=True)
        for configs in decisions.subnets:  # one subnet (block configurations) per image
            for row, i in enumerate(blocks):
                for f in DECISION_FIELDS:
                    counts[f][row, choices[f][row].index(getattr(configs[i], f))] += 1
        labels.append(y.cpu())
        ratios.append((macs / adaptive.full_macs).cpu())
        correct.append((logits.argmax(-1) == y).cpu())
    labels, ratios, correct = torch.cat(labels), torch.cat(ratios).double(), torch.cat(correct).double()
    classes = labels.unique().tolist()
    per_class = [labels == c for c in classes]
    return {
        "blocks": blocks,
        "choices": choices,
        "shares": {f: (counts[f] / len(labels)).tolist() for f in DECISION_FIELDS},
        "images": len(labels),
        "classes": classes,
        "images_per_class": [int(m.sum()) for m in per_class],
        "macs_ratio_per_class": [float(ratios[m].mean()) for m in per_class],
        "top1_per_class": [float(correct[m].mean()) for m in per_class],
        "macs_ratio": float(ratios.mean()),
    }


def decisions_figure(stats: dict, title: str, class_names: Sequence[str] | None = None) -> Figure:
    """The decisions of `decision_stats` in four panels: per decided block, stacked shares of the images taking
    each heads, MLP width and keep ratio choice (darker is larger); the mean MACs ratio per class, with Top-1."""
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 4, width_ratios=(1, 1, 1, 1.2))
    blocks = stats["blocks"]
    for ax, f in zip(axes, DECISION_FIELDS):
        shares = np.asarray(stats["shares"][f])
        values = stats["choices"][f][0]
        same = all(c == values for c in stats["choices"][f])  # else the legend names choice indices
        colours = [str(0.85 - 0.7 * k / max(1, shares.shape[1] - 1)) for k in range(shares.shape[1])]
        bottom = np.zeros(len(blocks))
        for k in range(shares.shape[1]):
            label = f"{values[k]:g}" if same else f"choice {k}"
            ax.bar(blocks, shares[:, k], bottom=bottom, color=colours[k], edgecolor="white", lw=0.3, label=label)
            bottom += shares[:, k]
        ax.set(title=FIELD_TITLES[f], xlabel="block", ylim=(0, 1), xticks=blocks)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, handlelength=1)
    axes[0].set_ylabel("share of images")
    ax = axes[3]
    names = [class_names[c] if class_names else str(c) for c in stats["classes"]]
    macs = stats["macs_ratio_per_class"]
    bars = ax.barh(range(len(names)), macs, color="tab:blue", alpha=0.8)
    for bar, top1 in zip(bars, stats["top1_per_class"]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {top1 * 100:.0f}%", va="center", fontsize=6)
    ax.axvline(stats["macs_ratio"], color="black", ls="--", lw=1, label=f"all: {stats['macs_ratio']:.3f}")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(title="mean MACs ratio per class (Top-1)", xlim=(0, 1.12), xlabel="MACs ratio")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return fig


def token_map_figure(
    model: vit.ElasticViT,
    images: Tensor,
    subnets: Sequence[vit.Subnet],
    titles: Sequence[str],
    correct: Sequence[bool],
    footers: Sequence[str],
    blocks: Sequence[int],
    title: str,
) -> tuple[Figure, list[int]]:
    """Which patches each of `blocks` leaves kept, merged or pruned, one row per image of `images` run on its subnet.

    Each row starts with the image (`titles[b]` above, green when `correct[b]`, `footers[b]` below), then the patch
    grid after each block of `blocks`, titled with its choice (`b3 h2 m128 r0.8`) and the patch tokens left. A patch
    still alone in its token shows the image, merged patches take the colour of the token they form (one colour per
    token, lines between tokens), pruned patches are greyed out. Returns the figure and, per image, the patch tokens
    left after the last block.
    """
    grid = math.isqrt(model.num_patches)  # patches per side
    rows, cols = len(images), 1 + len(blocks)
    fig = Figure(figsize=(1.0 * cols + 0.2, 1.45 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    final = []
    for b, picture in enumerate(pictures(model, images)):
        sources = trace_sources(model, images[b], subnets[b])
        final.append(sources[-1].shape[0])
        owners = [patch_owner(sources[i]) for i in blocks]
        ax = axes[b, 0]
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(titles[b], fontsize=7, color="tab:green" if correct[b] else "tab:red")
        ax.set_xlabel(footers[b], fontsize=7)
        for i, owner, colours, panel in zip(blocks, owners, merged_colours(owners), axes[b, 1:]):
            panel.imshow(draw_grid(picture, owner, colours, grid, scale=TOKEN_MAP_SCALE), interpolation="nearest")
            tokens = sources[i].shape[0]
            panel.set_title(f"b{i} {str(subnets[b][i]).replace('-', ' ')}", fontsize=6, pad=2)
            panel.set_xlabel(f"{tokens} token{'s' * (tokens != 1)}", fontsize=6, labelpad=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle(title, fontsize=9)
    legend = [
        Patch(facecolor="0.1", edgecolor="white", label="kept: a patch of its own"),
        Patch(facecolor=colour(0), label="merged: one colour per token"),
        Patch(facecolor=str(PRUNED_GREY), **PRUNED_HATCH, label="pruned"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return fig, final


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Write `fig` as a PNG (its folder created)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)


__all__ = [
    "decision_stats",
    "decisions_figure",
    "pareto_figure",
    "pareto_front",
    "save_figure",
    "selector_modes",
    "token_map_figure",
]

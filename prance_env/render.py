"""Token maps: which patches each block keeps, prunes or merges, drawn as an RGB array.

A patch still alone in its token shows the image, merged patches take the colour of the token they now form (one
colour per token, white lines between tokens), pruned patches are greyed out and hatched. The fates come from
ToMe's source tracing (`InferenceRunner.start(..., trace_sources=True)`), replayed image by image on the
configurations chosen.
`render_episode` draws one episode as a row of panels (the env's `render_mode="rgb_array"`); the pieces
(`trace_sources`, `patch_owner`, `merged_colours`, `draw_grid`) also serve figures of many images.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vit import BlockConfig, ElasticViT
from vit.inference import DecisionSchedule, InferenceRunner

RENDER_MODES = ("rgb_array",)
RENDER_FPS = 4  # decisions per second when frames are played as a video
PRUNED_GREY = 0.8
HATCH_GREY = 0.6
HATCH_PITCH = 4  # pixels between the hatch lines of a pruned patch
LINE_ALPHA = 0.7  # opacity of the white lines between tokens
UNRUN_GREY = 0.95  # panels of blocks not run yet
GOLDEN = 0.618033988749895  # hue step between token colours: neighbouring indices get distant hues
PANEL_PIXELS = 112  # panels are drawn at least this tall: a 28-pixel image is scaled 4 times
GAP = 4  # white pixels between panels


def check_render_mode(render_mode: str | None) -> str | None:
    """`render_mode` if it is None or one of `RENDER_MODES`, else a `ValueError` naming the modes."""
    if render_mode is not None and render_mode not in RENDER_MODES:
        raise ValueError(f"unknown render_mode {render_mode!r}; expected None or one of {', '.join(RENDER_MODES)}")
    return render_mode


def trace_sources(model: ElasticViT, image: Tensor, configs: Sequence[BlockConfig], amp: bool = False) -> list[Tensor]:
    """After each of the first `len(configs)` blocks run at `configs`, which original patches each patch token
    holds: (tokens, patches), CLS left out. image: (C, H, W) on the model's device. `amp`: replay under the bf16
    autocast the tokens were reduced under (`vit.utils.autocast`), so near-ties rank as they did. The blocks run
    through a `vit.InferenceRunner` deciding every block, the stem included, from the image's embedding."""
    runner = InferenceRunner(model, DecisionSchedule(stem_blocks=0), amp=amp)
    state = runner.start(image[None], trace_sources=True)
    sources = []
    for config in configs:
        state = runner.advance(state, [config])
        sources.append(state.tokens.source[1:, 1:])
    return sources


def patch_owner(source: Tensor) -> np.ndarray:
    """Per original patch, the patch token holding it, or -1 where it was pruned. source: (tokens, patches)."""
    return torch.where(source.sum(0) > 0, source.argmax(0), -1).cpu().numpy()


def merged_colours(owners: Sequence[np.ndarray]) -> list[dict[int, int]]:
    """Per panel of a row, a colour number for each token holding several patches.

    A token takes the colour of the largest coloured token it took patches from in the previous panel (unless a
    larger token took it first), so a growing token keeps its colour from block to block; others get new ones.
    """
    panels: list[dict[int, int]] = []
    fresh = 0
    for k, owner in enumerate(owners):
        counts = np.bincount(owner[owner >= 0])
        colours: dict[int, int] = {}
        for token in np.argsort(-counts, kind="stable"):
            if counts[token] < 2:
                break
            heirs = []
            if k:
                before = owners[k - 1][owner == token]
                tokens, shared = np.unique(before[before >= 0], return_counts=True)
                heirs = [panels[-1][t] for t in tokens[np.argsort(-shared, kind="stable")] if t in panels[-1]]
            taken = set(colours.values())
            heir = next((c for c in heirs if c not in taken), None)
            if heir is None:
                heir, fresh = fresh, fresh + 1
            colours[int(token)] = heir
        panels.append(colours)
    return panels


def colour(number: int) -> np.ndarray:
    """The RGB colour of colour number `number`: hues a golden-ratio step apart, so neighbours differ."""
    return np.array(colorsys.hsv_to_rgb((number * GOLDEN) % 1.0, 0.8, 1.0))


def pictures(model: ElasticViT, images: Tensor) -> np.ndarray:
    """Normalised images (B, C, H, W) back to RGB in [0, 1]: (B, H, W, 3)."""
    cfg = model.pretrained_cfg
    channels = images.shape[1]
    mean = torch.tensor(cfg.get("mean", (0.0,) * channels), device=images.device)[:, None, None]
    std = torch.tensor(cfg.get("std", (1.0,) * channels), device=images.device)[:, None, None]
    out = (images.float() * std + mean).clamp(0, 1).expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def draw_grid(picture: np.ndarray, owner: np.ndarray, colours: dict[int, int], grid: int, scale: int = 1) -> np.ndarray:
    """The patches of `picture` (H, W, 3 in [0, 1]) by fate, `scale` times larger: (scale H, scale W, 3) in [0, 1].

    owner: per patch, its token or -1 (pruned); colours: the colour number of each merged token; grid: patches per
    side.
    """
    patch = picture.shape[0] // grid
    owners = owner.reshape(grid, grid)
    rgb = picture.astype(np.float64)  # a copy: the picture is drawn on
    for (r, c), token in np.ndenumerate(owners):
        cell = rgb[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
        if token < 0:
            cell[:] = PRUNED_GREY
        elif token in colours:
            cell[:] = 0.6 * colour(colours[token]) + 0.4 * cell
    rgb = rgb.repeat(scale, 0).repeat(scale, 1)
    side = patch * scale  # pixels per patch
    rows, cols = np.indices(rgb.shape[:2])
    pruned = np.kron(owners < 0, np.ones((side, side), dtype=bool))
    rgb[pruned & ((rows + cols) % HATCH_PITCH == 0)] = HATCH_GREY
    line = np.zeros(rgb.shape[:2], dtype=bool)
    for r, c in zip(*np.nonzero(owners[:, 1:] != owners[:, :-1])):  # between columns c and c + 1
        line[r * side : (r + 1) * side, (c + 1) * side] = True
    for r, c in zip(*np.nonzero(owners[1:] != owners[:-1])):  # between rows r and r + 1
        line[(r + 1) * side, c * side : (c + 1) * side] = True
    rgb[line] = (1 - LINE_ALPHA) * rgb[line] + LINE_ALPHA
    return rgb


def render_episode(
    model: ElasticViT, image: Tensor, configs: Sequence[BlockConfig], first_block: int, amp: bool = False
) -> np.ndarray:
    """The token map of one episode: (H, W, 3) uint8, one row of panels.

    The image, then the patch grid after each block from `first_block` (the first decided one) to the last. Blocks
    not run yet (`configs` holds the configurations run so far) are blank, so every frame of an episode has the
    size the model fixes.

    Args:
        model: the supernet the episode runs on.
        image: (C, H, W), normalised, on the model's device.
        configs: the configuration of every block run so far, from block 0.
        first_block: the first block drawn.
        amp: whether the episode ran under bf16 autocast (its blocks are replayed the same way).
    """
    picture = pictures(model, image[None])[0]
    grid = math.isqrt(model.num_patches)  # patches per side
    scale = max(1, math.ceil(PANEL_PIXELS / picture.shape[0]))
    owners = [patch_owner(source) for source in trace_sources(model, image, configs, amp)[first_block:]]
    panels = [picture.repeat(scale, 0).repeat(scale, 1)]
    panels += [draw_grid(picture, o, c, grid, scale) for o, c in zip(owners, merged_colours(owners))]
    blank = np.full_like(panels[0], UNRUN_GREY)
    panels += [blank] * (1 + model.depth - first_block - len(panels))
    height = panels[0].shape[0]
    gap = np.ones((height, GAP, 3))
    row = np.concatenate([part for panel in panels for part in (gap, panel)][1:], axis=1)
    return np.rint(row * 255).astype(np.uint8)


__all__ = [
    "RENDER_FPS",
    "RENDER_MODES",
    "check_render_mode",
    "colour",
    "draw_grid",
    "merged_colours",
    "patch_owner",
    "pictures",
    "render_episode",
    "trace_sources",
]

"""Fewer configurations per step: a batch's per-image decisions snapped to K prototypes.

Per-sample execution pays per distinct configuration and token count, so a batch runs faster the fewer of them
it holds. `snap_to_prototypes` trades decision diversity for that speed: it picks at most K configurations for the
batch (k-medians over the choice-index vectors, L1 distance, initialised deterministically) and moves every
image's decision to the nearest one. K=1 is the per-field median choice of the batch, what `consensus` has always
run; a K at least the number of distinct decisions changes nothing. `snap_to_mean` is the official evaluation
protocol's variant of K=1: the batch's mean choice, rounded.

Measured on `prance_fmnist` (batch 256, one CPU thread, `scripts/benchmark.py`): K=1 runs dense blocks and is the
fast mode; K >= 2 runs about as fast as per-image decisions, because images that took different prototypes at one
step hold different token counts at the next, so the batch still splits into many (configuration, token count)
groups.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _weighted_lower_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column, the lower median of `values` (n, F), small non-negative ints, each repeated `weights` (n,)
    times: (F,). The value at position (W - 1) // 2 of the sorted repeated column, W the total weight: what
    `Tensor.median` returns on the repeated values."""
    F, V = values.shape[1], int(values.max()) + 1
    histogram = np.bincount((values + V * np.arange(F)).ravel(), np.repeat(weights, F), minlength=F * V)
    cumulative = histogram.reshape(F, V).cumsum(1)
    return (cumulative <= (int(weights.sum()) - 1) // 2).sum(1)  # the first value whose weight passes the middle


def snap_to_prototypes(indices: Tensor, k: int, max_iter: int = 20) -> Tensor:
    """Each row of `indices` (B, fields) int64 moved to the nearest of at most `k` prototype rows: (B, fields).

    The prototypes are k-medians of the rows under the L1 distance between choice-index vectors (a step to the
    next choice of any field counts 1): the first is the per-field lower median of the batch, each next one the
    distinct row farthest from the prototypes so far weighted by its count (ties to the first row in lexicographic
    order), then Lloyd steps (move each prototype to its members' per-field lower median; assign each row to its
    nearest prototype, ties to the first) until the assignment stops changing or after `max_iter` steps.
    Deterministic, and cheap: it works on the distinct rows (at most B) with their counts, in numpy (a few hundred
    microseconds for B=256). With `k` at least the number of distinct rows, `indices` comes back unchanged; with
    `k=1`, every row becomes the lower median of the batch per field (`indices.median(dim=0)`).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    values = indices.cpu().numpy()
    sizes = tuple(int(m) + 1 for m in values.max(0))  # each row as one int (rows in lexicographic order)
    keys = np.ravel_multi_index(tuple(values.T), sizes)
    keys, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    rows = np.stack(np.unravel_index(keys, sizes), 1)
    if rows.shape[0] <= k:
        return indices
    centres = np.empty((k, rows.shape[1]), dtype=rows.dtype)
    centres[0] = _weighted_lower_median(rows, counts)
    distance = np.abs(rows - centres[0]).sum(1)  # (D,) to the nearest prototype so far
    for c in range(1, k):
        far = int((distance * counts).argmax())  # a row that is no prototype yet, as D > k
        centres[c] = rows[far]
        distance = np.minimum(distance, np.abs(rows - rows[far]).sum(1))

    def nearest() -> np.ndarray:  # (D,) the first of the nearest prototypes of each distinct row
        return np.abs(rows[:, None] - centres[None]).sum(2).argmin(1)

    assignment = nearest()
    for _ in range(max_iter):
        for c in range(k):
            members = assignment == c
            if members.any():
                centres[c] = _weighted_lower_median(rows[members], counts[members])
        previous, assignment = assignment, nearest()
        if np.array_equal(assignment, previous):
            break
    snapped = centres[assignment][inverse]
    return torch.from_numpy(snapped).to(device=indices.device, dtype=indices.dtype)


def snap_to_mean(indices: Tensor) -> Tensor:
    """Every row of `indices` (B, fields) int64 replaced by the batch's mean row rounded to the nearest choice
    index (halves up), as the PRANCE release evaluates: its per-image decisions averaged over the batch and snapped
    to the nearest choice. On evenly spaced choices (all registered search spaces) rounding the mean index is
    snapping the mean value."""
    if indices.shape[0] == 0:
        return indices
    mean = torch.floor(indices.double().mean(0) + 0.5).to(indices.dtype)
    return mean.expand_as(indices).clone()


__all__ = ["snap_to_mean", "snap_to_prototypes"]

"""Accuracy, cost and speed of several models measured on the same batches, their speed in interleaved rounds.

A *method* is anything that maps a batch of images to an `agents.metrics.Outcome` (logits, per-image MACs, the
subnet each image ran and the patch tokens it ended with): `adaptive_method` wraps an `AdaptiveViT` at a price,
`static_method` a plain forward of one subnet. `evaluate_methods` runs every method on every batch, batch after
batch, so that each batch is one round of interleaved timing (the order rotating from batch to batch), and returns
one row per method: Top-1, Top-5, MACs, tokens kept, parameters read, and images/s by wall clock and by process CPU
time, with the speed-up over a reference method per batch (median and range). `execution_modes` and
`in_execution_mode` give the `AdaptiveViT` execution modes a script compares.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vit import ElasticViT, Subnet, count_macs
from vit.bench import Rounds
from vit.token_ops import token_schedule
from vit.utils import autocast

from .adaptive import EXECUTIONS, AdaptiveViT
from .metrics import Outcome, Tally

Method = Callable[[Tensor], Outcome]


def adaptive_method(adaptive: AdaptiveViT, price: float | None = None) -> Method:
    """An `AdaptiveViT` at compute price `price` (None: `adaptive.price`) as a method."""

    def run(images: Tensor) -> Outcome:
        logits, macs, decisions = adaptive(images, price=price, return_decisions=True)
        return Outcome(logits, macs, decisions.subnets, decisions.tokens)

    return run


def final_tokens(model: ElasticViT, subnet: Subnet) -> int:
    """Patch tokens left after the last block of `subnet` run on a whole image."""
    n = model.num_patches
    for config in subnet:
        n = token_schedule(n, config, model.token_mode)[1]
    return n


def static_method(model: ElasticViT, subnet: Subnet | None = None, amp: bool = False) -> Method:
    """A plain forward of one subnet (the largest when None) for the whole batch as a method: float32 images cast
    to the model's weights, under bf16 autocast with `amp`; float32 logits."""
    subnet = model.search_space.largest() if subnet is None else subnet
    macs, tokens = float(count_macs(model, subnet)), final_tokens(model, subnet)
    dtype = model.pos_embed.dtype

    @torch.inference_mode()
    def run(images: Tensor) -> Outcome:
        B, device = images.shape[0], images.device
        with autocast(device, amp):
            logits = model(images.to(dtype) if images.dtype == torch.float32 else images, subnet).float()
        per_image = [torch.full((B,), value, device=device) for value in (macs, tokens)]
        return Outcome(logits, per_image[0], [subnet] * B, per_image[1])

    return run


def execution_modes(executions: Sequence[str], prototypes: Sequence[int] = (1,)) -> list[tuple[str, int]]:
    """(execution, K) of each `AdaptiveViT` execution mode named in `executions` (`packed`, `bucketed`,
    `prototypes`, `batch-mean`; `agents.adaptive.EXECUTIONS`), one per K of `prototypes` for `prototypes`; K is 1
    for the others. In the order given, without repeats."""
    modes = []
    for execution in executions:
        if execution == "consensus":
            warnings.warn("execution mode 'consensus' is 'prototypes' with K=1", DeprecationWarning, stacklevel=2)
            modes.append(("prototypes", 1))
            continue
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; expected one of {', '.join(EXECUTIONS)}")
        modes += [("prototypes", int(k)) for k in prototypes] if execution == "prototypes" else [(execution, 1)]
    return list(dict.fromkeys(modes))


def mode_name(execution: str, prototypes: int = 1) -> str:
    """How tables and plots name an execution mode: `packed`, `bucketed`, `prototypes K=4`."""
    return f"prototypes K={prototypes}" if execution == "prototypes" else execution


def in_execution_mode(adaptive: AdaptiveViT, execution: str, prototypes: int = 1) -> AdaptiveViT:
    """`adaptive` (same supernet, policy, price, price range, schedule and autocast) in another execution mode."""
    layout, snap = EXECUTIONS[execution]
    return adaptive.replace(layout=layout, snap=snap, prototypes=prototypes)


def evaluate_methods(
    methods: dict[str, Method],
    batches: Iterable[tuple[Tensor, Tensor]],
    model: ElasticViT,
    reference: str | None = None,
    warmup: bool = True,
    desc: str | None = None,
) -> dict[str, dict]:
    """Every method on every (images, labels) batch, batch by batch: the `Tally` row of each, with its speed.

    Each batch is one round of interleaved timing: every method runs on it once, starting one further along the
    list than on the batch before. With `warmup` and more than one batch, the first batch warms every method up
    (first calls pay one-off costs): it counts for accuracy and MACs, not for speed. Speed keys of each row:
    `images_per_s` (wall clock) and `images_per_cpu_s` (process CPU time) over the timed batches and, against
    `reference` (default: the first method), `speedup` and `cpu_speedup`, the median of the per-batch ratios of the
    reference's seconds to the method's, with their range (`speedup_range`, `cpu_speedup_range`). `model` is the
    supernet the methods run (parameters and MACs are counted on it).
    """
    names = list(methods)
    reference = names[0] if reference is None else reference
    batches = list(batches)
    untimed = 1 if warmup and len(batches) > 1 else 0
    tallies = {name: Tally(model) for name in names}
    timer = Rounds(names, model.pos_embed.device)
    for b, (images, labels) in enumerate(tqdm(batches, desc=desc, leave=False, disable=desc is None)):
        runs = {name: lambda run=methods[name], x=images: run(x) for name in names}
        outcomes = timer.round(runs, timed=b >= untimed)
        for name, outcome in outcomes.items():
            tallies[name].add(outcome, labels)
    timed_images = sum(len(labels) for _, labels in batches[untimed:])
    rows = {}
    full_macs = count_macs(model)
    for name in names:
        row = tallies[name].result()
        row["gmacs"] = row["flops_ratio"] * full_macs / 1e9
        row |= timer.speed(name, reference, timed_images)
        rows[name] = row
    return rows


__all__ = [
    "adaptive_method",
    "evaluate_methods",
    "execution_modes",
    "final_tokens",
    "in_execution_mode",
    "mode_name",
    "static_method",
]

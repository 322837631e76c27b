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

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vit import ElasticViT, Subnet, count_flops
from vit.token_ops import token_schedule
from vit.utils import autocast, clocked, round_ratios

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
    macs, tokens = float(count_flops(model, subnet)), final_tokens(model, subnet)
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
    `prototypes`, `consensus`, `batch-mean`), one per K of `prototypes` for `prototypes`, `consensus` as K=1; K is
    1 for the others. In the order given, without repeats."""
    modes = []
    for execution in executions:
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; expected one of {', '.join(EXECUTIONS)}")
        if execution == "prototypes":
            modes += [("prototypes", int(k)) for k in prototypes]
        else:
            modes.append(("prototypes", 1) if execution == "consensus" else (execution, 1))
    return list(dict.fromkeys(modes))


def mode_name(execution: str, prototypes: int = 1) -> str:
    """How tables and plots name an execution mode: `packed`, `bucketed`, `prototypes K=4`."""
    return f"prototypes K={prototypes}" if execution == "prototypes" else execution


def in_execution_mode(adaptive: AdaptiveViT, execution: str, prototypes: int = 1) -> AdaptiveViT:
    """An `AdaptiveViT` deciding as `adaptive` does (same supernet, policy, price, price range, shape and autocast)
    in another execution mode."""
    return AdaptiveViT(
        adaptive.supernet,
        adaptive.policy,
        price=adaptive.price,
        price_range=adaptive.price_range,
        shape=adaptive.shape,
        execution=execution,
        amp=adaptive.amp,
        prototypes=prototypes,
    )


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
    device = model.pos_embed.device
    tallies = {name: Tally(model) for name in names}
    seconds = {name: {"wall": [], "cpu": []} for name in names}
    timed_images = 0
    for b, (images, labels) in enumerate(tqdm(batches, desc=desc, leave=False, disable=desc is None)):
        for name in names[b % len(names) :] + names[: b % len(names)]:
            outcome, wall, cpu = clocked(lambda run=methods[name], x=images: run(x), device)
            tallies[name].add(outcome, labels)
            if b >= untimed:
                seconds[name]["wall"].append(wall)
                seconds[name]["cpu"].append(cpu)
        timed_images += len(labels) * (b >= untimed)
    rows = {}
    for name in names:
        row = tallies[name].result()
        row["gmacs"] = row["flops_ratio"] * count_flops(model) / 1e9
        for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
            spent = [max(s, 1e-9) for s in seconds[name][clock]]
            median, low, high = round_ratios(seconds[reference][clock], spent)
            row["images_per_s" if clock == "wall" else "images_per_cpu_s"] = timed_images / sum(spent)
            row[f"{prefix}speedup"], row[f"{prefix}speedup_range"] = median, (low, high)
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

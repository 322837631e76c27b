"""The block-by-block inference loop: a batch of images run through the supernet one decision at a time.

`InferenceLoop.start` embeds the images and runs the stem at full width; `advance` runs the blocks of the next
decision at one configuration per image and block; `complete` finishes the inference from the current tokens with
the reference subnet (full width, no token reduction). A per-sample ledger counts the MACs spent (`vit.flops`), exact
for each image's configurations and token counts. The env (`prance_env`) and the deployed `agents.AdaptiveViT` are
its clients: the first pays rewards between the steps, the second asks a policy for the next configurations.
`LoopShape` says where the decisions fall and what each one sets: per block (ours) or per group of blocks (PRANCE's).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .config import BlockConfig, InvalidSubnetError, SearchSpace, Subnet
from .flops import block_macs, count_flops, embed_macs, head_macs
from .supernet import TOKEN_BATCHES, ElasticViT
from .utils import autocast, long_tensor, single_threaded

#: The keep ratios of PRANCE's grouped decisions: one token reduction per group of blocks, keeping down to a tenth.
GROUPED_KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RATIO_FIELDS = ("keep_ratio", "merge_ratio")


@dataclass(frozen=True)
class LoopShape:
    """Where the decisions fall and what each one sets.

    `stem_blocks` blocks run at full width when the loop starts, so the first decision depends on the image; then
    each decision sets the next `blocks_per_step` blocks.

    - Per-block decisions (`group_blocks=0`): a decision is one configuration (the search space's fields: heads, MLP
      width, keep ratio[, merge ratio]) that every block of its step runs.
    - Grouped decisions (`group_blocks=k`, PRANCE's): the blocks of a step fall in groups of k; a decision sets the
      heads and MLP width of every block (fields `heads[j]`, `mlp_hidden[j]`, j the block's place in the step) and
      one token reduction per group, at its first block (`keep_ratio[j]`, and `merge_ratio[j]` in `prune_merge`
      mode, from `keep_ratios`); the other blocks of the group keep every token.

    `LoopShape.named` gives the shapes by name: `per-block` (the default: a 1-block stem, a decision before every
    block), `grouped` (the paper's: a 3-block stem, decisions at blocks 3, 6 and 9, each for a group of 3 blocks,
    keep ratios 0.1 to 1.0) and `one-shot` (the same choices for the 3 groups of a 12-block model in one decision read
    after the stem: the baseline without an MDP).

    Attributes:
        stem_blocks: blocks run at full width when the loop starts.
        blocks_per_step: blocks set by one decision.
        group_blocks: 0 for per-block decisions, else the blocks of a group (a divisor of `blocks_per_step`).
        keep_ratios: grouped decisions: the keep (and merge) ratios of a group's token reduction, ascending, ending
            with 1.0; None takes the search space's choices at the group's first block. The supernet must offer
            them (`supernet_kwargs`).
    """

    stem_blocks: int = 1
    blocks_per_step: int = 1
    group_blocks: int = 0
    keep_ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.stem_blocks < 0 or self.blocks_per_step < 1:
            raise ValueError("stem_blocks must be >= 0 and blocks_per_step >= 1")
        if self.group_blocks < 0 or (self.group_blocks and self.blocks_per_step % self.group_blocks):
            raise ValueError(
                f"group_blocks must be 0 (per-block decisions) or divide blocks_per_step={self.blocks_per_step}, "
                f"got {self.group_blocks}"
            )
        if self.keep_ratios is not None:
            ratios = tuple(float(r) for r in self.keep_ratios)  # a JSON list reads back as the same shape
            object.__setattr__(self, "keep_ratios", ratios)
            if not self.group_blocks:
                raise ValueError("keep_ratios are for grouped decisions (group_blocks > 0)")
            ascending = all(a < b for a, b in zip(ratios, ratios[1:]))
            if not ratios or not ascending or ratios[0] <= 0.0 or ratios[-1] != 1.0:
                raise ValueError(f"keep_ratios must ascend in (0, 1] and end with 1.0, got {ratios}")

    @classmethod
    def named(
        cls, decisions: str | LoopShape, stem_blocks: int | None = None, blocks_per_step: int | None = None
    ) -> LoopShape:
        """The shape named `decisions` (one of `DECISIONS`; a `LoopShape` is taken as it is), with `stem_blocks` and
        `blocks_per_step` replaced where given."""
        if isinstance(decisions, LoopShape):
            shape = decisions
        elif decisions in DECISIONS:
            shape = DECISIONS[decisions]
        else:
            raise ValueError(f"unknown decisions {decisions!r}; expected one of {', '.join(DECISIONS)}")
        given = {"stem_blocks": stem_blocks, "blocks_per_step": blocks_per_step}
        return replace(shape, **{key: value for key, value in given.items() if value is not None})

    @property
    def grouped(self) -> bool:
        """Whether a decision sets each block's widths and one token reduction per group."""
        return self.group_blocks > 0

    def num_steps(self, depth: int) -> int:
        """The number of decisions in a model of `depth` blocks; a `ValueError` if the blocks do not divide."""
        decided = depth - self.stem_blocks
        if decided < 1 or decided % self.blocks_per_step:
            raise ValueError(
                f"{depth} blocks minus {self.stem_blocks} stem blocks must be a positive multiple of "
                f"blocks_per_step={self.blocks_per_step}"
            )
        return decided // self.blocks_per_step

    def blocks(self, step: int) -> range:
        """The blocks decision `step` sets."""
        start = self.stem_blocks + step * self.blocks_per_step
        return range(start, start + self.blocks_per_step)

    def supernet_kwargs(self) -> dict:
        """Keyword arguments of `vit.create_supernet` for a supernet that offers every ratio these decisions choose
        (grouped decisions down to keep 0.1 need a supernet built with those keep ratios)."""
        return {} if self.keep_ratios is None else {"keep_ratio_choices": self.keep_ratios}

    def fields(self, space: SearchSpace) -> tuple[str, ...]:
        """The names of a decision's fields, in action order."""
        return tuple(f.name for f in _layout(self, space, 0))

    def nvec(self, space: SearchSpace) -> tuple[int, ...]:
        """The number of choices of each field of a decision, the same at every step; a `ValueError` otherwise."""
        counts = {tuple(len(f.choices) for f in _layout(self, space, s)) for s in range(self.num_steps(space.depth))}
        if not self.grouped:  # a step's configuration runs at each of its blocks
            counts |= {space.num_choices(i) for i in range(self.stem_blocks, space.depth)}
        if len(counts) != 1:
            raise ValueError("the decided blocks must share their number of choices per field")
        return counts.pop()

    def check(self, space: SearchSpace) -> None:
        """Raise a `ValueError` naming what is missing unless `space` holds every configuration the decisions choose
        (so `vit.count_flops` and the supernet's forward take the subnets they make)."""
        self.nvec(space)
        if not self.grouped:
            return
        for step in range(self.num_steps(space.depth)):
            for f in _layout(self, space, step):
                missing = [c for c in f.choices if c not in getattr(space, f.field)[f.block]]
                if missing:
                    raise ValueError(
                        f"the supernet offers no {f.field} {missing} at block {f.block}, which these decisions "
                        f"choose: build it with {f.field}_choices={f.choices} (LoopShape.supernet_kwargs)"
                    )
        for block in range(self.stem_blocks, space.depth):
            for field in space.fields[2:]:
                if 1.0 not in getattr(space, field)[block]:
                    raise ValueError(f"block {block} offers no {field} 1.0 (no reduction) for grouped decisions")

    def decode(self, space: SearchSpace, step: int, indices: Sequence[int]) -> tuple[BlockConfig, ...]:
        """The configurations of the blocks decision `step` sets, from its choice indices (one per field); an
        `InvalidSubnetError` for a wrong number of indices or an index out of range."""
        blocks = self.blocks(step)
        if not self.grouped:
            return (space.config(blocks.start, indices),) * len(blocks)
        layout = _layout(self, space, step)
        if len(indices) != len(layout):
            raise InvalidSubnetError(f"expected {len(layout)} indices {tuple(f.name for f in layout)}, got {indices}")
        values = {b: {} for b in blocks}
        for f, i in zip(layout, indices):
            if not 0 <= int(i) < len(f.choices):
                raise InvalidSubnetError(f"{f.name} index {i} out of range [0, {len(f.choices)})")
            values[f.block][f.field] = f.choices[int(i)]
        return tuple(BlockConfig(**values[b]) for b in blocks)

    def subnet(self, space: SearchSpace, indices: Sequence[Sequence[int]]) -> Subnet:
        """The subnet of a whole inference: the stem at full width, then decision `t` at `indices[t]`."""
        steps = self.num_steps(space.depth)
        if len(indices) != steps:
            raise InvalidSubnetError(f"expected the indices of {steps} decisions, got {len(indices)}")
        largest = space.largest()
        decided = [c for t, row in enumerate(indices) for c in self.decode(space, t, row)]
        return Subnet((*largest[: self.stem_blocks], *decided))

    def sample(self, space: SearchSpace, rng: np.random.Generator | int | None = None) -> Subnet:
        """A subnet the decisions reach, every choice drawn uniformly."""
        rng = np.random.default_rng(rng)
        nvec = self.nvec(space)
        return self.subnet(space, [rng.integers(0, nvec).tolist() for _ in range(self.num_steps(space.depth))])

    def smallest(self, space: SearchSpace) -> Subnet:
        """The cheapest subnet the decisions reach: the stem, then every field at its first choice."""
        return self.subnet(space, [[0] * len(self.nvec(space))] * self.num_steps(space.depth))


@dataclass(frozen=True)
class _Field:
    """One field of a decision: its name, the `BlockConfig` field and block it sets, and its choices."""

    name: str
    field: str
    block: int
    choices: tuple


@functools.lru_cache(maxsize=256)
def _layout(shape: LoopShape, space: SearchSpace, step: int) -> tuple[_Field, ...]:
    """The fields of decision `step`, in action order (per-block decisions: those of the step's first block)."""
    blocks = shape.blocks(step)
    if not shape.grouped:
        return tuple(_Field(f, f, blocks.start, c) for f, c in zip(space.fields, space.choices(blocks.start)))
    out = []
    for first in blocks[:: shape.group_blocks]:
        for block in range(first, first + shape.group_blocks):
            j = block - blocks.start
            out += [_Field(f"{f}[{j}]", f, block, getattr(space, f)[block]) for f in ("heads", "mlp_hidden")]
        for f in space.fields[2:]:  # keep_ratio[, merge_ratio]: the group's reduction, at its first block
            choices = getattr(space, f)[first] if shape.keep_ratios is None else shape.keep_ratios
            out.append(_Field(f"{f}[{first - blocks.start}]", f, first, choices))
    return tuple(out)


#: The decision structures by name (`LoopShape.named`).
DECISIONS: dict[str, LoopShape] = {
    "per-block": LoopShape(),
    "grouped": LoopShape(stem_blocks=3, blocks_per_step=3, group_blocks=3, keep_ratios=GROUPED_KEEP_RATIOS),
    "one-shot": LoopShape(stem_blocks=3, blocks_per_step=9, group_blocks=3, keep_ratios=GROUPED_KEEP_RATIOS),
}


def log_price(price: Tensor) -> Tensor:
    """The log-price a decider reads, float32 (an observation space's bounds are computed with it too)."""
    return price.float().clamp_min(1e-12).log()


class InferenceLoop:
    """The inference of a batch of images, one decision at a time, with per-sample MACs.

    The loop holds the state of its current batch (`tokens`, `macs`, `choices`, `step_index`); `start` replaces it.
    It runs under `torch.inference_mode` and leaves the model's modes and `requires_grad` as they are.

    Args:
        model: the supernet.
        shape: where the decisions fall and what each sets; the model's search space must hold every configuration
            it chooses (`LoopShape.check`).
        execution: how a batch of per-sample configurations runs: `packed` (`vit.PackedBatch`) or `bucketed`
            (`vit.BucketedBatch`); the results are the same.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU; `vit.utils.autocast`); observations,
            logits and MACs stay float32/float64.
    """

    def __init__(
        self, model: ElasticViT, shape: LoopShape = LoopShape(), execution: str = "packed", amp: bool = False
    ) -> None:
        if execution not in TOKEN_BATCHES:
            raise ValueError(f"unknown execution {execution!r}; expected one of {', '.join(TOKEN_BATCHES)}")
        self.model = model
        self.shape = shape
        self.execution = execution
        self.amp = amp
        self.space = model.search_space
        self.num_steps = shape.num_steps(model.depth)
        shape.check(self.space)
        self.nvec: tuple[int, ...] = shape.nvec(self.space)
        self.fields: tuple[str, ...] = shape.fields(self.space)
        self.reference = self.space.largest()
        self.full_macs = count_flops(model)
        self._block_cache: dict[tuple[int, BlockConfig], int] = {}
        self._rest_cache: dict[tuple[int, int], int] = {}
        self._by_tokens: dict[BlockConfig, Tensor] = {}
        self.step_index = -1  # -1: not started; num_steps: done

    # --- MACs ledger: exact per-sample counts from (tokens, config), memoised -----------------------------------------

    def _block(self, n: int, config: BlockConfig) -> int:
        """MACs of a block entered with `n` patch tokens at `config`."""
        if (n, config) not in self._block_cache:
            self._block_cache[n, config] = block_macs(self.model, n, config)[0]
        return self._block_cache[n, config]

    def _block_macs(self, n: Tensor, configs: list[BlockConfig], code: Tensor) -> Tensor:
        """MACs (B,) float64 of a block entered with n (B,) patch tokens, sample b at `configs[code[b]]`."""
        for c in configs:
            if c not in self._by_tokens:
                counts = [self._block(m, c) for m in range(self.model.num_patches + 1)]
                self._by_tokens[c] = torch.tensor(counts, dtype=torch.float64, device=n.device)
        table = torch.stack([self._by_tokens[c] for c in configs])  # (distinct configs, N + 1)
        return table[code, n]

    def _rest(self, start: int, n: int) -> int:
        """MACs of blocks `start:` at the reference subnet (no reduction: tokens stay `n`) and the head."""
        if (start, n) not in self._rest_cache:
            blocks = sum(self._block(n, self.reference[i]) for i in range(start, self.model.depth))
            self._rest_cache[start, n] = blocks + head_macs(self.model)
        return self._rest_cache[start, n]

    def completion_macs(self) -> Tensor:
        """MACs (B,) float64 of `complete` per sample: the rest of the blocks at the reference subnet and the head.

        Zero once the batch is done (the ledger already holds the head)."""
        if self.done:
            return torch.zeros_like(self.macs)
        end = self.next_block
        rest = [self._rest(end, n) for n in self.tokens.num_patches().tolist()]
        return torch.tensor(rest, dtype=torch.float64, device=self.macs.device)

    # --- the loop -----------------------------------------------------------------------------------------------------

    @property
    def next_block(self) -> int:
        """The first block the next decision sets (the model's depth once done)."""
        return self.shape.stem_blocks + self.step_index * self.shape.blocks_per_step

    @property
    def done(self) -> bool:
        """Whether every decision of the current batch has run."""
        return self.step_index == self.num_steps

    @torch.inference_mode()
    def start(self, images: Tensor) -> None:
        """Start a batch: embed `images` (B, C, H, W) (on the model's device) and run the stem at full width."""
        B = images.shape[0]
        if B == 0:
            raise ValueError("no images: a batch needs at least one image")
        stem = self.shape.stem_blocks
        with autocast(images.device, self.amp):
            tokens = TOKEN_BATCHES[self.execution](self.model.embed(images))
            for i in range(stem):
                tokens = tokens.apply_block(self.model, i, self.reference[i])
        self.tokens = tokens
        n0 = self.model.num_patches
        spent = embed_macs(self.model) + sum(self._block(n0, self.reference[i]) for i in range(stem))
        self.macs = torch.full((B,), float(spent), dtype=torch.float64, device=images.device)
        self.choices: list[list[BlockConfig]] = [list(self.reference[:stem]) for _ in range(B)]
        self.step_index = 0

    def configs(self, indices: Tensor) -> list[tuple[BlockConfig, ...]]:
        """The configurations of the next decision from per-sample choice indices (B, fields) int64: per sample, one
        per block of the step (see `LoopShape.decode`, which raises `InvalidSubnetError` for an index out of
        range)."""
        rows = list(map(tuple, indices.tolist()))
        decoded = {row: self.shape.decode(self.space, self.step_index, row) for row in dict.fromkeys(rows)}  # once each
        return [decoded[row] for row in rows]

    @torch.inference_mode()
    def advance(self, configs: Sequence[BlockConfig | Sequence[BlockConfig]]) -> bool:
        """Run the blocks of the next decision, sample b at `configs[b]`: one `BlockConfig` for every block of the
        step, or one per block (as `configs` decodes them); True when the batch is done.

        Once done, `macs` includes the head, so it is each image's whole cost.
        """
        if self.step_index < 0:
            raise RuntimeError("call start() before advance()")
        if self.done:
            raise RuntimeError("the batch is done; call start() to start a new one")
        blocks = self.shape.blocks(self.step_index)
        per_sample = [(c,) * len(blocks) if isinstance(c, BlockConfig) else tuple(c) for c in configs]
        if len(per_sample) != self.tokens.batch_size:
            raise ValueError(f"expected {self.tokens.batch_size} configurations, got {len(per_sample)}")
        if any(len(c) != len(blocks) for c in per_sample):
            raise ValueError(f"expected one configuration per image, or one per block ({len(blocks)}) of the step")
        for k, i in enumerate(blocks):
            column = [c[k] for c in per_sample]
            codes: dict[BlockConfig, int] = {}
            code = long_tensor([codes.setdefault(c, len(codes)) for c in column], self.macs.device)
            with single_threaded(self.macs.device):
                self.macs += self._block_macs(self.tokens.num_patches(), list(codes), code)
            with autocast(self.macs.device, self.amp):
                self.tokens = self.tokens.apply_block(self.model, i, column)
            for choice, c in zip(self.choices, column):
                choice.append(c)
        self.step_index += 1
        if self.done:
            self.macs += head_macs(self.model)
        return self.done

    @torch.inference_mode()
    def complete(self) -> Tensor:
        """Class logits (B, num_classes), float32: the rest of the blocks run from the current tokens at the
        reference subnet; once done, the batch's own logits."""
        if self.step_index < 0:
            raise RuntimeError("call start() before complete()")
        with autocast(self.macs.device, self.amp):
            return self.model.forward_tokens(self.tokens, self.next_block).float()

    def observe(self, price: Tensor) -> dict[str, Tensor]:
        """What a decider reads before the next decision. `cls` (B, C): CLS entering the next block; `progress`
        (B, 3): decisions made / all, MACs spent / full MACs, patch tokens alive / initial; `price` (B, 1): log of
        each image's compute price `price` (B,)."""
        with single_threaded(self.macs.device):  # small operations: one thread is faster
            tokens = self.tokens.num_patches().float() / self.model.num_patches
            B = tokens.shape[0]
            progress = torch.stack(
                [
                    torch.full_like(tokens, self.step_index / self.num_steps),
                    (self.macs / self.full_macs).float(),
                    tokens,
                ],
                dim=1,
            )
            return {"cls": self.tokens.cls().float(), "progress": progress, "price": log_price(price).view(B, 1)}


__all__ = ["DECISIONS", "GROUPED_KEEP_RATIOS", "InferenceLoop", "LoopShape", "log_price"]

"""The block-by-block inference loop: a batch of images run through the supernet one decision at a time.

`InferenceLoop.start` embeds the images and runs the stem at full width; `advance` runs the blocks of the next
decision at one configuration per image; `complete` finishes the inference from the current tokens with the
reference subnet (full width, no token reduction). A per-sample ledger counts the MACs spent (`vit.flops`), exact
for each image's configurations and token counts. The env (`prance_env`) and the deployed `agents.AdaptiveViT` are
its clients: the first pays rewards between the steps, the second asks a policy for the next configurations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import BlockConfig
from .flops import block_macs, count_flops, embed_macs, head_macs
from .supernet import TOKEN_BATCHES, ElasticViT
from .utils import autocast, long_tensor, single_threaded


@dataclass(frozen=True)
class LoopShape:
    """Where the decisions fall: `stem_blocks` blocks at full width, then one decision per `blocks_per_step` blocks.

    Attributes:
        stem_blocks: blocks run at full width when the loop starts, so the first decision depends on the image.
        blocks_per_step: blocks set by one decision (all run at the decision's configuration).
    """

    stem_blocks: int = 1
    blocks_per_step: int = 1

    def __post_init__(self) -> None:
        if self.stem_blocks < 0 or self.blocks_per_step < 1:
            raise ValueError("stem_blocks must be >= 0 and blocks_per_step >= 1")

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


def log_price(price: Tensor) -> Tensor:
    """The log-price a decider reads, float32 (an observation space's bounds are computed with it too)."""
    return price.float().clamp_min(1e-12).log()


class InferenceLoop:
    """The inference of a batch of images, one decision at a time, with per-sample MACs.

    The loop holds the state of its current batch (`tokens`, `macs`, `choices`, `step_index`); `start` replaces it.
    It runs under `torch.inference_mode` and leaves the model's modes and `requires_grad` as they are.

    Args:
        model: the supernet.
        shape: where the decisions fall.
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
        counts = {self.space.num_choices(i) for i in range(shape.stem_blocks, model.depth)}
        if len(counts) != 1:
            raise ValueError("the decided blocks must share their number of choices per field")
        self.nvec: tuple[int, ...] = counts.pop()
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

    def configs(self, indices: Tensor) -> list[BlockConfig]:
        """The configurations of the next decision from per-sample choice indices (B, fields) int64 (see
        `SearchSpace.config`, which raises `InvalidSubnetError` for an index out of range)."""
        block = self.next_block
        rows = list(map(tuple, indices.tolist()))
        decoded = {row: self.space.config(block, row) for row in dict.fromkeys(rows)}  # each distinct row once
        return [decoded[row] for row in rows]

    @torch.inference_mode()
    def advance(self, configs: Sequence[BlockConfig]) -> bool:
        """Run the blocks of the next decision, sample b at `configs[b]`; True when the batch is done.

        Once done, `macs` includes the head, so it is each image's whole cost.
        """
        if self.step_index < 0:
            raise RuntimeError("call start() before advance()")
        if self.done:
            raise RuntimeError("the batch is done; call start() to start a new one")
        configs = list(configs)
        if len(configs) != self.tokens.batch_size:
            raise ValueError(f"expected {self.tokens.batch_size} configurations, got {len(configs)}")
        codes: dict[BlockConfig, int] = {}
        code = long_tensor([codes.setdefault(c, len(codes)) for c in configs], self.macs.device)
        distinct = list(codes)
        for i in self.shape.blocks(self.step_index):
            with single_threaded(self.macs.device):
                self.macs += self._block_macs(self.tokens.num_patches(), distinct, code)
            with autocast(self.macs.device, self.amp):
                self.tokens = self.tokens.apply_block(self.model, i, configs)
            for choice, c in zip(self.choices, configs):
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


__all__ = ["InferenceLoop", "LoopShape", "log_price"]

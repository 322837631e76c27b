"""The block-by-block inference of a batch of images: where the decisions fall, and a stateless runner.

`DecisionSchedule` says where the decisions fall and what each one sets: per block (ours) or per group of blocks
(PRANCE's). `InferenceRunner` runs a batch through the supernet one decision at a time on an explicit, immutable
`InferenceState`: `start` embeds the images and runs the stem at full width, `advance` runs the blocks of the next
decision at one configuration per image and block, and `complete` finishes the inference from the state's tokens
with the reference subnet (full width, no token reduction). A per-sample ledger counts the MACs spent (`vit.flops`),
exact for each image's configurations and token counts. The env (`prance_env`), the deployed `agents.AdaptiveViT`,
the token-reduction heuristics, the token-map renderer and joint fine-tuning each hold a runner: the env pays
rewards between the steps, `AdaptiveViT` asks a policy for the next configurations.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .bucketed import BucketedBatch
from .config import BlockConfig, InvalidSubnetError, SearchSpace, Subnet
from .flops import block_macs, count_macs, embed_macs, head_macs
from .official import block_macs as official_block_macs
from .official import count_macs as official_count_macs
from .official import embed_macs as official_embed_macs
from .official import head_macs as official_head_macs
from .official import output_width
from .packed import PackedBatch
from .supernet import LAYOUTS, ElasticViT
from .utils import autocast, long_tensor, single_threaded

#: The keep ratios of PRANCE's grouped decisions: one token reduction per group of blocks, keeping down to a tenth.
GROUPED_KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RATIO_FIELDS = ("keep_ratio", "merge_ratio")


def reduces_tokens(field: str) -> bool:
    """Whether the decision field named `field` (`keep_ratio`, `merge_ratio[3]`, ...) sets a token reduction."""
    return field.startswith(RATIO_FIELDS)


@dataclass(frozen=True)
class DecisionSchedule:
    """Where the decisions fall and what each one sets.

    `stem_blocks` blocks run at full width when the inference starts, so the first decision depends on the image;
    then each decision sets the next `blocks_per_step` blocks.

    - Per-block decisions (`group_blocks=0`): a decision is one configuration (the search space's fields: heads, MLP
      width, keep ratio[, merge ratio]) that every block of its step runs.
    - Grouped decisions (`group_blocks=k`, PRANCE's): the blocks of a step fall in groups of k; a decision sets the
      widths of every block (fields `heads[j]`, `mlp_hidden[j]`, j the block's place in the step; `embed_dim[j]`,
      `mlp_ratio[j]` on an official meta-network, `vit.official`) and one token reduction per group, at its first
      block (`keep_ratio[j]`, and `merge_ratio[j]` in `prune_merge` mode, from `keep_ratios`); the other blocks of
      the group keep every token.

    `DecisionSchedule.named` gives the schedules by name: `per-block` (the default: a 1-block stem, a decision before
    every block), `grouped` (the paper's: a 3-block stem, decisions at blocks 3, 6 and 9, each for a group of 3
    blocks, keep ratios 0.1 to 1.0) and `one-shot` (the same choices for the 3 groups of a 12-block model in one
    decision read after the stem: the baseline without an MDP).

    Attributes:
        stem_blocks: blocks run at full width when the inference starts.
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
            ratios = tuple(float(r) for r in self.keep_ratios)  # a JSON list reads back as the same schedule
            object.__setattr__(self, "keep_ratios", ratios)
            if not self.group_blocks:
                raise ValueError("keep_ratios are for grouped decisions (group_blocks > 0)")
            ascending = all(a < b for a, b in zip(ratios, ratios[1:]))
            if not ratios or not ascending or ratios[0] <= 0.0 or ratios[-1] != 1.0:
                raise ValueError(f"keep_ratios must ascend in (0, 1] and end with 1.0, got {ratios}")

    @classmethod
    def named(
        cls, decisions: str | DecisionSchedule, stem_blocks: int | None = None, blocks_per_step: int | None = None
    ) -> DecisionSchedule:
        """The schedule named `decisions` (one of `DECISIONS`; a `DecisionSchedule` is taken as it is), with
        `stem_blocks` and `blocks_per_step` replaced where given."""
        if isinstance(decisions, DecisionSchedule):
            schedule = decisions
        elif decisions in DECISIONS:
            schedule = DECISIONS[decisions]
        else:
            raise ValueError(f"unknown decisions {decisions!r}; expected one of {', '.join(DECISIONS)}")
        given = {"stem_blocks": stem_blocks, "blocks_per_step": blocks_per_step}
        return replace(schedule, **{key: value for key, value in given.items() if value is not None})

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
        (so `vit.count_macs` and the supernet's forward take the subnets they make)."""
        self.nvec(space)
        if not self.grouped:
            return
        for step in range(self.num_steps(space.depth)):
            for f in _layout(self, space, step):
                missing = [c for c in f.choices if not space.offers(f.field, f.block, c)]
                if missing:
                    raise ValueError(
                        f"the supernet offers no {f.field} {missing} at block {f.block}, which these decisions "
                        f"choose: build it with {f.field}_choices={f.choices} (DecisionSchedule.supernet_kwargs)"
                    )
        for block in range(self.stem_blocks, space.depth):
            for field in space.fields[2:]:
                if not space.offers(field, block, 1.0):
                    raise ValueError(f"block {block} offers no {field} 1.0 (no reduction) for grouped decisions")

    def decode(self, space: SearchSpace, step: int, indices: Sequence[int]) -> tuple[BlockConfig, ...]:
        """The configurations of the blocks decision `step` sets, from its choice indices (one per field, each in
        range: `prance_env.mdp.ActionCodec` checks actions before they get here)."""
        blocks = self.blocks(step)
        if not self.grouped:
            return (space.config(blocks.start, indices),) * len(blocks)
        values = {b: {} for b in blocks}
        for f, i in zip(_layout(self, space, step), indices):
            values[f.block][f.field] = f.choices[int(i)]
        return tuple(space.from_values(values[b]) for b in blocks)

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
def _layout(schedule: DecisionSchedule, space: SearchSpace, step: int) -> tuple[_Field, ...]:
    """The fields of decision `step`, in action order (per-block decisions: those of the step's first block)."""
    blocks = schedule.blocks(step)
    if not schedule.grouped:
        return tuple(_Field(f, f, blocks.start, c) for f, c in zip(space.fields, space.choices(blocks.start)))
    out = []
    for first in blocks[:: schedule.group_blocks]:
        for block in range(first, first + schedule.group_blocks):
            j = block - blocks.start
            out += [_Field(f"{f}[{j}]", f, block, getattr(space, f)[block]) for f in space.fields[:2]]
        for f in space.fields[2:]:  # keep_ratio[, merge_ratio]: the group's reduction, at its first block
            choices = getattr(space, f)[first] if schedule.keep_ratios is None else schedule.keep_ratios
            out.append(_Field(f"{f}[{first - blocks.start}]", f, first, choices))
    return tuple(out)


#: The decision schedules by name (`DecisionSchedule.named`).
DECISIONS: dict[str, DecisionSchedule] = {
    "per-block": DecisionSchedule(),
    "grouped": DecisionSchedule(stem_blocks=3, blocks_per_step=3, group_blocks=3, keep_ratios=GROUPED_KEEP_RATIOS),
    "one-shot": DecisionSchedule(stem_blocks=3, blocks_per_step=9, group_blocks=3, keep_ratios=GROUPED_KEEP_RATIOS),
}


def log_price(price: Tensor) -> Tensor:
    """The log-price a decider reads, float32 (an observation space's bounds are computed with it too)."""
    return price.float().clamp_min(1e-12).log()


@dataclass(frozen=True)
class InferenceState:
    """Where the inference of a batch of B images stands: what `InferenceRunner` takes and returns.

    Immutable: the runner returns a new state and leaves the one it was given as it was, so a client can branch (run
    the rest of the network from here) without copying.

    Attributes:
        tokens: the tokens entering the next block (`vit.PackedBatch` or `vit.BucketedBatch`).
        macs: (B,) float64, the MACs spent on each image so far (the head's included once `done`).
        step: the decisions taken.
        num_steps: the decisions of a whole inference.
        blocks: per block run so far (stem included), each image's configuration: `blocks[i][b]`.
    """

    tokens: PackedBatch | BucketedBatch
    macs: Tensor
    step: int
    num_steps: int
    blocks: tuple[tuple[BlockConfig, ...], ...]

    @property
    def batch_size(self) -> int:
        """B, the number of images."""
        return self.tokens.batch_size

    @property
    def done(self) -> bool:
        """Whether every decision has run."""
        return self.step == self.num_steps

    @property
    def next_block(self) -> int:
        """The first block the next decision sets (the model's depth once done)."""
        return len(self.blocks)

    def subnets(self) -> list[tuple[BlockConfig, ...]]:
        """Per image, the configurations of the blocks run so far (a whole `vit.Subnet`'s once done)."""
        return list(zip(*self.blocks)) if self.blocks else [()] * self.batch_size


def _step_configs(schedule: DecisionSchedule, state: InferenceState, configs) -> tuple[range, list[tuple]]:
    """The blocks of the state's next decision and each image's configuration of each of them, from one
    `BlockConfig` or one per block per image; a `ValueError` (or `RuntimeError` once done) otherwise."""
    if state.done:
        raise RuntimeError("the inference is done: start a new one")
    blocks = schedule.blocks(state.step)
    per_sample = [(c,) * len(blocks) if isinstance(c, BlockConfig) else tuple(c) for c in configs]
    if len(per_sample) != state.batch_size:
        raise ValueError(f"expected {state.batch_size} configurations, got {len(per_sample)}")
    if any(len(c) != len(blocks) for c in per_sample):
        raise ValueError(f"expected one configuration per image, or one per block ({len(blocks)}) of the step")
    return blocks, per_sample


class InferenceRunner:
    """Runs the inference of a batch one decision at a time, with per-sample MACs, on explicit states.

    Stateless between calls: every call takes an `InferenceState` and returns a new one (or what it computes from
    it); what the runner keeps are memoised MACs counts. It runs under `torch.inference_mode` and leaves the model's
    modes and `requires_grad` as they are.

    Args:
        model: the supernet.
        schedule: where the decisions fall and what each sets (the runner runs the configurations it is given;
            `prance_env.mdp.ActionCodec` checks that the search space holds every one the decisions choose).
        layout: how a batch of per-sample configurations is held and run: `packed` (`vit.PackedBatch`) or
            `bucketed` (`vit.BucketedBatch`); the results are the same.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU; `vit.utils.autocast`); observations,
            logits and MACs stay float32/float64.
        token_mode: how the blocks reduce tokens, for runs of configurations outside the search space (the
            full-width token-reduction heuristics run every model in `prune_merge` mode); None: the model's.
    """

    def __init__(
        self,
        model: ElasticViT,
        schedule: DecisionSchedule = DecisionSchedule(),
        layout: str = "packed",
        amp: bool = False,
        token_mode: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.model = model
        self.schedule = schedule
        self.layout = layout
        self.amp = amp
        self.token_mode = token_mode or model.token_mode
        self.num_steps = schedule.num_steps(model.depth)
        self.reference = model.search_space.largest()
        self.full_macs = count_macs(model)
        self._block_cache: dict[tuple[int, BlockConfig], int] = {}
        self._rest_cache: dict[tuple[int, int], int] = {}
        self._by_tokens: dict[BlockConfig, Tensor] = {}

    # --- MACs ledger: exact per-sample counts from (tokens, config), memoised -----------------------------------------

    def _block(self, n: int, config: BlockConfig) -> int:
        """MACs of a block entered with `n` patch tokens at `config`."""
        if (n, config) not in self._block_cache:
            self._block_cache[n, config] = block_macs(self.model, n, config, self.token_mode)[0]
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

    def completion_macs(self, state: InferenceState) -> Tensor:
        """MACs (B,) float64 of `complete` per sample: the rest of the blocks at the reference subnet and the head;
        zero once the state is done (its ledger holds the head already)."""
        if state.done:
            return torch.zeros_like(state.macs)
        rest = [self._rest(state.next_block, n) for n in state.tokens.num_patches().tolist()]
        return torch.tensor(rest, dtype=torch.float64, device=state.macs.device)

    # --- the inference --------------------------------------------------------------------------------------------

    def start(self, images: Tensor, trace_sources: bool = False) -> InferenceState:
        """Embed `images` (B, C, H, W) (on the model's device) and run the stem at full width.

        `trace_sources` (packed layout): the tokens carry ToMe's source map, which original tokens each holds
        (`PackedBatch.source`), for token maps."""
        with torch.inference_mode():
            B = images.shape[0]
            if B == 0:
                raise ValueError("no images: a batch needs at least one image")
            model, stem = self.model, self.schedule.stem_blocks
            with autocast(images.device, self.amp):
                x = model.embed(images)
                if trace_sources:
                    if self.layout != "packed":
                        raise ValueError("sources are traced on the packed layout only")
                    source = torch.eye(x.shape[1], device=x.device, dtype=x.dtype).expand(B, -1, -1)
                    tokens = PackedBatch(x, source=source)
                else:
                    tokens = PackedBatch(x) if self.layout == "packed" else BucketedBatch(x)
                for i in range(stem):
                    tokens = model.run_block(i, tokens, self.reference[i], self.token_mode)
            n0 = model.num_patches
            spent = embed_macs(model) + sum(self._block(n0, self.reference[i]) for i in range(stem))
            macs = torch.full((B,), float(spent), dtype=torch.float64, device=images.device)
            blocks = tuple((self.reference[i],) * B for i in range(stem))
            return InferenceState(tokens, macs, 0, self.num_steps, blocks)

    def advance(self, state: InferenceState, configs: Sequence[BlockConfig | Sequence[BlockConfig]]) -> InferenceState:
        """The state after the blocks of the next decision, sample b at `configs[b]`: one `BlockConfig` for every
        block of the step, or one per block (as `prance_env.mdp.ActionCodec` decodes actions).

        Once done, the state's `macs` include the head: each image's whole cost.
        """
        blocks, per_sample = _step_configs(self.schedule, state, configs)
        with torch.inference_mode():
            tokens, macs, run = state.tokens, state.macs, list(state.blocks)
            for k, i in enumerate(blocks):
                column = tuple(c[k] for c in per_sample)
                codes: dict[BlockConfig, int] = {}
                code = long_tensor([codes.setdefault(c, len(codes)) for c in column], macs.device)
                with single_threaded(macs.device):
                    macs = macs + self._block_macs(tokens.num_patches(), list(codes), code)
                with autocast(macs.device, self.amp):
                    tokens = self.model.run_block(i, tokens, column, self.token_mode)
                run.append(column)
            step = state.step + 1
            if step == self.num_steps:
                macs = macs + head_macs(self.model)
            return InferenceState(tokens, macs, step, self.num_steps, tuple(run))

    def complete(self, state: InferenceState) -> Tensor:
        """Class logits (B, num_classes), float32: the rest of the blocks run from the state's tokens at the
        reference subnet; once done, the batch's own logits."""
        with torch.inference_mode():
            with autocast(state.macs.device, self.amp):
                return self.model.forward_tokens(state.tokens, state.next_block, token_mode=self.token_mode).float()

    def observe(self, state: InferenceState, price: Tensor) -> dict[str, Tensor]:
        """What a decider reads before the next decision. `cls` (B, C): CLS entering the next block; `progress`
        (B, 3): decisions made / all, MACs spent / full MACs, patch tokens alive / initial; `price` (B, 1): log of
        each image's compute price `price` (B,)."""
        with single_threaded(state.macs.device):  # small operations: one thread is faster
            tokens = state.tokens.num_patches().float() / self.model.num_patches
            B = tokens.shape[0]
            progress = torch.stack(
                [
                    torch.full_like(tokens, state.step / self.num_steps),
                    (state.macs / self.full_macs).float(),
                    tokens,
                ],
                dim=1,
            )
            return {"cls": state.tokens.cls().float(), "progress": progress, "price": log_price(price).view(B, 1)}


class OfficialRunner:
    """`InferenceRunner`'s interface over an official PRANCE meta-network (`vit.official.OfficialViT`): the same
    states, ledger and observations, so the env, `agents.AdaptiveViT` and the heuristics run it unchanged.

    The decisions fall where the release's do, at blocks 3, 6 and 9 in groups of three (`grouped`; `one-shot` takes
    the three groups at once). The tokens are an `OfficialTokens`, images sharing a block's configuration and token
    count run together; an image's output width at a group's last block is the widest choice, as the release knows
    no more when it runs it. `observe` adds `official_state` (B, 197), the release's selector state: the key profile
    of the block before the decision. The MACs are `vit.official.count_macs`'s, block by block.
    """

    def __init__(
        self,
        model,
        schedule: DecisionSchedule | None = None,
        layout: str = "bucketed",
        amp: bool = False,
        token_mode: str | None = None,
    ) -> None:
        from .official import DECISION_BLOCKS, GROUP

        schedule = DECISIONS["grouped"] if schedule is None else schedule
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        if token_mode not in (None, model.token_mode):
            raise ValueError(f"an official meta-network runs its own token mode, {model.token_mode!r}")
        starts = [schedule.stem_blocks + k * GROUP for k in range(len(DECISION_BLOCKS))]
        if schedule.group_blocks != GROUP or tuple(starts) != DECISION_BLOCKS or schedule.blocks_per_step % GROUP:
            raise ValueError(
                f"an official meta-network decides at blocks {DECISION_BLOCKS} in groups of {GROUP}: decisions "
                "'grouped' or 'one-shot'"
            )
        self.model, self.schedule, self.layout, self.amp = model, schedule, layout, amp
        self.token_mode = model.token_mode
        self.num_steps = schedule.num_steps(model.depth)
        self.reference = model.search_space.largest()
        self.full_macs = official_count_macs(model)
        self._widest = model.shape.embed_choices[-1]
        self._block_cache: dict[tuple, tuple[int, int]] = {}
        self._rest_cache: dict[tuple[int, int], int] = {}

    def _block(self, i: int, config: BlockConfig, width: int, out: int, tokens: int) -> tuple[int, int]:
        key = (i, config, width, out, tokens)
        if key not in self._block_cache:
            self._block_cache[key] = official_block_macs(self.model, i, config, width, out, tokens)
        return self._block_cache[key]

    def _rest(self, start: int, tokens: int) -> int:
        """MACs of blocks `start:` at the reference subnet from `tokens` tokens (CLS included), and the head."""
        if (start, tokens) not in self._rest_cache:
            ref, total, width, n = self.reference, 0, self._width_into(self.reference, start), tokens
            for i in range(start, self.model.depth):
                out = output_width(ref, i, self._widest)
                macs, n = self._block(i, ref[i], width, out, n)
                total, width = total + macs, out
            self._rest_cache[start, tokens] = total + official_head_macs(self.model, ref[-1].embed_dim)
        return self._rest_cache[start, tokens]

    def _width_into(self, subnet, i: int) -> int:
        """The width of the tokens entering block `i`: the previous block's output width (the first's embedding
        width for block 0)."""
        return subnet[0].embed_dim if i == 0 else output_width(subnet, i - 1, self._widest)

    def completion_macs(self, state: InferenceState) -> Tensor:
        """MACs (B,) float64 of `complete` per sample (zero once done)."""
        if state.done:
            return torch.zeros_like(state.macs)
        tokens = (state.tokens.num_patches() + 1).tolist()
        rest = [self._rest(state.next_block, n) for n in tokens]
        return torch.tensor(rest, dtype=torch.float64, device=state.macs.device)

    def official_flops(self, state: InferenceState) -> Tensor:
        """(B,) float64: the release's FLOPs count (`vit.official.get_complexity`) of each image's configurations
        so far completed at the reference subnet (what `complete` runs)."""
        from .official import get_complexity

        subnets = [self._padded(r) for r in state.subnets()]
        counts = {s: get_complexity(self.model, s) for s in dict.fromkeys(subnets)}
        return torch.tensor([counts[s] for s in subnets], dtype=torch.float64, device=state.macs.device)

    def _padded(self, blocks: Sequence[BlockConfig]) -> Subnet:
        """An image's configurations so far, the reference's after them (read for output widths only)."""
        return Subnet((*blocks, *self.reference[len(blocks) :]))

    def start(self, images: Tensor, trace_sources: bool = False) -> InferenceState:
        """Embed `images` at the reference's first width and run the stem at the reference subnet."""
        if trace_sources:
            raise ValueError("an official meta-network traces no token sources")
        with torch.inference_mode():
            B = images.shape[0]
            if B == 0:
                raise ValueError("no images: a batch needs at least one image")
            stem, ref = self.schedule.stem_blocks, self.reference
            with autocast(images.device, self.amp):
                tokens = self.model.embed(images, ref[0].embed_dim)
                tokens = self.model.run_blocks(tokens, [ref] * B, stop=stem)
            spent, n = official_embed_macs(self.model, ref[0].embed_dim), self.model.num_tokens
            for i in range(stem):
                macs, n = self._block(i, ref[i], self._width_into(ref, i), output_width(ref, i, self._widest), n)
                spent += macs
            macs = torch.full((B,), float(spent), dtype=torch.float64, device=images.device)
            return InferenceState(tokens, macs, 0, self.num_steps, tuple((ref[i],) * B for i in range(stem)))

    def advance(self, state: InferenceState, configs: Sequence[BlockConfig | Sequence[BlockConfig]]) -> InferenceState:
        """The state after the blocks of the next decision, image b at `configs[b]` (one per block of the step, or
        one for all of them); checked against the meta-network's search space."""
        blocks, per_sample = _step_configs(self.schedule, state, configs)
        space = self.model.search_space
        for column in dict.fromkeys(per_sample):
            for i, config in zip(blocks, column):
                space.check(i, config)
        with torch.inference_mode():
            run = [(*row, *step) for row, step in zip(state.subnets(), per_sample)]
            subnets = [self._padded(r) for r in run]
            tokens = (state.tokens.num_patches() + 1).tolist()
            spent = []
            for subnet, n in zip(subnets, tokens):
                macs = 0
                for i in blocks:
                    out = output_width(subnet, i, self._widest)
                    m, n = self._block(i, subnet[i], self._width_into(subnet, i), out, n)
                    macs += m
                spent.append(macs)
            macs = state.macs + torch.tensor(spent, dtype=torch.float64, device=state.macs.device)
            with autocast(state.macs.device, self.amp):
                out_tokens = self.model.run_blocks(state.tokens, subnets, stop=blocks.stop)
            step = state.step + 1
            if step == self.num_steps:
                macs = macs + torch.tensor(
                    [official_head_macs(self.model, s[-1].embed_dim) for s in subnets], dtype=torch.float64
                ).to(macs.device)
            columns = tuple(zip(*per_sample))
            return InferenceState(out_tokens, macs, step, self.num_steps, (*state.blocks, *columns))

    def complete(self, state: InferenceState) -> Tensor:
        """Class logits (B, num_classes), float32: the rest of the blocks at the reference subnet."""
        with torch.inference_mode():
            tokens = state.tokens
            with autocast(state.macs.device, self.amp):
                if not state.done:
                    tokens = self.model.run_blocks(tokens, [self.reference] * state.batch_size)
                return self.model.classify(tokens).float()

    def observe(self, state: InferenceState, price: Tensor) -> dict[str, Tensor]:
        """`InferenceRunner.observe`'s `cls` (zero-padded to the super width), `progress` and `price`, and
        `official_state` (B, 197)."""
        with single_threaded(state.macs.device):
            tokens = state.tokens.num_patches().float() / self.model.num_patches
            B = tokens.shape[0]
            progress = torch.stack(
                [torch.full_like(tokens, state.step / self.num_steps), (state.macs / self.full_macs).float(), tokens],
                dim=1,
            )
            return {
                "cls": state.tokens.cls(self.model.embed_dim).float(),
                "progress": progress,
                "price": log_price(price).view(B, 1),
                "official_state": state.tokens.state().float(),
            }


def make_runner(model, schedule: DecisionSchedule | None = None, layout: str = "packed", amp: bool = False, **kwargs):
    """The runner of `model`: an `OfficialRunner` for an official meta-network, else an `InferenceRunner`;
    `schedule` None is the model's default (per block; the release's grouped decisions for an official one)."""
    from .official import OfficialViT

    if isinstance(model, OfficialViT):
        return OfficialRunner(model, schedule, layout, amp, **kwargs)
    return InferenceRunner(model, DecisionSchedule() if schedule is None else schedule, layout, amp, **kwargs)


def __getattr__(name: str):
    if name == "LoopShape":
        warnings.warn("vit.inference.LoopShape is now DecisionSchedule", DeprecationWarning, stacklevel=2)
        return DecisionSchedule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DECISIONS",
    "GROUPED_KEEP_RATIOS",
    "DecisionSchedule",
    "InferenceRunner",
    "InferenceState",
    "OfficialRunner",
    "make_runner",
    "log_price",
    "reduces_tokens",
]

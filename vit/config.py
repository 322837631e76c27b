"""Configurations of the elastic ViT: one block's widths and keep ratios, a subnet, and a search space.

A `BlockConfig` says how much of one block runs: the number of attention heads, the MLP hidden width and the
token keep ratio(s). A `Subnet` is one `BlockConfig` per block. A `SearchSpace` holds the choices per block and is
the one place that checks, samples, indexes and reduces configurations, so model, FLOPs and env code only ever
see valid `Subnet`s. `channel_statistics` fits a preprocessing config's per-channel mean and std to a model's
input channels.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

TOKEN_MODES = ("prune", "merge", "prune_merge")


def check_token_mode(token_mode: str) -> str:
    """Return `token_mode` if it is one of `TOKEN_MODES`, else raise a `ValueError` naming the valid ones."""
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"unknown token_mode {token_mode!r}; expected one of {', '.join(TOKEN_MODES)}")
    return token_mode


def channel_statistics(values: tuple[float, ...] | list[float], channels: int) -> tuple[float, ...]:
    """Per-channel statistics (a mean or a std) for images of `channels` channels: `values` when they fit, else
    their average on every channel (e.g. ImageNet's RGB statistics for grey images)."""
    values = tuple(float(v) for v in values)
    return values if len(values) == channels else (sum(values) / len(values),) * channels


class InvalidSubnetError(ValueError):
    """A subnet (or an action decoded into one) that lies outside the model's search space."""


@dataclass(frozen=True)
class BlockConfig:
    """How much of one transformer block runs.

    Attributes:
        heads: number of active attention heads (a prefix of the block's heads; the head dim is fixed).
        mlp_hidden: active MLP hidden width (a prefix of `fc1`'s rows and `fc2`'s columns).
        keep_ratio: fraction of patch tokens kept after attention (`prune` or `merge`; in `prune_merge`, the
            pruning ratio). 1.0 keeps all tokens.
        merge_ratio: `prune_merge` only: fraction of the surviving patch tokens kept after merging.
        embed_dim: the block's embedding width (a prefix of the residual stream's channels), for supernets with an
            elastic embedding width (`vit.official`); None: the model's one width.
    """

    heads: int
    mlp_hidden: int
    keep_ratio: float = 1.0
    merge_ratio: float = 1.0
    embed_dim: int | None = None

    def __str__(self) -> str:
        ratios = f"{self.keep_ratio:g}" if self.merge_ratio == 1.0 else f"{self.keep_ratio:g}/{self.merge_ratio:g}"
        embed = "" if self.embed_dim is None else f"e{self.embed_dim}-"
        return f"{embed}h{self.heads}-m{self.mlp_hidden}-r{ratios}"


@dataclass(frozen=True)
class Subnet:
    """One `BlockConfig` per block of the supernet."""

    blocks: tuple[BlockConfig, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> BlockConfig:
        return self.blocks[i]

    def __iter__(self) -> Iterator[BlockConfig]:
        return iter(self.blocks)

    def __str__(self) -> str:
        return " ".join(str(b) for b in self.blocks)


def _ascending(name: str, block: int, values: Sequence) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"block {block}: no {name} choices")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"block {block}: {name} choices must be strictly ascending, got {values}")
    return values


_BLOCK_PATTERN = re.compile(r"(?:e(\d+)-)?h(\d+)-m(\d+)-r([0-9.]+)(?:/([0-9.]+))?")


def _parse_block(block: int, spec: str) -> BlockConfig:
    """A `BlockConfig` from its `str`: `h2-m128-r0.9`, `h2-m128-r0.9/0.8`, or with an embed width `e240-h3-m960-r1`."""
    match = _BLOCK_PATTERN.fullmatch(spec)
    if match is None:
        raise InvalidSubnetError(
            f"block {block}: {spec!r} is not of the form [e<embed>-]h<heads>-m<mlp_hidden>-r<keep>[/<merge>]"
        )
    embed, heads, hidden, keep, merge = match.groups()
    try:
        merge = 1.0 if merge is None else float(merge)
        return BlockConfig(int(heads), int(hidden), float(keep), merge, None if embed is None else int(embed))
    except ValueError:
        raise InvalidSubnetError(f"block {block}: {spec!r} has a ratio that is not a number") from None


@dataclass(frozen=True)
class SearchSpace:
    """The choices of every block of a supernet, each list ascending and ending with the full model.

    The largest index of every field is the full model, so `largest()` is the dense network with no token
    reduction. `fields` are the per-block decisions an agent takes, in action order.
    """

    heads: tuple[tuple[int, ...], ...]
    mlp_hidden: tuple[tuple[int, ...], ...]
    keep_ratio: tuple[tuple[float, ...], ...]
    merge_ratio: tuple[tuple[float, ...], ...]
    token_mode: str = "merge"

    def __post_init__(self) -> None:
        check_token_mode(self.token_mode)
        depth = len(self.heads)
        for f in ("heads", "mlp_hidden", "keep_ratio", "merge_ratio"):
            per_block = getattr(self, f)
            if len(per_block) != depth:
                raise ValueError(f"{f}: {len(per_block)} blocks of choices, expected {depth}")
            object.__setattr__(self, f, tuple(_ascending(f, i, c) for i, c in enumerate(per_block)))
        for i in range(depth):
            ratios = self.keep_ratio[i] + self.merge_ratio[i]
            if any(not 0.0 < r <= 1.0 for r in ratios) or self.keep_ratio[i][-1] != 1.0:
                raise ValueError(f"block {i}: keep ratios must lie in (0, 1] and end with 1.0, got {ratios}")
            if self.token_mode != "prune_merge" and self.merge_ratio[i] != (1.0,):
                raise ValueError(f"block {i}: merge_ratio choices are for token_mode='prune_merge' only")

    @classmethod
    def uniform(
        cls,
        depth: int,
        heads: Sequence[int],
        mlp_hidden: Sequence[int],
        keep_ratio: Sequence[float] = (1.0,),
        merge_ratio: Sequence[float] = (1.0,),
        token_mode: str = "merge",
    ) -> SearchSpace:
        """The same choices at every one of `depth` blocks (`merge_ratio` is ignored unless `prune_merge`)."""
        if check_token_mode(token_mode) != "prune_merge":
            merge_ratio = (1.0,)
        return cls(
            heads=(tuple(heads),) * depth,
            mlp_hidden=(tuple(mlp_hidden),) * depth,
            keep_ratio=(tuple(keep_ratio),) * depth,
            merge_ratio=(tuple(merge_ratio),) * depth,
            token_mode=token_mode,
        )

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.heads)

    @property
    def fields(self) -> tuple[str, ...]:
        """The per-block decisions, in action order."""
        return ("heads", "mlp_hidden", "keep_ratio") + (("merge_ratio",) if self.token_mode == "prune_merge" else ())

    def choices(self, block: int) -> tuple[tuple, ...]:
        """The choice lists of `block`, one per field."""
        return tuple(getattr(self, f)[block] for f in self.fields)

    def num_choices(self, block: int) -> tuple[int, ...]:
        """The number of choices of `block`, one per field."""
        return tuple(len(c) for c in self.choices(block))

    def offers(self, field: str, block: int, value) -> bool:
        """Whether `block` offers `value` for `field` (one of `fields`)."""
        return value in getattr(self, field)[block]

    def from_values(self, values: dict) -> BlockConfig:
        """The `BlockConfig` of field values, by `fields`' names (a token ratio not given is 1.0)."""
        return BlockConfig(**values)

    def config(self, block: int, indices: Sequence[int]) -> BlockConfig:
        """The `BlockConfig` of `block` at the given choice indices (one per field)."""
        choices = self.choices(block)
        if len(indices) != len(choices):
            raise InvalidSubnetError(f"block {block}: expected {len(choices)} indices {self.fields}, got {indices}")
        values = {}
        for f, c, i in zip(self.fields, choices, indices):
            if not 0 <= int(i) < len(c):
                raise InvalidSubnetError(f"block {block}: {f} index {i} out of range [0, {len(c)})")
            values[f] = c[int(i)]
        return BlockConfig(**values)

    def indices(self, block: int, config: BlockConfig) -> tuple[int, ...]:
        """The choice indices of `config` at `block`; raises `InvalidSubnetError` if a value is not a choice."""
        out = []
        for f, c in zip(self.fields, self.choices(block)):
            value = getattr(config, f)
            if value not in c:
                raise InvalidSubnetError(f"block {block}: {f}={value} is not one of the choices {c}")
            out.append(c.index(value))
        if self.token_mode != "prune_merge" and config.merge_ratio != 1.0:
            raise InvalidSubnetError(f"block {block}: merge_ratio={config.merge_ratio} needs token_mode='prune_merge'")
        if config.embed_dim is not None:
            raise InvalidSubnetError(
                f"block {block}: embed_dim={config.embed_dim}, but this supernet has one embed width"
            )
        return tuple(out)

    def validate(self, subnet: Subnet) -> Subnet:
        """Return `subnet` if every block's configuration is one of the choices, else raise `InvalidSubnetError`."""
        self.validate_all([subnet])
        return subnet

    def validate_all(self, subnets: Sequence[Subnet]) -> None:
        """`validate` every one of `subnets`, checking each block's distinct configurations once (a batch of
        per-sample subnets shares most of them)."""
        for subnet in subnets:
            if not isinstance(subnet, Subnet):
                raise InvalidSubnetError(f"expected a vit.Subnet, got {type(subnet).__name__}")
            if len(subnet) != self.depth:
                raise InvalidSubnetError(f"subnet has {len(subnet)} blocks, the model has {self.depth}")
        for i in range(self.depth):
            for config in {s.blocks[i] for s in subnets}:
                self.indices(i, config)

    def from_indices(self, indices: Sequence[Sequence[int]]) -> Subnet:
        """The subnet whose block `i` takes the choice indices `indices[i]`."""
        if len(indices) != self.depth:
            raise InvalidSubnetError(f"expected indices for {self.depth} blocks, got {len(indices)}")
        return Subnet(tuple(self.config(i, idx) for i, idx in enumerate(indices)))

    def largest(self) -> Subnet:
        """Every block at full width with no token reduction: the dense model."""
        return self.from_indices([[n - 1 for n in self.num_choices(i)] for i in range(self.depth)])

    def smallest(self) -> Subnet:
        """Every block at its smallest widths and keep ratios."""
        return self.from_indices([[0] * len(self.fields)] * self.depth)

    def sample(self, rng: np.random.Generator | int | None = None) -> Subnet:
        """A subnet whose per-block choices are drawn independently and uniformly."""
        rng = np.random.default_rng(rng)
        return self.from_indices([[int(rng.integers(n)) for n in self.num_choices(i)] for i in range(self.depth)])

    def static(self, indices: Sequence[int]) -> Subnet:
        """The subnet that takes the same choice indices (one per field) at every block; -1 is the last choice."""
        per_block = []
        for i in range(self.depth):
            n = self.num_choices(i)
            per_block.append([idx % n[f] if idx < 0 else idx for f, idx in enumerate(indices)])
        return self.from_indices(per_block)

    def static_grid(self, tied: bool = False) -> list[Subnet]:
        """Static subnets (same choices at every block) of a space whose blocks share their choice counts.

        All combinations of the fields' choices; with `tied`, heads and MLP width take the same width level and
        the merge ratio follows the keep ratio, so the grid is width levels x keep ratios.
        """
        counts = {self.num_choices(i) for i in range(self.depth)}
        if len(counts) != 1:
            raise ValueError("static_grid needs the same number of choices at every block")
        counts = counts.pop()
        if not tied:
            return [self.static(idx) for idx in itertools.product(*(range(n) for n in counts))]
        levels = min(counts[0], counts[1])
        ratios = min(counts[2:])
        offsets = [n - levels for n in counts[:2]] + [n - ratios for n in counts[2:]]  # align on the largest
        grid = []
        for w, r in itertools.product(range(levels), range(ratios)):
            idx = [w, w] + [r] * (len(counts) - 2)
            grid.append(self.static([i + o for i, o in zip(idx, offsets)]))
        return grid

    def parse(self, text: str) -> Subnet:
        """The subnet `text` writes as `Subnet` prints one: a block as `h{heads}-m{mlp_hidden}-r{keep_ratio}`
        (`-r{keep}/{merge}` in `prune_merge`), one block for every block (`h2-m128-r1`) or one per block, separated
        by spaces; checked against the choices (`InvalidSubnetError` naming the block)."""
        specs = str(text).split()
        if len(specs) == 1:
            specs *= self.depth
        if len(specs) != self.depth:
            raise InvalidSubnetError(
                f"{text!r} gives {len(specs)} blocks; give one for all or one per block ({self.depth})"
            )
        return self.validate(Subnet(tuple(_parse_block(i, spec) for i, spec in enumerate(specs))))

    def prefix(self, depth: int) -> SearchSpace:
        """The choices of the first `depth` blocks (a model whose later blocks were pruned)."""
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth must lie in [1, {self.depth}], got {depth}")
        fields = ("heads", "mlp_hidden", "keep_ratio", "merge_ratio")
        return SearchSpace(**{f: getattr(self, f)[:depth] for f in fields}, token_mode=self.token_mode)

    def consensus(self, subnets: Sequence[Subnet]) -> Subnet:
        """One subnet for a whole batch: per block and field, the (lower) median choice index of `subnets`."""
        if not subnets:
            raise ValueError("consensus of an empty list of subnets")
        per_block = []
        for i in range(self.depth):
            idx = [self.indices(i, s[i]) for s in subnets]
            per_block.append([statistics.median_low(col) for col in zip(*idx)])
        return self.from_indices(per_block)

    def __str__(self) -> str:
        lines = [f"SearchSpace(depth={self.depth}, token_mode={self.token_mode!r})"]
        for i in range(self.depth):
            lines.append(f"  block {i}: " + ", ".join(f"{f}={c}" for f, c in zip(self.fields, self.choices(i))))
        return "\n".join(lines)


__all__ = [
    "TOKEN_MODES",
    "BlockConfig",
    "InvalidSubnetError",
    "SearchSpace",
    "Subnet",
    "channel_statistics",
    "check_token_mode",
]

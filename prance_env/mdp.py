"""What defines PranceViT's MDP, with no env around it: its settings (`MDPConfig`), its prices (`Prices`), its spaces
and the one action codec (`ActionCodec`).

The env, the vector env, `agents.AdaptiveViT`, the baselines, selector training, joint fine-tuning and the scripts
read their defaults and decode their actions here, so a deployed selector decides exactly as it was trained. The
module imports the model package only (no env, no data), so that `agents.AdaptiveViT` needs nothing else.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium import spaces

from vit import BlockConfig, InvalidSubnetError, SearchSpace
from vit.inference import DecisionSchedule, log_price, reduces_tokens
from vit.official import STATE_DIM, OfficialSpace, action_dim, decode_actions

REWARD_MODES = ("delta", "direct", "terminal", "official")
#: the release's reward (`model/ppo_sbs.py`'s `reward_process`): accuracy - 0.008 * FLOPs / 1e8 - 0.1 * ratio
OFFICIAL_FLOPS_WEIGHT = 0.008
OFFICIAL_RATIO_WEIGHT = 0.1
QUALITIES = ("correct", "logprob", "agree", "no_worse")
ACTION_TYPES = ("discrete", "continuous", "flat", "official")


@dataclass(frozen=True)
class MDPConfig:
    """The MDP over a supernet, and the one home of its defaults.

    The defaults are PranceViT-v1's registered ones (the env's keyword arguments, `agents.AdaptiveViT`, the selector
    training and fine-tuning configs and the scripts read them): the MDP the shipped selector
    (`agents/checkpoints/prance_fmnist`) was trained on.

    Attributes:
        schedule: where the decisions fall and what each sets (`vit.inference.DecisionSchedule`: stem blocks,
            blocks per step, per-block or grouped decisions).
        reward: `delta`, `direct`, `terminal` or `official` (see `prance_env.core`). The full model runs at reset
            only for `delta` (its result is R_{-1}), `official` and qualities `agree` and `no_worse`.
        quality: q of the result: `correct` (1 if right), `logprob` (log-prob of the true class, clipped at
            `logprob_floor`), `agree` (1 if the prediction is the full model's; needs no labels) or `no_worse` (the
            official code's: 1 unless the full model is right and this prediction wrong).
        logprob_floor: lower clip of `logprob`.
        price_range: (low, high) of the log-uniform compute price drawn per episode; the observed log-price is
            bounded by it, so a policy reads only the prices it was trained on.
        token_penalty: `direct` only, the official code's extra term: each step's reward also loses
            `token_penalty` times the fraction of patch tokens alive after it (the release uses 0.1).
        price: the price a deployed selector runs at when given none (`agents.AdaptiveViT`, `visualize.py`).
        eval_prices: the prices selector training and fine-tuning evaluate at.
        official_state: observe also `official_state` (197,), the official selector's state (the key profile of
            the block before the decision, zero-padded): an official meta-network's MDP only.
    """

    schedule: DecisionSchedule = field(default_factory=DecisionSchedule)
    reward: str = "delta"
    quality: str = "logprob"
    logprob_floor: float = -5.0
    price_range: tuple[float, float] = (3e-4, 2.0)
    token_penalty: float = 0.0
    price: float = 0.01
    eval_prices: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    official_state: bool = False

    def __post_init__(self) -> None:
        if self.token_penalty < 0 or (self.token_penalty and self.reward != "direct"):
            raise ValueError(f"token_penalty must be >= 0 and needs reward='direct', got {self.token_penalty}")
        if self.reward not in REWARD_MODES:
            raise ValueError(f"unknown reward {self.reward!r}; expected one of {', '.join(REWARD_MODES)}")
        if self.quality not in QUALITIES:
            raise ValueError(f"unknown quality {self.quality!r}; expected one of {', '.join(QUALITIES)}")
        Prices(None, self.price_range)  # a ValueError for a range that is not one

    @property
    def needs_full_model(self) -> bool:
        """Whether an episode's reset scores the full model (its result, or its prediction for the quality)."""
        return self.reward in ("delta", "official") or self.quality in ("agree", "no_worse")


def check_price(price) -> np.ndarray:
    """`price` (a number or an array of them) as float64 if every value is a positive, finite number; else the
    `ValueError` every entry point that takes a price raises (the env, the vector env, `agents.AdaptiveViT`, the
    scripts)."""
    values = np.asarray(torch.as_tensor(price).detach().cpu() if isinstance(price, torch.Tensor) else price)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"price must be a positive, finite number, got {price!r}")
    values = values.astype(np.float64)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        shown = values if values.ndim == 0 else values[bad][0]
        raise ValueError(f"price must be a positive, finite number, got {shown:g}")
    return values


class Prices:
    """The compute price of each episode: fixed, or drawn log-uniformly from `price_range`."""

    def __init__(self, price: float | None, price_range: Sequence[float]) -> None:
        if len(price_range) != 2:
            raise ValueError(f"price_range must be (low, high), got {tuple(price_range)}")
        if price is not None:
            check_price(price)
        low, high = (float(price), float(price)) if price is not None else map(float, price_range)
        if not 0 < low <= high or not 0 < float(price_range[0]) <= float(price_range[1]):
            raise ValueError(f"prices must satisfy 0 < low <= high, got {(low, high)} in range {tuple(price_range)}")
        self.low, self.high = low, high
        # observed log-prices: the configured range, widened to a fixed price, so the space is never degenerate
        self.bounds = (min(low, float(price_range[0])), max(high, float(price_range[1])))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` prices."""
        if self.low == self.high:
            return np.full(n, self.low)
        return np.exp(rng.uniform(math.log(self.low), math.log(self.high), n))

    def check(self, price: np.ndarray) -> np.ndarray:
        """Prices given in reset options, checked against the observation bounds."""
        price = check_price(price)
        if np.any(price < self.low) or np.any(price > self.high):
            raise ValueError(f"price must lie in [{self.low}, {self.high}], got {price}")
        return price


def warn_if_truncating(max_episode_steps: int | None, num_steps: int) -> None:
    """A warning when a time limit (`max_episode_steps`) ends the episodes before their last decision."""
    if max_episode_steps is not None and max_episode_steps < num_steps:
        warnings.warn(
            f"max_episode_steps={max_episode_steps} truncates this MDP's episodes of {num_steps} decisions",
            stacklevel=3,
        )


def observation_space(embed_dim: int, prices: Prices, official_state: bool = False) -> spaces.Dict:
    """The observation space of one episode: `cls` (embed_dim,), `progress` (3,), `price` (1,), and with
    `official_state` the official selector's state (197,), float32."""
    big = np.finfo(np.float32).max
    keys = {
        "cls": spaces.Box(-big, big, (embed_dim,), np.float32),
        "progress": spaces.Box(0.0, 1.0, (3,), np.float32),
        "price": spaces.Box(*log_price(torch.tensor(prices.bounds)).numpy(), (1,), np.float32),
    }
    if official_state:
        keys["official_state"] = spaces.Box(-big, big, (STATE_DIM,), np.float32)
    return spaces.Dict(keys)


class ActionCodec:
    """The actions of an MDP's decisions: their space, their validation and their decoding into the block
    configurations the runner runs.

    A decision has one field per choice it makes (`fields`, named by the schedule: `heads`, `mlp_hidden`,
    `keep_ratio`[, `merge_ratio`], or `heads[j]`, ... for grouped decisions), `nvec[f]` choices each. Discrete
    actions are the choice indices; continuous ones, values in [-1, 1], are rounded to them,
    `round((a + 1) / 2 * (n - 1))`. Invalid actions (another shape, a non-numeric dtype, NaN or Inf, an index out of
    range, a fraction, a value outside [-1, 1]) raise a `ValueError` quoting the value as given, before anything
    runs.

    Args:
        schedule: where the decisions fall and what each sets.
        search_space: the supernet's; it must hold every configuration the decisions choose.
        action_type: `discrete` (`MultiDiscrete(nvec)`), `continuous` (`Box(-1, 1, (fields,))`), `flat` (one
            `Discrete(prod(nvec))` over every combination of choices, in C order: for agents that take a `Discrete`
            space only, as DQN) or `official` (an official meta-network's grouped decisions only: the release's
            `Box(0, 1, (7,))` actions, 8 in `prune_merge`, decoded as its `action_to_config` does,
            `vit.official.decode_actions`: widths rounded to their choices, keep ratios raw).
    """

    def __init__(self, schedule: DecisionSchedule, search_space: SearchSpace, action_type: str = "discrete") -> None:
        if action_type not in ACTION_TYPES:
            raise ValueError(f"unknown action_type {action_type!r}; expected one of {', '.join(ACTION_TYPES)}")
        if action_type == "official" and (
            not isinstance(search_space, OfficialSpace) or schedule.blocks_per_step != schedule.group_blocks
        ):
            raise ValueError(
                "action_type='official' is the release's action: an official meta-network's decisions='grouped'"
            )
        schedule.check(search_space)
        self.schedule, self.search_space, self.action_type = schedule, search_space, action_type
        self.fields: tuple[str, ...] = schedule.fields(search_space)
        if action_type == "official":  # the release's order: MLP ratios, embedding widths, then the keep ratio(s)
            widths = [f"{f}[{j}]" for f in ("mlp_ratio", "embed_dim") for j in range(schedule.group_blocks)]
            self.fields = (*widths, *(f"{f}[0]" for f in search_space.fields[2:]))
        self.nvec: tuple[int, ...] = schedule.nvec(search_space)
        self.num_steps = schedule.num_steps(search_space.depth)
        #: which fields set a token reduction (keep and merge ratios)
        self.token_fields = np.array([reduces_tokens(f) for f in self.fields])

    @property
    def space(self) -> spaces.Space:
        """The action space of one decision."""
        if self.action_type == "discrete":
            return spaces.MultiDiscrete(np.array(self.nvec, dtype=np.int64))
        if self.action_type == "flat":
            return spaces.Discrete(math.prod(self.nvec))
        if self.action_type == "official":
            return spaces.Box(0.0, 1.0, (action_dim(self.search_space.token_mode),), np.float32)
        return spaces.Box(-1.0, 1.0, (len(self.nvec),), np.float32)

    def indices(self, actions, batch: int | None = None) -> np.ndarray:
        """Choice indices (B, fields) int64 of actions of exactly shape `(fields,)` (`batch` None: one decision) or
        `(batch, fields)` (numpy, torch on any device, or nested lists); a `ValueError` quoting the first invalid
        value as given. `official` actions are not indices: they come back checked, float64 (B, 7 or 8), for
        `configs`."""
        given = actions.detach().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        if self.action_type == "flat":
            return self._flat_indices(given, batch)
        width = self.space.shape[0] if self.action_type == "official" else len(self.nvec)
        shape = (width,) if batch is None else (batch, width)
        if given.dtype.kind not in "iuf":
            raise ValueError(f"actions must be numbers (choice indices or values in [-1, 1]), got dtype {given.dtype}")
        if given.shape != shape:
            raise ValueError(f"expected actions of shape {shape} for fields {self.fields}, got {given.shape}")
        rows = given.reshape(-1, width)
        nvec = np.array(self.nvec)
        if given.dtype.kind == "f" and not np.all(np.isfinite(rows)):
            where, value, _ = self._first_offender(given, ~np.isfinite(rows))
            raise ValueError(f"{where} value {value}: actions contain NaN or Inf")
        if self.action_type == "official":
            if np.any((rows < 0) | (rows > 1)):
                where, value, _ = self._first_offender(given, (rows < 0) | (rows > 1))
                raise ValueError(f"{where} value {value}: official actions must lie in [0, 1]")
            return rows.astype(np.float64)
        if self.action_type == "continuous":
            if np.any(np.abs(rows) > 1):
                where, value, _ = self._first_offender(given, np.abs(rows) > 1)
                raise ValueError(f"{where} value {value}: continuous actions must lie in [-1, 1]")
            return np.rint((rows.astype(np.float64) + 1.0) / 2.0 * (nvec - 1)).astype(np.int64)
        if given.dtype.kind == "f" and not np.all(rows == np.round(rows)):
            where, value, _ = self._first_offender(given, rows != np.round(rows))
            raise ValueError(f"{where} index {value}: discrete actions must be whole numbers")
        if np.any((rows < 0) | (rows >= nvec)):
            where, value, n = self._first_offender(given, (rows < 0) | (rows >= nvec))
            raise ValueError(f"{where} index {value} out of range [0, {n})")
        return rows.astype(np.int64)  # a copy: the caller's array may be read-only or reused

    def _flat_indices(self, given: np.ndarray, batch: int | None) -> np.ndarray:
        """Choice indices (B, fields) of `flat` actions: one whole number in [0, prod(nvec)) per decision, of shape
        () (`batch` None; also (1,), as SB3 gives them) or (batch,)."""
        n = math.prod(self.nvec)
        shape = () if batch is None else (batch,)
        if given.dtype.kind not in "iuf":
            raise ValueError(f"flat actions must be whole numbers in [0, {n}), got dtype {given.dtype}")
        if batch is None and given.shape == (1,):
            given = given.reshape(())
        if given.shape != shape:
            raise ValueError(f"expected flat actions of shape {shape}, got {given.shape}")
        flat = given.reshape(-1)
        bad = ~np.isfinite(flat) | (flat != np.round(flat)) | (flat < 0) | (flat >= n)
        if bad.any():
            where = "action" if batch is None else f"actions[{int(np.argmax(bad))}] ="
            raise ValueError(f"{where} {flat[bad][0]}: flat actions must be whole numbers in [0, {n})")
        return np.stack(np.unravel_index(flat.astype(np.int64), self.nvec), axis=1)

    def _first_offender(self, given: np.ndarray, mask: np.ndarray) -> tuple[str, str, int]:
        """Where the first entry of `mask` (B, fields) lies (the action and its field), its value and its field's
        number of choices; values are printed in the caller's dtype, so no cast shows 2**64 - 1 as -1."""
        rows = given.reshape(mask.shape)
        sample, field_ = (int(i) for i in np.argwhere(mask)[0])
        row = "[" + ", ".join(map(str, rows[sample])) + "]"
        action = f"action {row}" if given.ndim == 1 else f"actions[{sample}] = {row}"
        return f"{action}: {self.fields[field_]}", str(rows[sample, field_]), self.nvec[field_]

    def configs(self, step: int, indices: np.ndarray) -> list[tuple[BlockConfig, ...]]:
        """Per sample, the configuration of each block decision `step` sets, from valid choice indices (B, fields)
        (each distinct row decoded once)."""
        if not 0 <= step < self.num_steps:
            raise InvalidSubnetError(f"step {step} out of range: the decisions are steps 0 to {self.num_steps - 1}")
        if self.action_type == "official":
            return decode_actions(self.search_space, np.asarray(indices), self.schedule.blocks(step).start)
        rows = list(map(tuple, np.asarray(indices).tolist()))
        decoded = {row: self.schedule.decode(self.search_space, step, row) for row in dict.fromkeys(rows)}
        return [decoded[row] for row in rows]

    def decode(self, step: int, actions, batch: int | None = None) -> list[tuple[BlockConfig, ...]]:
        """`configs` of the checked `indices` of `actions`: what the runner runs for them."""
        return self.configs(step, self.indices(actions, batch))

    def masks(self, patches: np.ndarray) -> np.ndarray:
        """The valid choices of each sample, fields concatenated (B, sum(nvec)) (`flat`: the valid combinations,
        (B, prod(nvec))), for sb3-contrib's MaskablePPO: every choice, except that a sample down to one patch token
        (`patches`, (B,)) can reduce no further, so only the keep (and merge) ratio 1.0 is left to it."""
        if self.action_type == "official":
            raise ValueError("official actions are continuous: they have no action masks")
        masks = np.ones((len(patches), sum(self.nvec)), dtype=bool)
        spent = np.asarray(patches) <= 1
        offset = 0
        for n, token in zip(self.nvec, self.token_fields):
            if token:
                masks[spent, offset : offset + n - 1] = False
            offset += n
        if self.action_type != "flat":
            return masks
        # a combination is valid when each of its choices is: the fields' masks multiplied out, in C order
        per_field = np.split(masks, np.cumsum(self.nvec)[:-1], axis=1)
        flat = per_field[0]
        for valid in per_field[1:]:
            flat = (flat[:, :, None] & valid[:, None, :]).reshape(len(patches), -1)
        return flat


__all__ = [
    "ACTION_TYPES",
    "QUALITIES",
    "REWARD_MODES",
    "ActionCodec",
    "MDPConfig",
    "OFFICIAL_FLOPS_WEIGHT",
    "OFFICIAL_RATIO_WEIGHT",
    "Prices",
    "check_price",
    "observation_space",
    "warn_if_truncating",
]

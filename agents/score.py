"""Scores of policies on benchmark tasks, with confidence intervals.

Two policies run on the same held-out images give paired outcomes (1 if image i is classified right, its MACs
ratio, ...). `paired_difference` gives the mean of b - a and a percentile bootstrap interval over the images, the
resampling shared by both so that what the images have in common cancels; with several training seeds the seeds are
resampled too (`bootstrap_mean`).

`Scorer` scores a policy on a task (`prance_env.tasks`): its price is calibrated on the task's calibration images
to the budget, and on the whole held-out split it gets `Score`: Top-1, the MACs ratio reached, and the paired
differences to random decisions and to the best static subnet of equal or higher MACs, each with its interval, and
the budget's status (`met`, `under` it, or `out of reach`: never scored as met). `Scorer.auc` is the area under the
Top-1-MACs curve over several budgets, as the mean Top-1 over the budgets' span.

    scorer = Scorer(get_task("fmnist-per-block-0.5"))
    score = scorer.score_policy("shipped:prance_fmnist")         # or an SB3 model, a `predict`er, a callable
    print(score.top1, score.vs_random, score.status)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm.auto import tqdm

import vit
from prance_env.tasks import Task
from vit.train import subset_batches

from .adaptive import AdaptiveViT, calibrate
from .baselines import RandomPolicy
from .evaluation import Method, adaptive_method, static_method

#: how far from its budget a mean MACs ratio may lie and count as the budget met
TOLERANCE = 0.02
#: the width of the window of static subnets at or above a MACs ratio the best one is taken from
STATIC_WINDOW = 0.10


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval (`low`, `high`) at `level`."""

    mean: float
    low: float
    high: float
    level: float = 0.95

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return not self.contains(0.0)


def bootstrap_mean(values, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of `values` and its percentile bootstrap interval: one value per image (1-D), or one row of values
    per training seed (seeds x images), where each resample draws the seeds and, shared by all of them, the
    images."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"expected one value per image (1-D, or seeds x images), got shape {values.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    seeds, images = values.shape
    means = []
    for start in range(0, resamples, 200):  # chunks bound the memory of the (seeds, chunk, images) draw
        chunk = min(200, resamples - start)
        per_seed = values[:, rng.integers(0, images, (chunk, images))].mean(axis=2)  # (seeds, chunk)
        if seeds > 1:
            per_seed = np.take_along_axis(per_seed, rng.integers(0, seeds, (seeds, chunk)), axis=0)
        means.append(per_seed.mean(axis=0))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high), level)


def paired_difference(a, b, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of b - a over paired per-image outcomes, with its bootstrap interval (images resampled together).
    Either may hold one row per training seed (seeds x images); a single row pairs with every seed's."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[-1:] != b.shape[-1:] or a.ndim > 2 or b.ndim > 2:
        raise ValueError(f"paired outcomes need one value per image for both, got shapes {a.shape} and {b.shape}")
    if a.ndim == b.ndim == 2 and len(a) not in (1, len(b)) and len(b) != 1:
        raise ValueError(f"paired outcomes over seeds need as many seeds or one, got shapes {a.shape} and {b.shape}")
    return bootstrap_mean(np.atleast_2d(b) - np.atleast_2d(a), resamples, level, seed)


def budget_status(ratio: float, budget: float, tolerance: float = TOLERANCE) -> str:
    """`met` when a mean MACs ratio lies within `tolerance` of the budget, `under` when it spends less, `out of
    reach` when it spends more."""
    if ratio > budget + tolerance:
        return "out of reach"
    return "under" if ratio < budget - tolerance else "met"


@dataclass(frozen=True)
class Outcomes:
    """Per-image outcomes of one method on a set of images: whether it is right (0/1) and its MACs ratio."""

    correct: np.ndarray
    ratio: np.ndarray
    setting: str = ""

    @property
    def top1(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_ratio(self) -> float:
        return float(self.ratio.mean())


@torch.inference_mode()
def outcomes(method: Method, batches: list, full_macs: int, setting: str = "") -> Outcomes:
    """`method` run on every (images, labels) batch."""
    correct, ratio = [], []
    for images, labels in batches:
        outcome = method(images)
        correct.append((outcome.logits.argmax(-1) == labels.to(outcome.logits.device)).double().cpu())
        ratio.append(outcome.macs.double().cpu() / full_macs)
    return Outcomes(torch.cat(correct).numpy(), torch.cat(ratio).numpy(), setting)


def _interval(values: dict) -> Interval | None:
    return None if values is None else Interval(**values)


@dataclass(frozen=True)
class Score:
    """A policy's score on a task at one budget (see the module's docstring). `top1`, `vs_random` and `vs_static`
    are fractions (x100: points); `static` names the static subnet compared with; `settings` the price or setting
    of each seed; `seeds` the number of training seeds the intervals resample."""

    entry: str
    task: str
    budget: float
    status: str
    top1: Interval
    macs_ratio: Interval
    vs_random: Interval
    vs_static: Interval
    static: str
    settings: tuple[str, ...]
    seeds: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Score:
        intervals = {key: _interval(values[key]) for key in ("top1", "macs_ratio", "vs_random", "vs_static")}
        return cls(**(values | intervals | {"settings": tuple(values["settings"])}))


class Scorer:
    """Scores policies and baselines on a task's images: its supernet, its calibration images and its whole held-out
    split (or `held_out_images` of it, class-stratified, for quick checks).

    Policies: a saved selector (a path or `shipped:NAME`, run on the task's supernet), anything with SB3's
    `predict` (an SB3 model, `agents.baselines`' policies; decisions as the task's MDP takes them), or a callable
    from a batch of observations (numpy arrays) to actions. A list of them is one entry over training seeds.
    Baselines that are no policy are *sweeps*: methods by setting (images to an `agents.metrics.Outcome`), of
    which each budget takes the best on the calibration images among those within the budget.
    """

    def __init__(
        self,
        task: Task,
        device: str = "auto",
        batch_size: int = 256,
        held_out_images: int | None = None,
        random_seed: int = 0,
        resamples: int = 2000,
        level: float = 0.95,
        model: vit.ElasticViT | None = None,
    ) -> None:
        self.task = task
        self.model = task.build_supernet(device) if model is None else model
        self.device = self.model.pos_embed.device
        self.schedule = task.schedule()
        self.full_macs = vit.count_macs(self.model)
        self.random_seed, self.resamples, self.level = random_seed, resamples, level
        calibration, held_out = task.datasets(self.model)
        self.calibration = subset_batches(calibration, None, batch_size, self.device)
        self.held_out = subset_batches(held_out, held_out_images, batch_size, self.device)
        self._sweeps: dict[str, dict[str, tuple[Outcomes, Method]]] = {}
        self._held_out: dict[tuple[str, str], Outcomes] = {}

    # --- what is scored against ---------------------------------------------------------------------------------

    @cached_property
    def random(self) -> Outcomes:
        """Random decisions, uniform over the choices (seeded), on the held-out images."""
        adaptive = AdaptiveViT(self.model, RandomPolicy(self.nvec, seed=self.random_seed), schedule=self.schedule)
        return outcomes(adaptive_method(adaptive), self.held_out, self.full_macs, "uniform over the choices")

    @property
    def nvec(self) -> tuple[int, ...]:
        return self.schedule.nvec(self.model.search_space)

    @cached_property
    def static_subnets(self) -> list[vit.Subnet]:
        """Every static subnet of the tied grid (width level x keep ratio): the full model first, the smallest last."""
        space = self.model.search_space
        return list(dict.fromkeys([space.largest(), *space.static_grid(tied=True), space.smallest()]))

    @property
    def static_names(self) -> list[str]:
        return [f"`{s.blocks[-1]}` every block" for s in self.static_subnets]

    @cached_property
    def static_methods(self) -> dict[str, Method]:
        """The static subnets as methods, by name."""
        return {name: static_method(self.model, s) for name, s in zip(self.static_names, self.static_subnets)}

    def sweep(self, name: str, methods: dict[str, Method]) -> dict[str, tuple[Outcomes, Method]]:
        """The settings `methods` of the sweep family `name`: each one's outcomes on the calibration images (each
        setting measured once per family), and its method."""
        known = self._sweeps.setdefault(name, {})
        missing = {s: m for s, m in methods.items() if s not in known}
        for setting, method in tqdm(missing.items(), desc=f"{name} on the calibration images", leave=False):
            known[setting] = (outcomes(method, self.calibration, self.full_macs, setting), method)
        return {setting: known[setting] for setting in methods}

    def held_out_outcomes(self, name: str, setting: str, method: Method) -> Outcomes:
        """A sweep setting's outcomes on the held-out images (measured once)."""
        if (name, setting) not in self._held_out:
            self._held_out[name, setting] = outcomes(method, self.held_out, self.full_macs, setting)
        return self._held_out[name, setting]

    def matched_static(self, ratio: float) -> tuple[str, Outcomes]:
        """The static subnet of equal or higher MACs than `ratio` compared with: the best on the calibration images
        among those within `STATIC_WINDOW` above it, else the cheapest above it, else the full model."""
        sweep = self.sweep("static subnet", self.static_methods)
        above = {s: o for s, (o, _) in sweep.items() if o.mean_ratio >= ratio - 1e-9}
        window = {s: o for s, o in above.items() if o.mean_ratio <= ratio + STATIC_WINDOW}
        if window:
            setting = max(window, key=lambda s: (window[s].top1, -window[s].mean_ratio))
        elif above:
            setting = min(above, key=lambda s: above[s].mean_ratio)
        else:
            setting = max(sweep, key=lambda s: sweep[s][0].mean_ratio)
        return setting, self.held_out_outcomes("static subnet", setting, sweep[setting][1])

    # --- what is scored -----------------------------------------------------------------------------------------

    def adaptive(self, policy) -> AdaptiveViT:
        """`policy` (see the class's docstring) deciding on the task's supernet."""
        if isinstance(policy, (str, os.PathLike)):
            from .selector import load_adaptive

            return load_adaptive(policy, supernet=self.model)
        if not hasattr(policy, "predict"):
            if not callable(policy):
                raise TypeError(f"a policy has SB3's predict, is a saved selector or a callable, got {policy!r}")
            policy = CallablePolicy(policy)
        return AdaptiveViT(self.model, policy, schedule=self.schedule)

    def policy_outcomes(self, policy, budgets: tuple[float, ...] | None = None) -> dict[float, Outcomes]:
        """`policy`'s outcomes on the held-out images at each of `budgets` (default: the task's), at the price
        calibrated to it on the calibration images (the budgets' calibrations sharing their measurements); each
        setting is the price."""
        budgets = (self.task.budget,) if budgets is None else budgets
        adaptive = policy if isinstance(policy, AdaptiveViT) else self.adaptive(policy)
        measured: dict[float, float] = {}
        runs = {}
        for budget in budgets:
            with warnings.catch_warnings():  # an out-of-reach budget: the score's status says so
                warnings.simplefilter("ignore")
                price = calibrate(
                    adaptive, self.calibration, budget, tolerance=TOLERANCE / 2, max_iter=8, measured=measured
                )
            runs[budget] = outcomes(
                adaptive_method(adaptive, price), self.held_out, self.full_macs, f"price {price:.4g}"
            )
        return runs

    def sweep_outcomes(self, name: str, methods: dict[str, Method], budget: float | None = None) -> Outcomes:
        """The held-out outcomes of the best setting of `methods` (of sweep family `name`) on the calibration images
        among those within `budget` (+ `TOLERANCE`); the cheapest when none is."""
        budget = self.task.budget if budget is None else budget
        sweep = self.sweep(name, methods)
        within = [s for s, (o, _) in sweep.items() if o.mean_ratio <= budget + TOLERANCE]
        if within:
            setting = max(within, key=lambda s: (sweep[s][0].top1, -sweep[s][0].mean_ratio))
        else:
            setting = min(sweep, key=lambda s: sweep[s][0].mean_ratio)
        return self.held_out_outcomes(name, setting, sweep[setting][1])

    def score(self, entry: str, runs: list[Outcomes], budget: float | None = None) -> Score:
        """The `Score` of an entry from its held-out outcomes, one per training seed."""
        budget = self.task.budget if budget is None else budget
        if not runs:
            raise ValueError(f"no outcomes to score for {entry!r}")
        correct = np.stack([r.correct for r in runs])
        ratio = np.stack([r.ratio for r in runs])
        stats = dict(resamples=self.resamples, level=self.level, seed=self.random_seed)
        static, static_outcomes = self.matched_static(float(ratio.mean()))
        return Score(
            entry=entry,
            task=self.task.name,
            budget=budget,
            status=budget_status(float(ratio.mean()), budget),
            top1=bootstrap_mean(correct, **stats),
            macs_ratio=bootstrap_mean(ratio, **stats),
            vs_random=paired_difference(self.random.correct, correct, **stats),
            vs_static=paired_difference(static_outcomes.correct, correct, **stats),
            static=static,
            settings=tuple(r.setting for r in runs),
            seeds=len(runs),
        )

    def score_policy(self, policy, budget: float | None = None, entry: str = "policy") -> Score:
        """The `Score` of `policy` (or of a list of them: one per training seed) at `budget` (default: the
        task's)."""
        budget = self.task.budget if budget is None else budget
        policies = policy if isinstance(policy, (list, tuple)) else [policy]
        return self.score(entry, [self.policy_outcomes(p, (budget,))[budget] for p in policies], budget)

    def auc(self, runs: dict[float, list[Outcomes] | Outcomes]) -> Interval | None:
        """The area under the Top-1-MACs curve over the budgets of `runs` (budget: outcomes, one per seed; or one
        `Outcomes`, as `policy_outcomes` gives them), divided by
        their span: the mean Top-1 over the budgets, trapezoid-weighted, with its interval. None when a budget is
        out of reach (its score is not one of the curve's)."""
        runs = {b: [r] if isinstance(r, Outcomes) else list(r) for b, r in runs.items()}
        budgets = sorted(runs)
        if len(budgets) < 2:
            raise ValueError("the area under the curve needs at least two budgets")
        if any(budget_status(float(np.mean([r.mean_ratio for r in runs[b]])), b) == "out of reach" for b in budgets):
            return None
        gaps = np.diff(budgets)
        weights = (np.r_[gaps, 0] + np.r_[0, gaps]) / 2 / (budgets[-1] - budgets[0])
        per_image = sum(w * np.stack([r.correct for r in runs[b]]) for w, b in zip(weights, budgets))
        return bootstrap_mean(per_image, self.resamples, self.level, self.random_seed)


class CallablePolicy:
    """A callable from a batch of observations (a dict of numpy arrays) to actions, with SB3's `predict`."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        return np.asarray(self.fn(observation)), state


__all__ = [
    "CallablePolicy",
    "Interval",
    "Outcomes",
    "STATIC_WINDOW",
    "Score",
    "Scorer",
    "TOLERANCE",
    "bootstrap_mean",
    "budget_status",
    "outcomes",
    "paired_difference",
]

"""The deployable adaptive model: a supernet and a selector deciding, block by block, per image.

It holds a `vit.InferenceRunner`, the loop the env runs too, and decodes its policy's actions with the env's
`prance_env.mdp.ActionCodec`, so a selector decides here exactly as it was trained; it needs no env and no data.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn
from tqdm.auto import tqdm

from prance_env.mdp import ActionCodec, MDPConfig, check_price
from vit import ElasticViT, Subnet
from vit.inference import DecisionSchedule, make_runner
from vit.official import batch_mean_configs
from vit.utils import single_threaded

from .metrics import Outcome, Tally
from .prototypes import snap_to_mean, snap_to_prototypes

MDP = MDPConfig()
SNAPS = (None, "prototypes", "batch-mean")
#: The execution modes the scripts name, as (layout, snap): how a batch runs and how its decisions are snapped.
EXECUTIONS = {
    "packed": ("packed", None),
    "bucketed": ("bucketed", None),
    "prototypes": ("packed", "prototypes"),
    "batch-mean": ("packed", "batch-mean"),
}


@dataclass(frozen=True)
class Decisions:
    """What `AdaptiveViT` decided for a batch of B images.

    Attributes:
        subnets: the subnet each image ran, stem blocks included (B subnets of `depth` block configurations).
        indices: (B, steps, fields) int64, the choice indices of every decision (float64, the actions themselves,
            for the release's `official` actions).
        tokens: (B,) int64, the patch tokens alive at the end.
    """

    subnets: list[Subnet]
    indices: Tensor
    tokens: Tensor


class AdaptiveViT(nn.Module):
    """A supernet whose per-block widths and token ratios are chosen per image by a policy.

    `forward(images, price=...)` returns logits and per-sample MACs (and, with `return_decisions=True`, the
    `Decisions`). The inference is `vit.InferenceRunner`'s, the env's, without rewards: the stem runs, then at every
    step the policy reads the CLS token, progress and the price, its actions are decoded as the env decodes them
    (`prance_env.mdp.ActionCodec`), and the choices run per sample on the batch `layout`. With `snap="prototypes"`,
    each step's choices are first snapped to at most `prototypes` configurations for the batch
    (`agents.prototypes.snap_to_prototypes`: less diversity, fewer distinct configurations to run; K=1 is the
    median choice); `snap="batch-mean"` is the official evaluation protocol's: one choice for the batch per step
    and field, the mean of the images' choices snapped to the nearest (`agents.prototypes.snap_to_mean`). The
    module starts in eval mode, leaves the supernet's `requires_grad` and the policy's mode as they are, and keeps
    one statistic: `decide_seconds`, the wall-clock seconds spent in the policy and decoding its actions since it
    was built (set it to 0 to start again).

    The supernet runs in the dtype of its weights: `adaptive.to(torch.bfloat16)` (or a bf16 supernet) gives bf16
    weights, float32 images cast on entry, and logits, MACs and the policy's observations float32.

    Args:
        supernet: the elastic ViT, or an official meta-network (`vit.official`: its grouped decisions by default).
        policy: anything with stable-baselines3's `predict(obs, state, episode_start, deterministic)`; an SB3
            actor-critic model is called on tensors, on the supernet's device.
        price: the compute price λ the policy sees when `forward` is given none (`calibrate` finds one for a MACs
            budget); default `MDPConfig.price`.
        price_range: the prices the policy was trained on; `calibrate` searches inside it. Default:
            `MDPConfig.price_range`, the registered env's.
        schedule: where the decisions fall and what each sets (`DecisionSchedule.named`: per block, grouped,
            one-shot), as in the env the policy was trained on.
        layout: `packed` or `bucketed` (see `vit.ElasticViT.forward`).
        snap: None (each image's own decisions), `prototypes` or `batch-mean`.
        prototypes: K, the most configurations a step of `snap="prototypes"` runs for the batch.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU); the policy reads float32.
        shape, execution: deprecated names of `schedule`, and of `layout` and `snap` together (`EXECUTIONS`;
            `consensus`: prototypes, K=1).
    """

    def __init__(
        self,
        supernet: ElasticViT,
        policy,
        price: float | None = None,
        price_range: tuple[float, float] | None = None,
        schedule: DecisionSchedule | None = None,
        layout: str = "packed",
        snap: str | None = None,
        prototypes: int = 1,
        amp: bool = False,
        *,
        budget: float | None = None,
        calibration: Calibration | dict | None = None,
        shape: DecisionSchedule | None = None,
        execution: str | None = None,
    ) -> None:
        super().__init__()
        if shape is not None:
            warnings.warn("AdaptiveViT(shape=...) is now AdaptiveViT(schedule=...)", DeprecationWarning, stacklevel=2)
            schedule = shape
        if execution is not None:
            warnings.warn("AdaptiveViT(execution=...) is now layout= and snap=", DeprecationWarning, stacklevel=2)
            if execution == "consensus":
                execution, prototypes = "prototypes", 1
            if execution not in EXECUTIONS:
                raise ValueError(f"unknown execution {execution!r}; expected one of {', '.join(EXECUTIONS)}")
            layout, snap = EXECUTIONS[execution]
        if snap not in SNAPS:
            raise ValueError(f"unknown snap {snap!r}; expected one of {', '.join(map(str, SNAPS))}")
        if prototypes < 1:
            raise ValueError(f"prototypes must be at least 1, got {prototypes}")
        price_range = MDP.price_range if price_range is None else price_range
        if not 0 < price_range[0] <= price_range[1]:
            raise ValueError(f"price_range must be (low, high) with 0 < low <= high, got {tuple(price_range)}")
        self.supernet = supernet
        self.policy = policy
        self.price_range = (float(price_range[0]), float(price_range[1]))
        self.calibration = Calibration.from_dict(calibration) if isinstance(calibration, dict) else calibration
        if budget is not None and price is not None:
            raise ValueError("give the price or the budget to run at, not both")
        self._warned = False
        self._price = float(check_price(MDP.price if price is None else price))
        if budget is not None:
            self._price = self.price_for(budget)
        elif price is not None:
            self._prices(self._price, 1, torch.device("cpu"))  # warns when outside the trained prices
        self.layout, self.snap, self.prototypes, self.amp = layout, snap, prototypes, amp
        self.runner = make_runner(supernet, schedule, layout, amp)
        self.schedule = self.runner.schedule
        space = getattr(policy, "action_space", None)
        action_type = {spaces.Box: "continuous", spaces.Discrete: "flat"}.get(type(space), "discrete")
        self.codec = ActionCodec(self.schedule, supernet.search_space, getattr(policy, "action_type", action_type))
        if self.codec.action_type == "official" and snap == "prototypes":
            raise ValueError("official actions are continuous: snap='batch-mean' or None")
        self._check_policy(policy)
        self.decide_seconds = 0.0
        self.eval()  # a deployed model; `train()` switches it back like any module

    def replace(self, **changes) -> AdaptiveViT:
        """A new `AdaptiveViT` with these constructor arguments changed (`policy`, `layout`, `snap`, `price`, ...)
        and the others as this one's."""
        settings = dict(
            supernet=self.supernet,
            policy=self.policy,
            price=self.price,
            price_range=self.price_range,
            schedule=self.schedule,
            layout=self.layout,
            snap=self.snap,
            prototypes=self.prototypes,
            amp=self.amp,
            calibration=self.calibration,
        )
        if "budget" in changes:  # a budget replaces the price
            settings.pop("price")
            settings["budget"] = None
        unknown = set(changes) - set(settings)
        if unknown:
            raise TypeError(f"AdaptiveViT has no argument {sorted(unknown)[0]!r}")
        return AdaptiveViT(**(settings | changes))

    def _check_policy(self, policy) -> None:
        """A `ValueError` when the policy's spaces (if it has any) are not this supernet's."""
        obs_space = getattr(policy, "observation_space", None)
        if isinstance(obs_space, spaces.Dict) and "cls" in obs_space.spaces:
            width = obs_space["cls"].shape
            if width != (self.supernet.embed_dim,):
                raise ValueError(
                    f"the policy reads cls tokens of shape {width}, but the supernet's embed_dim is "
                    f"{self.supernet.embed_dim}: it was trained on another supernet"
                )
        action_space = getattr(policy, "action_space", None)
        nvec = self.nvec
        if isinstance(action_space, spaces.MultiDiscrete) and tuple(int(n) for n in action_space.nvec) != nvec:
            raise ValueError(
                f"the policy chooses among {tuple(int(n) for n in action_space.nvec)} choices per field, but the "
                f"supernet has {nvec} (nvec): it was trained on another supernet"
            )
        if isinstance(action_space, spaces.Discrete) and int(action_space.n) != math.prod(nvec):
            raise ValueError(
                f"the policy chooses among {int(action_space.n)} flat actions, but the supernet's decisions have "
                f"{math.prod(nvec)} combinations (nvec {nvec}): it was trained on another supernet"
            )
        if isinstance(action_space, spaces.Box) and action_space.shape != (len(nvec),):
            raise ValueError(
                f"the policy's actions have shape {action_space.shape}, but the supernet has {len(nvec)} choice "
                f"fields (nvec {nvec}): it was trained on another supernet"
            )

    @property
    def price(self) -> float:
        """The price `forward` uses when given none (fixed at construction: `replace(price=...)` or
        `replace(budget=...)` for another)."""
        return self._price

    def price_for(self, budget: float) -> float:
        """The price at which the selector spends `budget` of the full model's MACs on average, from its
        `calibration` (a `ValueError` when it has none, or when the budget is out of its reach)."""
        if self.calibration is None:
            raise ValueError(
                "this AdaptiveViT has no calibration to turn a budget into a price: load a selector file that "
                "records one (agents.load_adaptive; agents.calibrate_selector adds it), pass calibration=, or "
                "find the price with agents.calibrate"
            )
        return self.calibration.price_for(budget)

    @property
    def full_macs(self) -> int:
        """MACs of the full model on one image."""
        return self.runner.full_macs

    @property
    def nvec(self) -> tuple[int, ...]:
        """The number of choices per field of every decision (the env's `action_space.nvec`)."""
        return self.codec.nvec

    def decide(self, obs: dict[str, Tensor], state=None, episode_start=None) -> tuple[np.ndarray, object]:
        """The policy's deterministic actions (B, fields) for a batch of observations, as it gives them (choice
        indices, or values in [-1, 1]), and its state.

        An SB3 actor-critic model (not a recurrent one) runs on the tensors, on its device, through its public
        `get_distribution`; anything else through `predict` on numpy arrays. Box actions are clipped to the space as
        SB3's `predict` does."""
        policy = self.policy
        keys = getattr(getattr(policy, "observation_space", None), "spaces", None)
        if keys is not None:  # what the policy reads (an official meta-network's runner also gives its state)
            obs = {k: v for k, v in obs.items() if k in keys}
        net = getattr(policy, "policy", None)
        if isinstance(policy, BaseAlgorithm) and isinstance(net, ActorCriticPolicy) and not hasattr(net, "lstm_actor"):
            with torch.no_grad(), single_threaded(net.device):  # a small network: one thread is faster
                dist = net.get_distribution({k: v.to(net.device) for k, v in obs.items()})
                actions = dist.get_actions(deterministic=True).cpu().numpy()
            if isinstance(net.action_space, spaces.Box):
                space = net.action_space
                actions = net.unscale_action(actions) if net.squash_output else np.clip(actions, space.low, space.high)
            return actions, state
        numpy_obs = {k: v.cpu().numpy() for k, v in obs.items()}
        actions, state = policy.predict(numpy_obs, state, episode_start, deterministic=True)
        return np.asarray(actions), state

    def _configs(self, step: int, chosen: Tensor) -> list:
        """Per image, the configurations of step `step`'s blocks from its (snapped) choices; official actions
        with `snap="batch-mean"` run the release's batch inference (`vit.official.batch_mean_configs`)."""
        if self.codec.action_type == "official" and self.snap == "batch-mean":
            block = self.schedule.blocks(step).start
            return [batch_mean_configs(self.supernet.search_space, chosen.numpy(), block)] * chosen.shape[0]
        return self.codec.configs(step, chosen)

    def snapped(self, indices: Tensor) -> Tensor:
        """The choice indices (B, fields) a step runs: `indices` as decided, or snapped to the batch's prototypes or
        its mean choice (official actions are snapped by `_configs`)."""
        if self.codec.action_type == "official":
            return indices
        if self.snap == "batch-mean":
            return snap_to_mean(indices)
        if self.snap == "prototypes":
            return snap_to_prototypes(indices, self.prototypes)
        return indices

    def _prices(self, price: float | Tensor | None, B: int, device: torch.device) -> Tensor:
        """The price (B,) float32 of each image: `price` per image, one price for all, or the default; positive
        and finite (the env's `ValueError` otherwise), with one warning the first time one lies outside the range
        the selector was trained on."""
        if price is not None:
            values = check_price(price)
            low, high = self.price_range[0] * (1 - 1e-6), self.price_range[1] * (1 + 1e-6)  # float32 prices
            if not self._warned and (np.any(values < low) or np.any(values > high)):
                self._warned = True
                warnings.warn(
                    f"price {values.min() if np.any(values < low) else values.max():g} lies outside the prices the "
                    f"selector was trained on, {self.price_range}: what it decides there is untested",
                    stacklevel=3,
                )
        prices = torch.as_tensor(self.price if price is None else price, dtype=torch.float32, device=device)
        if prices.dim() == 0:
            return prices.expand(B)
        if prices.shape != (B,):
            raise ValueError(f"price must be a number or one per image, shape ({B},); got shape {tuple(prices.shape)}")
        return prices

    def forward(
        self,
        images: Tensor,
        price: float | Tensor | None = None,
        return_decisions: bool = False,
        *,
        budget: float | None = None,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Decisions]:
        """The adaptive inference of `images` (B, C, H, W) at compute price `price`, or at the price of a MACs
        `budget`.

        Args:
            images: on the supernet's device.
            price: one price for every image, a (B,) tensor of one per image, or None for `self.price`.
            return_decisions: also return the `Decisions`.
            budget: instead of a price, the mean fraction of the full model's MACs to spend, turned into a price by
                the selector's calibration (`price_for`).

        Returns:
            Logits (B, num_classes) float32 and MACs (B,) float32 per image, then the `Decisions` if asked.
        """
        if budget is not None:
            if price is not None:
                raise ValueError("give the price or the budget to run at, not both")
            price = self.price_for(budget)
        with torch.inference_mode():
            B = images.shape[0]
            prices = self._prices(price, B, images.device)
            if images.dtype == torch.float32 and self.supernet.pos_embed.dtype != torch.float32:
                images = images.to(self.supernet.pos_embed.dtype)  # bf16 weights: float32 images cast on entry
            runner = self.runner
            state = runner.start(images)
            policy_state, start, indices = None, np.ones(B, dtype=bool), []
            while not state.done:
                started = time.perf_counter()
                actions, policy_state = self.decide(runner.observe(state, prices), policy_state, start)
                chosen = self.snapped(torch.from_numpy(self.codec.indices(actions, B)))
                self.decide_seconds += time.perf_counter() - started
                start = np.zeros(B, dtype=bool)
                indices.append(chosen)
                state = runner.advance(state, self._configs(state.step, chosen))
            logits, macs = runner.complete(state), state.macs.float()
            if not return_decisions:
                return logits, macs
            subnets = [Subnet(c) for c in state.subnets()]
            return logits, macs, Decisions(subnets, torch.stack(indices, 1), state.tokens.num_patches())


@dataclass(frozen=True)
class Calibration:
    """What a selector spends over its trained prices: the mean MACs ratio `ratios[i]` it reaches at `prices[i]`
    (ascending), measured on `images` images of the `split` split; `price_for` turns a budget into a price."""

    prices: tuple[float, ...]
    ratios: tuple[float, ...]
    images: int
    split: str = "train"

    def __post_init__(self) -> None:
        if len(self.prices) != len(self.ratios) or len(self.prices) < 2:
            raise ValueError("a calibration needs two or more (price, ratio) points")

    def price_for(self, budget: float) -> float:
        """The price at which the mean MACs ratio is `budget`: log-price interpolated linearly between the measured
        points around it (the first crossing from the lowest price up); a `ValueError` when no measured price
        reaches the budget."""
        budget = float(budget)
        if not 0 < budget <= 1:
            raise ValueError(f"budget must lie in (0, 1] (a fraction of the full model's MACs), got {budget:g}")
        low, high = min(self.ratios), max(self.ratios)
        if not low <= budget <= high:
            raise ValueError(
                f"budget {budget:g} is out of reach: at the prices it was trained on, the selector spends {low:.3f} "
                f"to {high:.3f} of the full model's MACs ({self.images} {self.split} images)"
            )
        points = list(zip(self.prices, self.ratios))
        for (p0, r0), (p1, r1) in zip(points, points[1:]):  # prices ascending, ratios (mostly) falling
            if min(r0, r1) <= budget <= max(r0, r1):
                t = 0.0 if r1 == r0 else (budget - r0) / (r1 - r0)
                return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
        raise AssertionError("unreachable: the budget lies between the measured ratios")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Calibration:
        prices, ratios = tuple(values["prices"]), tuple(values["ratios"])
        return cls(prices, ratios, int(values["images"]), values.get("split", "train"))


def calibration_curve(
    adaptive: AdaptiveViT, loader: Iterable[tuple[Tensor, Tensor]], points: int = 25, split: str = "train"
) -> Calibration:
    """`adaptive`'s `Calibration`: its mean MACs ratio on `loader`'s images at `points` prices spaced evenly in
    log-price over its trained range."""
    batches = list(loader)
    low, high = (math.log(p) for p in adaptive.price_range)
    prices = [math.exp(low + (high - low) * i / (points - 1)) for i in range(points)]
    ratios = [measure(adaptive, batches, price=p)["flops_ratio"] for p in tqdm(prices, desc="calibration", leave=False)]
    return Calibration(tuple(prices), tuple(ratios), sum(len(y) for _, y in batches), split)


@torch.inference_mode()
def measure(
    adaptive: AdaptiveViT,
    batches: Iterable[tuple[Tensor, Tensor]],
    desc: str | None = None,
    logprob_floor: float = -5.0,
    price: float | None = None,
) -> dict:
    """Over (images, labels) batches at compute price `price` (None: `adaptive.price`): Top-1, Top-5, mean MACs
    ratio, mean fraction of tokens kept at the end, mean parameters read per image (`params`: those of the subnet
    each image ran, `vit.count_params`), and mean log-probability of the true class clipped at `logprob_floor` (the
    env's `logprob` quality). See `agents.metrics.Tally`."""
    tally = Tally(adaptive.supernet, logprob_floor)
    device = adaptive.supernet.pos_embed.device
    for images, labels in tqdm(batches, desc=desc, leave=False, disable=desc is None):
        images, labels = images.to(device), labels.to(device)
        logits, macs, decisions = adaptive(images, price=price, return_decisions=True)
        tally.add(Outcome(logits, macs, decisions.subnets, decisions.tokens), labels)
    return tally.result()


def calibrate(
    adaptive: AdaptiveViT,
    loader: Iterable[tuple[Tensor, Tensor]],
    target_flops_ratio: float,
    price_range: tuple[float, float] | None = None,
    tolerance: float = 0.005,
    max_iter: int = 14,
    measured: dict[float, float] | None = None,
) -> float:
    """The price at which `adaptive` spends `target_flops_ratio` of the full model's MACs on `loader`, on average.

    Bisection on log(price) inside `price_range` (default: `adaptive.price_range`, the range the selector was
    trained on); the mean MACs ratio falls as the price rises. Returns the price, for `adaptive(images, price=...)`;
    `adaptive` is left as it was. When the target is out of reach inside the range, it returns the endpoint nearest
    the target and warns. `measured` (price: mean MACs ratio on these images), when given, is read and filled: the
    calibrations of several budgets on the same images share their measurements, each starting from the tightest
    bracket measured.
    """
    if not 0.0 < target_flops_ratio <= 1.0:
        raise ValueError(f"target_flops_ratio must lie in (0, 1], got {target_flops_ratio}")
    batches = list(loader)
    price_range = adaptive.price_range if price_range is None else price_range
    seen: dict[float, float] = {} if measured is None else measured

    def ratio_at(price: float) -> float:
        if price not in seen:
            seen[price] = measure(adaptive, batches, price=price)["flops_ratio"]
        return seen[price]

    def done() -> float:
        inside = [p for p in seen if price_range[0] <= p <= price_range[1]]
        return min(inside, key=lambda p: abs(seen[p] - target_flops_ratio))

    cheapest, dearest = ratio_at(price_range[1]), ratio_at(price_range[0])
    if not cheapest - tolerance <= target_flops_ratio <= dearest + tolerance:
        warnings.warn(
            f"a mean MACs ratio of {target_flops_ratio:.3f} is out of reach for prices in {tuple(price_range)}: "
            f"the selector spends {cheapest:.3f} to {dearest:.3f}; using the nearest endpoint",
            stacklevel=2,
        )
        return done()
    inside = [p for p in seen if price_range[0] <= p <= price_range[1]]
    low = max([p for p in inside if seen[p] > target_flops_ratio], default=price_range[0])
    high = min([p for p in inside if seen[p] <= target_flops_ratio], default=price_range[1])
    for _ in tqdm(range(max_iter), desc=f"calibrating to {target_flops_ratio:.2f}", leave=False):
        if min(abs(ratio_at(p) - target_flops_ratio) for p in (low, high)) <= tolerance:
            break
        mid = math.sqrt(low * high)
        if ratio_at(mid) > target_flops_ratio:
            low = mid
        else:
            high = mid
    return done()


__all__ = ["AdaptiveViT", "Calibration", "Decisions", "calibrate", "calibration_curve", "measure"]

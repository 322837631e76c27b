"""The deployable adaptive model: a supernet and a selector deciding, block by block, per image.

It depends on the model package only: the loop is `vit.inference.InferenceLoop`, which the env runs too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import CategoricalDistribution, MultiCategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn
from tqdm.auto import tqdm

from vit import ElasticViT, Subnet
from vit.inference import InferenceLoop, LoopShape
from vit.utils import single_threaded

from .metrics import Outcome, Tally
from .prototypes import snap_to_mean, snap_to_prototypes

EXECUTIONS = ("packed", "bucketed", "prototypes", "consensus", "batch-mean")
PROTOTYPES_LOOP = "packed"  # how a batch of K prototype configurations runs (measured faster than bucketed on CPU)


@dataclass(frozen=True)
class Decisions:
    """What `AdaptiveViT` decided for a batch of B images.

    Attributes:
        subnets: the subnet each image ran, stem blocks included (B subnets of `depth` block configurations).
        indices: (B, steps, fields) int64, the choice indices of every decision.
        tokens: (B,) int64, the patch tokens alive at the end.
    """

    subnets: list[Subnet]
    indices: Tensor
    tokens: Tensor


class AdaptiveViT(nn.Module):
    """A supernet whose per-block widths and token ratios are chosen per image by a policy.

    `forward(images, price=...)` returns logits and per-sample MACs (and, with `return_decisions=True`, the
    `Decisions`). The loop is `vit.inference.InferenceLoop`, the one the env runs, without rewards: the stem runs,
    then at every step the policy reads the CLS token, progress and the price, and its choices run per sample, on
    packed tokens (`packed`) or by bucketing (`bucketed`). With `execution="prototypes"`, each step's choices are
    first snapped to at most `prototypes` configurations for the batch (`agents.prototypes.snap_to_prototypes`:
    less diversity, fewer distinct configurations to run); `consensus` is its K=1 case, one median choice for the
    whole batch. `batch-mean` is the official evaluation protocol's: one choice for the batch per step and field,
    the mean of the images' choices snapped to the nearest (`agents.prototypes.snap_to_mean`). The module starts in
    eval mode and leaves the supernet's `requires_grad` as it is.

    The supernet runs in the dtype of its weights: `adaptive.to(torch.bfloat16)` (or a bf16 supernet) gives bf16
    weights, float32 images cast on entry, and logits, MACs and the policy's observations float32.

    Args:
        supernet: the elastic ViT.
        policy: anything with stable-baselines3's `predict(obs, state, episode_start, deterministic)`; an SB3 model
            is called directly on tensors, on the supernet's device.
        price: the compute price λ the policy sees when `forward` is given none (`calibrate` finds one for a MACs
            budget).
        price_range: the prices the policy was trained on; `calibrate` searches inside it.
        shape: where the decisions fall and what each sets (per block, grouped, one-shot: `LoopShape.named`), as in
            the env the policy was trained on.
        execution: `packed`, `bucketed` (see `vit.ElasticViT.forward`), `prototypes`, `consensus` (the same as
            `prototypes` with `prototypes=1`), or `batch-mean`.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU); the policy reads float32.
        prototypes: K, the most configurations a step of `execution="prototypes"` runs for the batch.
    """

    def __init__(
        self,
        supernet: ElasticViT,
        policy,
        price: float = 0.1,
        price_range: tuple[float, float] = (0.01, 1.0),
        shape: LoopShape = LoopShape(),
        execution: str = "packed",
        amp: bool = False,
        prototypes: int = 1,
    ) -> None:
        super().__init__()
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; expected one of {', '.join(EXECUTIONS)}")
        if execution == "consensus":
            execution, prototypes = "prototypes", 1
        if prototypes < 1:
            raise ValueError(f"prototypes must be at least 1, got {prototypes}")
        self.supernet = supernet
        self.policy = policy
        self._price = float(price)
        if not 0 < price_range[0] <= price_range[1]:
            raise ValueError(f"price_range must be (low, high) with 0 < low <= high, got {tuple(price_range)}")
        self.price_range = (float(price_range[0]), float(price_range[1]))
        self.shape = shape
        self.execution = execution
        self.prototypes = prototypes
        self.amp = amp
        snapped = execution in ("prototypes", "batch-mean")
        self._loop = InferenceLoop(supernet, shape, PROTOTYPES_LOOP if snapped else execution, amp)
        self._check_policy(policy)
        self._direct = isinstance(policy, BaseAlgorithm) and not hasattr(policy.policy, "lstm_actor")
        if isinstance(policy, BaseAlgorithm):
            policy.policy.set_training_mode(False)
        self._continuous = isinstance(getattr(policy, "action_space", None), spaces.Box)
        self.eval()  # a deployed model; `train()` switches it back like any module

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
        if isinstance(action_space, spaces.Box) and action_space.shape != (len(nvec),):
            raise ValueError(
                f"the policy's actions have shape {action_space.shape}, but the supernet has {len(nvec)} choice "
                f"fields (nvec {nvec}): it was trained on another supernet"
            )

    @property
    def price(self) -> float:
        """The price `forward` uses when given none."""
        return self._price

    @property
    def full_macs(self) -> int:
        """MACs of the full model on one image."""
        return self._loop.full_macs

    @property
    def nvec(self) -> tuple[int, ...]:
        """The number of choices per field of every decision (the env's `action_space.nvec`)."""
        return self._loop.nvec

    def decide(self, obs: dict[str, Tensor], state=None, episode_start=None) -> tuple[Tensor, object]:
        """The policy's deterministic choice indices (B, fields) for a batch of observations, and its state."""
        B = obs["cls"].shape[0]
        if self._direct:  # an SB3 model: straight on tensors, no numpy round trip
            net = self.policy.policy
            obs = {k: v.to(net.device) for k, v in obs.items()}
            with torch.no_grad(), single_threaded(net.device):  # a small network: one thread is faster
                if isinstance(net, ActorCriticPolicy) and isinstance(
                    net.action_dist, (CategoricalDistribution, MultiCategoricalDistribution)
                ):  # the mode of each categorical is the argmax of its logits: no distribution objects
                    features = net.extract_features(obs)
                    features = features if net.share_features_extractor else features[0]
                    logits = net.action_net(net.mlp_extractor.forward_actor(features))
                    sizes = getattr(net.action_dist, "action_dims", [logits.shape[-1]])
                    actions = torch.stack([part.argmax(-1) for part in logits.split(list(sizes), dim=-1)], 1)
                else:
                    actions = net._predict(obs, deterministic=True)
        else:
            numpy_obs = {k: v.cpu().numpy() for k, v in obs.items()}
            actions, state = self.policy.predict(numpy_obs, state, episode_start, deterministic=True)
            actions = torch.as_tensor(np.asarray(actions))
        actions = actions.reshape(B, -1)
        if self._continuous:  # Box(-1, 1) actions, decoded by rounding as the env does
            nvec = torch.tensor(self.nvec, device=actions.device)
            actions = ((actions.clamp(-1, 1) + 1) / 2 * (nvec - 1)).round()
        return actions.long(), state

    def snap(self, actions: Tensor) -> Tensor:
        """The choice indices (B, fields) a step runs: `actions` as decided, or snapped to the batch's prototypes or
        its mean choice."""
        if self.execution == "batch-mean":
            return snap_to_mean(actions)
        if self.execution != "prototypes":
            return actions
        return snap_to_prototypes(actions, self.prototypes)

    def _prices(self, price: float | Tensor | None, B: int, device: torch.device) -> Tensor:
        """The price (B,) float32 of each image: `price` per image, one price for all, or the default."""
        if price is None:
            price = self._price
        prices = torch.as_tensor(price, dtype=torch.float32, device=device)
        if prices.dim() == 0:
            return prices.expand(B)
        if prices.shape != (B,):
            raise ValueError(f"price must be a number or one per image, shape ({B},); got shape {tuple(prices.shape)}")
        return prices

    @torch.inference_mode()
    def forward(
        self, images: Tensor, price: float | Tensor | None = None, return_decisions: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Decisions]:
        """The adaptive inference of `images` (B, C, H, W) at compute price `price`.

        Args:
            images: on the supernet's device.
            price: one price for every image, a (B,) tensor of one per image, or None for `self.price`.
            return_decisions: also return the `Decisions`.

        Returns:
            Logits (B, num_classes) float32 and MACs (B,) float32 per image, then the `Decisions` if asked.
        """
        B = images.shape[0]
        prices = self._prices(price, B, images.device)
        if images.dtype == torch.float32 and self.supernet.pos_embed.dtype != torch.float32:
            images = images.to(self.supernet.pos_embed.dtype)  # bf16 weights: float32 images cast on entry
        loop = self._loop
        loop.start(images)
        state, start, indices = None, np.ones(B, dtype=bool), []
        while True:
            actions, state = self.decide(loop.observe(prices), state, start)
            start = np.zeros(B, dtype=bool)
            actions = self.snap(actions)
            indices.append(actions)
            if loop.advance(loop.configs(actions)):
                break
        logits, macs = loop.complete(), loop.macs.float()
        if not return_decisions:
            return logits, macs
        subnets = [Subnet(tuple(c)) for c in loop.choices]
        return logits, macs, Decisions(subnets, torch.stack(indices, 1), loop.tokens.num_patches())


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
) -> float:
    """The price at which `adaptive` spends `target_flops_ratio` of the full model's MACs on `loader`, on average.

    Bisection on log(price) inside `price_range` (default: `adaptive.price_range`, the range the selector was
    trained on); the mean MACs ratio falls as the price rises. Returns the price, for `adaptive(images, price=...)`;
    `adaptive` is left as it was. When the target is out of reach inside the range, it returns the endpoint nearest
    the target and warns.
    """
    if not 0.0 < target_flops_ratio <= 1.0:
        raise ValueError(f"target_flops_ratio must lie in (0, 1], got {target_flops_ratio}")
    batches = list(loader)
    price_range = adaptive.price_range if price_range is None else price_range
    seen: dict[float, float] = {}

    def ratio_at(price: float) -> float:
        seen[price] = measure(adaptive, batches, price=price)["flops_ratio"]
        return seen[price]

    def done() -> float:
        return min(seen, key=lambda p: abs(seen[p] - target_flops_ratio))

    cheapest, dearest = ratio_at(price_range[1]), ratio_at(price_range[0])
    if not cheapest - tolerance <= target_flops_ratio <= dearest + tolerance:
        warnings.warn(
            f"a mean MACs ratio of {target_flops_ratio:.3f} is out of reach for prices in {tuple(price_range)}: "
            f"the selector spends {cheapest:.3f} to {dearest:.3f}; using the nearest endpoint",
            stacklevel=2,
        )
        return done()
    low, high = math.log(price_range[0]), math.log(price_range[1])
    for _ in tqdm(range(max_iter), desc=f"calibrating to {target_flops_ratio:.2f}", leave=False):
        if min(abs(r - target_flops_ratio) for r in seen.values()) <= tolerance:
            break
        mid = 0.5 * (low + high)
        if ratio_at(math.exp(mid)) > target_flops_ratio:
            low = mid
        else:
            high = mid
    return done()


__all__ = ["AdaptiveViT", "Decisions", "calibrate", "measure"]

"""ViT inference as a batched MDP, on torch tensors: the one implementation of reset and step.

`BatchedMDP` holds a frozen supernet's `vit.InferenceRunner` and pays the Result-to-Go between its steps. It keeps no
episode of its own: `reset` returns the `Episodes` of a batch of images (one episode each) and `step` takes them and
returns the next ones, so the single env (a batch of one) and the vector env (a batch of N) each hold theirs and
convert to and from numpy at their boundary.

Result-to-Go: after the action of step t the rest of the inference is completed from the current tokens with the
reference subnet (full width, no token reduction), and scored,

    R_t = q(prediction_t) - price * F_t / F_full,

F_t being the MACs spent so far plus the reference cost of the rest. The reward is `R_t - R_{t-1}` (`delta`, with
R_{-1} the full model's result), `R_t` (`direct`), or zero but at the last step, where it is `R_T` (`terminal`:
the final result alone, no intermediate credit and no completion, so an episode costs one forward pass).

`official` is the release's reward (`model/ppo_sbs.py`), paid at every step on the same completion:
`no_worse(prediction_t) - 0.008 * FLOPs_t / 1e8 - 0.1 * ratio_t`, FLOPs_t the absolute FLOPs of the completed
subnet (the release's count, `vit.official.get_complexity`, on an official meta-network; our MACs otherwise) and
ratio_t the keep ratio(s) the step chose (summed over its token reductions). The price plays no part in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vit import BlockConfig, ElasticViT
from vit.inference import InferenceState, make_runner

from .mdp import OFFICIAL_FLOPS_WEIGHT, OFFICIAL_RATIO_WEIGHT, MDPConfig


@dataclass(frozen=True)
class Episodes:
    """Where a batch of B episodes stands: what `BatchedMDP` takes and returns.

    Attributes:
        inference: the state of the images' inference.
        price: (B,) float32, each episode's compute price.
        labels: (B,) int64, or None (quality `agree` needs none).
        full_pred: (B,) the full model's predictions, when the reward or the quality reads them.
        result: (B,) float64, the last result R_{t-1} (`delta` reward; R_{-1} the full model's), else None.
    """

    inference: InferenceState
    price: Tensor
    labels: Tensor | None
    full_pred: Tensor | None
    result: Tensor | None

    @property
    def done(self) -> bool:
        """Whether the episodes have ended."""
        return self.inference.done


class BatchedMDP:
    """A batch of synchronised inference episodes on a frozen supernet.

    Args:
        model: the supernet (put in eval mode and frozen; it is never trained here).
        config: the MDP's settings.
        layout: how a batch of per-sample configurations is held and run: `packed` (`vit.PackedBatch`) or
            `bucketed` (`vit.BucketedBatch`); the results are the same.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU; `vit.utils.autocast`); observations,
            logits and rewards stay float32/float64.
    """

    def __init__(
        self, model: ElasticViT, config: MDPConfig = MDPConfig(), layout: str = "packed", amp: bool = False
    ) -> None:
        self.runner = make_runner(model.eval().requires_grad_(False), config.schedule, layout, amp)
        self.config = config
        if config.official_state and not hasattr(self.runner, "official_flops"):
            raise ValueError("official_state is the official selector's state: it needs an official meta-network")

    @property
    def model(self) -> ElasticViT:
        """The frozen supernet."""
        return self.runner.model

    def reset(self, images: Tensor, labels: Tensor | None = None, price: Tensor | None = None) -> Episodes:
        """Start one episode per image: embed, run the stem, score the full model where the MDP needs it.

        Args:
            images: (B, C, H, W) on the model's device.
            labels: (B,) int64, needed unless quality is `agree`.
            price: (B,) compute price of each episode (0 when None).
        """
        with torch.inference_mode():
            B = images.shape[0]
            if B == 0:
                raise ValueError("no images: an episode batch needs at least one image")
            if self.config.quality != "agree" and labels is None:
                raise ValueError(f"quality={self.config.quality!r} needs labels; use quality='agree' without them")
            price = torch.zeros(B, device=images.device) if price is None else price.to(images.device, torch.float32)
            inference = self.runner.start(images)
            full_pred = result = None
            if self.config.needs_full_model:
                full_logits = self.runner.complete(inference)
                full_pred = full_logits.argmax(-1)
                ones = torch.ones(B, dtype=torch.float64, device=images.device)
                result = self._result(full_logits, ones, price, labels, full_pred)
            return Episodes(inference, price, labels, full_pred, result)

    def observe(self, episodes: Episodes) -> dict[str, Tensor]:
        """`cls` (B, C): CLS entering the next block; `progress` (B, 3): step fraction, MACs spent / full MACs,
        patch tokens alive / initial; `price` (B, 1): log of the episode's price (`InferenceRunner.observe`)."""
        obs = self.runner.observe(episodes.inference, episodes.price)
        if not self.config.official_state:
            obs.pop("official_state", None)
        return obs

    def step(
        self, episodes: Episodes, configs: Sequence[BlockConfig | Sequence[BlockConfig]]
    ) -> tuple[Episodes, Tensor, dict]:
        """Run the next decision's blocks at `configs` (per sample, `prance_env.mdp.ActionCodec.decode`'s) and pay
        the reward.

        Returns the next episodes, the reward (B,) float64 and an info dict of tensors: `macs` (B,) spent so far
        (the whole episode's at the end), `tokens` (B,) patch tokens alive, `subnet` (per sample, the
        configurations run so far) and, at the end, `pred`, `label`, `correct`, `flops_ratio`.
        """
        with torch.inference_mode():
            if episodes.done:
                raise RuntimeError("the episodes have ended; call reset() to start new ones")
            inference = self.runner.advance(episodes.inference, configs)
            cfg, price, labels, full_pred = self.config, episodes.price, episodes.labels, episodes.full_pred
            result = episodes.result
            if cfg.reward == "terminal" and not inference.done:
                reward, pred = torch.zeros_like(inference.macs), None
            else:
                logits = self.runner.complete(inference)
                pred = logits.argmax(-1)
                cost = inference.macs + self.runner.completion_macs(inference)  # spent plus the reference rest
                result = self._result(logits, cost / self.runner.full_macs, price, labels, full_pred)
                if cfg.reward == "official":
                    reward = self._official_reward(inference, logits, cost, labels, full_pred)
                elif cfg.reward == "delta":
                    reward = result - episodes.result
                elif cfg.token_penalty:
                    alive = inference.tokens.num_patches().to(result) / self.model.num_patches
                    reward = result - cfg.token_penalty * alive
                else:
                    reward = result
            info = {"macs": inference.macs, "tokens": inference.tokens.num_patches(), "subnet": inference.subnets()}
            if inference.done:
                correct = (pred == labels) if labels is not None else (pred == full_pred)
                info.update(pred=pred, correct=correct, flops_ratio=inference.macs / self.runner.full_macs)
                if labels is not None:
                    info["label"] = labels
            return Episodes(inference, price, labels, full_pred, result), reward, info

    def logits(self, episodes: Episodes) -> Tensor:
        """Class logits (B, num_classes), float32, of finished episodes."""
        if not episodes.done:
            raise RuntimeError("logits() needs finished episodes")
        return self.runner.complete(episodes.inference)

    def _official_reward(
        self, inference: InferenceState, logits: Tensor, cost: Tensor, labels: Tensor | None, full_pred: Tensor
    ) -> Tensor:
        """The release's reward of the step just run (B,) float64: no_worse - 0.008 FLOPs / 1e8 - 0.1 ratio."""
        if labels is None:
            raise ValueError("reward='official' scores accuracy: it needs labels")
        quality = ((logits.argmax(-1) == labels) | (full_pred != labels)).double()
        flops = getattr(self.runner, "official_flops", None)
        flops = cost if flops is None else flops(inference)
        schedule = self.runner.schedule
        step_blocks = len(schedule.blocks(inference.step - 1))
        reductions = inference.blocks[-step_blocks:][:: schedule.group_blocks or 1]  # per reduction, per image
        two = self.model.token_mode == "prune_merge"
        ratios = [[c.keep_ratio + (c.merge_ratio if two else 0.0) for c in column] for column in reductions]
        ratio = torch.tensor(ratios, dtype=torch.float64, device=quality.device).sum(0)
        return quality - OFFICIAL_FLOPS_WEIGHT * flops.to(quality) / 1e8 - OFFICIAL_RATIO_WEIGHT * ratio

    def _result(
        self, logits: Tensor, flops_ratio: Tensor, price: Tensor, labels: Tensor | None, full_pred: Tensor | None
    ) -> Tensor:
        """R = q(prediction) - price * flops_ratio, per sample, float64."""
        q = self.config.quality
        if q == "logprob":
            log_probs = logits.float().log_softmax(-1).gather(1, labels[:, None])[:, 0]
            quality = log_probs.clamp_min(self.config.logprob_floor)
        elif q == "agree":
            quality = (logits.argmax(-1) == full_pred).float()
        elif q == "no_worse":
            quality = ((logits.argmax(-1) == labels) | (full_pred != labels)).float()
        else:
            quality = (logits.argmax(-1) == labels).float()
        return quality.double() - price.double() * flops_ratio


__all__ = ["BatchedMDP", "Episodes"]

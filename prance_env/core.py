"""ViT inference as a batched MDP, on torch tensors: the one implementation of reset and step.

`BatchedInference` is `vit.inference.InferenceLoop` with rewards: it holds a frozen supernet and the state of a batch
of episodes (one image each), decodes actions into per-sample configurations and pays the Result-to-Go. The single
env is a batch of one and the vector env a batch of N; both convert to and from numpy at their boundary.

Result-to-Go: after the action of step t the rest of the inference is completed from the current tokens with the
reference subnet (full width, no token reduction), and scored,

    R_t = q(prediction_t) - price * F_t / F_full,

F_t being the MACs spent so far plus the reference cost of the rest. The reward is `R_t - R_{t-1}` (`delta`, with
R_{-1} the full model's result), `R_t` (`direct`), or zero but at the last step, where it is `R_T` (`terminal`:
the final result alone, no intermediate credit and no completion, so an episode costs one forward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vit import BlockConfig, ElasticViT, InvalidSubnetError
from vit.inference import InferenceLoop, LoopShape

REWARD_MODES = ("delta", "direct", "terminal")
QUALITIES = ("correct", "logprob", "agree", "no_worse")


@dataclass(frozen=True)
class MDPConfig:
    """The MDP over a supernet.

    The defaults are the one source of PranceViT-v1's registered defaults (the env's keyword arguments and the
    selector training config read them): the MDP the shipped selector (`agents/checkpoints/prance_fmnist`) was
    trained on.

    Attributes:
        shape: where the decisions fall and what each sets (`vit.inference.LoopShape`: stem blocks, blocks per
            step, per-block or grouped decisions).
        reward: `delta`, `direct` or `terminal` (see the module docstring). The full model runs at reset only
            for `delta` (its result is R_{-1}) and for qualities `agree` and `no_worse`.
        quality: q of the result: `correct` (1 if right), `logprob` (log-prob of the true class, clipped at
            `logprob_floor`), `agree` (1 if the prediction is the full model's; needs no labels) or `no_worse` (the
            official code's: 1 unless the full model is right and this prediction wrong).
        logprob_floor: lower clip of `logprob`.
        price_range: (low, high) of the log-uniform compute price drawn per episode; the observed log-price is
            bounded by it, so a policy reads only the prices it was trained on.
        token_penalty: `direct` only, the official code's extra term: each step's reward also loses
            `token_penalty` times the fraction of patch tokens alive after it (the release uses 0.1).
    """

    shape: LoopShape = field(default_factory=LoopShape)
    reward: str = "delta"
    quality: str = "logprob"
    logprob_floor: float = -5.0
    price_range: tuple[float, float] = (3e-4, 2.0)
    token_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.token_penalty < 0 or (self.token_penalty and self.reward != "direct"):
            raise ValueError(f"token_penalty must be >= 0 and needs reward='direct', got {self.token_penalty}")
        if self.reward not in REWARD_MODES:
            raise ValueError(f"unknown reward {self.reward!r}; expected one of {', '.join(REWARD_MODES)}")
        if self.quality not in QUALITIES:
            raise ValueError(f"unknown quality {self.quality!r}; expected one of {', '.join(QUALITIES)}")


class BatchedInference(InferenceLoop):
    """A batch of synchronised inference episodes on a frozen supernet.

    Args:
        model: the supernet (put in eval mode and frozen; it is never trained here).
        config: the MDP's settings.
        execution: how a batch of per-sample configurations runs: `packed` (`vit.PackedBatch`) or `bucketed`
            (`vit.BucketedBatch`); the results are the same.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU; `vit.utils.autocast`); observations,
            logits and rewards stay float32/float64.
    """

    def __init__(
        self, model: ElasticViT, config: MDPConfig = MDPConfig(), execution: str = "packed", amp: bool = False
    ) -> None:
        super().__init__(model.eval().requires_grad_(False), config.shape, execution, amp)
        self.config = config

    @torch.inference_mode()
    def reset(self, images: Tensor, labels: Tensor | None = None, price: Tensor | None = None) -> dict[str, Tensor]:
        """Start one episode per image: embed, run the stem, score the full model. Returns the first observation.

        Args:
            images: (B, C, H, W) on the model's device.
            labels: (B,) int64, needed unless quality is `agree`.
            price: (B,) compute price of each episode (0 when None).
        """
        B = images.shape[0]
        if B == 0:
            raise ValueError("no images: an episode batch needs at least one image")
        self.labels = labels
        self.price = torch.zeros(B, device=images.device) if price is None else price.to(images.device, torch.float32)
        self.start(images)
        self.full_pred = self.result = None
        if self.config.reward == "delta" or self.config.quality in ("agree", "no_worse"):  # the full model's is needed
            full_logits = self.complete()
            self.full_pred = full_logits.argmax(-1)
            self.result = self._result(full_logits, torch.ones(B, dtype=torch.float64, device=images.device))
        return self.observation()

    def observation(self) -> dict[str, Tensor]:
        """`cls` (B, C): CLS entering the next block; `progress` (B, 3): step fraction, MACs spent / full MACs,
        patch tokens alive / initial; `price` (B, 1): log of the episode's price (`InferenceLoop.observe`)."""
        return self.observe(self.price)

    def decode(self, actions: Tensor | Sequence) -> list[tuple[BlockConfig, ...]]:
        """Per sample, the `BlockConfig` of each block of the step from choice indices (B, fields); raises
        `InvalidSubnetError` if invalid."""
        actions = torch.as_tensor(actions)
        self._check_actions(actions)
        return self.configs(actions.long())

    def _check_actions(self, actions: Tensor) -> None:
        """Raise `InvalidSubnetError` unless `actions` are (B, fields) whole choice indices in range."""
        B = self.tokens.batch_size
        if actions.shape != (B, len(self.nvec)):
            raise InvalidSubnetError(
                f"expected actions of shape ({B}, {len(self.nvec)}) for fields {self.fields}, "
                f"got {tuple(actions.shape)}"
            )
        if actions.is_floating_point():
            if not torch.isfinite(actions).all():
                raise InvalidSubnetError("actions contain NaN or Inf")
            if not torch.equal(actions, actions.round()):
                raise InvalidSubnetError("discrete actions must be whole numbers")
        high = torch.tensor(self.nvec, device=actions.device)
        bad = (actions < 0) | (actions >= high)  # on the values as given: a cast to int64 would wrap 1e20
        if bad.any():
            sample, field = (int(v) for v in bad.nonzero()[0])
            raise InvalidSubnetError(
                f"action {actions[sample].tolist()} (sample {sample}): {self.fields[field]} index "
                f"{actions[sample, field].item()} out of range [0, {self.nvec[field]})"
            )

    @torch.inference_mode()
    def advance(self, actions: Tensor | Sequence) -> bool:
        """Run the next `blocks_per_step` blocks at the decoded actions, with no reward; True at the end.

        At the end `self.macs` includes the head, so it is the episode's whole cost.
        """
        if self.step_index < 0:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the episodes have ended; call reset() to start new ones")
        return super().advance(self.decode(actions))

    @torch.inference_mode()
    def logits(self) -> Tensor:
        """Class logits (B, num_classes), float32, of the finished episodes."""
        if not self.done:
            raise RuntimeError("logits() needs finished episodes")
        return self.complete()

    @torch.inference_mode()
    def step(self, actions: Tensor | Sequence) -> tuple[dict[str, Tensor], Tensor, bool, dict]:
        """Run the next `blocks_per_step` blocks at the decoded configurations and pay the reward.

        Returns the observation, the reward (B,) float64, whether the episodes ended, and an info dict of tensors:
        `macs` (B,) spent so far, `tokens` (B,) patch tokens alive, `subnet` (per-sample tuples of the configs run
        so far) and, at the end, `pred`, `label`, `correct`, `flops_ratio`.
        """
        done = self.advance(actions)
        reward = self._reward(done)
        info = {
            "macs": self.macs.clone(),
            "tokens": self.tokens.num_patches(),
            "subnet": [tuple(c) for c in self.choices],
        }
        if done:
            info.update(pred=self.pred, correct=self._correct(self.pred), flops_ratio=self.macs / self.full_macs)
            if self.labels is not None:
                info["label"] = self.labels
        return self.observation(), reward, done, info

    def _reward(self, done: bool) -> Tensor:
        cfg = self.config
        if cfg.reward == "terminal" and not done:
            return torch.zeros_like(self.macs)
        logits = self.complete()
        cost = self.macs + self.completion_macs()  # spent so far plus the reference cost of the rest
        self.pred = logits.argmax(-1)
        result = self._result(logits, cost / self.full_macs)
        previous, self.result = self.result, result
        if cfg.reward == "delta":
            return result - previous
        if cfg.token_penalty:
            alive = self.tokens.num_patches().to(result) / self.model.num_patches
            return result - cfg.token_penalty * alive
        return result

    def _correct(self, pred: Tensor) -> Tensor:
        return (pred == self.labels) if self.labels is not None else (pred == self.full_pred)

    def _result(self, logits: Tensor, flops_ratio: Tensor) -> Tensor:
        """R = q(prediction) - price * flops_ratio, per sample, float64."""
        q = self.config.quality
        if q != "agree" and self.labels is None:
            raise ValueError(f"quality={q!r} needs labels; use quality='agree' without them")
        if q == "logprob":
            quality = (
                logits.float()
                .log_softmax(-1)
                .gather(1, self.labels[:, None])[:, 0]
                .clamp_min(self.config.logprob_floor)
            )
        elif q == "agree":
            quality = (logits.argmax(-1) == self.full_pred).float()
        elif q == "no_worse":
            quality = ((logits.argmax(-1) == self.labels) | (self.full_pred != self.labels)).float()
        else:
            quality = (logits.argmax(-1) == self.labels).float()
        return quality.double() - self.price.double() * flops_ratio

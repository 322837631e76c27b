"""ViT inference as a batched MDP, on torch tensors: the one implementation of reset and step.

`BatchedInference` holds a frozen supernet and the state of a batch of episodes (one image each). The single
env is a batch of one and the vector env a batch of N; both convert to and from numpy at their boundary. The
decision loop of a deployed selector (`agents.AdaptiveViT`) runs the same object with no reward.

Result-to-Go: after the action of step t the rest of the inference is completed from the current tokens with the
reference subnet (full width, no token reduction), and scored,

    R_t = q(prediction_t) - price * F_t / F_full,

F_t being the MACs spent so far plus the reference cost of the rest. The reward is `R_t - R_{t-1}` (`delta`, with
R_{-1} the full model's result), `R_t` (`direct`), or zero but at the last step, where it is `R_T` (`terminal`:
the final result alone, no intermediate credit and no completion, so an episode costs one forward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vit import BlockConfig, ElasticViT, InvalidSubnetError
from vit.flops import block_macs, count_flops, embed_macs, head_macs
from vit.supernet import TOKEN_BATCHES
from vit.utils import autocast, long_tensor, single_threaded

REWARD_MODES = ("delta", "direct", "terminal")
QUALITIES = ("correct", "logprob", "agree")


@dataclass(frozen=True)
class MDPConfig:
    """The shape of the MDP over a supernet.

    The defaults are the one source of PranceViT-v0's registered defaults (the env's keyword arguments and the
    selector training config read them): the MDP the shipped selector (`agents/checkpoints/prance_fmnist`) was
    trained on.

    Attributes:
        stem_blocks: blocks run at full width at reset, so the first observation depends on the image.
        blocks_per_step: blocks decided by one action (all run at the action's configuration).
        reward: `delta`, `direct` or `terminal` (see the module docstring). The full model runs at reset only
            for `delta` (its result is R_{-1}) and for quality `agree`.
        quality: q of the result: `correct` (1 if right), `logprob` (log-prob of the true class, clipped at
            `logprob_floor`) or `agree` (1 if the prediction is the full model's; needs no labels).
        logprob_floor: lower clip of `logprob`.
        price_range: (low, high) of the log-uniform compute price drawn per episode; the observed log-price is
            bounded by it, so a policy reads only the prices it was trained on.
    """

    stem_blocks: int = 1
    blocks_per_step: int = 1
    reward: str = "delta"
    quality: str = "logprob"
    logprob_floor: float = -5.0
    price_range: tuple[float, float] = (3e-4, 0.3)

    def __post_init__(self) -> None:
        if self.reward not in REWARD_MODES:
            raise ValueError(f"unknown reward {self.reward!r}; expected one of {', '.join(REWARD_MODES)}")
        if self.quality not in QUALITIES:
            raise ValueError(f"unknown quality {self.quality!r}; expected one of {', '.join(QUALITIES)}")
        if self.stem_blocks < 0 or self.blocks_per_step < 1:
            raise ValueError("stem_blocks must be >= 0 and blocks_per_step >= 1")


def log_price(price: Tensor) -> Tensor:
    """The observed log-price, float32 (the observation space's bounds are computed with it too)."""
    return price.float().clamp_min(1e-12).log()


class BatchedInference:
    """A batch of synchronised inference episodes on a frozen supernet.

    Args:
        model: the supernet (put in eval mode; it is never trained here).
        config: the MDP's settings.
        execution: how a batch of per-sample configurations runs: `packed` (`vit.PackedBatch`) or `bucketed`
            (`vit.TokenBatch`); the results are the same.
        amp: run the supernet under bf16 autocast on its device (CUDA or CPU; `vit.utils.autocast`); observations,
            logits and rewards stay float32/float64.
    """

    def __init__(
        self, model: ElasticViT, config: MDPConfig = MDPConfig(), execution: str = "packed", amp: bool = False
    ) -> None:
        if execution not in TOKEN_BATCHES:
            raise ValueError(f"unknown execution {execution!r}; expected one of {', '.join(TOKEN_BATCHES)}")
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.execution = execution
        self.amp = amp
        self.space = model.search_space
        decided = model.depth - config.stem_blocks
        if decided < 1 or decided % config.blocks_per_step:
            raise ValueError(
                f"{model.depth} blocks minus {config.stem_blocks} stem blocks must be a positive multiple of "
                f"blocks_per_step={config.blocks_per_step}"
            )
        self.num_steps = decided // config.blocks_per_step
        counts = {self.space.num_choices(i) for i in range(config.stem_blocks, model.depth)}
        if len(counts) != 1:
            raise ValueError("the decided blocks must share their number of choices per field")
        self.nvec = counts.pop()
        self.reference = self.space.largest()
        self.full_macs = count_flops(model)
        self._block_cache: dict[tuple[int, BlockConfig], int] = {}
        self._rest_cache: dict[tuple[int, int], int] = {}
        self._by_tokens: dict[BlockConfig, Tensor] = {}
        self.step_index = -1  # -1: not reset; num_steps: done

    # --- MACs bookkeeping: exact per-sample counts from (tokens, config), memoised ---------------------------------

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

    # --- episode ------------------------------------------------------------------------------------------------------

    @property
    def next_block(self) -> int:
        """The first block the next action decides."""
        return self.config.stem_blocks + self.step_index * self.config.blocks_per_step

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
        device = images.device
        self.labels = labels
        self.price = torch.zeros(B, device=device) if price is None else price.to(device, torch.float32)
        with autocast(device, self.amp):
            tokens = TOKEN_BATCHES[self.execution](self.model.embed(images))
            for i in range(self.config.stem_blocks):
                tokens = tokens.apply_block(self.model, i, self.reference[i])
        self.tokens = tokens
        n0 = self.model.num_patches
        stem = embed_macs(self.model) + sum(self._block(n0, self.reference[i]) for i in range(self.config.stem_blocks))
        self.macs = torch.full((B,), float(stem), dtype=torch.float64, device=device)
        self.choices: list[list[BlockConfig]] = [list(self.reference[: self.config.stem_blocks]) for _ in range(B)]
        self.step_index = 0
        self.full_pred = self.result = None
        if self.config.reward == "delta" or self.config.quality == "agree":  # the full model's result is needed
            with autocast(device, self.amp):
                full_logits = self.model.forward_tokens(tokens, self.config.stem_blocks)
            self.full_pred = full_logits.argmax(-1)
            self.result = self._result(full_logits, torch.ones(B, dtype=torch.float64, device=device))
        return self.observation()

    def observation(self) -> dict[str, Tensor]:
        """`cls` (B, C): CLS entering the next block; `progress` (B, 3): step fraction, MACs spent / full MACs,
        patch tokens alive / initial; `price` (B, 1): log of the episode's price."""
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
            return {
                "cls": self.tokens.cls().float(),
                "progress": progress,
                "price": log_price(self.price).view(B, 1),
            }

    def decode(self, actions: Tensor | Sequence) -> list[BlockConfig]:
        """Per-sample `BlockConfig`s from choice indices (B, fields); raises `InvalidSubnetError` if invalid."""
        return self._decode(actions)[0]

    def _decode(self, actions: Tensor | Sequence) -> tuple[list[BlockConfig], list[BlockConfig], Tensor]:
        """`decode`'s configurations, the distinct ones, and the index (B,) of each sample's among them."""
        actions = torch.as_tensor(actions)
        self._check_actions(actions)
        actions = actions.long()
        block = self.next_block
        codes: dict[tuple, int] = {}
        distinct, out, code = [], [], []
        for row in map(tuple, actions.tolist()):
            if row not in codes:
                codes[row] = len(distinct)
                distinct.append(self.space.config(block, row))
            code.append(codes[row])
            out.append(distinct[code[-1]])
        return out, distinct, long_tensor(code, self.macs.device)

    def _check_actions(self, actions: Tensor) -> None:
        """Raise `InvalidSubnetError` unless `actions` are (B, fields) whole choice indices in range."""
        B = self.tokens.batch_size
        if actions.shape != (B, len(self.nvec)):
            raise InvalidSubnetError(
                f"expected actions of shape ({B}, {len(self.nvec)}) for fields {self.space.fields}, "
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
                f"action {actions[sample].tolist()} (sample {sample}): {self.space.fields[field]} index "
                f"{actions[sample, field].item()} out of range [0, {self.nvec[field]})"
            )

    @torch.inference_mode()
    def advance(self, actions: Tensor | Sequence) -> bool:
        """Run the next `blocks_per_step` blocks at the decoded configurations, with no reward; True at the end.

        At the end `self.macs` includes the head, so it is the episode's whole cost.
        """
        if self.step_index < 0:
            raise RuntimeError("call reset() before step()")
        if self.step_index >= self.num_steps:
            raise RuntimeError("the episodes have ended; call reset() to start new ones")
        configs, distinct, code = self._decode(actions)
        start = self.next_block
        for i in range(start, start + self.config.blocks_per_step):
            with single_threaded(self.macs.device):
                self.macs += self._block_macs(self.tokens.num_patches(), distinct, code)
            with autocast(self.macs.device, self.amp):
                self.tokens = self.tokens.apply_block(self.model, i, configs)
            for choice, c in zip(self.choices, configs):
                choice.append(c)
        self.step_index += 1
        done = self.step_index == self.num_steps
        if done:
            self.macs += head_macs(self.model)
        return done

    @torch.inference_mode()
    def logits(self) -> Tensor:
        """Class logits (B, num_classes), float32, of the finished episodes."""
        if self.step_index != self.num_steps:
            raise RuntimeError("logits() needs finished episodes")
        with autocast(self.macs.device, self.amp):
            return self.model.forward_tokens(self.tokens, self.model.depth).float()

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
        end = self.next_block
        with autocast(self.macs.device, self.amp):
            logits = self.model.forward_tokens(self.tokens, end)
        if done:
            cost = self.macs
        else:
            rest = torch.tensor(
                [self._rest(end, n) for n in self.tokens.num_patches().tolist()],
                dtype=torch.float64,
                device=self.macs.device,
            )
            cost = self.macs + rest
        self.pred = logits.argmax(-1)
        result = self._result(logits, cost / self.full_macs)
        previous, self.result = self.result, result
        return result - previous if cfg.reward == "delta" else result

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
        else:
            quality = (logits.argmax(-1) == self.labels).float()
        return quality.double() - self.price.double() * flops_ratio

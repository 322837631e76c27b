"""What a model gives for a batch (`Outcome`) and running totals of it over batches (`Tally`): Top-1, Top-5, MACs,
tokens kept, parameters read and the log-probability of the true class, per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from vit import ElasticViT, Subnet, count_macs, count_params


@dataclass(frozen=True)
class Outcome:
    """What a model gives for a batch of B images.

    Attributes:
        logits: (B, num_classes).
        macs: (B,) MACs spent on each image.
        subnets: the subnet each image ran (B of them).
        tokens: (B,) patch tokens alive at the end.
    """

    logits: Tensor
    macs: Tensor
    subnets: Sequence[Subnet]
    tokens: Tensor


@dataclass
class Tally:
    """Running totals over batches of a model's outcomes, for `agents.measure`'s row: Top-1, Top-5, mean MACs ratio,
    tokens kept, parameters read per image and the mean log-probability of the true class clipped at
    `logprob_floor`."""

    model: ElasticViT
    logprob_floor: float = -5.0
    seen: int = 0
    correct: int = 0
    correct5: int = 0
    macs: float = 0.0
    tokens: float = 0.0
    params: float = 0.0
    logprob: float = 0.0
    _params_of: dict[Subnet, int] = field(default_factory=dict, repr=False)
    _full_macs: int | None = field(default=None, repr=False)

    def add(self, outcome: Outcome, labels: Tensor) -> None:
        """Count one batch's `outcome` against its `labels` (B,)."""
        logits = outcome.logits
        self.correct += int((logits.argmax(-1) == labels).sum())
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        self.correct5 += int((top5 == labels[:, None]).any(-1).sum())
        self.seen += len(labels)
        new = list(dict.fromkeys(s for s in outcome.subnets if s not in self._params_of))
        self._params_of.update(zip(new, count_params(self.model, new)))
        self.params += sum(self._params_of[s] for s in outcome.subnets)
        self.macs += float(outcome.macs.double().sum())
        self.tokens += float(outcome.tokens.sum()) / self.model.num_patches
        true_class = logits.float().log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
        self.logprob += float(true_class.clamp_min(self.logprob_floor).sum())

    def result(self) -> dict:
        """`top1`, `top5`, `flops_ratio` (mean MACs / the full model's), `tokens_kept`, `params`, `logprob`."""
        if not self.seen:
            raise ValueError("no images to measure")
        if self._full_macs is None:
            self._full_macs = count_macs(self.model)
        return {
            "top1": self.correct / self.seen,
            "top5": self.correct5 / self.seen,
            "flops_ratio": self.macs / self.seen / self._full_macs,
            "tokens_kept": self.tokens / self.seen,
            "params": self.params / self.seen,
            "logprob": self.logprob / self.seen,
        }


__all__ = ["Outcome", "Tally"]

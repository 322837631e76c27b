"""The official PRANCE selector as an agent: their `PolicyNet` weights (`actor.pth`), their state, their decoding.

At each decision block (3, 6, 9) the selector reads the key profile of the block before (the mean of the keys over
heads and channels, one value per token, zero-padded to 197), outputs `(tanh(mu) + 1) / 2` (the mean: evaluation),
and the release's `action_to_config` turns the 7 numbers (8 in `prune_merge`) into the MLP ratios and embedding
widths of the group's three blocks (each index `round(clip(a, 0, 1) * (n - 1))`, halves to even) and the keep
ratio(s) of the decision block, used raw. `run_official` drives an `vit.official.OfficialViT` with it: each image
on its own decisions (`protocol="per-image"`), or, as the release evaluates, every image of a batch on the
decisions averaged over the batch (`protocol="batch-mean"`).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gymnasium import spaces
from torch import Tensor

from vit.checkpoint import read_state_dict
from vit.config import BlockConfig, Subnet
from vit.inference import OfficialRunner
from vit.official import (
    STATE_DIM,
    OfficialViT,
    action_dim,
    batch_mean_configs,
    decode_actions,
)

PROTOCOLS = ("per-image", "batch-mean")


class PolicyNet(nn.Module):
    """The release's actor: two ReLU layers and a tanh mean mapped to (0, 1) (`model/ppo_sbs.py`'s `PolicyNet`,
    the same parameter names)."""

    def __init__(self, state_dim: int = STATE_DIM, hidden_dim: int = 256, action_dim: int = 7) -> None:
        super().__init__()
        self.fc1 = nn.Linear(state_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc_mu = nn.Linear(hidden_dim, action_dim)

    def forward(self, state: Tensor) -> Tensor:
        """The action means (B, action_dim) in (0, 1) of states (B, state_dim)."""
        return (torch.tanh(self.fc_mu(F.relu(self.fc2(F.relu(self.fc1(state)))))) + 1) / 2


class OfficialSelector:
    """The official PPO selector of a meta-network: decides a group's widths and keep ratio(s) per image.

    Build it with `OfficialSelector.load("…/actor.pth", model)`, or `OfficialSelector(model)` for a randomly
    initialised actor (as the release initialises it). `decide(state, block)` gives each image's three
    `BlockConfig`s; `run_official(model, selector, images)` runs the pair.

    It is also a policy with stable-baselines3's `predict`: it reads the observation's `official_state` (the env's
    `official_state=True`) and gives the release's actions, which the env and `agents.AdaptiveViT` decode as the
    release does with `action_type="official"` (`action_type` says so to `AdaptiveViT`).
    """

    #: how the env and `agents.AdaptiveViT` decode this policy's actions (`prance_env.mdp.ActionCodec`)
    action_type = "official"

    def __init__(self, model: OfficialViT, actor: PolicyNet | None = None, device: str | torch.device = "cpu") -> None:
        if not isinstance(model, OfficialViT):
            raise TypeError(f"the official selector decides for an official meta-network, not {type(model).__name__}")
        self.space = model.search_space
        self.actor = (actor or PolicyNet(action_dim=action_dim(model.token_mode))).to(device).eval()
        expected = action_dim(model.token_mode)
        if self.actor.fc_mu.out_features != expected:
            given = self.actor.fc_mu.out_features
            raise ValueError(f"the actor gives {given} numbers; token_mode={model.token_mode!r} takes {expected}")

    @property
    def action_space(self) -> spaces.Box:
        """The release's actions: `Box(0, 1, (7,))` (8 in `prune_merge`)."""
        return spaces.Box(0.0, 1.0, (self.actor.fc_mu.out_features,), np.float32)

    def predict(self, observation: dict, state=None, episode_start=None, deterministic: bool = True):
        """SB3's `predict`: the release's deterministic actions (the actor's mean) for an observation with
        `official_state` ((197,) or (B, 197)), and `state` as given. The release samples around the mean only in
        training, so `deterministic=False` is refused."""
        if not deterministic:
            raise ValueError("the official selector acts on its mean only: predict(..., deterministic=True)")
        if not isinstance(observation, dict) or "official_state" not in observation:
            raise ValueError(
                "the official selector reads the observation's 'official_state': make the env with "
                "official_state=True over an official meta-network"
            )
        given = torch.as_tensor(np.asarray(observation["official_state"]), dtype=torch.float32)
        actions = self.act(given.view(1, -1) if given.dim() == 1 else given).astype(np.float32)
        return (actions[0] if given.dim() == 1 else actions), state

    @classmethod
    def load(cls, path: str | os.PathLike, model: OfficialViT, device: str | torch.device = "cpu") -> OfficialSelector:
        """The selector whose actor the release saved (`actor.pth`: `PolicyNet`'s state dict), for `model`."""
        state = read_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if set(shapes) != {f"{n}.{p}" for n in ("fc1", "fc2", "fc_mu") for p in ("weight", "bias")}:
            raise ValueError(
                f"{path} is not an official actor.pth: expected the keys fc1, fc2, fc_mu (weight, bias), got "
                f"{', '.join(sorted(shapes)[:6])}"
            )
        hidden, state_dim = shapes["fc1.weight"]
        actor = PolicyNet(state_dim, hidden, shapes["fc_mu.weight"][0])
        try:
            actor.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path} does not fit an official actor: {e}") from None
        if state_dim != STATE_DIM:
            raise ValueError(f"{path} reads states of {state_dim} tokens; the official state has {STATE_DIM}")
        return cls(model, actor, device)

    @torch.no_grad()
    def act(self, state: Tensor) -> np.ndarray:
        """The actions (B, 7 or 8), float64 as the release holds them, for states (B, 197)."""
        if state.dim() != 2 or state.shape[1] != self.actor.fc1.in_features:
            raise ValueError(f"expected states (B, {self.actor.fc1.in_features}), got {tuple(state.shape)}")
        if not torch.isfinite(state).all():
            raise ValueError("the states contain NaN or Inf values")
        device = self.actor.fc1.weight.device
        return self.actor(state.to(device, torch.float32)).double().cpu().numpy()

    def configs(self, actions: np.ndarray, block: int) -> list[tuple[BlockConfig, ...]]:
        """Each image's configurations of blocks `block` to `block + 2` from its action, as `action_to_config` reads
        it (`vit.official.decode_actions`)."""
        return decode_actions(self.space, actions, block)

    def decide(self, state: Tensor, block: int) -> list[tuple[BlockConfig, ...]]:
        """Each image's configurations of blocks `block` to `block + 2`, from its state."""
        return self.configs(self.act(state), block)

    def batch_mean(self, actions: np.ndarray, block: int) -> tuple[BlockConfig, ...]:
        """The configurations the release's batch inference runs for a whole batch
        (`vit.official.batch_mean_configs`)."""
        return batch_mean_configs(self.space, actions, block)


def run_official(
    model: OfficialViT, selector: OfficialSelector, images: Tensor, protocol: str = "per-image"
) -> tuple[Tensor, list[Subnet]]:
    """Logits (B, classes) of `images` under the selector's decisions, and the configuration each image ran.

    The first group runs the largest configuration (the release evaluates with `max_flag`); at blocks 3, 6, 9 the
    selector decides the next group from the state of the block before (`vit.inference.OfficialRunner`).
    `per-image`: each image its own decisions (images sharing a configuration run together); `batch-mean`: the whole
    batch on `OfficialSelector.batch_mean` of the decisions, the release's evaluation."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    runner = OfficialRunner(model)
    state = runner.start(images)
    while not state.done:
        block = runner.schedule.blocks(state.step).start
        actions = selector.act(state.tokens.state())
        if protocol == "batch-mean":
            decided = [selector.batch_mean(actions, block)] * images.shape[0]
        else:
            decided = selector.configs(actions, block)
        state = runner.advance(state, decided)
    return runner.complete(state), [Subnet(c) for c in state.subnets()]


def official_method(model: OfficialViT, selector: OfficialSelector | None, protocol: str = "per-image"):
    """The pair (or, without a selector, the largest configuration) as an `agents.evaluation` method; its outcomes
    carry each image's configuration, so `official_flops` can count their FLOPs afterwards."""
    from vit.official import count_macs, token_counts

    from .metrics import Outcome

    largest = model.search_space.largest()

    @torch.inference_mode()
    def run(images: Tensor) -> Outcome:
        if selector is None:
            logits, subnets = model(images), [largest] * images.shape[0]
        else:
            logits, subnets = run_official(model, selector, images, protocol)
        macs = torch.tensor(count_macs(model, subnets), dtype=torch.float64)
        kept = [token_counts(s, model.num_tokens, model.token_mode)[-1][2] - 1 for s in subnets]
        return Outcome(logits, macs, subnets, torch.tensor(kept, dtype=torch.float64))

    return run


def evaluate_official(cfg) -> list[dict]:
    """`scripts/evaluate.py --actor actor.pth --checkpoint checkpoint.pth`: an official pair on an ImageFolder's
    held-out images against the meta-network's largest configuration, timed in the same pass. `--protocol ours`
    (the default) runs each image's own decisions; `official` the release's batch-64 batch-mean decisions. Every
    row gives Top-1, Top-5, the release's FLOPs (`get_complexity`) and our MACs, the parameters read and images/s.
    Writes `OUT/results.md` and `OUT/results.json`; returns the rows."""
    import json
    from pathlib import Path

    import vit
    from vit.bench import setup_cpu
    from vit.official import get_complexity
    from vit.train import held_out_batches
    from vit.utils import resolve_device

    from .evaluation import evaluate_methods

    if cfg.data_dir is None:
        raise ValueError("an official pair is evaluated on an ImageFolder: pass --data-dir (train/ and val/ inside)")
    setup_cpu(cfg.threads, cfg.keep_freed_memory)
    device = resolve_device(cfg.device)
    name = cfg.supernet or "prance_official_small"
    if not name.startswith("prance_official"):
        raise ValueError(f"--actor is an official selector: --supernet must be an official preset, not {name!r}")
    model = vit.create_supernet(name, token_mode=cfg.token_mode, checkpoint=cfg.checkpoint).to(device).eval()
    selector = OfficialSelector.load(cfg.actor, model, device)
    protocol = "batch-mean" if cfg.protocol == "official" else "per-image"
    batch_size = 64 if cfg.protocol == "official" else cfg.batch_size
    batches = held_out_batches(cfg.data or "imagefolder", cfg.data_dir, model, cfg.images, batch_size, device)
    runs: dict[str, list] = {"largest configuration": [], f"official pair, {protocol}": []}
    methods = {}
    for key, pair in zip(runs, (None, selector)):
        method = official_method(model, pair, protocol)
        methods[key] = lambda x, method=method, seen=runs[key]: _recording(method, x, seen)
    measured = evaluate_methods(methods, batches, model, desc="evaluating the official pair, batch by batch")
    rows = []
    for key, row in measured.items():
        flops = [get_complexity(model, s) for s in dict.fromkeys(runs[key])]
        by_subnet = dict(zip(dict.fromkeys(runs[key]), flops))
        official_g = sum(by_subnet[s] for s in runs[key]) / len(runs[key]) / 1e9
        rows.append({"method": key, "official_gflops": official_g, **row})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images = sum(len(y) for _, y in batches)
    lines = [
        f"{name} ({model.token_mode}), {images} held-out images, batch {batch_size}, protocol {cfg.protocol}; "
        "GFLOPs: the release's count (`get_complexity`), GMACs: ours (what runs).",
        "",
        "| method | Top-1 (%) | Top-5 (%) | GFLOPs (theirs) | GMACs (ours) | params (M) | images/s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['top1'] * 100:.2f} | {r['top5'] * 100:.2f} | {r['official_gflops']:.3f} "
            f"| {r['gmacs']:.3f} | {r['params'] / 1e6:.2f} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"table": rows}, indent=2, default=str))
    print(text)
    print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return rows


def _recording(method, images: Tensor, seen: list):
    """`method(images)`, its outcome's configurations appended to `seen`."""
    outcome = method(images)
    seen.extend(outcome.subnets)
    return outcome


__all__ = [
    "PROTOCOLS",
    "OfficialSelector",
    "PolicyNet",
    "action_dim",
    "evaluate_official",
    "official_method",
    "run_official",
]

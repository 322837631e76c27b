"""An agent that is not from stable-baselines3: REINFORCE in a plain Gymnasium loop on PranceViT-v1.

The policy is a small torch module with one categorical head per action field. It is trained episode by
episode against `gymnasium.make("PranceViT-v1")` (the Result-to-Go rewards summed into returns-to-go, a running
baseline), and, because it has stable-baselines3's `predict` signature, it then plugs into `agents.AdaptiveViT`
and `agents.measure` unchanged.

    python scripts/reinforce_example.py                     # 2000 episodes on prance_fmnist, then a test
"""

from __future__ import annotations

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

from dataclasses import dataclass, field

import gymnasium
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import agents
import prance_env  # noqa: F401  (registers PranceViT-v1)
from vit.bench import setup_cpu
from vit.cli import DEVICE_HELP, device_field, run, threads_field
from vit.train import held_out_batches


class Reinforce(nn.Module):
    """A categorical policy over the env's `MultiDiscrete` action from (cls, progress, price)."""

    def __init__(self, observation_space: gymnasium.spaces.Dict, nvec, hidden: int = 64) -> None:
        super().__init__()
        width = sum(int(np.prod(observation_space[k].shape)) for k in ("cls", "progress", "price"))
        self.nvec = [int(n) for n in nvec]
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.Tanh())
        self.heads = nn.Linear(hidden, sum(self.nvec))

    def distributions(self, obs: dict) -> list[torch.distributions.Categorical]:
        """One categorical distribution per action field, for one observation or a batch (numpy or torch, any
        device: the policy stays on the CPU)."""
        x = torch.cat([torch.as_tensor(obs[k], dtype=torch.float32).cpu() for k in ("cls", "progress", "price")], -1)
        logits = self.heads(self.body(x)).split(self.nvec, dim=-1)
        return [torch.distributions.Categorical(logits=lg) for lg in logits]

    @torch.no_grad()
    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """stable-baselines3's signature: actions for one observation or a batch."""
        dists = self.distributions(observation)
        picks = [d.probs.argmax(-1) if deterministic else d.sample() for d in dists]
        return torch.stack(picks, -1).numpy(), state


@dataclass
class Args:
    """Train a REINFORCE selector in a plain Gymnasium loop, then measure it with AdaptiveViT."""

    episodes: int = field(default=2000, metadata={"help": "training episodes (one image each)"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    price: float = field(default=0.03, metadata={"help": "compute price"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST folder (default: Debian's)"})
    images: int = field(default=1000, metadata={"help": "held-out images measured at the end"})
    batch_size: int = field(default=256, metadata={"help": "images per forward of the final measurement"})
    device: str = device_field(f"{DEVICE_HELP}: the supernet's (the policy's is cpu)")
    threads: int = threads_field()
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> dict:
    """Train the policy as `args` says, then measure it on held-out images: the training returns and the
    measurement (`agents.measure`'s keys)."""
    setup_cpu(args.threads, keep_memory=False)
    torch.manual_seed(args.seed)
    env = gymnasium.make(
        "PranceViT-v1",
        supernet=args.supernet,
        checkpoint=args.checkpoint,
        data_dir=args.data_dir,
        quality="logprob",
        price=args.price,
        device=args.device,
    )
    with env:  # closed however training ends
        policy = Reinforce(env.observation_space, env.action_space.nvec)
        optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
        baseline, returns = 0.0, []
        obs, _ = env.reset(seed=args.seed)
        for _ in (bar := tqdm(range(args.episodes), desc="REINFORCE", unit="episode")):
            log_probs, rewards, done = [], [], False
            while not done:
                dists = policy.distributions(obs)
                action = torch.stack([d.sample() for d in dists])
                log_probs.append(sum(d.log_prob(a) for d, a in zip(dists, action)))
                obs, reward, terminated, truncated, _ = env.step(action.numpy())
                rewards.append(float(reward))
                done = terminated or truncated
            to_go = torch.tensor(np.cumsum(rewards[::-1])[::-1].copy(), dtype=torch.float32)
            loss = -(torch.stack(log_probs) * (to_go - baseline)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            baseline = 0.95 * baseline + 0.05 * float(to_go[0])
            returns.append(float(to_go[0]))
            if len(returns) % 20 == 0:
                bar.set_postfix(mean_return=f"{np.mean(returns[-100:]):+.3f}")
            obs, _ = env.reset()

        model = env.unwrapped.model
    adaptive = agents.AdaptiveViT(model, policy.eval(), price=args.price)
    test = held_out_batches("fashion-mnist", args.data_dir, model, args.images, args.batch_size, model.pos_embed.device)
    result = agents.measure(adaptive, test)
    print(
        f"REINFORCE, {args.episodes} episodes: mean return of the last 100 {np.mean(returns[-100:]):+.4f}; on "
        f"{args.images} test images at price {args.price:g}: Top-1 {result['top1'] * 100:.2f}%, "
        f"MACs ratio {result['flops_ratio']:.3f}, tokens kept {result['tokens_kept']:.3f}"
    )
    return {"returns": returns, **result}


if __name__ == "__main__":
    run(main, Args)

"""Speed of the batched PranceViT-v0 against a plain forward pass of the same subnets, in one run.

For `num_envs` images and random actions (seeded), it times whole episodes (reset + every step) in `terminal`
mode (no Result-to-Go completion: the env's own overhead) and in `delta` mode (a completion after every step),
then a bucketed forward of the subnets those episodes chose, on the same images.

    python scripts/benchmark_env.py                     # prance_fmnist, 256 sub-envs, CPU
"""

from dataclasses import dataclass, field

import gymnasium
import numpy as np
import torch

import prance_env  # noqa: F401  (registers PranceViT-v0)
from vit.utils import parse_dataclass, seconds_per_call


@dataclass
class Args:
    """Env steps per second and the env's overhead over a plain forward pass."""

    num_envs: int = field(default=256, metadata={"help": "sub-envs (images per batch)"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet"})
    checkpoint: str | None = field(default=None, metadata={"help": "weights file (default: shipped)"})
    data_path: str | None = field(default=None, metadata={"help": "Fashion-MNIST folder"})
    policy: str = field(default="random", metadata={"help": "random | full (every action at its maximum)"})
    repeats: int = field(default=5, metadata={"help": "timed episodes per measurement (median)"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | auto"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def main(args: Args) -> dict[str, float]:
    results = {}
    subnets = images = None
    for reward in ("terminal", "delta"):
        envs = gymnasium.make_vec(
            "PranceViT-v0",
            num_envs=args.num_envs,
            supernet=args.supernet,
            checkpoint=args.checkpoint,
            data_path=args.data_path,
            device=args.device,
            reward=reward,
            split="test",
        )
        rng = np.random.default_rng(args.seed)
        nvec = envs.single_action_space.nvec
        plan = [rng.integers(0, nvec, (args.num_envs, len(nvec))) for _ in range(envs.inference.num_steps)]
        if args.policy == "full":
            plan = [np.broadcast_to(nvec - 1, p.shape) for p in plan]

        def episode(envs=envs, plan=plan):
            envs.reset(options={"indices": np.arange(args.num_envs)})
            for actions in plan:
                _, _, _, _, info = envs.step(actions)
            return info

        info = episode()
        seconds = seconds_per_call(episode, args.repeats, warmup=0, device=envs.model.pos_embed.device)
        results[reward] = seconds
        steps = len(plan) * args.num_envs
        print(
            f"{reward:>8}: {seconds * 1e3:.0f} ms an episode of {args.num_envs} images, "
            f"{steps / seconds:.0f} env steps/s"
        )
        subnets, model = list(info["subnet"]), envs.model
        images = envs.source.get(np.arange(args.num_envs))[0]
    with torch.inference_mode():
        plain = seconds_per_call(lambda: model(images, subnets), args.repeats, device=images.device)
    results["forward"] = plain
    print(f"{'forward':>8}: {plain * 1e3:.0f} ms for the same subnets (bucketed forward pass)")
    print(f"\nepisode without completion / forward: {results['terminal'] / plain:.2f} (target <= 1.15)")
    print(f"episode with Result-to-Go completion / forward: {results['delta'] / plain:.2f}")
    return results


if __name__ == "__main__":
    main(parse_dataclass(Args))

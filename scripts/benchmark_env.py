"""Speed of the batched PranceViT-v1 against a plain forward pass of the same subnets, in one run.

For `num_envs` images and random actions (seeded), it times whole episodes (reset + every step) in `terminal`
mode (no Result-to-Go completion: the env's own overhead) and in `delta` mode (a completion after every step),
then a per-sample forward pass (packed) of the subnets those episodes chose, on the same images.

    python scripts/benchmark_env.py                     # prance_fmnist, 256 sub-envs
    python scripts/benchmark_env.py --device cpu --threads 1
"""

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

import contextlib
from dataclasses import dataclass, field

import gymnasium
import numpy as np
import torch

import prance_env  # noqa: F401  (registers PranceViT-v1)
from vit.utils import parse_dataclass, seconds_per_call, setup_cpu


@dataclass
class Args:
    """Env steps per second and the env's overhead over a plain forward pass."""

    num_envs: int = field(default=256, metadata={"help": "sub-envs (images per batch)"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    policy: str = field(default="random", metadata={"help": "random | full (every action at its maximum)"})
    repeats: int = field(default=5, metadata={"help": "timed episodes per measurement (median)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = field(default=0, metadata={"help": "random seed (actions)"})


def main(args: Args) -> dict[str, float]:
    setup_cpu(args.threads, keep_memory=False)
    with contextlib.ExitStack() as closing:  # the envs are closed however the run ends
        envs = {}
        for reward in ("terminal", "delta"):
            envs[reward] = gymnasium.make_vec(
                "PranceViT-v1",
                num_envs=args.num_envs,
                supernet=args.supernet,
                checkpoint=args.checkpoint,
                data=args.data,
                data_path=args.data_dir,
                device=args.device,
                reward=reward,
                split=vit.data.held_out_split(args.data),
            )
            closing.callback(envs[reward].close)
        return _measure(args, envs)


def _measure(args: Args, envs: dict) -> dict[str, float]:
    """The timings of `main` on its two envs (keyed by reward mode)."""
    some = envs["terminal"]
    rng = np.random.default_rng(args.seed)
    nvec = some.single_action_space.nvec
    plan = [rng.integers(0, nvec, (args.num_envs, len(nvec))) for _ in range(some.inference.num_steps)]
    if args.policy == "full":
        plan = [np.broadcast_to(nvec - 1, p.shape) for p in plan]

    def episode(env) -> dict:
        env.reset(options={"indices": np.arange(args.num_envs)})
        for actions in plan:
            _, _, _, _, info = env.step(actions)
        return info

    subnets = list(episode(some)["subnet"])
    images = some.source.get(np.arange(args.num_envs))[0]
    device = images.device

    def forward():
        with torch.inference_mode():
            some.model(images, subnets)

    calls = {"terminal": lambda: episode(envs["terminal"]), "delta": lambda: episode(envs["delta"]), "forward": forward}
    for call in calls.values():  # warm-up
        call()
    # interleaved rounds: this machine's speed drifts by tens of percent, so ratios are taken within a round
    rounds = [
        {k: seconds_per_call(call, repeats=1, warmup=0, device=device) for k, call in calls.items()}
        for _ in range(args.repeats)
    ]
    median = {k: float(np.median([r[k] for r in rounds])) for k in calls}
    steps = len(plan) * args.num_envs
    print(f"{args.num_envs} sub-envs, {args.policy} actions, {args.repeats} interleaved rounds (medians)")
    for k in ("terminal", "delta"):
        print(f"{k:>8}: {median[k] * 1e3:.0f} ms an episode, {steps / median[k]:.0f} env steps/s")
    print(f"{'forward':>8}: {median['forward'] * 1e3:.0f} ms for the same subnets (per-sample forward pass, packed)")
    ratios = {k: float(np.median([r[k] / r["forward"] for r in rounds])) for k in ("terminal", "delta")}
    print(f"\nepisode without completion / forward: {ratios['terminal']:.2f} (target <= 1.15)")
    print(f"episode with Result-to-Go completion / forward: {ratios['delta']:.2f}")
    return ratios


if __name__ == "__main__":
    main(parse_dataclass(Args))

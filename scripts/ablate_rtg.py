"""Result-to-Go ablation: learning curves of PPO selectors trained with `delta`, `direct` and `terminal` rewards.

Every reward mode trains for the same steps with the same seeds and the same settings otherwise; a checkpoint is
kept every `every` steps. Each checkpoint is then scored on held-out test images by two measures that mean the
same whatever the reward it was trained with:

- held-out return: the final result the selector reaches at a fixed price, q - price * MACs ratio, with q the
  training quality (mean clipped log-probability of the true class for `logprob`, Top-1 for `correct`);
- Top-1 at a fixed budget: the price calibrated (on training images) to a mean MACs ratio of `budget`.

It writes `OUT/ablation.json`, `OUT/ablation.md` (a table of the curves) and `OUT/ablation.png`.

    python scripts/ablate_rtg.py                       # 3 modes x 240k steps x seed 0 on prance_fmnist
    python scripts/ablate_rtg.py --seeds 0 1 2 --steps 200000
    python scripts/ablate_rtg.py --decisions grouped --rewards delta terminal --one-shot --seeds 0 1

`--decisions` picks the MDP (per-block, or PRANCE's grouped decisions at blocks 3, 6, 9); `--one-shot` adds, per
seed, a selector that takes every decision at once from the stem's features (one step: the no-MDP baseline),
trained with the first reward mode.
"""

from __future__ import annotations

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

# isort: split

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import agents
from agents.ppo import SelectorConfig, train_selector
from agents.selector import algorithm, selector_dataset
from vit.train import subset_batches
from vit.utils import parse_dataclass, resolve_device, setup_cpu


@dataclass
class Args:
    """Learning curves of delta, direct and terminal rewards."""

    rewards: tuple[str, ...] = field(default=("delta", "direct", "terminal"), metadata={"help": "reward modes"})
    steps: int = field(default=240_000, metadata={"help": "environment steps per run"})
    every: int = field(default=40_000, metadata={"help": "steps between scored checkpoints"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "seeds (every mode runs every seed)"})
    decisions: str = field(default="per-block", metadata={"help": "per-block | grouped (the MDP of every mode)"})
    one_shot: bool = field(default=False, metadata={"help": "add a one-shot selector per seed (no MDP)"})
    price: float = field(default=0.01, metadata={"help": "fixed price of the held-out return"})
    budget: float = field(default=0.5, metadata={"help": "MACs ratio of the Top-1 curve"})
    images: int = field(default=1000, metadata={"help": "held-out images per score"})
    calib_images: int = field(default=512, metadata={"help": "training images used to calibrate the budget"})
    num_envs: int = field(default=256, metadata={"help": "sub-envs"})
    n_steps: int = field(default=22, metadata={"help": "rollout length per sub-env"})
    minibatch_size: int = field(default=1408, metadata={"help": "env steps per PPO minibatch"})
    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    data_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST folder (default: Debian's)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    out: str = field(
        default="runs/ablate_rtg", metadata={"help": "output folder (ablation.md, .json, .png; one run folder each)"}
    )
    resume: bool = field(default=False, metadata={"help": "reuse finished runs and resume unfinished ones"})


ONE_SHOT = "one-shot"


def run_config(args: Args, label: str, seed: int) -> SelectorConfig:
    """The selector run of a curve: a reward mode on `args.decisions`, or the one-shot baseline."""
    one_shot = label == ONE_SHOT
    reward = args.rewards[0] if one_shot else label
    return SelectorConfig(
        supernet=args.supernet,
        checkpoint=args.checkpoint,
        data_dir=args.data_dir,
        reward=reward,
        decisions=ONE_SHOT if one_shot else args.decisions,
        total_steps=args.steps,
        num_envs=args.num_envs,
        n_steps=args.n_steps,
        minibatch_size=args.minibatch_size,
        eval_prices=(args.price,),
        images=min(args.images, 512),
        eval_every=10 * args.steps,  # scored from the checkpoints afterwards
        save_every=args.every,
        out=str(Path(args.out) / f"{label}_seed{seed}"),
        resume=args.resume,
        seed=seed,
        device=args.device,
    )


def score(cfg: SelectorConfig, checkpoint: Path, adaptive: agents.AdaptiveViT, test, calibration, args) -> dict:
    """Held-out return at the fixed price and Top-1 at the calibrated budget of one checkpoint."""
    adaptive.policy = algorithm(cfg.algo).load(checkpoint, device=adaptive.supernet.pos_embed.device)
    adaptive.policy.policy.set_training_mode(False)
    fixed = agents.measure(adaptive, test, price=args.price)
    quality = fixed["logprob"] if cfg.quality == "logprob" else fixed["top1"]
    with warnings.catch_warnings():  # early checkpoints may not reach the budget: the MACs ratio column says so
        warnings.simplefilter("ignore")
        price = agents.calibrate(adaptive, calibration, args.budget, tolerance=0.01, max_iter=6)
    budget = agents.measure(adaptive, test, price=price)
    return {
        "return": quality - args.price * fixed["flops_ratio"],
        "flops_ratio_at_price": fixed["flops_ratio"],
        "top1_at_budget": budget["top1"],
        "flops_ratio_at_budget": budget["flops_ratio"],
        "budget_price": price,
    }


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob("selector_*.zip"):
        steps = path.stem.split("_")[-1]
        if steps.isdigit():
            found.append((int(steps), path))
    return sorted(found)


def plot(curves: dict, args: Args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("return", f"held-out return at price {args.price:g}"),
        ("top1_at_budget", f"Top-1 (%) at MACs ratio {args.budget:g}"),
    )
    for ax, (key, title) in zip(axes, panels):
        for reward, rows in curves.items():
            steps = sorted({r["steps"] for r in rows})
            values = np.array([[r[key] for r in rows if r["steps"] == s] for s in steps], dtype=float)
            scale = 100 if key == "top1_at_budget" else 1
            mean = values.mean(1) * scale
            line = ax.plot(steps, mean, "o-", label=reward)[0]
            if values.shape[1] > 1:
                ax.fill_between(steps, values.min(1) * scale, values.max(1) * scale, alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("environment steps (thousands)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}"))
        ax.grid(alpha=0.3)
    axes[0].legend(title="reward")
    seeds = ", ".join(map(str, args.seeds))
    fig.suptitle(f"Result-to-Go ablation ({args.supernet}, {args.decisions} decisions, seeds {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(args: Args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_cpu(args.threads, keep_memory=False)
    device = resolve_device(args.device)
    curves: dict[str, list[dict]] = {}
    labels = [*args.rewards, *([ONE_SHOT] if args.one_shot else [])]
    runs = [(label, seed) for seed in args.seeds for label in labels]
    for reward, seed in tqdm(runs, desc="ablation runs"):
        cfg = run_config(args, reward, seed)
        if not (args.resume and (Path(cfg.out) / "selector.zip").is_file()):
            tqdm.write(f"training {reward}, seed {seed}")
            train_selector(cfg)
        adaptive = agents.load_adaptive(Path(cfg.out) / "selector", device=str(device))
        model = adaptive.supernet
        test = subset_batches(
            selector_dataset(Path(cfg.out) / "selector", "held-out", model, data_path=args.data_dir),
            args.images,
            args.num_envs,
            device,
        )
        calibration = subset_batches(
            selector_dataset(Path(cfg.out) / "selector", "train", model, data_path=args.data_dir),
            args.calib_images,
            args.num_envs,
            device,
        )
        for steps, path in tqdm(checkpoints(Path(cfg.out) / "checkpoints"), desc=f"scoring {reward}", leave=False):
            scores = score(cfg, path, adaptive, test, calibration, args)
            curves.setdefault(reward, []).append({"reward": reward, "seed": seed, "steps": steps, **scores})

    lines = [
        f"{args.decisions} decisions; held-out return at price {args.price:g} / Top-1 (%) at MACs ratio "
        f"{args.budget:g}, {args.images} held-out images, mean over seeds {', '.join(map(str, args.seeds))}",
        "",
        "| steps | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    all_steps = sorted({r["steps"] for rows in curves.values() for r in rows})
    for steps in all_steps:
        cells = []
        for reward in labels:
            rows = [r for r in curves.get(reward, []) if r["steps"] == steps]
            if rows:
                ret = np.mean([r["return"] for r in rows])
                top1 = np.mean([r["top1_at_budget"] for r in rows]) * 100
                cells.append(f"{ret:.4f} / {top1:.2f}")
            else:
                cells.append("")
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps({"args": vars(args), "curves": curves}, indent=2, default=list))
    plot(curves, args, out / "ablation.png")
    print(text)
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")
    return curves


if __name__ == "__main__":
    main(parse_dataclass(Args))

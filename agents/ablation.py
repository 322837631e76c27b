"""Result-to-Go ablation: learning curves of PPO selectors trained with `delta`, `direct` and `terminal` rewards.

Every reward mode trains for the same steps with the same seeds and the same settings otherwise; a checkpoint is
kept every `every` steps. Each checkpoint is then scored on held-out test images by two measures that mean the
same whatever the reward it was trained with:

- held-out return: the final result the selector reaches at a fixed price, q - price * MACs ratio, with q the
  training quality (mean clipped log-probability of the true class for `logprob`, Top-1 for `correct`);
- Top-1 at a fixed budget: the price calibrated (on training images) to a mean MACs ratio of `budget`.

`decisions` picks the MDP (per-block, or PRANCE's grouped decisions at blocks 3, 6, 9); `one_shot` adds, per seed, a
selector that takes every decision at once from the stem's features (one step: the no-MDP baseline), trained with
the first reward mode.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import vit
from vit.bench import setup_cpu
from vit.cli import device_field, threads_field
from vit.train import held_out_batches, subset_batches
from vit.utils import resolve_device

from .adaptive import AdaptiveViT, calibrate, measure
from .selector import algorithm, load_adaptive
from .training import SelectorConfig, checkpoints, train_selector

ONE_SHOT = "one-shot"
DATA = "fashion-mnist"  # the selectors' dataset: SelectorConfig's default


@dataclass
class AblationConfig:
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
    device: str = device_field()
    threads: int = threads_field()
    out: str = field(
        default="runs/ablate_rtg", metadata={"help": "output folder (ablation.md, .json, .png; one run folder each)"}
    )
    resume: bool = field(default=False, metadata={"help": "reuse finished runs and resume unfinished ones"})


def run_config(cfg: AblationConfig, label: str, seed: int) -> SelectorConfig:
    """The selector run of a curve: a reward mode on `cfg.decisions`, or the one-shot baseline."""
    one_shot = label == ONE_SHOT
    return SelectorConfig(
        supernet=cfg.supernet,
        checkpoint=cfg.checkpoint,
        data=DATA,
        data_dir=cfg.data_dir,
        reward=cfg.rewards[0] if one_shot else label,
        decisions=ONE_SHOT if one_shot else cfg.decisions,
        total_steps=cfg.steps,
        num_envs=cfg.num_envs,
        n_steps=cfg.n_steps,
        minibatch_size=cfg.minibatch_size,
        eval_prices=(cfg.price,),
        images=min(cfg.images, 512),
        eval_every=10 * cfg.steps,  # scored from the checkpoints afterwards
        save_every=cfg.every,
        out=str(Path(cfg.out) / f"{label}_seed{seed}"),
        resume=cfg.resume,
        seed=seed,
        device=cfg.device,
    )


def score(
    run: SelectorConfig, checkpoint: Path, adaptive: AdaptiveViT, test: list, calibration: list, cfg: AblationConfig
) -> dict:
    """Held-out return at the fixed price and Top-1 at the calibrated budget of one checkpoint, run by `adaptive`'s
    supernet and decisions on the (images, labels) batches `test` and `calibration`."""
    policy = algorithm(run.algo).load(checkpoint, device=adaptive.supernet.pos_embed.device)
    policy.policy.set_training_mode(False)
    adaptive = adaptive.replace(policy=policy)
    fixed = measure(adaptive, test, price=cfg.price)
    quality = fixed["logprob"] if run.quality == "logprob" else fixed["top1"]
    with warnings.catch_warnings():  # early checkpoints may not reach the budget: the MACs ratio column says so
        warnings.simplefilter("ignore")
        price = calibrate(adaptive, calibration, cfg.budget, tolerance=0.01, max_iter=6)
    budget = measure(adaptive, test, price=price)
    return {
        "return": quality - cfg.price * fixed["flops_ratio"],
        "flops_ratio_at_price": fixed["flops_ratio"],
        "top1_at_budget": budget["top1"],
        "flops_ratio_at_budget": budget["flops_ratio"],
        "budget_price": price,
    }


def curves_markdown(curves: dict[str, list[dict]], labels: list[str], cfg: AblationConfig) -> str:
    """The table of the curves: per checkpoint step, each label's mean held-out return / Top-1 (%) over seeds."""
    lines = [
        f"{cfg.decisions} decisions; held-out return at price {cfg.price:g} / Top-1 (%) at MACs ratio "
        f"{cfg.budget:g}, {cfg.images} held-out images, mean over seeds {', '.join(map(str, cfg.seeds))}",
        "",
        "| steps | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for steps in sorted({r["steps"] for rows in curves.values() for r in rows}):
        cells = []
        for label in labels:
            rows = [r for r in curves.get(label, []) if r["steps"] == steps]
            if rows:
                ret = np.mean([r["return"] for r in rows])
                top1 = np.mean([r["top1_at_budget"] for r in rows]) * 100
                cells.append(f"{ret:.4f} / {top1:.2f}")
            else:
                cells.append("")
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], cfg: AblationConfig, path: Path) -> None:
    """The two curves (held-out return, Top-1 at the budget) of every label against steps, as a PNG at `path`;
    the band spans the seeds."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    panels = (
        ("return", f"held-out return at price {cfg.price:g}"),
        ("top1_at_budget", f"Top-1 (%) at MACs ratio {cfg.budget:g}"),
    )
    for ax, (key, title) in zip(axes, panels):
        for label, rows in curves.items():
            steps = sorted({r["steps"] for r in rows})
            values = np.array([[r[key] for r in rows if r["steps"] == s] for s in steps], dtype=float)
            scale = 100 if key == "top1_at_budget" else 1
            line = ax.plot(steps, values.mean(1) * scale, "o-", label=label)[0]
            if values.shape[1] > 1:
                ax.fill_between(steps, values.min(1) * scale, values.max(1) * scale, alpha=0.2, color=line.get_color())
        ax.set_title(title)
        ax.set_xlabel("environment steps (thousands)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}"))
        ax.grid(alpha=0.3)
    axes[0].legend(title="reward")
    seeds = ", ".join(map(str, cfg.seeds))
    fig.suptitle(f"Result-to-Go ablation ({cfg.supernet}, {cfg.decisions} decisions, seeds {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def ablate_rtg(cfg: AblationConfig) -> dict[str, list[dict]]:
    """Train every (reward mode, seed) run of `cfg` (finished runs reused with `resume`), score each checkpoint, and
    write `OUT/ablation.md` (the table of the curves, also printed), `OUT/ablation.json` and `OUT/ablation.png`.
    Returns the curves: per label, one row per seed and checkpoint (`steps` and the scores of `score`)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_cpu(cfg.threads, keep_memory=False)
    device = resolve_device(cfg.device)
    curves: dict[str, list[dict]] = {}
    labels = [*cfg.rewards, *([ONE_SHOT] if cfg.one_shot else [])]
    runs = [(label, seed) for seed in cfg.seeds for label in labels]
    for label, seed in tqdm(runs, desc="ablation runs"):
        run = run_config(cfg, label, seed)
        if not (cfg.resume and (Path(run.out) / "selector.zip").is_file()):
            tqdm.write(f"training {label}, seed {seed}")
            train_selector(run)
        adaptive = load_adaptive(Path(run.out) / "selector", device=str(device))
        model = adaptive.supernet
        test = held_out_batches(DATA, cfg.data_dir, model, cfg.images, cfg.num_envs, device)
        train = vit.load_dataset(DATA, split="train", root=cfg.data_dir, model=model)
        calibration = subset_batches(train, cfg.calib_images, cfg.num_envs, device)
        for steps, path in tqdm(checkpoints(Path(run.out) / "checkpoints"), desc=f"scoring {label}", leave=False):
            scores = score(run, path, adaptive, test, calibration, cfg)
            curves.setdefault(label, []).append({"reward": label, "seed": seed, "steps": steps, **scores})

    text = curves_markdown(curves, labels, cfg)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps({"args": vars(cfg), "curves": curves}, indent=2, default=list))
    plot_curves(curves, cfg, out / "ablation.png")
    print(text)
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'}")
    return curves


__all__ = ["AblationConfig", "ablate_rtg", "curves_markdown", "plot_curves", "run_config", "score"]

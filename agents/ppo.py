"""Selector training: PPO (or A2C, MaskablePPO, RecurrentPPO) with the CLS features extractor on the batched env.

python scripts/train_selector.py                      # PPO on prance_fmnist, Fashion-MNIST train split
python scripts/train_selector.py --algo maskable_ppo  # sb3-contrib
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.utils import ConstantSchedule
from stable_baselines3.common.vec_env import VecMonitor
from tqdm.auto import tqdm

import prance_env
import vit
from vit.checkpoint import atomic_write
from vit.train import first_batches
from vit.utils import resolve_device

from .adaptive import AdaptiveViT, measure
from .extractor import CLSFeaturesExtractor
from .selector import (
    algorithm,
    check_supernet,
    read_settings,
    resolve_selector,
    save_selector,
    supernet_signature,
)


@dataclass
class SelectorConfig:
    """Train a PRANCE selector on PranceViT-v0."""

    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet"})
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights (default: shipped)"})
    token_mode: str | None = field(default=None, metadata={"help": "prune | merge | prune_merge (default: preset)"})
    data: str = field(default="fashion-mnist", metadata={"help": "dataset name"})
    data_path: str | None = field(default=None, metadata={"help": "dataset folder"})
    eval_split: str = field(default="test", metadata={"help": "held-out split for evaluation"})
    algo: str = field(default="ppo", metadata={"help": "ppo | a2c | maskable_ppo | recurrent_ppo"})
    total_steps: int = field(default=800_000, metadata={"help": "environment steps (images x blocks)"})
    num_envs: int = field(default=256, metadata={"help": "images per batch (sub-envs)"})
    n_steps: int = field(default=22, metadata={"help": "rollout length per sub-env (two episodes by default)"})
    batch_size: int = field(default=1408, metadata={"help": "PPO minibatch"})
    n_epochs: int = field(default=4, metadata={"help": "PPO epochs per rollout"})
    lr: float = field(default=3e-4, metadata={"help": "learning rate"})
    gamma: float = field(default=1.0, metadata={"help": "discount (episodes are short and finite)"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    ent_coef: float = field(default=0.005, metadata={"help": "entropy bonus"})
    reward: str = field(default="delta", metadata={"help": "delta | direct | terminal"})
    quality: str = field(default="logprob", metadata={"help": "correct | logprob | agree"})
    price_low: float = field(default=3e-4, metadata={"help": "lowest compute price of the log-uniform range"})
    price_high: float = field(default=0.3, metadata={"help": "highest compute price"})
    stem_blocks: int = field(default=1, metadata={"help": "full-width blocks before the first decision"})
    blocks_per_step: int = field(default=1, metadata={"help": "blocks per decision"})
    hidden: int = field(default=128, metadata={"help": "width of the CLS extractor's MLP"})
    eval_prices: tuple[float, ...] = field(default=(0.001, 0.003, 0.01, 0.03), metadata={"help": "prices evaluated"})
    eval_images: int = field(default=2000, metadata={"help": "held-out images per evaluation"})
    eval_every: int = field(default=100_000, metadata={"help": "environment steps between evaluations"})
    save_every: int = field(default=100_000, metadata={"help": "environment steps between checkpoints"})
    out: str = field(default="runs/selector", metadata={"help": "output folder"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in OUT"})
    init: str | None = field(
        default=None,
        metadata={"help": "fine-tune a saved selector (PATH, or shipped:NAME) for TOTAL_STEPS instead of a new one"},
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def env_kwargs(self) -> dict:
        """Keyword arguments of PranceViT-v0 for this run (training split)."""
        checkpoint = None if self.checkpoint is None else str(Path(self.checkpoint).resolve())
        return dict(
            supernet=self.supernet,
            checkpoint=checkpoint,
            token_mode=self.token_mode,
            data=self.data,
            data_path=self.data_path,
            split="train",
            device=self.device,
            reward=self.reward,
            quality=self.quality,
            price_range=(self.price_low, self.price_high),
            stem_blocks=self.stem_blocks,
            blocks_per_step=self.blocks_per_step,
        )


class ProgressBar(BaseCallback):
    """A tqdm bar over environment steps."""

    def _on_training_start(self) -> None:
        self.bar = tqdm(
            total=self.locals["total_timesteps"], initial=self.model.num_timesteps, unit="step", desc="selector"
        )

    def _on_step(self) -> bool:
        self.bar.update(self.training_env.num_envs)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()


class SelectorEval(BaseCallback):
    """Every `every` steps: Top-1, mean MACs ratio and tokens kept on held-out images at a few prices."""

    def __init__(self, supernet: vit.ElasticViT, batches: list, prices, every: int, cfg: SelectorConfig) -> None:
        super().__init__()
        self.supernet, self.batches, self.prices, self.every, self.cfg = supernet, batches, prices, every, cfg
        self.last, self.history = 0, []

    def evaluate(self) -> list[dict]:
        """One evaluation at every price, logged to TensorBoard and kept in `history`."""
        adaptive = AdaptiveViT(
            self.supernet,
            self.model,
            price_range=(self.cfg.price_low, self.cfg.price_high),
            stem_blocks=self.cfg.stem_blocks,
            blocks_per_step=self.cfg.blocks_per_step,
        )
        rows = []
        for price in self.prices:
            adaptive.price = price
            row = {"steps": self.num_timesteps, "price": price, **measure(adaptive, self.batches)}
            rows.append(row)
            for key in ("top1", "flops_ratio", "tokens_kept"):
                self.logger.record(f"eval/{key}@{price:g}", row[key])
        self.model.policy.set_training_mode(True)
        self.history.extend(rows)
        tqdm.write(
            f"[{self.num_timesteps} steps] "
            + "; ".join(
                f"price {r['price']:g}: Top-1 {r['top1']:.4f}, MACs {r['flops_ratio']:.3f}, "
                f"tokens {r['tokens_kept']:.3f}"
                for r in rows
            )
        )
        return rows

    def _on_training_start(self) -> None:
        self.last = self.num_timesteps

    def _on_rollout_start(self) -> None:  # after the policy update, so the model evaluated is the latest
        if self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            self.evaluate()

    def _on_step(self) -> bool:
        return True


class Checkpoints(BaseCallback):
    """Every `every` steps, the model as `OUT/checkpoints/selector_<steps>.zip` (written, then renamed)."""

    def __init__(self, folder: Path, every: int) -> None:
        super().__init__()
        self.folder, self.every, self.last = folder, every, 0

    def _on_training_start(self) -> None:
        self.last = self.num_timesteps

    def _on_rollout_start(self) -> None:  # after the policy update, so a resumed run loses no update
        if self.num_timesteps - self.last >= self.every:
            self.last = self.num_timesteps
            save_checkpoint(self.model, self.folder)

    def _on_step(self) -> bool:
        return True


def save_checkpoint(model: BaseAlgorithm, folder: Path) -> Path:
    """Save `model` atomically as `selector_<steps>.zip` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"selector_{model.num_timesteps}.zip"
    tmp = folder / f".tmp_{model.num_timesteps}.zip"
    model.save(tmp)
    tmp.replace(final)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of most steps in `folder`, if any."""
    found = [
        (int(m.group(1)), p)
        for p in folder.glob("selector_*.zip")
        if (m := re.fullmatch(r"selector_(\d+)\.zip", p.name))
    ]
    return max(found)[1] if found else None


def held_out_batches(cfg: SelectorConfig, model: vit.ElasticViT, images: int, device: torch.device) -> list:
    """The first `images` images of the evaluation split, in batches of `num_envs`."""
    data = vit.load_dataset(cfg.data, split=cfg.eval_split, root=cfg.data_path, model=model)
    return first_batches(data, images, cfg.num_envs, device)


def train_selector(cfg: SelectorConfig) -> tuple[BaseAlgorithm, list[dict]]:
    """Train a selector as `cfg` says; saves `OUT/selector.zip` + `.json`. Returns the model and eval history."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    envs = gymnasium.make_vec("PranceViT-v0", num_envs=cfg.num_envs, **cfg.env_kwargs())
    venv = VecMonitor(prance_env.to_sb3(envs))
    venv.seed(cfg.seed)
    algo = algorithm(cfg.algo)
    resume_from = latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if resume_from is not None:
        model = algo.load(resume_from, env=venv, device=device, tensorboard_log=str(out / "tb"))
        tqdm.write(f"resumed from {resume_from} at {model.num_timesteps} steps")
    elif cfg.init is not None:
        path = resolve_selector(cfg.init)
        settings = read_settings(path)
        check_supernet(settings, envs.unwrapped.model)
        if settings["algo"] != cfg.algo:
            raise ValueError(f"{cfg.init} was trained with {settings['algo']!r}, not --algo {cfg.algo!r}")
        model = algo.load(
            path.with_suffix(".zip"),
            env=venv,
            device=device,
            tensorboard_log=str(out / "tb"),
            custom_objects={"learning_rate": cfg.lr, "lr_schedule": ConstantSchedule(cfg.lr)},  # --lr applies
        )
        model.set_random_seed(cfg.seed)
        model.num_timesteps = 0  # count the fine-tuning steps from zero
        tqdm.write(f"fine-tuning {path.with_suffix('.zip')} for {cfg.total_steps} steps")
    else:
        policy = "MultiInputLstmPolicy" if cfg.algo == "recurrent_ppo" else "MultiInputPolicy"
        kwargs = dict(
            n_steps=cfg.n_steps, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, ent_coef=cfg.ent_coef, learning_rate=cfg.lr
        )
        if cfg.algo != "a2c":
            kwargs.update(batch_size=cfg.batch_size, n_epochs=cfg.n_epochs)
        policy_kwargs = dict(
            features_extractor_class=CLSFeaturesExtractor,
            features_extractor_kwargs=dict(hidden=cfg.hidden),
            net_arch=dict(pi=[64], vf=[64]),
        )
        model = algo(
            policy,
            venv,
            policy_kwargs=policy_kwargs,
            tensorboard_log=str(out / "tb"),
            seed=cfg.seed,
            device=device,
            **kwargs,
        )
    supernet = envs.unwrapped.model
    evaluation = SelectorEval(
        supernet,
        held_out_batches(cfg, supernet, cfg.eval_images, supernet.pos_embed.device),
        cfg.eval_prices,
        cfg.eval_every,
        cfg,
    )
    callbacks = CallbackList([ProgressBar(), evaluation, Checkpoints(out / "checkpoints", cfg.save_every)])
    started = time.time()
    remaining = max(0, cfg.total_steps - model.num_timesteps)
    history_file = out / "eval_history.json"
    if resume_from is not None and history_file.is_file():  # keep the evaluations before the interruption
        earlier = json.loads(history_file.read_text())
        evaluation.history = [row for row in earlier if row["steps"] <= model.num_timesteps]
    model.learn(remaining, callback=callbacks, reset_num_timesteps=resume_from is None, tb_log_name=cfg.algo)
    save_checkpoint(model, out / "checkpoints")
    evaluation.init_callback(model)
    if not evaluation.history or evaluation.history[-1]["steps"] != model.num_timesteps:
        evaluation.evaluate()
    settings = {
        "algo": cfg.algo,
        "signature": supernet_signature(supernet),
        "config": asdict(cfg),
        "env": {**cfg.env_kwargs(), "price_range": [cfg.price_low, cfg.price_high]},
        "minutes": (time.time() - started) / 60,
    }
    save_selector(model, out / "selector", settings)
    atomic_write(history_file, lambda tmp: Path(tmp).write_text(json.dumps(evaluation.history, indent=2)))
    venv.close()
    return model, evaluation.history


__all__ = ["SelectorConfig", "latest_checkpoint", "train_selector"]

"""Selector training: PPO, A2C, MaskablePPO or RecurrentPPO with the CLS features extractor on the batched env.

python scripts/train_selector.py                      # PPO on prance_fmnist, Fashion-MNIST train split
python scripts/train_selector.py --algo maskable_ppo  # sb3-contrib
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EveryNTimesteps,
    ProgressBarCallback,
)
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import ConstantSchedule, configure_logger
from stable_baselines3.common.vec_env import VecMonitor
from tqdm.auto import tqdm

import prance_env
import vit
from vit.checkpoint import atomic_write
from vit.cli import amp_field, device_field, threads_field
from vit.inference import DecisionSchedule
from vit.registry import SupernetShape
from vit.train import held_out_batches, subset_batches
from vit.utils import resolve_device

from .adaptive import AdaptiveViT, measure
from .extractor import CLSFeaturesExtractor
from .selector import (
    algorithm,
    calibrate_selector,
    check_supernet,
    read_settings,
    resolve_selector,
    save_selector,
    supernet_signature,
)

MDP = prance_env.MDPConfig()  # PranceViT-v1's defaults: a new selector trains on the registered MDP


@dataclass
class SelectorConfig(SupernetShape):
    """Train a PRANCE selector on PranceViT-v1."""

    supernet: str | None = field(
        default=None, metadata={"help": "registered supernet name (default: the checkpoint's, else prance_fmnist)"}
    )
    checkpoint: str | None = field(default=None, metadata={"help": "supernet weights file (default: shipped)"})
    token_mode: str | None = field(default=None, metadata={"help": "prune | merge | prune_merge (default: preset)"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagefolder | imagenet"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    eval_split: str | None = field(
        default=None, metadata={"help": "split evaluated (default: the held-out one, vit.data.held_out_split)"}
    )
    algo: str = field(default="ppo", metadata={"help": "ppo | a2c | maskable_ppo | recurrent_ppo"})
    total_steps: int = field(default=800_000, metadata={"help": "environment steps (images x decisions)"})
    num_envs: int = field(default=256, metadata={"help": "images per batch (sub-envs)"})
    n_steps: int = field(default=22, metadata={"help": "rollout length per sub-env (two episodes by default)"})
    minibatch_size: int = field(default=1408, metadata={"help": "env steps per PPO minibatch"})
    n_epochs: int = field(default=4, metadata={"help": "PPO epochs per rollout"})
    clip_range: float = field(default=0.2, metadata={"help": "PPO clip range of the probability ratio"})
    vf_coef: float = field(default=0.5, metadata={"help": "value loss coefficient"})
    max_grad_norm: float = field(default=0.5, metadata={"help": "gradient norm clipping"})
    target_kl: float | None = field(
        default=None, metadata={"help": "PPO: stop a rollout's epochs past this approximate KL (default: never)"}
    )
    lr: float = field(default=3e-4, metadata={"help": "learning rate"})
    gamma: float = field(default=1.0, metadata={"help": "discount (episodes are short and finite)"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    ent_coef: float = field(default=0.005, metadata={"help": "entropy bonus"})
    reward: str = field(default=MDP.reward, metadata={"help": "delta | direct | terminal"})
    quality: str = field(default=MDP.quality, metadata={"help": "correct | logprob | agree | no_worse"})
    price_low: float = field(default=MDP.price_range[0], metadata={"help": "lowest price of the log-uniform range"})
    price_high: float = field(default=MDP.price_range[1], metadata={"help": "highest compute price"})
    token_penalty: float = field(
        default=MDP.token_penalty,
        metadata={"help": "direct reward only: minus this times the fraction of tokens alive (official: 0.1)"},
    )
    decisions: str = field(
        default="per-block",
        metadata={"help": "per-block | grouped (PRANCE's: decisions at blocks 3, 6, 9) | one-shot (DecisionSchedule)"},
    )
    stem_blocks: int | None = field(
        default=None, metadata={"help": "full-width blocks before any decision (default: the decisions' own)"}
    )
    blocks_per_step: int | None = field(
        default=None, metadata={"help": "blocks per decision (default: the decisions' own)"}
    )
    hidden: int = field(default=128, metadata={"help": "width of the CLS extractor's MLP"})
    eval_prices: tuple[float, ...] = field(default=MDP.eval_prices, metadata={"help": "prices evaluated"})
    images: int = field(default=2000, metadata={"help": "held-out images per evaluation"})
    calib_images: int = field(
        default=1000,
        metadata={"help": "training images the saved selector's budget calibration is measured on (0: none)"},
    )
    eval_every: int = field(default=100_000, metadata={"help": "environment steps between evaluations"})
    save_every: int = field(default=100_000, metadata={"help": "environment steps between checkpoints"})
    out: str = field(default="runs/selector", metadata={"help": "output folder"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in OUT"})
    init: str | None = field(
        default=None,
        metadata={"help": "fine-tune a saved selector (PATH, or shipped:NAME) for TOTAL_STEPS instead of a new one"},
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = device_field()
    threads: int = threads_field()
    amp: bool = amp_field("run the supernet under bf16 autocast (CUDA or CPU)")

    def schedule(self) -> DecisionSchedule:
        """Where the decisions of this run fall and what each sets."""
        return DecisionSchedule.named(self.decisions, self.stem_blocks, self.blocks_per_step)

    @property
    def preset(self) -> str:
        """The preset this run builds: `supernet`, else the one `checkpoint` records, else `prance_fmnist`."""
        return vit.registry.preset_name(self.supernet, self.checkpoint)

    def build_supernet(self) -> vit.ElasticViT:
        """The supernet of this run: the preset `supernet` at the shapes given, with the weights of `checkpoint`
        (default: the preset's reference weights), offering the ratios the decisions choose."""
        from prance_env.build import build_supernet

        return build_supernet(
            self.preset,
            self.checkpoint,
            self.token_mode,
            None,
            torch.device("cpu"),
            self.schedule(),
            self.shape_kwargs(),
        )

    def env_kwargs(self) -> dict:
        """Keyword arguments of PranceViT-v1 for this run (training split), the supernet given by name and the loop's
        shape in full."""
        checkpoint = None if self.checkpoint is None else str(Path(self.checkpoint).resolve())
        schedule = self.schedule()
        return dict(
            supernet=self.preset,
            checkpoint=checkpoint,
            token_mode=self.token_mode,
            data=self.data,
            data_dir=self.data_dir,
            split="train",
            device=self.device,
            reward=self.reward,
            quality=self.quality,
            price_range=(self.price_low, self.price_high),
            token_penalty=self.token_penalty,
            decisions=self.decisions,
            stem_blocks=schedule.stem_blocks,
            blocks_per_step=schedule.blocks_per_step,
            amp=self.amp,
        )

    def algo_kwargs(self) -> dict:
        """Keyword arguments of the algorithm `algo` for this run, the learning rate left out."""
        kwargs = dict(
            n_steps=self.n_steps,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            ent_coef=self.ent_coef,
            vf_coef=self.vf_coef,
            max_grad_norm=self.max_grad_norm,
        )
        if self.algo != "a2c":
            kwargs.update(batch_size=self.minibatch_size, n_epochs=self.n_epochs)
            kwargs.update(clip_range=self.clip_range, target_kl=self.target_kl)
        return kwargs


class ProgressBar(ProgressBarCallback):
    """SB3's progress bar over environment steps, drawn with tqdm's default bar (SB3's needs `rich`), counting from
    the steps a resumed run starts at."""

    def __init__(self) -> None:
        BaseCallback.__init__(self)  # SB3's own checks for `rich`, which this bar does not need

    def _on_training_start(self) -> None:
        total, done = self.locals["total_timesteps"], self.model.num_timesteps
        self.pbar = tqdm(total=total, initial=done, unit="step", desc="selector")


class AfterUpdate(EveryNTimesteps):
    """SB3's `EveryNTimesteps`, checked when a rollout starts (after the policy update) rather than after every env
    step, so that what it triggers sees the policy trained on every step counted; counted from the steps the run
    starts at, so a resumed run keeps its rhythm."""

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self.last_time_trigger = self.num_timesteps

    def _on_rollout_start(self) -> None:
        super()._on_step()  # EveryNTimesteps's trigger

    def _on_step(self) -> bool:
        return True


class SelectorCheckpoint(CheckpointCallback):
    """SB3's `CheckpointCallback` saving `selector_<steps>.zip` atomically (a kill mid-write leaves the previous
    checkpoints whole); triggered by `AfterUpdate`."""

    def __init__(self, folder: Path) -> None:
        super().__init__(save_freq=1, save_path=str(folder), name_prefix="selector")

    def _checkpoint_path(self, checkpoint_type: str = "", extension: str = "") -> str:
        return os.path.join(self.save_path, f"{self.name_prefix}_{checkpoint_type}{self.num_timesteps}.{extension}")

    def _on_step(self) -> bool:
        atomic_write(self._checkpoint_path(extension="zip"), self.model.save)
        return True


def write_now(logger: Logger, values: dict, step: int, exclude: tuple[str, ...] = ()) -> None:
    """Write `values` to the outputs of `logger` (TensorBoard, ...) at `step` right away.

    Through a logger of its own over the same outputs: the records the algorithm has pending in `logger` keep the
    step of its next dump.
    """
    now = Logger(logger.dir, logger.output_formats)
    for key, value in values.items():
        now.record(key, value, exclude=exclude)
    now.dump(step)


class ConfigText(BaseCallback):
    """At the start of training, the run's full config as TensorBoard text (tag `config`): a table of fields."""

    def __init__(self, cfg: SelectorConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def _on_training_start(self) -> None:
        table = "| field | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in asdict(self.cfg).items())
        consoles_and_files = ("stdout", "log", "json", "csv")  # a table is for TensorBoard's text tab only
        write_now(self.logger, {"config": table}, self.num_timesteps, exclude=consoles_and_files)

    def _on_step(self) -> bool:
        return True


class SelectorEval(BaseCallback):
    """Top-1, mean MACs ratio and tokens kept on held-out images at a few prices, each time it is called (by
    `AfterUpdate`, and once at the end of training).

    Each evaluation is written to TensorBoard at the step it was measured and, when `history_file` is given, the
    whole `history` to that JSON file (atomically), so an interrupted run keeps what it measured.
    """

    def __init__(
        self, supernet: vit.ElasticViT, batches: list, cfg: SelectorConfig, history_file: Path | None = None
    ) -> None:
        super().__init__()
        self.supernet, self.batches, self.cfg = supernet, batches, cfg
        self.history_file = history_file
        self.history: list[dict] = []

    def evaluate(self) -> list[dict]:
        """One evaluation at every price, written to TensorBoard and `history_file`, and kept in `history`."""
        price_range = (self.cfg.price_low, self.cfg.price_high)
        schedule = self.cfg.schedule()
        adaptive = AdaptiveViT(self.supernet, self.model, price_range=price_range, schedule=schedule, amp=self.cfg.amp)
        rows = []
        for price in self.cfg.eval_prices:
            rows.append({"steps": self.num_timesteps, "price": price, **measure(adaptive, self.batches, price=price)})
        scalars = {f"eval/{key}@{r['price']:g}": r[key] for r in rows for key in ("top1", "flops_ratio", "tokens_kept")}
        write_now(self.logger, scalars, self.num_timesteps)
        self.history.extend(rows)
        if self.history_file is not None:
            atomic_write(self.history_file, lambda tmp: Path(tmp).write_text(json.dumps(self.history, indent=2)))
        tqdm.write(
            f"[{self.num_timesteps} steps] "
            + "; ".join(
                f"price {r['price']:g}: Top-1 {r['top1']:.4f}, MACs {r['flops_ratio']:.3f}, "
                f"tokens {r['tokens_kept']:.3f}"
                for r in rows
            )
        )
        return rows

    def _on_step(self) -> bool:
        self.evaluate()
        return True


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Every checkpoint `selector_<steps>.zip` in `folder`, as (steps, path), fewest steps first."""
    found = [
        (int(m.group(1)), p)
        for p in folder.glob("selector_*.zip")
        if (m := re.fullmatch(r"selector_(\d+)\.zip", p.name))
    ]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of most steps in `folder`, if any."""
    found = checkpoints(folder)
    return found[-1][1] if found else None


def train_selector(cfg: SelectorConfig, callback: BaseCallback | None = None) -> tuple[BaseAlgorithm, list[dict]]:
    """Train a selector as `cfg` says; saves `OUT/selector.zip` + `.json`. Returns the model and eval history.

    Writes, in OUT: `checkpoints/selector_<steps>.zip` every `save_every` steps, `eval_history.json` after every
    evaluation, and TensorBoard logs in `tb/` (the algorithm's, the evaluations at the step they were measured, the
    config as text). `callback` is an SB3 callback run after the built-in ones (to stop early, log more, ...).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # the env builds presets at their own shapes: this run's supernet goes in as a module, its weights loaded
    module = {"supernet": cfg.build_supernet(), "checkpoint": None}
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=cfg.num_envs, **{**cfg.env_kwargs(), **module})
    venv = VecMonitor(prance_env.to_sb3(envs))
    try:
        return _train(cfg, envs, venv, device, callback)
    finally:
        venv.close()


def _train(
    cfg: SelectorConfig,
    envs: gymnasium.vector.VectorEnv,
    venv: VecMonitor,
    device: torch.device,
    callback: BaseCallback | None,
) -> tuple[BaseAlgorithm, list[dict]]:
    """`train_selector` on its envs (closed by the caller)."""
    out = Path(cfg.out)
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
            # this run's price range may differ: only the bounds of the observed price change
            custom_objects={
                "learning_rate": cfg.lr,
                "lr_schedule": ConstantSchedule(cfg.lr),
                "observation_space": venv.observation_space,
            },
            **cfg.algo_kwargs(),  # this run's hyperparameters apply, not those the selector was trained with
        )
        model.set_random_seed(cfg.seed)
        model.num_timesteps = 0  # count the fine-tuning steps from zero
        tqdm.write(f"fine-tuning {path.with_suffix('.zip')} for {cfg.total_steps} steps")
    else:
        policy = "MultiInputLstmPolicy" if cfg.algo == "recurrent_ppo" else "MultiInputPolicy"
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
            learning_rate=cfg.lr,
            **cfg.algo_kwargs(),
        )
    supernet = envs.unwrapped.model
    history_file = out / "eval_history.json"
    if cfg.eval_split is None:
        test = held_out_batches(cfg.data, cfg.data_dir, supernet, cfg.images, cfg.num_envs, supernet.pos_embed.device)
    else:  # another split than the held-out one
        data = vit.load_dataset(cfg.data, split=cfg.eval_split, root=cfg.data_dir, model=supernet)
        test = subset_batches(data, cfg.images, cfg.num_envs, supernet.pos_embed.device)
    evaluation = SelectorEval(supernet, test, cfg, history_file=history_file)
    checkpoints = SelectorCheckpoint(out / "checkpoints")
    callbacks = [ProgressBar(), ConfigText(cfg), AfterUpdate(cfg.eval_every, evaluation)]
    callbacks += [AfterUpdate(cfg.save_every, checkpoints)] + ([callback] if callback is not None else [])
    started = time.time()
    remaining = max(0, cfg.total_steps - model.num_timesteps)
    if resume_from is not None and history_file.is_file():  # keep the evaluations before the interruption
        earlier = json.loads(history_file.read_text())
        evaluation.history = [row for row in earlier if row["steps"] <= model.num_timesteps]
    # the logger `learn` would configure, set here so that it is closed however the run ends
    model.set_logger(configure_logger(model.verbose, model.tensorboard_log, cfg.algo, resume_from is None))
    try:
        model.learn(
            remaining, callback=CallbackList(callbacks), reset_num_timesteps=resume_from is None, tb_log_name=cfg.algo
        )
        checkpoints.init_callback(model)
        checkpoints.on_step()
        evaluation.init_callback(model)
        evaluation.num_timesteps = model.num_timesteps
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
        if cfg.calib_images:
            calibrate_selector(out / "selector", cfg.calib_images, cfg.num_envs, cfg.device)
    finally:
        model.logger.close()
    return model, evaluation.history


__all__ = ["SelectorConfig", "checkpoints", "latest_checkpoint", "train_selector"]

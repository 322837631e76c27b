"""Stage three of PRANCE, joint fine-tuning: the supernet trained on the subnets its selector picks, alternating with
the selector fine-tuned on the new supernet.

Every step draws one price per image, log-uniform over the selector's training range (the env's draw), lets the
selector decide each image's subnet from the current supernet's features (`AdaptiveViT`, no gradients), then trains
the supernet on those per-sample subnets (packed tokens) and on its largest subnet, each against a mix of the labels
and a frozen copy of the full model before fine-tuning (the teacher):

    loss = mix(the selector's subnets) + largest_weight * mix(the largest subnet)
    mix  = (1 - label_weight) * CE(logits, the teacher's probabilities) + label_weight * CE(logits, labels)

`subnets` says who decides: the selector on the supernet being fine-tuned (on the fly, the default), the selector on
a frozen copy of the weights it was trained on (recorded: what decisions recorded before the round would be, for the
same images and prices), or random decisions of the selector's MDP (the control: the same steps and loss without a
selector, as ordinary supernet training samples its subnets).

The prices span the selector's range, so one fine-tuned supernet serves every budget (the official release keeps one
meta-network per budget); the largest subnet in the loss keeps the full model, which the env completes inference
with, from regressing. Then, with `selector_steps`, the selector is fine-tuned on the new supernet (from the saved
selector, on the MDP and with the settings it was trained with: `agents.train_selector`); `rounds` alternates the two.
The teacher stays the model before the first round.

The supernet's side reuses supernet training's (`vit.train`): its batches, AdamW parameter groups, warm-up and cosine
schedule, DDP through torchrun (the selector's fine-tuning runs on rank 0 while the other ranks wait), bf16 autocast
on CUDA, atomic checkpoints. A resumable state is written every `save_every` steps; every step reseeds its random
streams (prices, augmentation) from (seed, round, step, rank) and the data resumes at the batch it had reached, so a
run interrupted and resumed with `resume` ends with the same weights as an uninterrupted one.

    python scripts/finetune.py --out runs/finetune                       # prance_fmnist under the shipped selector
    torchrun --nproc_per_node 2 scripts/finetune.py --out runs/finetune  # DDP: gloo on CPU, nccl on CUDA

Files in OUT: `supernet.safetensors` (the fine-tuned weights: `vit.create_supernet(name, checkpoint=...)`),
`selector.zip` + `.json` (the last round's selector, recorded on those weights: `agents.load_adaptive(OUT/selector)`
runs the pair), `finetune_state.pt` (resumable), `eval_history.json`, TensorBoard in `tb/`; with selector fine-tuning,
`round<r>/`: that round's supernet weights and the selector run on them (`train_selector`'s folder).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import vit
from prance_env.mdp import MDPConfig, Prices
from vit.checkpoint import atomic_write, read_state_dict, read_train_state, save_checkpoint, save_train_state
from vit.cli import amp_field, device_field, threads_field, workers_field
from vit.data import is_image_folder
from vit.train import (
    Batches,
    evaluate,
    held_out_batches,
    lr_at,
    param_groups,
    setup_distributed,
    shift_and_flip,
    soft_cross_entropy,
)
from vit.utils import autocast

from .adaptive import AdaptiveViT, measure
from .selector import (
    SHAPE_KEYS,
    calibrate_selector,
    load_adaptive,
    read_settings,
    recorded_supernet,
    resolve_selector,
    save_selector,
)
from .training import SelectorConfig, train_selector

FINETUNE_FORMAT = "prance-vit-finetune"
SUBNETS = ("on-the-fly", "recorded", "random")  # FinetuneConfig.subnets


@dataclass
class FinetuneConfig:
    """Joint fine-tuning (PRANCE's stage three): the supernet on the subnets its selector picks, then the selector."""

    selector: str = field(default="shipped:prance_fmnist", metadata={"help": "the selector: PATH, or shipped:NAME"})
    supernet: str | None = field(
        default=None, metadata={"help": "registered supernet name (default: the one the selector records)"}
    )
    checkpoint: str | None = field(
        default=None, metadata={"help": "supernet weights to fine-tune (default: those the selector was trained on)"}
    )
    data: str | None = field(
        default=None, metadata={"help": "fashion-mnist | imagenet (an ImageFolder); default: the selector's"}
    )
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: the selector's)"})
    steps: int = field(default=1000, metadata={"help": "supernet steps per round"})
    batch_size: int = field(default=128, metadata={"help": "images per step and process"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of the supernet (AdamW)"})
    min_lr: float = field(default=1e-6, metadata={"help": "final learning rate of the cosine decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps of each round"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    label_weight: float = field(
        default=0.5, metadata={"help": "weight of the labels against the teacher's predictions (0: distillation only)"}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the labels' cross-entropy"})
    largest_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the largest subnet's loss, which keeps the full model from regressing (0: none)"},
    )
    clip_grad: float = field(default=5.0, metadata={"help": "gradient norm clipping (0: off)"})
    augment: bool = field(default=True, metadata={"help": "random shifts and flips (FMNIST; timm's for ImageNet)"})
    rounds: int = field(default=1, metadata={"help": "rounds of supernet, then selector, fine-tuning"})
    selector_steps: int = field(
        default=200_000, metadata={"help": "env steps of selector fine-tuning per round (0: the supernet alone)"}
    )
    selector_lr: float | None = field(
        default=None, metadata={"help": "learning rate of selector fine-tuning (default: the selector's)"}
    )
    num_envs: int | None = field(
        default=None, metadata={"help": "sub-envs of selector fine-tuning (default: the selector's)"}
    )
    subnets: str = field(
        default="on-the-fly",
        metadata={
            "help": "the subnets trained: on-the-fly (the selector's, read from the supernet being fine-tuned) | "
            "recorded (the selector's, read from the frozen weights it was trained on, as decisions recorded before "
            "the round would be) | random (random decisions of the selector's MDP: the control without a selector)",
            "choices": SUBNETS,
        },
    )
    price_high: float | None = field(
        default=None,
        metadata={
            "help": "highest compute price of both fine-tunings (default: the selector's); raise it when the "
            "cheapest budget is out of the selector's reach"
        },
    )
    eval_prices: tuple[float, ...] = field(default=MDPConfig().eval_prices, metadata={"help": "prices evaluated"})
    images: int = field(default=2000, metadata={"help": "held-out images per evaluation"})
    calib_images: int = field(
        default=1000,
        metadata={"help": "training images the saved selector's budget calibration is measured on (0: none)"},
    )
    save_every: int = field(default=100, metadata={"help": "steps between resumable checkpoints"})
    out: str = field(default="runs/finetune", metadata={"help": "output folder (weights, selector, TensorBoard)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/finetune_state.pt when it exists"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = device_field()
    threads: int = threads_field()
    workers: int = workers_field()
    amp: bool = amp_field("bf16 autocast on CUDA (the CPU trains in fp32)")

    def data_source(self, settings: dict) -> tuple[str, str | None]:
        """The dataset and its folder: those given, else those the selector (its `settings`) was trained on."""
        if self.data is not None:
            return self.data, self.data_dir
        env = settings["env"]
        return env.get("data") or "fashion-mnist", self.data_dir or env.get("data_dir", env.get("data_path"))


def distill_loss(
    logits: Tensor, teacher_probs: Tensor, labels: Tensor, label_weight: float, label_smoothing: float = 0.0
) -> Tensor:
    """The loss of one subnet: `(1 - label_weight)` x the cross-entropy against the teacher's probabilities plus
    `label_weight` x the (smoothed) cross-entropy against the labels."""
    loss = soft_cross_entropy(logits, teacher_probs)
    if label_weight:
        labelled = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        loss = (1 - label_weight) * loss + label_weight * labelled
    return loss


def selector_subnets(adaptive: AdaptiveViT, images: Tensor, prices: Tensor) -> tuple[list[vit.Subnet], Tensor]:
    """The subnet the selector picks for each image at its price, read from the supernet as it is now (in eval mode,
    without gradients), and each image's MACs as a fraction of the full model's, (B,)."""
    training = adaptive.supernet.training
    adaptive.eval()
    _, macs, decisions = adaptive(images, price=prices, return_decisions=True)
    adaptive.supernet.train(training)
    return decisions.subnets, macs / adaptive.full_macs


def selector_config(
    cfg: FinetuneConfig, selector: Path, checkpoint: Path, out: Path, device: torch.device
) -> SelectorConfig:
    """The fine-tuning of a saved `selector` on the supernet weights `checkpoint` for `cfg.selector_steps`, into
    `out`: the MDP and the PPO settings it was trained with, this run's data, seed, prices evaluated and images."""
    settings = read_settings(selector, required=("algo", "signature", "env"))
    known = {f.name for f in fields(SelectorConfig)}
    base = SelectorConfig(**{k: v for k, v in settings.get("config", {}).items() if k in known})
    env, signature = settings["env"], settings["signature"]
    data, data_dir = cfg.data_source(settings)
    num_envs = cfg.num_envs or base.num_envs
    return replace(
        base,
        **{key: signature[key] for key in SHAPE_KEYS if key in signature},
        supernet=cfg.supernet or signature["supernet"],
        checkpoint=str(checkpoint),
        token_mode=signature["token_mode"],
        data=data,
        data_dir=data_dir,
        eval_split=None,
        reward=env.get("reward", base.reward),
        quality=env.get("quality", base.quality),
        price_low=env["price_range"][0],
        price_high=cfg.price_high or env["price_range"][1],
        decisions=env.get("decisions", "per-block"),
        stem_blocks=env["stem_blocks"],
        blocks_per_step=env["blocks_per_step"],
        init=str(selector),
        total_steps=cfg.selector_steps,
        lr=cfg.selector_lr or base.lr,
        num_envs=num_envs,
        minibatch_size=min(base.minibatch_size, num_envs * base.n_steps),
        eval_prices=cfg.eval_prices,
        images=cfg.images,
        out=str(out),
        resume=cfg.resume,
        seed=cfg.seed,
        device=str(device),
        amp=cfg.amp and device.type == "cuda",
    )


class FinetuneRun:
    """What the rounds of one fine-tuning run share: settings, processes, data, the supernet and its teacher."""

    def __init__(self, cfg: FinetuneConfig, supernet: vit.ElasticViT | None) -> None:
        self.cfg, self.out = cfg, Path(cfg.out)
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        self.main = self.rank == 0
        self.amp = cfg.amp and self.device.type == "cuda"
        self.selector = resolve_selector(cfg.selector)
        self.settings = read_settings(self.selector, required=("algo", "signature", "env"))
        model = supernet if supernet is not None else recorded_supernet(self.settings, cfg.checkpoint, cfg.supernet)
        self.model = model.to(self.device)
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.largest = self.model.search_space.largest()
        data, data_dir = cfg.data_source(self.settings)
        self.imagefolder = is_image_folder(data)
        train_set = vit.load_dataset(data, split="train", root=data_dir, model=self.model, augment=cfg.augment)
        self.batches = Batches(train_set, cfg.batch_size, self.device, self.rank, self.world, cfg.workers, cfg.seed)
        if len(self.batches) == 0:
            raise ValueError(f"the training split has fewer than {cfg.batch_size * self.world} images: no full batch")
        self.test = (  # evaluated by the main process only
            held_out_batches(data, data_dir, self.model, cfg.images, cfg.batch_size, self.device, cfg.seed, cfg.workers)
            if self.main
            else []
        )
        self.net = (
            nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
            if self.world > 1
            else self.model
        )
        # the selector's fine-tuning may outlast a collective's timeout: the other ranks wait for it on a group of
        # their own
        self.waiting = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if self.world > 1 else None
        self.writer = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tb"))
        self.history: list[dict] = []

    def round_selector(self, r: int) -> Path:
        """The selector that decides in round `r`: the given one, or the previous round's fine-tuned one."""
        return self.selector if r == 1 or not self.cfg.selector_steps else self.out / f"round{r - 1}" / "selector"

    def adaptive(self, selector: Path, supernet: vit.ElasticViT | None = None) -> AdaptiveViT:
        """`selector` deciding on `supernet` (default: the supernet being fine-tuned)."""
        supernet = self.model if supernet is None else supernet
        return load_adaptive(selector, supernet=supernet, device=str(self.device), amp=self.amp)

    def decider(self, r: int, adaptive: AdaptiveViT) -> AdaptiveViT:
        """Who picks round `r`'s subnets with `cfg.subnets` on-the-fly or recorded: `adaptive` itself, or its
        selector on a frozen copy of the weights that selector was trained on (the model before fine-tuning in round
        1 or without selector fine-tuning, else the weights the previous round's selector was fine-tuned on)."""
        if self.cfg.subnets != "recorded":
            return adaptive
        frozen = self.teacher
        if r > 1 and self.cfg.selector_steps:
            frozen = copy.deepcopy(self.teacher)
            frozen.load_state_dict(read_state_dict(self.out / f"round{r - 1}" / "supernet.safetensors"))
        return self.adaptive(self.round_selector(r), frozen)

    def pick(self, decider: AdaptiveViT, x: Tensor, price: Tensor, rng: np.random.Generator) -> tuple[list, Tensor]:
        """The step's per-image subnets and their MACs ratios: `decider`'s at `price`, or with `cfg.subnets` random,
        random decisions of its MDP (drawn from `rng`)."""
        if self.cfg.subnets != "random":
            return selector_subnets(decider, x, price)
        space = self.model.search_space
        subnets = [decider.schedule.sample(space, rng) for _ in range(len(x))]
        macs = torch.tensor(vit.count_macs(self.model, subnets), dtype=torch.float64)
        return subnets, macs / decider.full_macs

    def data(self, position: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's batches from global step `position` on, epoch after epoch."""
        epoch, start = divmod(position, len(self.batches))
        while True:
            yield from self.batches.epoch(epoch, start=start)
            epoch, start = epoch + 1, 0

    def evaluate(self, adaptive: AdaptiveViT, r: int, step: int) -> None:
        """Held-out Top-1 of the largest subnet and of the selector's subnets at every evaluated price (main process:
        printed, in TensorBoard and in `eval_history.json`)."""
        if not self.main:
            return
        training = self.model.training
        self.model.eval()
        top1 = evaluate(self.model, lambda: iter(self.test), [self.largest], self.device)[0]
        rows = [{"round": r, "step": step, "price": None, "top1": top1, "flops_ratio": 1.0}]
        for price in self.cfg.eval_prices:
            rows.append({"round": r, "step": step, "price": price, **measure(adaptive, self.test, price=price)})
        self.model.train(training)
        at = (max(r, 1) - 1) * self.cfg.steps + step
        self.writer.add_scalar("eval/top1_largest", top1, at)
        for row in rows[1:]:
            for key in ("top1", "flops_ratio", "tokens_kept"):
                self.writer.add_scalar(f"eval/{key}@{row['price']:g}", row[key], at)
        self.history.extend(rows)
        atomic_write(
            self.out / "eval_history.json", lambda tmp: Path(tmp).write_text(json.dumps(self.history, indent=2))
        )
        tqdm.write(
            f"[round {r}, step {step}] largest: Top-1 {top1:.4f}; "
            + "; ".join(
                f"price {row['price']:g}: Top-1 {row['top1']:.4f}, MACs {row['flops_ratio']:.3f}" for row in rows[1:]
            )
        )

    def save(self, optimizer: torch.optim.Optimizer, r: int, step: int) -> None:
        """The resumable state after `step` steps of round `r`, and the weights as `supernet.safetensors`."""
        if not self.main:
            return
        state = {"round": r, "step": step, "config": asdict(self.cfg)}
        save_train_state(self.out / "finetune_state.pt", FINETUNE_FORMAT, self.model, optimizer, **state)
        save_checkpoint(self.model, self.out / "supernet.safetensors", self.metadata(r, step))

    def metadata(self, r: int, step: int) -> dict:
        """What a weights file of this run records."""
        return {
            "model": self.model.pretrained_cfg.get("architecture"),
            "token_mode": self.model.token_mode,
            "selector": self.cfg.selector,
            "round": r,
            "step": step,
        }

    def train_supernet(
        self,
        decider: AdaptiveViT,
        r: int,
        start: int,
        optimizer_state: dict | None,
        on_step: Callable[[int, int, dict], None] | None,
    ) -> None:
        """Steps `start`..`cfg.steps` of round `r`'s supernet fine-tuning under `decider`'s decisions (`pick`)."""
        cfg, model, device = self.cfg, self.model, self.device
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        prices = Prices(None, (decider.price_range[0], cfg.price_high or decider.price_range[1]))
        passes = [("subnets", None, 1.0)] + (
            [("largest", self.largest, cfg.largest_weight)] if cfg.largest_weight else []
        )
        batches = self.data((r - 1) * cfg.steps + start)
        model.train()
        bar = tqdm(
            range(start, cfg.steps),
            initial=start,
            total=cfg.steps,
            desc=f"round {r}/{cfg.rounds}",
            disable=not self.main,
        )
        for step in bar:
            rng = np.random.default_rng([cfg.seed, r, step, self.rank])
            torch.manual_seed(int(rng.integers(2**63)))  # augmentation, and any dropout
            x, y = next(batches)
            lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.augment and not self.imagefolder:
                x = shift_and_flip(x)
            price = torch.as_tensor(prices.draw(rng, len(x)), dtype=torch.float32, device=device)
            subnets, flops = self.pick(decider, x, price, rng)
            with torch.no_grad(), autocast(device, self.amp):
                target = self.teacher(x, self.largest).float().softmax(-1)
            optimizer.zero_grad(set_to_none=True)
            losses = {}
            for j, (name, subnet, weight) in enumerate(passes):
                sync = self.world == 1 or j == len(passes) - 1
                with contextlib.nullcontext() if sync else self.net.no_sync(), autocast(device, self.amp):
                    logits = self.net(x, subnets if subnet is None else subnet).float()
                    loss = distill_loss(logits, target, y, cfg.label_weight, cfg.label_smoothing)
                (weight * loss).backward()
                losses[name] = loss.item()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            bar.set_postfix(**{k: f"{v:.3f}" for k, v in losses.items()}, macs=f"{flops.mean():.3f}", lr=f"{lr:.2e}")
            done = (r - 1) * cfg.steps + step + 1
            if self.writer is not None and (step % 10 == 0 or step + 1 == cfg.steps):
                for name, value in losses.items():
                    self.writer.add_scalar(f"losses/{name}", value, done)
                self.writer.add_scalar("charts/lr", lr, done)
                self.writer.add_scalar("charts/flops_ratio", float(flops.mean()), done)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                self.save(optimizer, r, step + 1)
            if on_step is not None:
                on_step(r, step + 1, losses)

    def train_selector(self, r: int) -> None:
        """Round `r`'s selector fine-tuning on the supernet as it is now (rank 0; the other ranks wait)."""
        folder = self.out / f"round{r}"
        if self.main:
            checkpoint = save_checkpoint(self.model, folder / "supernet.safetensors", self.metadata(r, self.cfg.steps))
            if not (self.cfg.resume and (folder / "selector.zip").is_file()):
                train_selector(selector_config(self.cfg, self.round_selector(r), checkpoint, folder, self.device))
        if self.waiting is not None:
            dist.barrier(group=self.waiting)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def joint_finetune(
    cfg: FinetuneConfig,
    supernet: vit.ElasticViT | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> tuple[AdaptiveViT, list[dict]]:
    """Fine-tune a supernet under its selector, then the selector, for `cfg.rounds` rounds, as `cfg` says.

    Args:
        cfg: the run's settings.
        supernet: the supernet to fine-tune, as given, instead of the one the selector records (e.g. a custom size;
            the selector's own fine-tuning rebuilds a supernet by name, so it needs `cfg.selector_steps=0`).
        on_step: called with (round, steps done in the round, the step's losses) after each supernet step and its
            checkpoint.

    Returns:
        The fine-tuned supernet under the last selector (an `AdaptiveViT`), and the evaluations (one row per price,
        `price` None for the largest subnet, before the first round and after each round's supernet fine-tuning).
    """
    if min(cfg.rounds, cfg.steps, cfg.save_every) < 1:
        raise ValueError(
            f"rounds, steps and save_every must be at least 1, got {cfg.rounds}, {cfg.steps}, {cfg.save_every}"
        )
    if supernet is not None and (cfg.supernet or cfg.checkpoint):
        raise ValueError("pass a supernet module or the supernet and checkpoint to build one with, not both")
    if supernet is not None and cfg.selector_steps:
        raise ValueError(
            "the selector's fine-tuning rebuilds its supernet by name (vit.create_supernet): with a supernet module "
            "given, set selector_steps=0"
        )
    if cfg.subnets not in SUBNETS:
        raise ValueError(f"subnets must be one of {', '.join(SUBNETS)}, got {cfg.subnets!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    run = FinetuneRun(cfg, supernet)
    try:
        state_file = run.out / "finetune_state.pt"
        state = read_train_state(state_file, FINETUNE_FORMAT) if cfg.resume and state_file.is_file() else None
        first, start = (state["round"], state["step"]) if state is not None else (1, 0)
        if state is not None:
            run.model.load_state_dict(state["model"])
            history_file = run.out / "eval_history.json"
            if run.main and history_file.is_file():  # keep the evaluations made before the interruption
                earlier = json.loads(history_file.read_text())
                run.history = [row for row in earlier if (row["round"], row["step"]) <= (first, start)]
            if run.main:
                print(f"resumed from {state_file} at round {first}, step {start}")
        for r in range(first, cfg.rounds + 1):
            adaptive = run.adaptive(run.round_selector(r))
            if state is None and r == 1:
                run.evaluate(adaptive, 0, 0)  # before fine-tuning
            if r > first or start < cfg.steps:
                resumed = state["optimizer"] if state is not None and r == first else None
                run.train_supernet(run.decider(r, adaptive), r, start if r == first else 0, resumed, on_step)
            if not any((row["round"], row["step"]) == (r, cfg.steps) for row in run.history):
                run.evaluate(adaptive, r, cfg.steps)
            if cfg.selector_steps:
                run.train_selector(r)
        last = run.round_selector(cfg.rounds + 1)
        adaptive = run.adaptive(last)
        if run.main:  # the pair to deploy: the last selector, recorded on the fine-tuned weights
            settings = read_settings(last)
            settings["env"]["checkpoint"] = str((run.out / "supernet.safetensors").resolve())
            settings["finetune"] = {**asdict(cfg), "minutes": (time.time() - started) / 60}
            save_selector(adaptive.policy, run.out / "selector", settings)
            if cfg.calib_images:
                calibrate_selector(run.out / "selector", cfg.calib_images, cfg.batch_size, adaptive=adaptive)
    finally:
        run.close()
    return adaptive, run.history


__all__ = ["FinetuneConfig", "distill_loss", "joint_finetune", "selector_config", "selector_subnets"]

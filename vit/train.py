"""Supernet training: the sandwich rule with in-place distillation, on one process or many (DDP via torchrun).

Every step trains the largest subnet on the labels, then the smallest and `num_random` random subnets (per-block
choices drawn independently, token reduction included; with `--decisions grouped`, the subnets PRANCE's grouped
decisions reach) on the largest's predictions. The first
`largest_only_epochs` train the largest alone: distilling from an untrained teacher stalls the whole supernet.
AdamW with linear warm-up and a cosine decay, label smoothing, light augmentation, bf16 autocast on CUDA.
For ImageNet, DeiT's recipe through timm is a set of flags, off by default (the Fashion-MNIST defaults stay):

    --auto-augment rand-m9-mstd0.5-inc1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --drop-path 0.1 \
        --lr 5e-4 --lr-scale-batch 512 --warmup-epochs 5 --epochs 300 --clip-grad 0

With Mixup/CutMix every subnet trained on labels reads the mixed soft targets (timm's `SoftTargetCrossEntropy`);
distilled subnets read the largest's predictions on the same mixed images, as before.
A checkpoint is written atomically after every epoch; `resume` continues from it and, since every epoch reseeds
its random streams from (seed, epoch, rank), an interrupted run ends with the same weights as an uninterrupted one.

    torchrun --nproc_per_node 2 scripts/train_supernet.py --epochs 1   # gloo on CPU, nccl on CUDA
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .checkpoint import read_train_state, save_checkpoint, save_train_state
from .cli import amp_field, device_field, threads_field, workers_field
from .config import Subnet
from .data import (
    SeededItems,
    batch_loader,
    image_folder_shape,
    is_image_folder,
    load_dataset,
    memory_tensors,
    stratified_subset,
    to_device,
)
from .inference import DecisionSchedule
from .official import OFFICIAL_PRESETS
from .registry import SupernetShape, create_supernet, load_pretrained
from .supernet import ElasticViT
from .utils import autocast, resolve_device

TRAIN_FORMAT = "prance-vit-train"


@dataclass
class TrainConfig(SupernetShape):
    """Supernet training with the sandwich rule and in-place distillation."""

    supernet: str = field(default="prance_fmnist", metadata={"help": "registered supernet name"})
    token_mode: str = field(default="merge", metadata={"help": "prune | merge | prune_merge"})
    data: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist | imagenet (an ImageFolder)"})
    data_dir: str | None = field(default=None, metadata={"help": "dataset folder (default: Debian's Fashion-MNIST)"})
    init: str | None = field(default=None, metadata={"help": "initial weights: timm:NAME or a file; then rewired"})
    epochs: int = field(default=20, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per step and process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (DeiT: 5e-4 at --lr-scale-batch 512)"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of the cosine decay (DeiT: 1e-5)"})
    lr_scale_batch: int = field(
        default=0,
        metadata={
            "help": "scale LR and MIN_LR by the global batch (batch size x processes) over this many images, "
            "lr = LR x global batch / N (DeiT: 512; 0: as given)"
        },
    )
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length (DeiT: 5)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the largest subnet's loss"})
    num_random: int = field(default=2, metadata={"help": "random subnets per step besides largest and smallest"})
    decisions: str = field(
        default="per-block",
        metadata={
            "help": "subnets sampled: per-block (the search space's, every block drawn alone) | grouped | one-shot "
            "(those grouped decisions reach: full-width stem, a reduction at blocks 3, 6, 9, keep ratios down to 0.1)"
        },
    )
    largest_only_epochs: float = field(default=3.0, metadata={"help": "train only the largest subnet at first"})
    distill: bool = field(default=True, metadata={"help": "train the other subnets on the largest's predictions"})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth rate (DeiT: 0.1)"})
    clip_grad: float = field(default=5.0, metadata={"help": "gradient norm clipping (0: off; DeiT: off)"})
    augment: bool = field(default=True, metadata={"help": "random shifts and flips (FMNIST; timm's for ImageNet)"})
    auto_augment: str | None = field(
        default=None,
        metadata={"help": "ImageFolder: timm's RandAugment policy in the train transform (DeiT: rand-m9-mstd0.5-inc1)"},
    )
    reprob: float = field(default=0.0, metadata={"help": "ImageFolder: random erasing probability (DeiT: 0.25)"})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha, soft targets (DeiT: 0.8; 0: off)"})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha, soft targets (DeiT: 1.0; 0: off)"})
    steps_per_epoch: int | None = field(default=None, metadata={"help": "cap on steps per epoch (quick runs)"})
    eval_batches: int | None = field(default=None, metadata={"help": "cap on evaluation batches"})
    out: str = field(default="runs/supernet", metadata={"help": "output folder (checkpoints, TensorBoard)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/last.pt when it exists"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = device_field()
    threads: int = threads_field()
    workers: int = workers_field()
    amp: bool = amp_field("bf16 autocast on CUDA (the CPU trains in fp32)")


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sandwich(
    model: ElasticViT, num_random: int, rng: np.random.Generator, schedule: DecisionSchedule = DecisionSchedule()
) -> list[Subnet]:
    """The subnets of one step: largest first (the teacher), smallest, then `num_random` random ones.

    Per-block decisions (`schedule`'s default) draw from the whole search space, each block alone; grouped ones draw
    the subnets their decisions reach (`DecisionSchedule.sample`): the stem at full width, one reduction per group."""
    space = model.search_space
    if not schedule.grouped:
        return [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(num_random))]
    return [space.largest(), schedule.smallest(space), *(schedule.sample(space, rng) for _ in range(num_random))]


def shift_and_flip(x: Tensor, pad: int = 2) -> Tensor:
    """Random translations of up to `pad` pixels (edge-padded) and horizontal flips, per image. x: (B, C, H, W)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(B, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, out.flip(-1), out)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy against a distribution: in-place distillation, and Mixup's soft targets (timm's
    `SoftTargetCrossEntropy`)."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Callable[[], Iterator[tuple[Tensor, Tensor]]],
    subnets: list[Subnet],
    device: torch.device,
    desc: str = "eval",
) -> list[float]:
    """Top-1 accuracy of each subnet over the batches of `batches()`."""
    was_training = model.training
    model.eval()
    correct, seen = torch.zeros(len(subnets), device=device), 0
    for x, y in tqdm(batches(), desc=desc, leave=False, disable=not _is_main()):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for j, subnet in enumerate(subnets):
            correct[j] += (model(x, subnet).argmax(-1) == y).sum()
        seen += len(y)
    model.train(was_training)
    return (correct / max(seen, 1)).tolist()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Batches:
    """Epoch-seeded batches of a dataset for one process of `world`, on `device`.

    Fashion-MNIST (or a subset of it) is held on the device whole. Other datasets are read by `workers` loader
    processes (None: the default number) through `SeededItems` seeded by (seed, epoch), so random transforms repeat
    with the seed.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        rank: int,
        world: int,
        workers: int | None,
        seed: int,
    ) -> None:
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.rank, self.world, self.workers, self.seed = rank, world, workers, seed
        self.tensors = memory_tensors(dataset, device)

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world)

    def epoch(
        self, epoch: int, shuffle: bool = True, limit: int | None = None, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of this process in `epoch`: a shuffle seeded by (seed, epoch), sharded by rank; from batch
        `start` on (a run resumed mid-epoch reads the batches it had not reached, the same images)."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        per_rank = n // self.world if shuffle else math.ceil(n / self.world)
        order = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        num = len(order) // self.batch_size if shuffle else math.ceil(len(order) / self.batch_size)
        num = num if limit is None else min(num, limit)
        if self.tensors is not None:
            images, labels = self.tensors
            for b in range(start, num):
                index = order[b * self.batch_size : (b + 1) * self.batch_size].to(self.device)
                yield images[index], labels[index]
            return
        items = order[start * self.batch_size : num * self.batch_size].tolist()
        subset = Subset(SeededItems(self.dataset, (self.seed, epoch)), items)
        loader_seed = self.seed * 100_003 + epoch
        loader = batch_loader(subset, self.device, self.workers, loader_seed, batch_size=self.batch_size)
        yield from to_device(loader, self.device)


def subset_batches(
    dataset: Dataset,
    count: int | None,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    workers: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """A seeded, class-stratified subset of `count` images of `dataset` (all when None; `vit.data.stratified_subset`),
    as batches of `batch_size` on `device`, decoded by `workers` loader processes (None: the default number)."""
    if count is not None and count < 1:
        raise ValueError(f"a count of images (--images, --calib-images) must be at least 1, got {count}")
    subset = dataset if count is None else stratified_subset(dataset, count, seed)
    return list(Batches(subset, batch_size, device, 0, 1, workers, seed).epoch(0, shuffle=False))


def held_out_batches(
    data: str,
    root: str | os.PathLike | None,
    model: ElasticViT,
    count: int | None,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    workers: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """The held-out images of dataset `data` in folder `root` (Fashion-MNIST's test split, an ImageFolder's val:
    `vit.data.held_out_split`) read for `model` through the eval transform: a seeded, class-stratified subset of
    `count` of them (all when None) in batches (`subset_batches`). Every evaluation of a selector reads them here."""
    dataset = load_dataset(data, split="held-out", root=root, model=model)
    return subset_batches(dataset, count, batch_size, device, seed, workers)


class _NumpyStream:
    """A seeded stream of numpy's global generator, in force only inside `with`: timm's Mixup draws from the global
    generator, and the caller's global stream is left as it was."""

    def seed(self, seed: int) -> None:
        """Restart the stream as `np.random.seed(seed)` would."""
        self.state = np.random.RandomState(seed).get_state()

    def __enter__(self) -> None:
        self.outer = np.random.get_state()
        np.random.set_state(self.state)

    def __exit__(self, *exc: object) -> None:
        self.state = np.random.get_state()
        np.random.set_state(self.outer)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device of this process; initialises the process group (nccl on CUDA, gloo on CPU) when
    started by torchrun with several ranks. Supernet training and joint fine-tuning start with it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def param_groups(model: ElasticViT, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `weight_decay` on the weight matrices, none on norms, biases and the embeddings
    (`ElasticViT.no_weight_decay`)."""
    decay, no_decay = [], []
    skip = model.no_weight_decay()
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def shape_for_data(name: str, data: str, data_dir: str | os.PathLike | None, given: dict) -> dict:
    """The shape arguments to build preset `name` with for `data`: `given` (the flags passed), and for an
    ImageFolder the classes of its folder; its images' channels must be the preset's unless `in_chans` is given, a
    `ValueError` naming the flags otherwise. Fashion-MNIST and other data leave `given` as it is."""
    if not is_image_folder(data) or data_dir is None:
        return dict(given)
    found = image_folder_shape(data_dir)
    with torch.device("meta"):
        in_chans = create_supernet(name).patch_embed.in_chans
    if "in_chans" not in given and found["in_chans"] != in_chans:
        colour = {1: "grey (1 channel)", 3: "RGB (3 channels)"}
        raise ValueError(
            f"{name} reads {colour[in_chans]} images but the ImageFolder {data_dir} holds {colour[found['in_chans']]} "
            f"images in {found['num_classes']} classes: pass --in-chans {found['in_chans']} "
            f"--num-classes {found['num_classes']} to train {name} on them, or a preset for such images "
            "(--supernet prance_deit_tiny, ...)"
        )
    return {"num_classes": found["num_classes"], **given}


def train_supernet(
    cfg: TrainConfig,
    model: ElasticViT | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> ElasticViT:
    """Train a supernet as `cfg` says and return it (unwrapped).

    Args:
        cfg: the run's settings.
        model: a supernet to train instead of building `cfg.supernet` (e.g. a custom size).
        on_epoch_end: called with (epoch, metrics) after each epoch's checkpoint is written.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed(cfg.device)
    imagefolder = is_image_folder(cfg.data)
    if not imagefolder and (cfg.auto_augment or cfg.reprob):
        raise ValueError("auto_augment and reprob are timm transforms of an ImageFolder; Fashion-MNIST has neither")
    if (cfg.mixup or cfg.cutmix) and cfg.batch_size % 2:
        raise ValueError(f"Mixup/CutMix mix each batch with its reverse: batch_size must be even, not {cfg.batch_size}")
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    schedule = DecisionSchedule.named(cfg.decisions)
    if model is None:
        kwargs = shape_for_data(cfg.supernet, cfg.data, cfg.data_dir, cfg.shape_kwargs())
        if cfg.supernet in OFFICIAL_PRESETS:  # the release's search space, no stochastic depth
            if cfg.drop_path:
                raise ValueError(f"{cfg.supernet} has no stochastic depth: --drop-path 0")
        else:
            kwargs |= schedule.supernet_kwargs() | {"drop_path_rate": cfg.drop_path}
        model = create_supernet(cfg.supernet, token_mode=cfg.token_mode, **kwargs)
    if schedule.grouped:  # the sampled subnets must be the model's (per-block sampling draws from its own space)
        schedule.check(model.search_space)
    if cfg.init is not None:
        load_pretrained(model, cfg.init)
    model.to(device)

    recipe = {"auto_augment": cfg.auto_augment, "re_prob": cfg.reprob, "re_mode": "pixel"} if imagefolder else {}
    train_set = load_dataset(cfg.data, split="train", root=cfg.data_dir, model=model, augment=cfg.augment, **recipe)
    test_set = load_dataset(cfg.data, split="held-out", root=cfg.data_dir, model=model)
    train_batches = Batches(train_set, cfg.batch_size, device, rank, world, cfg.workers, cfg.seed)
    test_batches = Batches(test_set, cfg.batch_size, device, 0, 1, cfg.workers, cfg.seed)
    steps_per_epoch = min(len(train_batches), cfg.steps_per_epoch or len(train_batches))
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has fewer than {cfg.batch_size * world} images: no full batch")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    scale = cfg.batch_size * world / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0
    peak_lr, min_lr = cfg.lr * scale, cfg.min_lr * scale
    mixup = None
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup

        # label smoothing moves into the soft targets
        mixup = Mixup(cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=model.num_classes)
        mixup_stream = _NumpyStream()

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    start_epoch = 0
    last = out / "last.pt"
    if cfg.resume and last.is_file():
        state = read_train_state(last, TRAIN_FORMAT)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        if _is_main():
            print(f"resumed from {last} at epoch {start_epoch}")
    elif cfg.resume and _is_main():
        print(f"no checkpoint at {last}: starting from scratch")

    net = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    writer = None
    if _is_main():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))

    amp = cfg.amp and device.type == "cuda"
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + rank)
        if mixup is not None:
            mixup_stream.seed((cfg.seed * 100_003 + epoch * 1_009 + rank) % 2**32)
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        model.train()
        started = time.time()
        bar = tqdm(
            train_batches.epoch(epoch, limit=steps_per_epoch),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not _is_main(),
        )
        for b, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + b
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.augment and not imagefolder:
                x = shift_and_flip(x)
            if mixup is not None:
                with mixup_stream:
                    x, soft_targets = mixup(x, y)
                label_loss = functools.partial(soft_cross_entropy, target_probs=soft_targets)
            else:
                label_loss = functools.partial(F.cross_entropy, target=y, label_smoothing=cfg.label_smoothing)
            subnets = sandwich(model, cfg.num_random, rng, schedule)
            if step < cfg.largest_only_epochs * steps_per_epoch:
                subnets = subnets[:1]
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for j, subnet in enumerate(subnets):
                sync = world == 1 or j == len(subnets) - 1
                with contextlib.nullcontext() if sync else net.no_sync(), autocast(device, amp):
                    logits = net(x, subnet).float()
                    if j == 0:
                        teacher = logits.detach().softmax(-1)
                    loss = soft_cross_entropy(logits, teacher) if j and cfg.distill else label_loss(logits)
                loss.backward()
                losses.append(loss.item())
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            bar.set_postfix(largest=f"{losses[0]:.3f}", last=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
            if writer is not None and step % 20 == 0:
                writer.add_scalar("losses/largest", losses[0], step)
                if len(losses) > 1:
                    writer.add_scalar("losses/smallest", losses[1], step)
                writer.add_scalar("charts/lr", lr, step)

        metrics = {"epoch": epoch + 1, "minutes": (time.time() - started) / 60}
        if _is_main():
            top1 = evaluate(
                model,
                lambda: test_batches.epoch(0, shuffle=False, limit=cfg.eval_batches),
                sandwich(model, 0, rng, schedule),  # the largest and the smallest subnet
                device,
            )
            metrics.update(top1_largest=top1[0], top1_smallest=top1[1])
            for key in ("top1_largest", "top1_smallest"):
                writer.add_scalar(f"eval/{key}", metrics[key], epoch + 1)
            print(
                f"epoch {epoch + 1}: Top-1 largest {top1[0]:.4f} smallest {top1[1]:.4f} ({metrics['minutes']:.1f} min)"
            )
            save_train_state(last, TRAIN_FORMAT, model, optimizer, epoch=epoch + 1, config=asdict(cfg))
            save_checkpoint(
                model,
                out / "supernet.safetensors",
                {
                    "model": cfg.supernet,
                    "token_mode": model.token_mode,
                    "decisions": cfg.decisions,
                    "epoch": epoch + 1,
                    **metrics,
                },
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    if writer is not None:
        writer.close()
    return model


__all__ = [
    "Batches",
    "TrainConfig",
    "evaluate",
    "held_out_batches",
    "lr_at",
    "param_groups",
    "sandwich",
    "setup_distributed",
    "shift_and_flip",
    "subset_batches",
    "train_supernet",
]

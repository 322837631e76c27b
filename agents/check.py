"""The whole chain on one machine, in one call: a Markdown table of stages, results and seconds.

On a CUDA machine (at most about 8 minutes), at DeiT-Small shapes on a generated ImageFolder of 224-px JPEGs:

1. supernet training steps with DeiT's recipe (RandAugment, random erasing, Mixup/CutMix, drop path, scaled
   learning rate), bf16 autocast, DDP over every visible GPU through torchrun when there are several
   (`scripts/train_supernet.py` in a subprocess);
2. env steps per second, without (`terminal`) and with (`delta`) Result-to-Go completion, at 256 and 1024 sub-envs;
3. a few thousand PPO steps (`agents.train_selector`);
4. calibration of the selector to half the full model's MACs;
5. the evaluation report (`agents.report.evaluate_selector`: Top-1, Top-5, parameters);
6. the benchmark (`agents.bench.benchmark`): `AdaptiveViT` in each execution mode against the full model and the
   static subnet of equal MACs, and random per-sample subnets at DeiT-Small shapes, images/s at batch 256, fp32
   (TF32 matmuls) and bf16 weights.

Every stage runs even when an earlier one failed, where it can (a failed training leaves randomly initialised
weights to the stages after it; the selector's stages need PPO).
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium
import torch

import prance_env  # noqa: F401  (registers PranceViT-v1)
import vit
from prance_env.bench import time_episodes
from vit.bench import setup_cpu
from vit.cli import device_field, threads_field
from vit.data import write_image_folder
from vit.train import subset_batches
from vit.utils import resolve_device, use_tf32

from .adaptive import calibrate, measure
from .bench import BenchmarkConfig, benchmark
from .report import EvaluateConfig, evaluate_selector
from .selector import load_adaptive
from .training import SelectorConfig, train_selector

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_supernet.py"


@dataclass
class GpuCheckConfig:
    """Run supernet training, env, PPO, calibration, evaluation and benchmark stages; print one table."""

    tiny: bool = field(default=False, metadata={"help": "tiny sizes and few steps (DeiT-Tiny at 32 px; CPU tests)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "an ImageFolder with train/ and val/ (default: one generated in OUT/data)"}
    )
    device: str = device_field()
    threads: int = threads_field()
    seed: int = field(default=0, metadata={"help": "random seed"})
    out: str = field(default="runs/gpu_check", metadata={"help": "output folder (gpu_check.md, logs, runs)"})


@dataclass(frozen=True)
class Sizes:
    """The sizes of one check."""

    supernet: str
    img_size: int | None  # None: the preset's
    classes: int
    train_per_class: int
    val_per_class: int
    train_batch: int  # per process
    train_steps: int
    num_envs: tuple[int, ...]
    ppo_envs: int
    ppo_rollouts: int
    batch: int  # calibration, evaluation and benchmark forwards
    rounds: int


FULL = Sizes("prance_deit_small", None, 10, 200, 26, 64, 30, (256, 1024), 256, 2, 256, 3)
TINY = Sizes("prance_deit_tiny", 32, 4, 16, 8, 16, 2, (8, 32), 16, 1, 32, 1)


class Check:
    """The stages run so far: (stage, result, seconds, passed)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, bool]] = []

    def run(self, stage: str, fn: Callable[[], str]) -> bool:
        """Run one stage; a raised exception fails it (and is printed) without stopping the check."""
        print(f"\n== {stage}", flush=True)
        started = time.perf_counter()
        try:
            result, passed = fn(), True
        except Exception as e:  # any failure of a stage is a result of the check
            traceback.print_exc()
            result, passed = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False
        self.rows.append((stage, result.replace("|", "/"), time.perf_counter() - started, passed))
        return passed

    def skip(self, stage: str, why: str) -> None:
        """A stage that cannot run: a failure."""
        self.rows.append((stage, f"FAILED: skipped, {why}", 0.0, False))

    def table(self) -> str:
        """The Markdown table of the stages."""
        lines = ["| stage | result | seconds |", "|---|---|---|"]
        lines += [f"| {stage} | {result} | {seconds:.1f} |" for stage, result, seconds, _ in self.rows]
        return "\n".join(lines)

    @property
    def passed(self) -> bool:
        """Whether every stage passed."""
        return all(row[3] for row in self.rows)

    def finish(self, out: Path) -> bool:
        """Print the table, write it to `OUT/gpu_check.md`; True when every stage passed."""
        table = self.table()
        (out / "gpu_check.md").write_text(table + "\n")
        print(f"\n## gpu check: {'all stages passed' if self.passed else 'FAILED'}\n\n{table}")
        return self.passed


def train_command(cfg: GpuCheckConfig, sizes: Sizes, data: Path, out: Path, device: torch.device, gpus: int) -> list:
    """The training run: DeiT's recipe for a few steps, on `gpus` processes (through torchrun when several)."""
    launch = (
        [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}"]
    )
    shape = [] if sizes.img_size is None else ["--img-size", str(sizes.img_size)]
    return [
        *launch,
        str(TRAIN_SCRIPT),
        *("--supernet", sizes.supernet, "--num-classes", str(sizes.classes), *shape),
        *("--data", "imagenet", "--data-dir", str(data), "--out", str(out), "--device", str(device)),
        *("--epochs", "1", "--steps-per-epoch", str(sizes.train_steps), "--batch-size", str(sizes.train_batch)),
        *("--largest-only-epochs", "0", "--warmup-epochs", "0.2", "--eval-batches", "1", "--seed", str(cfg.seed)),
        *("--auto-augment", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0"),
        *("--drop-path", "0.1", "--lr", "5e-4", "--lr-scale-batch", "512", "--clip-grad", "0", "--amp"),
    ]


def env_speed(model: vit.ElasticViT, data: Path, num_envs: int, amp: bool, seed: int) -> str:
    """Env steps/s of random episodes without (`terminal`) and with (`delta`) Result-to-Go completion
    (`prance_env.bench.time_episodes`)."""
    with contextlib.ExitStack() as closing:
        envs = {}
        for reward in ("terminal", "delta"):
            kwargs = dict(supernet=model, data="imagenet", data_dir=str(data), reward=reward, amp=amp)
            envs[reward] = gymnasium.make_vec("PranceViT-v1", num_envs=num_envs, **kwargs)
            closing.callback(envs[reward].close)
        speed = time_episodes(envs, rounds=2, seed=seed)["steps_per_s"]
    return f"ok: {speed['terminal']:.0f} env steps/s without completion, {speed['delta']:.0f} with Result-to-Go"


def gpu_check(cfg: GpuCheckConfig) -> bool:
    """Run every stage as `cfg` says, print the table and write it to `OUT/gpu_check.md` (the training run's logs to
    `OUT/train.log`); True when every stage passed."""
    setup_cpu(cfg.threads, keep_memory=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        use_tf32()
    sizes = TINY if cfg.tiny else FULL
    amp = device.type == "cuda"  # bf16 where it pays; the fp32/bf16 comparison is the benchmark's
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = {"num_classes": sizes.classes} | ({} if sizes.img_size is None else {"img_size": sizes.img_size})
    check = Check()
    data = Path(cfg.data_dir) if cfg.data_dir else out / "data"

    def make_data() -> str:
        if cfg.data_dir:
            return f"ok: {data}"
        side = sizes.img_size or vit.create_supernet(sizes.supernet, **shape).patch_embed.img_size[0]
        per_class = {"train": sizes.train_per_class, "val": sizes.val_per_class}
        write_image_folder(data, sizes.classes, per_class, side, cfg.seed)
        return (
            f"ok: {sizes.classes} classes of {sizes.train_per_class}/{sizes.val_per_class} train/val JPEGs, {side} px"
        )

    check.run("data", make_data)

    weights = out / "supernet" / "supernet.safetensors"
    processes = torch.cuda.device_count() if device.type == "cuda" else 1
    command = train_command(cfg, sizes, data, out / "supernet", device, processes)

    def train() -> str:
        with open(out / "train.log", "w") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode:
            tail = (out / "train.log").read_text().strip().splitlines()[-1:]
            raise RuntimeError(f"train_supernet.py exited {result.returncode}: {' '.join(tail)}")
        model = vit.create_supernet(sizes.supernet, pretrained=False, checkpoint=str(weights), **shape)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError("the trained weights are not finite")
        steps = min(sizes.train_steps, sizes.classes * sizes.train_per_class // (sizes.train_batch * processes))
        return f"ok: {steps} steps of {sizes.train_batch} images x {processes} process(es), weights finite"

    if not check.run(f"supernet training ({'bf16' if amp else 'fp32'}, DeiT recipe)", train):
        torch.manual_seed(cfg.seed)  # the stages after it run on random weights
        vit.save_checkpoint(vit.create_supernet(sizes.supernet, **shape), weights)

    model = vit.create_supernet(sizes.supernet, pretrained=False, checkpoint=str(weights), **shape).to(device)
    for num_envs in sizes.num_envs:
        check.run(f"env steps/s, {num_envs} sub-envs", lambda n=num_envs: env_speed(model, data, n, amp, cfg.seed))

    selector = out / "selector" / "selector"
    steps = model.depth - 1
    ppo_cfg = SelectorConfig(
        supernet=sizes.supernet,
        checkpoint=str(weights),
        data="imagenet",
        data_dir=str(data),
        num_envs=sizes.ppo_envs,
        n_steps=steps,
        minibatch_size=sizes.ppo_envs * steps // 2,
        n_epochs=2,
        total_steps=sizes.ppo_envs * steps * sizes.ppo_rollouts,
        eval_prices=(0.01,),
        images=sizes.batch,
        eval_every=10**9,
        save_every=10**9,
        out=str(out / "selector"),
        seed=cfg.seed,
        device=str(device),
        amp=amp,
        **shape,
    )

    def ppo() -> str:
        started = time.perf_counter()
        trained, history = train_selector(ppo_cfg)
        seconds = time.perf_counter() - started
        top1 = history[-1]["top1"]
        return f"ok: {trained.num_timesteps} env steps, {trained.num_timesteps / seconds:.0f} steps/s, Top-1 {top1:.3f}"

    if not check.run("PPO", ppo):
        for stage in ("calibration", "evaluate.py", "benchmark.py fp32", "benchmark.py bf16"):
            check.skip(stage, "no selector (PPO failed)")
        return check.finish(out)

    def calibration() -> str:
        adaptive = load_adaptive(str(selector), device=str(device), amp=amp)
        dataset = vit.load_dataset("imagenet", split="train", root=data, model=adaptive.supernet)
        batches = subset_batches(dataset, sizes.batch, sizes.batch, device)
        price = calibrate(adaptive, batches, 0.5, tolerance=0.02)
        ratio = measure(adaptive, batches, price=price)["flops_ratio"]
        if not math.isfinite(ratio):
            raise FloatingPointError(f"MACs ratio {ratio}")
        return f"ok: price {price:.3g} gives a MACs ratio of {ratio:.3f} (target 0.5)"

    check.run("calibration", calibration)

    def evaluate() -> str:
        report = EvaluateConfig(
            selector=str(selector),
            budgets=(0.5,),
            images=sizes.batch,
            calib_images=sizes.batch,
            tolerance=0.02,
            batch_size=sizes.batch,
            device=str(device),
            threads=cfg.threads,
            amp=amp,
            out=str(out / "evaluate"),
        )
        table = evaluate_selector(report)
        full, row = table[0], next(r for r in table if r["method"].startswith("PRANCE selector"))
        return (
            f"ok: selector Top-1 {row['top1']:.3f}, Top-5 {row['top5']:.3f}, MACs ratio {row['flops_ratio']:.3f}, "
            f"{row['params'] / 1e6:.2f} M params (full {full['params'] / 1e6:.2f} M)"
        )

    check.run("evaluate.py", evaluate)

    def speed(precision: str) -> str:
        bench = BenchmarkConfig(
            selector=str(selector),
            batch_size=sizes.batch,
            calib_images=sizes.batch,
            rounds=sizes.rounds,
            threads=cfg.threads,
            device=str(device),
            precisions=(precision,),
            supernet="none" if cfg.tiny else sizes.supernet,
            supernet_batch_size=sizes.batch,
            out=str(out / f"benchmark_{precision}"),
        )
        row = {r["run"]: r for r in benchmark(bench)["rows"] if r["part"] == "selector"}
        return (
            f"ok: images/s at batch {sizes.batch}: full {row['full']['images_per_s']:.0f}, static "
            f"{row['static']['images_per_s']:.0f}, AdaptiveViT {row['packed']['images_per_s']:.0f} "
            f"({row['packed']['speedup']:.2f}x full at MACs ratio {row['packed']['flops_ratio']:.3f})"
        )

    for precision in ("fp32", "bf16"):
        check.run(f"benchmark.py {precision}", lambda p=precision: speed(p))
    return check.finish(out)


__all__ = ["FULL", "TINY", "Check", "GpuCheckConfig", "Sizes", "env_speed", "gpu_check", "train_command"]

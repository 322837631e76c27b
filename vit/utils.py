"""Small helpers shared by the packages and scripts: device choice and dataclass-driven command lines."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import statistics
import sys
import time
import types
import typing
from collections.abc import Sequence

import numpy as np
import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available, else the CPU; anything else is passed to `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu' or 'auto'")
    return device


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`'s type (CUDA or CPU) when `enabled`, a null context otherwise.

    Matmuls, convolutions and attention run in bf16 while weights, norms, softmax statistics and the residual
    stream stay fp32; torch supports it on CPUs too (fast where the CPU has bf16 instructions).
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` computes in under the autocast in force on its device (`x.dtype` outside one),
    for buffers written by out= operations, which autocast does not cast."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def use_tf32() -> None:
    """Let CUDA run fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa products, fp32 sums).

    Process-wide and CUDA only (CPU matmuls stay exact fp32); the scripts call it where they start on a CUDA device.
    Several times faster fp32 matmuls on Ampere and later GPUs.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def long_tensor(values: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """`torch.tensor(values)` as int64 on `device`, built through numpy: several times faster for Python lists of
    a few hundred ints, which the per-sample execution makes every block."""
    tensor = torch.from_numpy(np.asarray(values, dtype=np.int64))
    return tensor if device is None or torch.device(device).type == "cpu" else tensor.to(device)


@contextlib.contextmanager
def single_threaded(device: torch.device | str):
    """Run the CPU operations inside on one thread, restoring torch's thread count after; on CUDA, a no-op.

    For stretches of many small operations (per-sample attention cores, token-reduction bookkeeping, a small
    policy's forward), where waking a second thread costs more than the work it takes over. `torch.set_num_threads`
    is process-wide: torch work running meanwhile in other Python threads gets one thread too.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def keep_freed_memory(keep_bytes: int = 1 << 30) -> bool:
    """Have glibc's malloc keep freed memory in the process (Linux), so that repeated CPU forwards stop
    page-faulting; returns whether it applied (False on other C libraries and systems).

    By default glibc hands freed blocks of a few MiB and more back to the system, and a forward that allocates them
    again takes a page fault per 4 KiB on first touch: tens of thousands per forward of the full model at batch
    256, a third of its time in some processes and none in others, depending on the allocation history. With this,
    blocks up to 32 MiB come from the heap and up to `keep_bytes` of free heap is kept, as jemalloc and tcmalloc do
    (PyTorch's CPU tuning guide suggests those). Process-wide; the timing scripts call it before measuring.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_TRIM_THRESHOLD, keep_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


def setup_cpu(threads: int = 0, keep_memory: bool = True) -> bool:
    """What the timing scripts set before measuring: torch's CPU thread count (0 keeps torch's default) and, with
    `keep_memory`, `keep_freed_memory()`. Returns whether freed memory is kept."""
    if threads:
        torch.set_num_threads(threads)
    return keep_memory and keep_freed_memory()


def timed(fn, device: torch.device | str | None = None):
    """`fn()`'s result and the wall-clock seconds it took (CUDA synchronised on a CUDA `device`)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def seconds_per_call(fn, repeats: int = 5, warmup: int = 1, device: torch.device | None = None) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls after `warmup` calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def clocked(fn, device: torch.device | str | None = None):
    """`fn()`'s result, the wall-clock seconds it took (CUDA synchronised on a CUDA `device`) and the process CPU
    seconds (`time.process_time`: every thread of the process, none of other processes, so it drifts less than wall
    clock on a shared machine)."""
    cpu = time.process_time()
    out, wall = timed(fn, device)
    return out, wall, time.process_time() - cpu


def interleaved_rounds(
    runs: dict[str, typing.Callable[[], object]],
    rounds: int,
    device: torch.device | str | None = None,
    warmup: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each of `runs` in each of `rounds` rounds: {name: {"wall": [...],
    "cpu": [...]}}.

    Every round calls each run once, starting one further along the list than the round before, so that a machine's
    drift and the effects of call order (caches, allocations) spread over all runs; `warmup` untimed rounds come
    first. Ratios of two runs are best taken per round (`round_ratios`).
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    seconds = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _, wall, cpu = clocked(runs[name], device)
            seconds[name]["wall"].append(wall)
            seconds[name]["cpu"].append(cpu)
    return seconds


def round_ratios(reference: Sequence[float], other: Sequence[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the per-round ratios reference / other (of seconds: the speed-up of `other`)."""
    ratios = [a / b for a, b in zip(reference, other)]
    return statistics.median(ratios), min(ratios), max(ratios)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype of a model's weights at `precision` (`fp32` or `bf16`; bf16 autocast over fp32 weights is `amp`,
    a separate switch)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _arg_type(annotation) -> tuple[type, bool]:
    """The scalar type of a field annotation, and whether the field is a list."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _arg_type(args[0])
    if origin in (list, tuple, Sequence):
        return args[0], True
    return annotation, False


class _DefaultsOnce(argparse.HelpFormatter):
    """Help lines with the default appended once: not when the help text already speaks of its default, nor for a
    default of None (the help says what happens then); sequences are shown as they are typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if default is None or default is argparse.SUPPRESS or "default" in help_.lower():
            return help_
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{help_} (default: {shown.replace('%', '%%')})"


def parse_dataclass(cls, argv: Sequence[str] | None = None, description: str | None = None):
    """Build an instance of dataclass `cls` from command-line arguments, one `--flag` per field.

    Each field's `metadata["help"]` is its help line, followed in `--help` by the default unless the line already
    says what the default is; `metadata["choices"]`, when given, are the values accepted; booleans become
    `--flag/--no-flag`.
    """
    parser = argparse.ArgumentParser(description=description or cls.__doc__, formatter_class=_DefaultsOnce)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind, many = _arg_type(hints[field.name])
        help_ = field.metadata.get("help", "")
        if kind is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            action.help = help_  # Python < 3.14 appends its own "(default: ...)"; the formatter adds it once
        else:
            parser.add_argument(
                flag,
                type=kind,
                nargs="+" if many else None,
                default=default,
                choices=field.metadata.get("choices"),
                help=help_,
            )
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


__all__ = [
    "PRECISIONS",
    "autocast",
    "clocked",
    "interleaved_rounds",
    "keep_freed_memory",
    "matmul_dtype",
    "parse_dataclass",
    "resolve_device",
    "round_ratios",
    "seconds_per_call",
    "setup_cpu",
    "use_tf32",
    "weights_dtype",
]

"""Device, dtype and thread helpers: where and in what precision the model runs.

Timing lives in `vit.bench` and the dataclass-driven command lines in `vit.cli`; their old names here are deprecated
aliases.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype of a model's weights at `precision` (`fp32` or `bf16`; bf16 autocast over fp32 weights is `amp`,
    a separate switch)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


_MOVED = {
    "clocked": "bench",
    "interleaved_rounds": "bench",
    "keep_freed_memory": "bench",
    "round_ratios": "bench",
    "seconds_per_call": "bench",
    "setup_cpu": "bench",
    "timed": "bench",
    "parse_dataclass": "cli",
}


def __getattr__(name: str):
    if name in _MOVED:
        module = f"vit.{_MOVED[name]}"
        warnings.warn(f"vit.utils.{name} is now {module}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PRECISIONS",
    "autocast",
    "long_tensor",
    "matmul_dtype",
    "resolve_device",
    "single_threaded",
    "use_tf32",
    "weights_dtype",
]

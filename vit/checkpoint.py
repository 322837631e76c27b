"""Supernet weights on disk: safetensors files written atomically and read back with clear errors."""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "prance-vit"


def _umask() -> int:
    """The process umask, read without changing it where the system shows it (Linux's `/proc`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere, reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    A crash or interruption during `write` leaves any previous file at `path` untouched. A process killed during
    `write` (SIGKILL, power loss) cannot remove its temporary file: the next successful write of `path` does.
    The file gets the permissions of any new file of the process, `0o666 & ~umask`, so that a team sharing a run
    folder can read it (temporary files, ours and those of writers that rename their own, are private: 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after `write`, which may have replaced the file (safetensors does)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    leftover = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkstemp's names for this path
    for stale in path.parent.iterdir():
        if leftover.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    return path


#: what a supernet file records of its model, beside the weights: the preset and its shape arguments
RECORDED = ("architecture", "num_classes", "img_size", "in_chans")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the weights of `model` to a safetensors file (atomically), with JSON-able `metadata`; a model with a
    `pretrained_cfg` (a supernet) also records its preset and shape (`RECORDED`, read by `recorded_model`)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "metadata": json.dumps(metadata or {})}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        in_chans, img_size, _ = cfg["input_size"]
        shape = {"architecture": cfg.get("architecture"), "num_classes": cfg["num_classes"]}
        meta["model"] = json.dumps(shape | {"img_size": img_size, "in_chans": in_chans})
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def recorded_model(path: str | os.PathLike) -> dict:
    """The preset (`architecture`) and shape a supernet file records (`save_checkpoint`); {} for a file that records
    none (older files, `.pt` state dicts, timm's weights)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        recorded = json.loads(meta.get("model", "{}"))
    except Exception:  # not a readable safetensors file: loading it says so
        return {}
    return {k: v for k, v in recorded.items() if k in RECORDED and v is not None}


class _Foreign:
    """What an object of a class outside torch and numpy in a checkpoint (a training script's `args`, ...) loads
    as: nothing of it runs."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickles tensors, arrays and plain containers; every other class becomes `_Foreign`."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] in ("torch", "collections", "numpy", "_codecs"):
            return super().find_class(module, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return super().find_class(module, name)
        return _Foreign


def _load_weights(path: Path) -> object:
    """A torch file's contents: `weights_only`, or, for training checkpoints that also pickle objects of their
    scripts (DeiT-style `{"model": ..., "args": Namespace}`), with those objects loaded as nothing."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        module = types.SimpleNamespace(__name__="pickle", Unpickler=_WeightsUnpickler, load=pickle.load)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (safetensors, or a torch `.pt`/`.pth` state dict), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = _load_weights(path)
    except Exception as e:  # unpickling a foreign file fails in many ways (KeyError, UnpicklingError, ...)
        raise ValueError(f"{path} is not a readable checkpoint (truncated or not a weights file): {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise a `ValueError` listing missing, unexpected and mis-shaped keys of `state` for `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{len(items)} {what} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})")
        raise ValueError(f"{source} does not fit this {type(model).__name__}: " + "; ".join(parts))


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights from `path` into `model` after checking every key and shape; returns `model`."""
    state = read_state_dict(path)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def save_train_state(
    path: str | os.PathLike, tag: str, model: nn.Module, optimizer: torch.optim.Optimizer, **state
) -> Path:
    """Write a resumable training state atomically: the model's and the optimizer's state dicts, `state` (step
    counts, config) and the format tag `tag` of the trainer that reads it back (`read_train_state`)."""
    state = {"format": tag, "model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}
    return atomic_write(path, functools.partial(torch.save, state))


def read_train_state(path: str | os.PathLike, tag: str) -> dict:
    """A training state `save_train_state` wrote with format tag `tag`; a clear `ValueError` when it is broken or
    foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling a foreign file fails in many ways (KeyError, UnpicklingError, ...)
        raise ValueError(f"{path} is not a readable training checkpoint (truncated or foreign): {e}") from e
    if not isinstance(state, dict) or state.get("format") != tag:
        raise ValueError(f"{path} is not a training checkpoint of this package (no {tag!r} format tag)")
    return state


__all__ = [
    "atomic_write",
    "check_state_dict",
    "load_checkpoint",
    "read_state_dict",
    "recorded_model",
    "read_train_state",
    "save_checkpoint",
    "save_train_state",
]

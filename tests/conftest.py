"""Shared test helpers: small generated datasets and tiny supernets, so tests never download and stay fast."""

import functools
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import flop_counter as torch_flop_counter
from torch.utils.flop_counter import FlopCounterMode

import vit

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` as a user would, from the repository root on one thread; `check` asserts it succeeded
    (showing the end of its stderr otherwise)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts every fused attention kernel torch may dispatch to, whatever its version.

    torch's formula registry lacks some kernels: in torch 2.14.1 CPU ``F.scaled_dot_product_attention`` runs
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode counts as 0 FLOPs. Every
    non-decomposing ``aten`` SDPA op without a formula gets torch's own SDPA formula (the backward one for
    ``*_backward`` ops); the ops torch already counts keep their formula.
    """
    return FlopCounterMode(display=False, custom_mapping=_missing_sdpa_formulas())


@functools.cache
def _missing_sdpa_formulas() -> dict:
    formulas = {}
    for qualified in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualified.partition("::")
        name = name.split(".")[0]
        if namespace != "aten" or "scaled_dot_product" not in name:
            continue
        # composite ops (the public SDPA, the math fallback) decompose into matmuls before the mode sees them
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeImplicitAutograd"):
            continue
        packet = getattr(torch.ops.aten, name)
        if packet not in torch_flop_counter.flop_registry:
            formulas[packet] = _sdpa_backward_flops if name.endswith("_backward") else _sdpa_flops
    return formulas


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return torch_flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return torch_flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (magic 0x08nn, big-endian dims, raw bytes)."""
    data = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_split(root: Path, split: str, n: int = 5, seed: int = 0, compress: bool = True) -> tuple[Path, Path]:
    """Write a small valid Fashion-MNIST split of ``n`` random images; return the image and label paths."""
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return (
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress),
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress),
    )


def write_image_folder(root: Path, classes: int, per_class: dict[str, int], size: int, seed: int = 0) -> Path:
    """An ImageFolder of random RGB JPEGs, `root/<split>/class<k>/<i>.jpg`, `per_class[split]` images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked `long` first, so that pytest-xdist's workers finish together instead of one of them running a
    long test alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session", autouse=True)
def sb3_log_dir(tmp_path_factory) -> Path:
    """Where the SB3 runs of the tests without a log folder log (SB3 would make a folder in the system's temporary
    directory for each)."""
    folder = tmp_path_factory.mktemp("sb3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SB3_LOGDIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST folder: 96 train and 48 test images of random pixels."""
    root = tmp_path_factory.mktemp("fmnist")
    write_split(root, "train", n=96, seed=0)
    write_split(root, "test", n=48, seed=1)
    return root


def tiny_supernet(token_mode: str = "merge", seed: int = 0, **kwargs) -> vit.ElasticViT:
    """A two-block, 16-wide Fashion-MNIST-shaped supernet with two choices per field, initialised from `seed`."""
    torch.manual_seed(seed)
    args = dict(
        depth=2,
        embed_dim=16,
        num_heads=2,
        head_choices=(1, 2),
        mlp_hidden_choices=(32, 64),
        keep_ratio_choices=(0.5, 1.0),
        token_mode=token_mode,
    )
    return vit.create_supernet("prance_fmnist", **{**args, **kwargs})


def shared_supernet(name: str, token_mode: str = "merge") -> vit.ElasticViT:
    """A randomly initialised eval-mode preset, cached for tests that only read it (copy it to modify it)."""
    return _build_supernet(name, token_mode)


@functools.cache
def _build_supernet(name: str, token_mode: str) -> vit.ElasticViT:
    torch.manual_seed(0)
    return vit.create_supernet(name, token_mode=token_mode).eval()


def release_shared_supernets() -> None:
    """Free the cached presets (DeiT-B is 350 MB)."""
    _build_supernet.cache_clear()


def images(model: vit.ElasticViT, batch: int, seed: int = 0) -> torch.Tensor:
    """A seeded batch of random images of the model's input size."""
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(seed))


def dense_reduce(x, size, scores, keys, schedule, source=None):
    """A block's token reduction of a dense batch x (B, 1 + N, C) (sizes (B, 1 + N) or None) from its public pieces,
    `assign_tokens` and `Reduction.from_slots`: x and size after it (and the source map, when given)."""
    from vit.token_ops import Reduction, assign_tokens

    B, L, C = x.shape
    pruned, final = schedule
    slot = assign_tokens(scores, keys, pruned, final)
    samples = torch.arange(B)
    reduction = Reduction.from_slots(slot, samples * L, samples * (1 + final), B * (1 + final), final < pruned)
    x, size = reduction.mean(x.reshape(B * L, C), None if size is None else size.reshape(B * L))
    x, size = x.view(B, 1 + final, C), None if size is None else size.view(B, 1 + final)
    if source is None:
        return x, size
    return x, size, reduction.sum(source.reshape(B * L, -1)).view(B, 1 + final, -1)


def official_on_random_weights(token_mode: str, **kwargs):
    """The official T meta-network in `token_mode`, eval mode, on seeded random weights with non-zero biases and
    non-unit LayerNorms."""
    from vit import official

    model = official.create_official("tiny", token_mode=token_mode, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if "norm" in name else 0.05))
    return model

"""Datasets: Fashion-MNIST read from its IDX files, and ImageNet-style folders with timm's transforms.

Fashion-MNIST is the embedded default. Debian's ``dataset-fashion-mnist`` package installs its four IDX files in
``/usr/share/datasets/fashion-mnist``; elsewhere, point ``FASHION_MNIST_DIR`` (or ``root=``) at a folder holding
them. Nothing here downloads anything.

    data = load_dataset("fashion-mnist", split="test")                  # (1, 28, 28) float images, int labels
    data = load_dataset("imagefolder", split="val", root=DIR, model=m)  # torchvision ImageFolder, timm transforms

An ImageFolder is read through timm's eval transform unless ``augment=True`` (supernet training). The random
transforms draw from Python's ``random``, numpy's and torch's global generators; :class:`SeededItems` seeds them per
item, so a seeded run reads the same images whatever the number of loader workers. ``stratified_subset`` picks a
seeded, class-stratified subset (an ImageNet folder is sorted by class), and ``batch_loader`` /
``to_device`` feed batches from parallel workers onto the model's device.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import math
import os
import random
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .config import channel_statistics

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")
IMAGEFOLDER_NAMES = ("imagefolder", "imagenet")

_IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
_HOW_TO_GET = (
    "On Debian/Ubuntu install it with `sudo apt-get install dataset-fashion-mnist`; elsewhere set FASHION_MNIST_DIR "
    "or pass root= to a folder holding the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)."
)
# timm data-config keys that load_dataset("imagefolder", ...) accepts as keyword overrides.
_TIMM_DATA_KEYS = ("input_size", "img_size", "in_chans", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# timm train-transform keys (RandAugment, random erasing) it also accepts; they apply when augmenting only.
_TIMM_TRAIN_KEYS = ("auto_augment", "re_prob", "re_mode", "re_count")


def _find_idx(folder: Path, stem: str) -> Path:
    """Return ``folder/stem.gz``, or ``folder/stem`` when only the uncompressed file is there."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    raise FileNotFoundError(f"Fashion-MNIST file not found: {folder / stem}.gz. {_HOW_TO_GET}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes whose header starts with ``magic``; the low byte of magic is the rank."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = math.prod(shape)
    if len(raw) - header != size:
        raise ValueError(f"{path}: header announces shape {shape} ({size} bytes), file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape).copy()


class FashionMNIST(Dataset):
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey product photos in 10 classes, 60k train and 10k test.

    The split is read once from its IDX files and held in memory as ``images`` (uint8, (N, 28, 28)) and ``targets``
    (int64, (N,)). Items are ``(image, label)`` with ``image`` a normalised float32 (1, 28, 28) tensor and ``label``
    an int. ``__getitems__`` lets a DataLoader fetch a whole batch with one indexing operation, and ``tensors()``
    gives the whole split at once (e.g. on a GPU).

    Args:
        root: folder holding the IDX files (``.gz`` or uncompressed). Defaults to ``$FASHION_MNIST_DIR``, then to
            ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
        split: ``"train"`` or ``"test"``.
    """

    MEAN = 0.2860
    STD = 0.3530
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    _FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train") -> None:
        if split not in self._FILES:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(self._FILES)}")
        root = root if root is not None else os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder not found: {self.root}. {_HOW_TO_GET}")

        image_path, label_path = (_find_idx(self.root, stem) for stem in self._FILES[split])
        images = _read_idx(image_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(label_path, _IDX_LABELS_MAGIC)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
        if len(images) != len(labels):
            raise ValueError(f"{label_path}: {len(labels)} labels for {len(images)} images in {image_path}")
        if len(labels) and labels.max() >= len(self.classes):
            raise ValueError(f"{label_path}: label {labels.max()} out of range 0..{len(self.classes) - 1}")
        self.images = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, root={str(self.root)!r}, n={len(self)})"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 pixels of any shape to float32 with the dataset's mean and std."""
        return (images.float() / 255.0 - self.MEAN) / self.STD

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[index].unsqueeze(0)), int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Fetch a batch of items with one gather instead of ``len(indices)`` separate ones."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.normalize(self.images[index].unsqueeze(1))  # (B, 1, 28, 28)
        return list(zip(images.unbind(0), self.targets[index].tolist(), strict=True))

    def tensors(
        self, device: torch.device | str | None = None, indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split (or the items ``indices``, int64) as ``(images, labels)``: normalised float32
        (N, 1, 28, 28) and int64 (N,) on ``device``."""
        images, labels = self.images, self.targets
        if indices is not None:
            images, labels = images[indices], labels[indices]
        images = images.to(device)  # move the uint8 pixels (4x smaller), then normalise on the device
        return self.normalize(images.unsqueeze(1)), labels.to(device)


def _open_image(path: str, mode: str) -> object:
    """A PIL image of the file at `path` in `mode` (`L`: grey, `RGB`), whatever the file holds."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def image_folder_shape(root: str | os.PathLike, split: str = "train") -> dict[str, int]:
    """`num_classes` (the class folders of `root/split`) and `in_chans` (1 when every image of the first class
    folder's first few is grey, else 3) of an ImageFolder, without decoding it all."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageFolder split not found: {folder} (expected root/{split}/<class>/*.jpg)")
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} holds no class folders (expected {folder}/<class>/*.jpg)")
    from PIL import Image

    files = sorted(f for f in classes[0].iterdir() if f.is_file())[:8]
    modes = set()
    for file in files:
        with contextlib.suppress(OSError), Image.open(file) as image:
            modes.add(image.mode)
    grey = bool(modes) and modes <= {"1", "L", "I", "I;16", "F"}
    return {"num_classes": len(classes), "in_chans": 1 if grey else 3}


def _image_folder(
    split: str, root: str | os.PathLike | None, model: torch.nn.Module | None, augment: bool, **overrides: object
) -> Dataset:
    """torchvision ``ImageFolder(root/split)`` with timm's transforms resolved for ``model``: the random train
    transform when ``augment``, else the eval one (resize, centre crop, normalise)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown ImageFolder split {split!r}; expected 'train', 'val' or 'test'")
    if root is None:
        raise ValueError("load_dataset('imagefolder') needs root=, a folder with train/ and val/ subfolders")
    unknown = sorted(set(overrides) - set(_TIMM_DATA_KEYS) - set(_TIMM_TRAIN_KEYS))
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown}; ImageFolder accepts timm data config keys {list(_TIMM_DATA_KEYS)}"
            f" and train transform keys {list(_TIMM_TRAIN_KEYS)}"
        )
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageFolder split not found: {folder}. Expected the torchvision ImageFolder layout "
            f"root/train/<class>/*.jpg and root/val/<class>/*.jpg (optionally root/test/<class>/*.jpg)."
        )

    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    args = {k: v for k, v in overrides.items() if k in _TIMM_DATA_KEYS}
    train_args = {k: v for k, v in overrides.items() if k in _TIMM_TRAIN_KEYS and augment}
    if model is None:
        args.setdefault("img_size", 224)  # timm's defaults (ImageNet mean/std, bicubic, crop 0.875) at 224 px
    config = resolve_data_config(args, model=model)
    channels = config["input_size"][0]
    if channels not in (1, 3):
        raise ValueError(f"an ImageFolder is read as grey (1 channel) or RGB (3 channels) images, not {channels}")
    config["mean"], config["std"] = (channel_statistics(config[key], channels) for key in ("mean", "std"))
    # timm's transforms keep the channels the loader gives: grey images for a 1-channel model, RGB otherwise
    loader = functools.partial(_open_image, mode="L" if channels == 1 else "RGB")
    transform = create_transform(**config, **train_args, is_training=augment)
    return ImageFolder(str(folder), transform=transform, loader=loader)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    augment: bool = False,
    **kwargs: object,
) -> Dataset:
    """Build a dataset of ``(image, label)`` pairs by name.

    Args:
        name: ``"fashion-mnist"`` (aliases ``"fashion_mnist"``, ``"fmnist"``) or ``"imagefolder"`` (alias
            ``"imagenet"``).
        split: ``"train"`` or ``"test"`` for Fashion-MNIST; ``"train"``, ``"val"`` (or ``"test"`` when that folder
            exists) for an ImageFolder; ``"held-out"`` for the dataset's held-out split (:func:`held_out_split`).
        root: the dataset folder. Optional for Fashion-MNIST (see :class:`FashionMNIST`); for an ImageFolder, the
            folder holding ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``.
        model: for an ImageFolder, the model whose ``pretrained_cfg`` sets input size, interpolation, crop and
            normalisation (timm's ``resolve_data_config``); ``None`` uses timm's defaults at 224 px. Fashion-MNIST
            ignores it (its preprocessing is fixed), so generic code may always pass it.
        augment: for an ImageFolder, timm's random train transform (random resized crop, flip, colour jitter)
            instead of the eval transform, whatever the split; read it through :class:`SeededItems` to make it
            reproducible. Fashion-MNIST ignores it (supernet training augments its batches on the device).
        **kwargs: for an ImageFolder, overrides of timm's data config (``input_size``, ``img_size``, ``in_chans``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), and, used with ``augment``, timm's
            ``create_transform`` arguments ``auto_augment`` (e.g. DeiT's ``"rand-m9-mstd0.5-inc1"``), ``re_prob``,
            ``re_mode``, ``re_count`` (random erasing). Fashion-MNIST takes none.

    Raises:
        ValueError: unknown name or split, or an ImageFolder without ``root``; a malformed IDX file.
        FileNotFoundError: the data is not where it was looked for; the message says how to get it.
    """
    if split == "held-out":
        split = held_out_split(name)
    if name.lower() in FASHION_MNIST_NAMES:
        return FashionMNIST(root=root, split=split, **kwargs)
    if is_image_folder(name):
        return _image_folder(split, root, model, augment, **kwargs)
    raise _unknown_dataset(name)


def _unknown_dataset(name: str) -> ValueError:
    return ValueError(f"unknown dataset {name!r}; known names: {', '.join(FASHION_MNIST_NAMES + IMAGEFOLDER_NAMES)}")


def is_image_folder(name: str) -> bool:
    """Whether the dataset name ``name`` (any case) is that of an ImageFolder (``"imagefolder"``, ``"imagenet"``)."""
    return name.lower() in IMAGEFOLDER_NAMES


def held_out_split(name: str) -> str:
    """The held-out split of the dataset named ``name`` (any case): Fashion-MNIST's ``"test"``, an ImageFolder's
    ``"val"``. Raises ``ValueError`` for an unknown name."""
    if is_image_folder(name):
        return "val"
    if name.lower() in FASHION_MNIST_NAMES:
        return "test"
    raise _unknown_dataset(name)


def default_workers() -> int:
    """Loader worker processes by default: four, or fewer on a machine with fewer cores."""
    return min(4, os.cpu_count() or 1)


@contextlib.contextmanager
def _seeded(entropy: Sequence[int]) -> Iterator[None]:
    """Python's ``random``, numpy's global and torch's CPU generator seeded from ``entropy``, restored on exit."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    words = np.random.SeedSequence(list(entropy)).generate_state(4)
    random.seed(int(words[0]))
    np.random.seed(words[1])
    torch.default_generator.manual_seed(int(words[2]) << 32 | int(words[3]))  # CPU only: CUDA streams untouched
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


class SeededItems(Dataset):
    """``dataset`` with item ``i`` read under generators seeded from ``(*seed, i)``.

    timm's random transforms draw from Python's ``random``, numpy's and torch's global generators; seeding them per
    item makes an augmented image a function of (seed, index) alone, the same in the main process or any worker,
    for any number of workers and any order, and leaves the caller's generators as they were.
    """

    def __init__(self, dataset: Dataset, seed: Sequence[int]) -> None:
        self.dataset, self.seed = dataset, tuple(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded((*self.seed, index)):
            return self.dataset[index]


def _base(dataset: Dataset) -> tuple[Dataset, torch.Tensor | None]:
    """The dataset under subsets and seeding wrappers, and the index (int64) in it of each item of ``dataset``
    (None when no subset lies between them)."""
    index = None
    while isinstance(dataset, Subset | SeededItems):
        if isinstance(dataset, Subset):
            inner = torch.as_tensor(dataset.indices, dtype=torch.long)
            index = inner if index is None else inner[index]  # an outer subset indexes the inner one
        dataset = dataset.dataset
    return dataset, index


def in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` is held in memory whole: Fashion-MNIST, under any subsets and seeding wrappers (its
    items draw no random numbers, so seeding changes none of them)."""
    return isinstance(_base(dataset)[0], FashionMNIST)


def memory_tensors(dataset: Dataset, device: torch.device | str) -> tuple[Tensor, Tensor] | None:
    """All items of an in-memory ``dataset`` (:func:`in_memory`) as ``(images, labels)`` on ``device``, gathered
    at once through its subsets' indices; None for a dataset read item by item."""
    base, index = _base(dataset)
    return base.tensors(device, index) if isinstance(base, FashionMNIST) else None


def labels_of(dataset: Dataset) -> np.ndarray:
    """The label of every item (int64): ``targets`` when the dataset keeps them (ImageFolder, Fashion-MNIST and
    subsets of these), else read item by item."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(targets, dtype=np.int64)


def stratified_subset(dataset: Dataset, n: int, seed: int = 0) -> Subset:
    """A seeded subset of ``n`` items with every class in proportion to its share of ``dataset``.

    Each class gets its proportional share rounded down and at least one item (when ``n`` reaches the number of
    classes); the items left go to the classes furthest below their share, so every class lies within one item of
    proportional (for any but extremely skewed classes, where the one-item floor wins). Which items of a class are
    taken, and ties between classes, are drawn from ``seed``. The indices are in dataset order; all of them when
    ``n`` reaches the dataset's size.
    """
    if n < 1:
        raise ValueError(f"a subset needs at least one item, got n={n}")
    labels = labels_of(dataset)
    if n >= len(labels):
        return Subset(dataset, list(range(len(labels))))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    if n >= len(counts):
        take = np.maximum(take, 1)
    rng = np.random.default_rng(seed)
    tie = rng.random(len(counts))
    while (missing := n - int(take.sum())) != 0:
        if missing > 0:  # give one more to the classes furthest below their share
            order = np.lexsort((tie, take - quota))
            order = order[take[order] < counts[order]][:missing]
            take[order] += 1
        else:  # take one back from the classes furthest above it
            order = np.lexsort((tie, quota - take))
            order = order[take[order] > 1][:-missing]
            take[order] -= 1
    perm = rng.permutation(len(labels))
    perm = perm[np.argsort(inverse[perm], kind="stable")]  # grouped by class, shuffled within each
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(labels)) - starts[inverse[perm]]
    return Subset(dataset, np.sort(perm[rank < take[inverse[perm]]]).tolist())


def batch_loader(
    dataset: Dataset, device: torch.device | str, workers: int | None = None, seed: int = 0, **kwargs: object
) -> DataLoader:
    """A DataLoader (``kwargs``: its batching arguments) that decodes in ``workers`` processes.

    ``None`` workers means :func:`default_workers`; in-memory Fashion-MNIST is always read in the process, where a
    batch is one gather. Batches are pinned for a CUDA ``device`` (move them with :func:`to_device`). The loader's
    own generator, seeded by ``seed``, gives the workers their seeds, so loading draws nothing from torch's global
    generator.
    """
    workers = 0 if in_memory(dataset) else default_workers() if workers is None else workers
    if workers == 0:  # options of worker processes, which torch refuses without any
        kwargs = {k: v for k, v in kwargs.items() if k not in ("persistent_workers", "prefetch_factor")}
    return DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def to_device(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
    """Each ``(images, labels)`` batch on ``device`` (copied asynchronously from pinned memory)."""
    for images, labels in batches:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def write_image_folder(
    root: str | os.PathLike, classes: int, per_class: dict[str, int], side: int, seed: int = 0
) -> Path:
    """Write an ImageFolder of generated images, `root/<split>/class<k>/<i>.jpg` with `per_class[split]` images per
    class: smooth random RGB JPEGs of `side` pixels (a coarse 8 x 8 grid of noise, upsampled), standing in for
    ImageNet where no data may be downloaded. Returns `root`."""
    from PIL import Image

    root, rng = Path(root), np.random.default_rng(seed)
    for split, count in per_class.items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(folder / f"{i}.jpg")
    return root

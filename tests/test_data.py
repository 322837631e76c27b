"""Datasets: Fashion-MNIST from IDX files (real and generated) and ImageFolder with timm transforms."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx, write_split
from torch.utils.data import DataLoader, Subset

from vit.data import (
    FASHION_MNIST_DIR,
    FashionMNIST,
    SeededItems,
    batch_loader,
    held_out_split,
    is_image_folder,
    load_dataset,
    memory_tensors,
)

REAL_ROOT = Path(os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def real_test():
    if not any((REAL_ROOT / name).is_file() for name in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")):
        pytest.skip(f"Fashion-MNIST not found in {REAL_ROOT} (apt-get install dataset-fashion-mnist)")
    return load_dataset("fashion-mnist", split="test")


# --- the real dataset ---------------------------------------------------------------------------------------------


def test_real_test_split(real_test):
    assert len(real_test) == 10000
    image, label = real_test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int)
    assert real_test.targets.dtype == torch.int64
    assert set(real_test.targets.tolist()) == set(range(10))
    assert len(real_test.classes) == 10
    images, labels = real_test.tensors()
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1.0) < 0.1


def test_real_getitems_matches_getitem(real_test):
    indices = [0, 7, 9999, 42, 7]
    batch = real_test.__getitems__(indices)
    assert len(batch) == len(indices)
    for i, (image, label) in zip(indices, batch, strict=True):
        expected_image, expected_label = real_test[i]
        torch.testing.assert_close(image, expected_image, rtol=0, atol=0)
        assert label == expected_label and isinstance(label, int)


def test_real_dataloader_batches(real_test):
    loader = DataLoader(real_test, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    images, labels = next(iter(loader))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() <= 9
    assert sum(len(y) for _, y in loader) == 10000


def test_root_resolution_order(tmp_path, monkeypatch):
    env_root, arg_root = tmp_path / "env", tmp_path / "arg"
    env_root.mkdir()
    arg_root.mkdir()
    write_split(env_root, "test", n=3)
    write_split(arg_root, "test", n=4)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(env_root))
    assert len(FashionMNIST(split="test")) == 3
    assert len(FashionMNIST(root=arg_root, split="test")) == 4


# --- small generated IDX files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("compress", [True, False])
def test_generated_split_loads(tmp_path, split, compress):
    write_split(tmp_path, split, n=5, compress=compress)
    data = load_dataset("fmnist", split=split, root=tmp_path)
    assert len(data) == 5 and data.images.dtype == torch.uint8 and data.images.shape == (5, 28, 28)

    rng = np.random.default_rng(0)  # the same draws as write_split
    pixels = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    image, label = data[3]
    expected = (torch.from_numpy(pixels[3]).float() / 255 - FashionMNIST.MEAN) / FashionMNIST.STD
    torch.testing.assert_close(image, expected.unsqueeze(0))
    assert label == int(labels[3])
    assert data.targets.tolist() == labels.tolist()


def test_other_split_missing(tmp_path):
    write_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(root=tmp_path, split="train")


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as excinfo:
        load_dataset("fashion-mnist", split="test", root=missing)
    assert str(missing) in str(excinfo.value)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FashionMNIST(split="test")


def test_truncated_file(tmp_path):
    images, _ = write_split(tmp_path, "test", n=5, compress=False)
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        FashionMNIST(root=tmp_path, split="test")


def test_truncated_gzip(tmp_path):
    images, _ = write_split(tmp_path, "test", n=5)
    images.write_bytes(images.read_bytes()[:-20])
    with pytest.raises(ValueError, match="gzip"):
        FashionMNIST(root=tmp_path, split="test")


def test_bad_magic(tmp_path):
    _, labels = write_split(tmp_path, "test", n=5)
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[:4] = struct.pack(">I", 2051)
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="magic"):
        FashionMNIST(root=tmp_path, split="test")


def test_count_mismatch(tmp_path):
    write_split(tmp_path, "test", n=5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="4 labels for 5 images"):
        FashionMNIST(root=tmp_path, split="test")


def test_wrong_image_size(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 32, 32), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="28x28"):
        FashionMNIST(root=tmp_path, split="test")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="split"):
        load_dataset("fashion-mnist", split="val", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_dataset("imagefolder", split="holdout", root=tmp_path)


# --- ImageFolder --------------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_imagefolder_val(image_folder):
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    data = load_dataset("imagefolder", split="val", root=image_folder, model=model)
    assert len(data) == 4 and data.classes == ["cat", "dog"]
    image, label = data[3]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert isinstance(label, int) and label == 1


def test_imagefolder_defaults_and_overrides(image_folder):
    image, _ = load_dataset("imagenet", split="train", root=image_folder)[0]
    assert image.shape == (3, 224, 224)
    image, _ = load_dataset("imagefolder", split="val", root=image_folder, img_size=64)[0]
    assert image.shape == (3, 64, 64)
    with pytest.raises(TypeError, match="unexpected"):
        load_dataset("imagefolder", split="val", root=image_folder, colour="blue")


def test_imagefolder_errors(image_folder):
    with pytest.raises(ValueError, match="root"):
        load_dataset("imagefolder", split="val")
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        load_dataset("imagefolder", split="val", root=image_folder / "missing")
    with pytest.raises(FileNotFoundError, match="test"):
        load_dataset("imagefolder", split="test", root=image_folder)


# --- held-out splits and in-memory subsets -----------------------------------------------------------------------


def test_held_out_split_of_every_dataset_name_in_any_case():
    assert [held_out_split(n) for n in ("fashion-mnist", "FMNIST", "Fashion_MNIST")] == ["test"] * 3
    assert [held_out_split(n) for n in ("imagefolder", "ImageNet")] == ["val"] * 2
    assert is_image_folder("ImageNet") and not is_image_folder("fmnist")
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        held_out_split("cifar10")


def test_nested_subsets_of_fashion_mnist_are_gathered_at_once(tmp_path):
    write_split(tmp_path, "test", n=20, seed=3)
    data = FashionMNIST(tmp_path, split="test")
    nested = Subset(SeededItems(Subset(data, list(range(19, -1, -2))), (0,)), [4, 0, 7])
    images, labels = memory_tensors(nested, "cpu")
    assert labels.tolist() == [int(data.targets[i]) for i in (11, 19, 5)]
    assert torch.equal(images, torch.stack([data[i][0] for i in (11, 19, 5)]))
    assert memory_tensors(Subset(list(zip(images, labels)), [0]), "cpu") is None  # read item by item


def test_batch_loader_reads_a_fashion_mnist_subset_in_the_process_whatever_the_worker_options(tmp_path):
    write_split(tmp_path, "test", n=12, seed=4)
    subset = Subset(FashionMNIST(tmp_path, split="test"), [3, 1, 8, 5])
    loader = batch_loader(subset, "cpu", workers=2, batch_size=2, persistent_workers=True, prefetch_factor=4)
    assert loader.num_workers == 0
    images, labels = next(iter(loader))
    first, second = subset[0], subset[1]
    assert torch.equal(images, torch.stack([first[0], second[0]])) and labels.tolist() == [first[1], second[1]]

"""The ImageFolder input pipeline: seeded augmentation, eval transforms, stratified subsets, batches on the model's
device, and the env decoding its next batch while the current episodes run."""

import threading
import time

import gymnasium
import numpy as np
import pytest
import torch
from conftest import tiny_supernet, write_image_folder
from torch.utils.data import Dataset

import prance_env
from prance_env.source import ImageSource
from vit.data import labels_of, load_dataset, stratified_subset
from vit.train import Batches, TrainConfig, subset_batches, train_supernet

META = torch.device("meta")  # a device other than the CPU that needs no accelerator: nothing reaches it by chance


def rgb_supernet() -> torch.nn.Module:
    """A tiny supernet reading 32-px RGB images, so an ImageFolder is read at 32 px."""
    return tiny_supernet(in_chans=3, img_size=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes, sorted by class as ImageNet is: 8 train and 4 val JPEGs each, larger than the model's input."""
    return write_image_folder(tmp_path_factory.mktemp("images"), 3, {"train": 8, "val": 4}, size=48)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Class-sorted train split of unequal classes (3, 5, 7, 9, 11 images)."""
    root = tmp_path_factory.mktemp("skewed")
    for k, count in enumerate((3, 5, 7, 9, 11)):
        write_image_folder(root / f"c{k}", 1, {"train": count}, size=8, seed=k)
        (root / f"c{k}" / "train" / "class0").rename(root / f"class{k}")
    (root / "train").mkdir()
    for k in range(5):
        (root / f"class{k}").rename(root / "train" / f"class{k}")
    return root


# --- seeded augmentation and eval transforms --------------------------------------------------------------------


def test_augment_false_reads_the_eval_transform(folder, tmp_path):
    (tmp_path / "val").symlink_to(folder / "train")  # the train images, as a val split (eval transform)
    model = rgb_supernet()
    train = load_dataset("imagefolder", split="train", root=folder, model=model)
    as_val = load_dataset("imagefolder", split="val", root=tmp_path, model=model)
    for i in (0, 9, 23):
        assert torch.equal(train[i][0], as_val[i][0])
    augmented = load_dataset("imagefolder", split="train", root=folder, model=model, augment=True)
    assert not all(torch.equal(augmented[i][0], as_val[i][0]) for i in (0, 9, 23))


def test_augmented_batches_repeat_with_the_seed_whatever_the_workers(folder):
    data = load_dataset("imagefolder", split="train", root=folder, model=rgb_supernet(), augment=True)

    def epoch(workers: int, seed: int, epoch: int = 0) -> torch.Tensor:
        batches = Batches(data, 4, torch.device("cpu"), 0, 1, workers, seed)
        return torch.cat([x for x, _ in batches.epoch(epoch, limit=3)])

    torch.manual_seed(0)
    first = epoch(0, seed=1)
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(epoch(2, seed=1), first)
    assert not torch.equal(epoch(0, seed=2), first)
    assert not torch.equal(epoch(0, seed=1, epoch=1), first)


def test_two_trainings_with_the_same_seed_give_identical_weights(folder, tmp_path):
    def train(workers: int, seed: int) -> dict:
        cfg = TrainConfig(
            data="imagefolder",
            data_dir=str(folder),
            epochs=1,
            batch_size=4,
            steps_per_epoch=2,
            eval_batches=1,
            largest_only_epochs=0.0,
            num_random=0,
            workers=workers,
            seed=seed,
            device="cpu",
            out=str(tmp_path / f"run{workers}_{seed}"),
        )
        return train_supernet(cfg, model=rgb_supernet()).state_dict()

    a, b, other = train(0, seed=0), train(2, seed=0), train(0, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)


def test_two_envs_with_the_same_seed_give_identical_episodes(folder):
    def episode(workers: int) -> list:
        envs = gymnasium.make_vec(
            "PranceViT-v1",
            num_envs=4,
            supernet=rgb_supernet(),
            data="imagefolder",
            data_dir=str(folder),
            device="cpu",
            workers=workers,
        )
        obs, info = envs.reset(seed=7)
        seen = [info["index"], obs["cls"]]
        images = [envs.unwrapped.images.clone()]
        for _ in range(envs.unwrapped.codec.num_steps + 1):  # the last step resets onto the next batch
            obs, reward, *_ = envs.step(np.zeros(envs.action_space.shape, dtype=np.int64))
            seen += [obs["cls"], reward]
        images.append(envs.unwrapped.images.clone())
        envs.close()
        return seen, images

    (first, images), (second, _) = episode(0), episode(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    # the env reads the train split through the eval transform
    train = load_dataset("imagefolder", split="train", root=folder, model=rgb_supernet())
    assert torch.equal(images[0], torch.stack([train[int(i)][0] for i in first[0]]))


# --- stratified subsets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 7, 12, 20, 34])
def test_stratified_subset_holds_every_class_in_proportion(skewed, n):
    data = load_dataset("imagefolder", split="train", root=skewed, img_size=8)
    subset = stratified_subset(data, n, seed=0)
    labels, all_labels = labels_of(subset), labels_of(data)
    assert len(subset) == n and len(set(subset.indices)) == n
    counts, totals = np.bincount(labels, minlength=5), np.bincount(all_labels)
    assert (counts >= 1).all()
    assert np.abs(counts - n * totals / len(data)).max() < 1
    assert stratified_subset(data, n, seed=0).indices == subset.indices
    assert stratified_subset(data, n, seed=1).indices != subset.indices


def test_calibration_and_held_out_batches_hold_every_class(folder):
    model = rgb_supernet()
    for split in ("train", "val"):  # calibration reads the train split, held-out evaluation the val split
        data = load_dataset("imagefolder", split=split, root=folder, model=model)
        batches = subset_batches(data, 6, 4, torch.device("cpu"), workers=0)
        labels = torch.cat([y for _, y in batches])
        assert [len(y) for _, y in batches] == [4, 2]
        assert torch.bincount(labels).tolist() == [2, 2, 2]


# --- batches on the model's device ----------------------------------------------------------------------------------


def test_batches_reach_the_requested_device(folder):
    data = load_dataset("imagefolder", split="train", root=folder, model=rgb_supernet())
    x, y = next(Batches(data, 4, META, 0, 1, 0, 0).epoch(0))
    assert x.device == META and y.device == META
    for x, y in subset_batches(data, 6, 4, META, workers=0):  # evaluation, calibration, benchmark
        assert x.device == META and y.device == META
    source = prance_env.source.build_source(data, None, "train", rgb_supernet(), META, workers=0)
    images, labels = source.get(np.arange(3))  # the env
    assert images.device == META and labels.device == META
    source.close()


class _Recorded(Exception):
    pass


def test_supernet_training_feeds_images_and_labels_on_the_model_device(folder, tmp_path, monkeypatch):
    seen = {}
    model = rgb_supernet()

    def forward(x, subnet=None):
        seen["images"] = x.device
        return torch.zeros(len(x), 10, device=x.device)

    def cross_entropy(logits, target, **kwargs):
        seen["labels"] = target.device
        raise _Recorded

    model.forward = forward
    monkeypatch.setattr("vit.train.setup_distributed", lambda device: (0, 1, META))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    cfg = TrainConfig(data="imagefolder", data_dir=str(folder), batch_size=4, workers=0, out=str(tmp_path))
    with pytest.raises(_Recorded):
        train_supernet(cfg, model=model)
    assert seen == {"images": META, "labels": META}


# --- prefetching --------------------------------------------------------------------------------------------------


class SlowImages(Dataset):
    """Fashion-MNIST-shaped images filled with their index that take `delay` seconds each to read; records the
    threads of this process that read them, and fails to read the indices in `broken`."""

    def __init__(self, n: int = 32, delay: float = 0.05, broken: tuple[int, ...] = ()) -> None:
        self.n, self.delay, self.broken, self.threads = n, delay, broken, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if index in self.broken:
            raise ValueError(f"image {index} is unreadable")
        self.threads.append(threading.current_thread())
        time.sleep(self.delay)
        return torch.full((1, 28, 28), float(index)), index % 10


def test_the_env_decodes_the_next_batch_while_the_episodes_run():
    data = SlowImages(delay=0.1)
    envs = prance_env.PranceViTVectorEnv(num_envs=4, supernet=tiny_supernet(), data=data, device="cpu", workers=2)
    envs.reset(seed=0)
    for _ in range(envs.codec.num_steps):
        envs.step(np.zeros(envs.action_space.shape, dtype=np.int64))
    time.sleep(1.0)  # the rest of a rollout: the policy, the learner
    started = time.perf_counter()
    *_, info = envs.step(np.zeros(envs.action_space.shape, dtype=np.int64))  # autoreset onto the next batch
    waited = time.perf_counter() - started
    assert waited < 0.15  # reading the batch now would take 0.2 s: two images on each of the two workers
    assert data.threads == []  # every image was read by a loader process
    assert torch.equal(envs.images[:, 0, 0, 0], torch.as_tensor(info["index"], dtype=torch.float32))
    envs.close()


def test_without_workers_the_env_reads_each_batch_in_its_own_thread_when_it_needs_it():
    data = SlowImages(delay=0.0)
    envs = prance_env.PranceViTVectorEnv(num_envs=4, supernet=tiny_supernet(), data=data, device="cpu", workers=0)
    envs.reset(seed=0)
    assert len(data.threads) == 4  # nothing read ahead: reading draws from the generators this thread draws from
    for _ in range(envs.codec.num_steps + 1):  # the last step autoresets onto the next batch
        *_, info = envs.step(np.zeros(envs.action_space.shape, dtype=np.int64))
    assert len(data.threads) == 8 and set(data.threads) == {threading.current_thread()}
    assert torch.equal(envs.images[:, 0, 0, 0], torch.as_tensor(info["index"], dtype=torch.float32))


def test_the_single_env_reads_its_image_in_its_own_thread_by_default():
    data = SlowImages(delay=0.0)
    env = prance_env.PranceViTEnv(supernet=tiny_supernet(), data=data, device="cpu")
    env.reset(seed=0)
    assert env.source.workers == 0 and data.threads == [threading.current_thread()]
    with prance_env.PranceViTEnv(supernet=tiny_supernet(), data=data, device="cpu", workers=1) as env:
        env.reset(seed=0)
        assert env.source.workers == 1 and len(data.threads) == 1  # read by the loader process


def test_a_failed_read_ahead_is_raised_by_the_next_get():
    source = ImageSource(SlowImages(delay=0.0, broken=(5,)), torch.device("cpu"), workers=1)
    source.prefetch(np.array([4, 5]))
    with pytest.raises(ValueError, match="image 5 is unreadable"):
        source.get(np.array([0, 1]))
    images, _ = source.get(np.array([0, 1]))  # the source reads on
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0]
    source.close()

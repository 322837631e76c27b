"""Supernet training: DDP agreement, exact resume, the ImageNet path, and checkpoints that never break."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_supernet
from PIL import Image

import vit
from vit.checkpoint import atomic_write, read_train_state
from vit.data import FashionMNIST
from vit.train import (
    TRAIN_FORMAT,
    TrainConfig,
    lr_at,
    sandwich,
    shift_and_flip,
    subset_batches,
    train_supernet,
)


def tiny_config(out: Path, data: Path, **kwargs) -> TrainConfig:
    args = dict(
        data_dir=str(data),
        out=str(out),
        epochs=2,
        batch_size=16,
        steps_per_epoch=3,
        eval_batches=1,
        num_random=1,
        device="cpu",
        warmup_epochs=0.5,
    )
    return TrainConfig(**{**args, **kwargs})


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 2e-5 and lr_at(100, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def test_sandwich_is_largest_smallest_then_random():
    model = tiny_supernet()
    subnets = sandwich(model, 3, np.random.default_rng(0))
    assert subnets[0] == model.search_space.largest() and subnets[1] == model.search_space.smallest()
    assert len(subnets) == 5


def test_augmentation_shifts_and_flips_within_bounds():
    torch.manual_seed(0)
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    y = shift_and_flip(x, pad=2)
    assert y.shape == x.shape
    assert not torch.equal(x, y)  # with this seed at least one image moved
    assert y.min() >= x.min() and y.max() <= x.max()  # edge padding adds no new values


def test_training_runs_its_epochs_and_writes_checkpoints(tmp_path, fmnist_dir):
    metrics = []
    model = train_supernet(tiny_config(tmp_path, fmnist_dir), tiny_supernet(), lambda e, m: metrics.append(m))
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert 0.0 <= metrics[-1]["top1_largest"] <= 1.0
    state = read_train_state(tmp_path / "last.pt", TRAIN_FORMAT)
    assert state["epoch"] == 2
    reloaded = vit.load_checkpoint(tiny_supernet(), tmp_path / "supernet.safetensors")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert list((tmp_path / "tb").iterdir()), "no TensorBoard events written"


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, fmnist_dir):
    straight = train_supernet(tiny_config(tmp_path / "a", fmnist_dir), tiny_supernet())

    def interrupt(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_supernet(tiny_config(tmp_path / "b", fmnist_dir), tiny_supernet(), interrupt)
    assert read_train_state(tmp_path / "b" / "last.pt", TRAIN_FORMAT)["epoch"] == 1
    resumed = train_supernet(tiny_config(tmp_path / "b", fmnist_dir, resume=True), tiny_supernet())
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import tiny_supernet
from vit.train import TrainConfig, train_supernet

cfg = TrainConfig(data_dir={data!r}, out={out!r}, epochs=1, batch_size=8, steps_per_epoch=2, eval_batches=1,
                  num_random=1, device="cpu")
model = train_supernet(cfg, tiny_supernet())
torch.save(model.state_dict(), f"{out}/rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
"""


def test_ddp_two_ranks_end_with_identical_weights(tmp_path, fmnist_dir):
    script = tmp_path / "ddp_train.py"
    script.write_text(
        textwrap.dedent(DDP_SCRIPT).format(tests=str(Path(__file__).parent), data=str(fmnist_dir), out=str(tmp_path))
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    init = tiny_supernet().state_dict()  # the weights both ranks started from
    assert any(not torch.equal(rank0[k], init[k]) for k in init), "training changed nothing"
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_imagenet_path_end_to_end(tmp_path):
    timm = pytest.importorskip("timm")
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    init_file = tmp_path / "deit_tiny.pth"
    torch.save(source.state_dict(), init_file)
    cfg = TrainConfig(
        supernet="prance_deit_tiny",
        data="imagenet",
        data_dir=str(root),
        init=str(init_file),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=2,
        steps_per_epoch=1,
        eval_batches=1,
        num_random=0,
        workers=0,
        device="cpu",
    )
    model = train_supernet(cfg)
    assert (tmp_path / "run" / "supernet.safetensors").is_file()
    # initialised from the file (then rewired and trained one step): the embedding still comes from it
    assert torch.allclose(model.patch_embed.proj.weight, source.patch_embed.proj.weight, atol=0.05)


def test_broken_training_checkpoints_give_clear_errors(tmp_path, fmnist_dir):
    train_supernet(tiny_config(tmp_path, fmnist_dir, epochs=1), tiny_supernet())
    last = tmp_path / "last.pt"
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        train_supernet(tiny_config(tmp_path, fmnist_dir, resume=True), tiny_supernet())
    torch.save({"weights": torch.zeros(3)}, last)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        read_train_state(last, TRAIN_FORMAT)


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    vit.save_checkpoint(tiny_supernet(), path)
    before = path.read_bytes()

    def crash(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "a temporary file was left behind"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_training_files_follow_the_umask(tmp_path, fmnist_dir, umask):
    old = os.umask(umask)
    try:
        train_supernet(tiny_config(tmp_path, fmnist_dir, epochs=1), tiny_supernet())
    finally:
        os.umask(old)
    for name in ("last.pt", "supernet.safetensors"):
        assert oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) == oct(0o666 & ~umask), name


def test_mixup_and_cutmix_train_every_subnet_on_soft_targets(tmp_path, fmnist_dir):
    """DeiT's Mixup/CutMix with the sandwich rule and distillation: a run trains, and mixing changes the weights."""
    one_epoch = dict(epochs=1, largest_only_epochs=0)
    plain = train_supernet(tiny_config(tmp_path / "plain", fmnist_dir, **one_epoch), tiny_supernet())
    mixed = train_supernet(
        tiny_config(tmp_path / "mixed", fmnist_dir, **one_epoch, mixup=0.8, cutmix=1.0),
        tiny_supernet(),
    )
    assert all(torch.isfinite(p).all() for p in mixed.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), mixed.parameters()))
    with pytest.raises(ValueError, match="even"):
        train_supernet(tiny_config(tmp_path / "odd", fmnist_dir, batch_size=15, mixup=0.8), tiny_supernet())
    with pytest.raises(ValueError, match="ImageFolder"):
        train_supernet(tiny_config(tmp_path / "aa", fmnist_dir, auto_augment="rand-m9-mstd0.5-inc1"), tiny_supernet())


def test_fashion_mnist_subset_batches_are_one_gather_equal_to_the_items(fmnist_dir, monkeypatch):
    data = FashionMNIST(fmnist_dir, split="test")
    reads = []
    read_item = FashionMNIST.__getitem__
    monkeypatch.setattr(FashionMNIST, "__getitem__", lambda self, i: reads.append(i) or read_item(self, i))
    batches = subset_batches(data, 20, 8, torch.device("cpu"))
    assert reads == []  # gathered from the tensors in memory, not item by item
    images, labels = (torch.cat(parts) for parts in zip(*batches))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    expected = [read_item(data, i) for i in vit.data.stratified_subset(data, 20).indices]
    assert torch.equal(images, torch.stack([x for x, _ in expected])) and labels.tolist() == [y for _, y in expected]


def test_training_leaves_the_global_numpy_generator_as_it_was(tmp_path, fmnist_dir):
    np.random.seed(1234)
    expected = np.random.random(3)
    np.random.seed(1234)
    cfg = tiny_config(tmp_path, fmnist_dir, epochs=1, steps_per_epoch=1, num_random=0, mixup=0.8)
    train_supernet(cfg, tiny_supernet())
    assert np.array_equal(np.random.random(3), expected)

"""Any ImageFolder at any shape: presets built at other `num_classes`/`img_size`/`in_chans`, the data config that
follows the model, selectors that record the supernet they were trained on, and the scripts end to end."""

import json
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from conftest import run_script, write_image_folder
from PIL import Image

import agents
import vit
from agents.adaptive import AdaptiveViT

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int = 300) -> str:
    """The stdout of `scripts/<script>` run as a user would."""
    return run_script(script, *args, timeout=timeout).stdout


def grey_folder(root: Path, levels: tuple[int, ...], size: int) -> Path:
    """An ImageFolder of solid grey RGB JPEGs, one class per grey level (`val/` only)."""
    for k, level in enumerate(levels):
        (root / "val" / f"class{k}").mkdir(parents=True)
        Image.fromarray(np.full((size, size, 3), level, dtype=np.uint8)).save(root / "val" / f"class{k}" / "0.jpg")
    return root


@pytest.mark.parametrize("in_chans, img_size", [(1, 32), (3, 48), (1, 224)])
def test_imagefolder_images_follow_the_model(tmp_path, in_chans, img_size):
    """Channels, size and normalisation of the images are the model's, whatever the files hold."""
    levels = (40, 200)
    root = grey_folder(tmp_path, levels, size=70)
    model = vit.create_supernet("prance_fmnist", num_classes=2, img_size=img_size, in_chans=in_chans)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (in_chans, img_size, img_size)
    assert cfg["mean"] == (0.2860,) * in_chans and cfg["std"] == (0.3530,) * in_chans  # the preset's statistics
    data = vit.load_dataset("imagefolder", split="val", root=root, model=model)
    for (image, _), level in zip((data[0], data[1]), levels):
        assert image.shape == (in_chans, img_size, img_size)
        expected = torch.full_like(image, (level / 255 - 0.2860) / 0.3530)
        torch.testing.assert_close(image, expected, atol=0.03, rtol=0)
    with torch.no_grad():
        assert model(torch.stack([data[0][0], data[1][0]])).shape == (2, 2)


def test_deit_statistics_are_averaged_for_a_grey_model(tmp_path):
    root = grey_folder(tmp_path, (128,), size=40)
    model = vit.create_supernet("prance_deit_tiny", num_classes=1, img_size=32, in_chans=1)
    mean, std = np.mean((0.485, 0.456, 0.406)), np.mean((0.229, 0.224, 0.225))
    np.testing.assert_allclose(model.pretrained_cfg["mean"], (mean,))
    image, _ = vit.load_dataset("imagefolder", split="val", root=root, model=model)[0]
    assert image.shape == (1, 32, 32)
    torch.testing.assert_close(image, torch.full_like(image, (128 / 255 - mean) / std), atol=0.03, rtol=0)


@vit.register_supernet
def prance_test_shapes(pretrained: bool = False, **kwargs) -> vit.ElasticViT:
    """A two-block prance_fmnist, registered by the tests as a user registers a preset of their own."""
    args = dict(depth=2, embed_dim=16, num_heads=2, head_choices=(1, 2), mlp_hidden_choices=(32, 64))
    return vit.create_supernet("prance_fmnist", **{**args, **kwargs})


def test_selector_of_a_registered_supernet_at_other_shapes_loads_from_its_files_alone(tmp_path):
    """The settings record the registered preset's name, its shape arguments and the weights file, so
    `load_adaptive(path)` rebuilds that supernet and decides as the trained selector does."""
    root = write_image_folder(tmp_path / "data", classes=3, per_class={"train": 4, "val": 2}, size=24)
    shape = dict(num_classes=3, img_size=16, in_chans=3)
    torch.manual_seed(0)
    weights = vit.save_checkpoint(vit.create_supernet("prance_test_shapes", **shape), tmp_path / "w.safetensors")
    cfg = agents.SelectorConfig(
        supernet="prance_test_shapes",
        checkpoint=str(weights),
        **shape,
        data="imagefolder",
        data_dir=str(root),
        eval_split="val",
        num_envs=4,
        n_steps=2,
        minibatch_size=8,
        n_epochs=1,
        hidden=16,
        total_steps=8,
        eval_prices=(0.01,),
        images=4,
        out=str(tmp_path / "run"),
        device="cpu",
    )
    model, _ = agents.train_selector(cfg)
    settings = json.loads((tmp_path / "run" / "selector.json").read_text())
    assert settings["signature"]["supernet"] == "prance_test_shapes"
    assert {k: settings["signature"][k] for k in shape} == shape
    assert settings["env"]["checkpoint"] == str(weights.resolve())

    adaptive = agents.load_adaptive(tmp_path / "run" / "selector", price=0.01, device="cpu")
    expected = vit.create_supernet("prance_test_shapes", checkpoint=weights, **shape)
    torch.testing.assert_close(adaptive.supernet.state_dict(), expected.state_dict(), atol=0, rtol=0)
    data = vit.load_dataset("imagefolder", split="val", root=root, model=adaptive.supernet)
    images = torch.stack([data[i][0] for i in range(len(data))])
    logits, _ = adaptive(images)
    reference, _ = AdaptiveViT(expected, model, price=0.01)(images)
    assert logits.shape == (6, 3)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_a_selector_of_an_unnamed_supernet_asks_for_it(tmp_path):
    """A module built without `create_supernet` has no name to rebuild it from: the error says what to pass."""
    module = vit.ElasticViT(img_size=16, patch_size=4, num_classes=2, embed_dim=16, depth=2, num_heads=2)
    settings = {"algo": "ppo", "signature": agents.selector.supernet_signature(module), "env": {}}
    (tmp_path / "selector.json").write_text(json.dumps(settings))
    (tmp_path / "selector.zip").write_bytes(b"")
    with pytest.raises(ValueError, match="no supernet name.*pass supernet="):
        agents.load_adaptive(tmp_path / "selector", device="cpu")


# name, classes, channels, pixels, the preset (with its patch size: 4 px for prance_fmnist, 16 for DeiT)
FOLDERS = [("grey32", 10, 1, 32, "prance_fmnist"), ("rgb64", 7, 3, 64, "prance_deit_tiny")]


@pytest.mark.long
@pytest.mark.parametrize("name, classes, in_chans, img_size, supernet", FOLDERS, ids=[f[0] for f in FOLDERS])
def test_an_imagefolder_goes_through_every_script(tmp_path, name, classes, in_chans, img_size, supernet):
    """train_supernet → train_selector → evaluate → visualize with the documented flags; the selector then loads
    back from its files alone and runs on the folder's images."""
    root = write_image_folder(tmp_path / name, classes, per_class={"train": 2, "val": 1}, size=img_size + 8)
    shape = ["--num-classes", str(classes), "--img-size", str(img_size), "--in-chans", str(in_chans)]
    data = ["--data", "imagefolder", "--data-dir", str(root)]
    common = [*data, "--device", "cpu"]
    run("train_supernet.py", "--supernet", supernet, *shape, *common, "--epochs", "1", "--steps-per-epoch", "2",
        "--batch-size", "8", "--eval-batches", "1", "--out", str(tmp_path / "supernet"))  # fmt: skip
    weights = tmp_path / "supernet" / "supernet.safetensors"
    run("train_selector.py", "--supernet", supernet, "--checkpoint", str(weights), *shape, *common,
        "--eval-split", "val", "--num-envs", "8", "--n-steps", "11", "--minibatch-size", "44", "--images", "8",
        "--total-steps", "88", "--out", str(tmp_path / "selector"))  # fmt: skip
    selector = tmp_path / "selector" / "selector"
    run("evaluate.py", "--selector", str(selector), "--budgets", "0.5", "--images", "8", "--calib-images", "8",
        "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "evaluate"))  # fmt: skip
    shown = run("visualize.py", "--selector", str(selector), "--images", "2", "--device", "cpu",
                "--out", str(tmp_path / "visualize"))  # fmt: skip

    adaptive = agents.load_adaptive(selector, device="cpu")
    model = adaptive.supernet
    assert model.pretrained_cfg["architecture"] == supernet
    assert (model.num_classes, model.pretrained_cfg["input_size"]) == (classes, (in_chans, img_size, img_size))
    expected = vit.create_supernet(
        supernet, checkpoint=weights, num_classes=classes, img_size=img_size, in_chans=in_chans
    )
    torch.testing.assert_close(model.state_dict(), expected.state_dict(), atol=0, rtol=0)
    val = vit.load_dataset("imagefolder", split="val", root=root, model=model)
    images = torch.stack([val[i][0] for i in range(len(val))])
    logits, macs = adaptive(images)
    assert logits.shape == (len(val), classes) and torch.all((0 < macs) & (macs <= adaptive.full_macs))

    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    full = next(row for row in results["table"] if row["method"] == "full model")
    assert full["gmacs"] == pytest.approx(vit.count_macs(model) / 1e9)  # the evaluated supernet is this shape
    assert 0.0 <= full["top1"] <= 1.0
    assert sum(line.startswith("image ") for line in shown.splitlines()) == 2
    assert (tmp_path / "visualize" / "tokens.png").stat().st_size > 0


@pytest.mark.long
def test_a_newcomer_s_imagefolder_needs_no_shape_flag(tmp_path):
    """A 5-class RGB 64-px ImageFolder: the head follows the folder, the selector and the env follow the supernet
    file, and a preset for grey images is refused with the flags to pass."""
    root = write_image_folder(tmp_path / "shapes", 5, per_class={"train": 2, "val": 1}, size=64)
    data = ["--data", "imagefolder", "--data-dir", str(root), "--device", "cpu"]
    run("train_supernet.py", "--supernet", "prance_deit_tiny", *data, "--epochs", "1", "--steps-per-epoch", "1",
        "--batch-size", "4", "--eval-batches", "1", "--out", str(tmp_path / "supernet"))  # fmt: skip
    weights = tmp_path / "supernet" / "supernet.safetensors"
    assert vit.checkpoint.recorded_model(weights) == {
        "architecture": "prance_deit_tiny", "num_classes": 5, "img_size": 224, "in_chans": 3
    }  # fmt: skip
    run("train_selector.py", "--checkpoint", str(weights), *data, "--eval-split", "val", "--num-envs", "4",
        "--n-steps", "11", "--minibatch-size", "22", "--images", "4", "--total-steps", "44",
        "--out", str(tmp_path / "selector"))  # fmt: skip
    selector = tmp_path / "selector" / "selector"
    settings = json.loads(selector.with_suffix(".json").read_text())
    assert settings["signature"]["supernet"] == "prance_deit_tiny" and settings["signature"]["num_classes"] == 5
    ratios = settings["calibration"]["ratios"]
    budget = f"{(min(ratios) + max(ratios)) / 2:.3f}"  # a budget inside what this barely trained selector reaches
    run("evaluate.py", "--selector", str(selector), "--budgets", budget, "--images", "5", "--calib-images", "5",
        "--batch-size", "5", "--device", "cpu", "--out", str(tmp_path / "evaluate"))  # fmt: skip
    run("visualize.py", "--selector", str(selector), "--budget", budget, "--images", "2", "--device", "cpu",
        "--out", str(tmp_path / "visualize"))  # fmt: skip
    assert (tmp_path / "visualize" / "tokens.png").is_file()
    table = (tmp_path / "evaluate" / "results.md").read_text()
    assert "Top-5" not in table and "| Top-1 (%) | GMACs |" in table  # 5 classes: no Top-5 column
    adaptive = agents.load_adaptive(selector, device="cpu", budget=float(budget))
    assert adaptive.supernet.num_classes == 5

    env = gymnasium.make("PranceViT-v1", checkpoint=str(weights), data="imagefolder", data_dir=str(root), device="cpu")
    obs, _ = env.reset(seed=0)
    assert env.unwrapped.model.num_classes == 5 and obs["cls"].shape == (192,)

    refused = run_script(
        "train_supernet.py", *data, "--epochs", "1", "--out", str(tmp_path / "grey"), check=False, timeout=120
    )
    assert refused.returncode != 0 and not (tmp_path / "grey").exists()
    for flag in ("--in-chans 3", "--num-classes 5", "--supernet"):
        assert flag in refused.stderr

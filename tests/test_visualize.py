"""scripts/visualize.py: source tracing through the supernet's blocks, and the figure drawn for a trained selector
and for a baseline, on a randomly initialised prance_fmnist and a generated Fashion-MNIST folder."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import images, tiny_supernet
from PIL import Image

import agents
import vit
from vit.token_ops import token_schedule

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("visualize", ROOT / "scripts" / "visualize.py")
visualize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(visualize)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random weights of the prance_fmnist preset, standing in for a trained checkpoint."""
    torch.manual_seed(0)
    return vit.save_checkpoint(vit.create_supernet("prance_fmnist"), tmp_path_factory.mktemp("w") / "w.safetensors")


@pytest.fixture(scope="module")
def selector(fmnist_dir, weights, tmp_path_factory) -> Path:
    """A PPO selector trained for 44 steps on `weights`: the path of its files without suffix."""
    out = tmp_path_factory.mktemp("selector")
    cfg = agents.SelectorConfig(
        checkpoint=str(weights),
        data_path=str(fmnist_dir),
        num_envs=4,
        n_steps=11,
        batch_size=44,
        n_epochs=1,
        hidden=16,
        total_steps=44,
        eval_prices=(0.01,),
        eval_images=4,
        out=str(out),
        device="cpu",
    )
    agents.train_selector(cfg)
    return out / "selector"


def check_png(path: Path) -> None:
    """A readable PNG of a figure, not a blank canvas."""
    assert path.is_file()
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    assert width >= 600 and height >= 300
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_traced_sources_follow_the_tokens_block_by_block(token_mode, seed):
    """Tracing changes nothing in the forward pass. After every block each patch is held by exactly one token
    unless pruned (in merge mode, none is), a pruned patch stays pruned, every token holds a patch (exactly one
    in prune mode), and merged sizes are the number of patches a token holds."""
    model = tiny_supernet(token_mode, depth=4, keep_ratio_choices=(0.5, 0.7, 1.0)).eval()
    subnet = model.search_space.sample(seed)
    x = images(model, 1, seed)
    sources = visualize.trace_sources(model, x[0], subnet)
    tokens, size, alive = model.embed(x), None, torch.ones(model.num_patches, dtype=torch.bool)
    with torch.no_grad():
        for i, (config, source) in enumerate(zip(subnet, sources)):
            final = token_schedule(tokens.shape[1] - 1, config, token_mode)[1]
            tokens, size = model.forward_block(i, tokens, size, config)
            assert source.shape == (final, model.num_patches) and tokens.shape[1] == 1 + final
            held = source.sum(0)  # tokens holding each patch
            assert set(held.unique().tolist()) <= {0.0, 1.0}
            assert not torch.any(held.bool() & ~alive)
            alive = held.bool()
            assert np.array_equal(visualize.patch_owner(source) >= 0, alive.numpy())
            rows = source.sum(1)  # patches held by each token
            assert torch.all(rows == 1) if token_mode == "prune" else torch.all(rows >= 1)
            if token_mode == "merge":
                assert torch.all(alive)
            if size is not None:
                torch.testing.assert_close(size[0, 1:], rows, atol=0, rtol=0)
        torch.testing.assert_close(model.forward_head(model.norm(tokens)), model(x, subnet), atol=0, rtol=0)


def test_merged_tokens_keep_their_colour_as_they_grow():
    owners = [np.array([0, 0, 1, 2, 3, 3]), np.array([0, 0, 1, 0, 2, 2]), np.array([0, 0, 0, 0, 0, 0])]
    colours = visualize.merged_colours(owners)
    assert colours[0] == {0: 0, 3: 1}  # singletons have none
    assert colours[1] == {0: 0, 2: 1}
    assert colours[2] == {0: 0}  # the largest token it absorbed


def test_visualize_a_trained_selector(selector, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "vis.png"
    argv = ["--selector", str(selector), "--images", "3", "--data-path", str(fmnist_dir), "--device", "cpu"]
    assert visualize.main([*argv, "--out", str(out)]) == out
    assert f"wrote {out}" in capsys.readouterr().out
    check_png(out)


def test_visualize_a_baseline_without_a_selector(weights, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "deep" / "uniform.png"
    visualize.main(
        [
            "--selector",
            str(tmp_path / "none"),
            "--policy",
            "uniform",
            "--checkpoint",
            str(weights),
            "--token-mode",
            "prune_merge",
            "--images",
            "2",
            "--every",
            "3",
            "--data-path",
            str(fmnist_dir),
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert printed.count("image ") == 2 and f"wrote {out}" in printed
    check_png(out)


def test_a_missing_selector_says_how_to_get_one(tmp_path):
    with pytest.raises(SystemExit, match=r"train_selector\.py.*--policy full\|random\|uniform"):
        visualize.main(["--selector", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()

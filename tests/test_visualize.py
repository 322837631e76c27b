"""Pictures (`agents.plots`, `scripts/visualize.py`): source tracing through the supernet's blocks, the token maps
drawn for a trained selector and for a baseline, the decisions over a dataset, and the Pareto plot, on randomly
initialised supernets and a generated Fashion-MNIST folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import images, tiny_supernet
from PIL import Image

import agents
import vit
from agents.plots import decision_stats, pareto_figure, pareto_front
from agents.visualize import VisualizeConfig
from prance_env.render import merged_colours, patch_owner, trace_sources
from vit.cli import parse_dataclass
from vit.token_ops import token_schedule


def visualize(argv: list[str]) -> Path:
    """`scripts/visualize.py`'s work for its command-line flags `argv`: the PNG it draws."""
    return agents.visualize.visualize(parse_dataclass(VisualizeConfig, argv))


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
        data_dir=str(fmnist_dir),
        num_envs=4,
        n_steps=11,
        minibatch_size=44,
        n_epochs=1,
        hidden=16,
        total_steps=44,
        eval_prices=(0.01,),
        images=4,
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
    sources = trace_sources(model, x[0], subnet)
    tokens, alive = vit.PackedBatch(model.embed(x)), torch.ones(model.num_patches, dtype=torch.bool)
    with torch.no_grad():
        for i, (config, source) in enumerate(zip(subnet, sources)):
            final = token_schedule(tokens.lengths[0] - 1, config, token_mode)[1]
            tokens = model.run_block(i, tokens, config)
            size = tokens.size
            assert source.shape == (final, model.num_patches) and tokens.lengths[0] == 1 + final
            held = source.sum(0)  # tokens holding each patch
            assert set(held.unique().tolist()) <= {0.0, 1.0}
            assert not torch.any(held.bool() & ~alive)
            alive = held.bool()
            assert np.array_equal(patch_owner(source) >= 0, alive.numpy())
            rows = source.sum(1)  # patches held by each token
            assert torch.all(rows == 1) if token_mode == "prune" else torch.all(rows >= 1)
            if token_mode == "merge":
                assert torch.all(alive)
            if size is not None:
                torch.testing.assert_close(size[1:], rows, atol=0, rtol=0)
        torch.testing.assert_close(model.forward_tokens(tokens, model.depth), model(x, subnet), atol=0, rtol=0)


def test_merged_tokens_keep_their_colour_as_they_grow():
    owners = [np.array([0, 0, 1, 2, 3, 3]), np.array([0, 0, 1, 0, 2, 2]), np.array([0, 0, 0, 0, 0, 0])]
    colours = merged_colours(owners)
    assert colours[0] == {0: 0, 3: 1}  # singletons have none
    assert colours[1] == {0: 0, 2: 1}
    assert colours[2] == {0: 0}  # the largest token it absorbed


def test_visualize_a_trained_selector(selector, fmnist_dir, tmp_path, capsys):
    argv = ["--selector", str(selector), "--images", "3", "--data-dir", str(fmnist_dir), "--device", "cpu"]
    out = tmp_path / "tokens.png"
    assert visualize([*argv, "--out", str(tmp_path)]) == out
    assert f"wrote {out}" in capsys.readouterr().out
    check_png(out)


def test_visualize_a_baseline_without_a_selector(weights, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "deep" / "tokens.png"
    visualize(
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
            "--data-dir",
            str(fmnist_dir),
            "--device",
            "cpu",
            "--out",
            str(out.parent),
        ]
    )
    printed = capsys.readouterr().out
    assert printed.count("image ") == 2 and f"wrote {out}" in printed
    check_png(out)


def test_a_missing_selector_says_how_to_get_one(tmp_path):
    with pytest.raises(SystemExit, match=r"train_selector\.py.*--policy full\|random\|uniform"):
        visualize(["--selector", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_visualize_stats_counts_the_decisions_over_the_split(weights, fmnist_dir, tmp_path):
    argv = ["--policy", "uniform", "--keep-index", "1", "--checkpoint", str(weights), "--stats"]
    argv += ["--batch-size", "20", "--data-dir", str(fmnist_dir), "--device", "cpu", "--out", str(tmp_path)]
    assert visualize(argv) == tmp_path / "decisions.png"
    stats = json.loads((tmp_path / "decisions.json").read_text())
    assert stats["images"] == 48 and sum(stats["images_per_class"]) == 48  # the whole generated test split
    assert stats["blocks"] == list(range(1, 12))  # prance_fmnist decides every block after the stem
    for row in stats["shares"]["keep_ratio"]:  # uniform merging: keep-ratio choice 1, full widths, at every block
        assert row == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0])
    assert all(row[-1] == pytest.approx(1.0) for f in ("heads", "mlp_hidden") for row in stats["shares"][f])
    assert "48 fashion-mnist held-out images" in stats["title"]
    check_png(tmp_path / "decisions.png")


def test_decision_stats_of_random_decisions_match_the_forward():
    model = tiny_supernet(depth=4, keep_ratio_choices=(0.5, 0.7, 1.0)).eval()
    nvec = model.search_space.num_choices(model.depth - 1)
    adaptive = agents.AdaptiveViT(model, agents.RandomPolicy(nvec, seed=0), price=0.01)
    x, y = images(model, 12, seed=1), torch.arange(12) % 3
    stats = decision_stats(adaptive, [(x[:5], y[:5]), (x[5:], y[5:])])
    assert stats["images"] == 12 and stats["classes"] == [0, 1, 2] and stats["images_per_class"] == [4, 4, 4]
    for f in ("heads", "mlp_hidden", "keep_ratio"):
        shares = np.asarray(stats["shares"][f])
        assert shares.shape == (3, len(stats["choices"][f][0])) and np.allclose(shares.sum(1), 1)
        assert (shares < 1).any()  # random decisions: more than one choice taken somewhere
    # the same decisions again (a fresh generator of the same seed), image by image
    adaptive.policy = agents.RandomPolicy(nvec, seed=0)
    _, macs5, first = adaptive(x[:5], return_decisions=True)
    _, macs7, then = adaptive(x[5:], return_decisions=True)
    configs = first.subnets + then.subnets
    ratios = torch.cat([macs5, macs7]).double() / adaptive.full_macs
    for k in range(3):
        assert stats["macs_ratio_per_class"][k] == pytest.approx(float(ratios[y == k].mean()))
    heads = model.search_space.heads[1]
    expected = [sum(c[1].heads == h for c in configs) / 12 for h in heads]
    assert stats["shares"]["heads"][0] == pytest.approx(expected)


def row(top1: float, gmacs: float, speed: float, **extra) -> dict:
    return {"top1": top1, "gmacs": gmacs, "images_per_s": speed, **extra}


def test_pareto_front_keeps_the_rows_nothing_beats():
    rows = [row(0.9, 3.0, 100), row(0.8, 2.0, 300), row(0.85, 2.5, 50), row(0.7, 2.2, 400), row(0.6, 1.0, 350)]
    assert [r["gmacs"] for r in pareto_front(rows, "gmacs")] == [1.0, 2.0, 2.5, 3.0]
    assert [r["images_per_s"] for r in pareto_front(rows, "images_per_s", higher_x_is_better=True)] == [100, 300, 400]


def test_pareto_figure_shows_the_whole_grid_its_front_and_one_label_per_point():
    grid = [row(0.2 + 0.03 * k, 0.1 * (k + 1), 1000 / (k + 1)) for k in range(20)]  # far below the selector
    selector = [
        row(0.88, 1.0, 500, budget=0.3),
        row(0.88, 1.0, 500, budget=0.5),  # the same point as budget 0.3: one shared label
        row(0.9, 1.5, 400, budget=0.7),
    ]
    others = [row(0.91, 2.0, 90, method="full model"), row(0.3, 1.2, 450, method="random decisions")]
    fig = pareto_figure(grid, grid[5:], selector, others, "fashion-mnist, 40 images: prance_fmnist")
    assert fig.get_suptitle() == "fashion-mnist, 40 images: prance_fmnist"
    for ax, x in zip(fig.axes, ("gmacs", "images_per_s")):
        low, high = ax.get_ylim()
        assert low < min(r["top1"] * 100 for r in grid) and high > 91
        front = pareto_front(grid, x, x == "images_per_s")
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["grid Pareto front"].get_xdata()) == [r[x] for r in front]
        assert sorted(t.get_text() for t in ax.texts) == ["budget 0.3 = 0.5", "budget 0.7"]


def test_pareto_figure_draws_every_execution_mode_against_gmacs_and_measured_speed():
    grid = [row(0.2 + 0.03 * k, 0.1 * (k + 1), 1000 / (k + 1)) for k in range(20)]
    speeds = {"packed": (500, 400), "bucketed": (300, 250), "prototypes K=1": (900, 800)}
    selector = [
        row(0.88 + 0.01 * b, 1.0 + 0.5 * b, speeds[mode][b], budget=budget, mode=mode)
        for b, budget in enumerate((0.3, 0.7))
        for mode in speeds
    ]
    others = [row(0.91, 2.0, 90, method="full model")]
    fig = pareto_figure(grid, grid[5:], selector, others, "modes")
    left, right = fig.axes
    assert right.get_xlabel().startswith("images/s")
    for ax, x in ((left, "gmacs"), (right, "images_per_s")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for mode in speeds:
            rows = sorted((r for r in selector if r["mode"] == mode), key=lambda r: r[x])
            line = lines[f"PRANCE selector, {mode}"]
            assert list(line.get_xdata()) == [r[x] for r in rows]
            assert list(line.get_ydata()) == [r["top1"] * 100 for r in rows]
        assert sorted(t.get_text() for t in ax.texts) == ["budget 0.3", "budget 0.7"]  # the first mode's budgets
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [f"PRANCE selector, {mode}" for mode in speeds] == [t for t in legend if t.startswith("PRANCE")]


def test_token_maps_show_one_image_of_each_class(weights, fmnist_dir, tmp_path, monkeypatch):
    """The rows are a class-stratified subset of the held-out split in class order, not its first images."""
    drawn = {}
    draw = agents.visualize.token_map_figure

    def spy(model, images, subnets, titles, *args, **kwargs):
        drawn["titles"] = titles
        return draw(model, images, subnets, titles, *args, **kwargs)

    monkeypatch.setattr(agents.visualize, "token_map_figure", spy)
    argv = ["--policy", "full", "--checkpoint", str(weights), "--images", "6", "--data-dir", str(fmnist_dir)]
    visualize([*argv, "--device", "cpu", "--out", str(tmp_path)])
    classes = [title.split("\n")[0] for title in drawn["titles"]]
    assert len(classes) == 6 and len(set(classes)) == 6  # six classes, one image each


def test_budget_labels_of_close_points_do_not_overprint():
    """Three budgets within 0.05 points of Top-1: each label at least a label's height above the one below."""
    grid = [row(0.2 + 0.03 * k, 0.1 * (k + 1), 1000 / (k + 1)) for k in range(20)]
    selector = [row(0.88 + 0.0002 * k, 1.0 + 0.2 * k, 500 - 10 * k, budget=b) for k, b in enumerate((0.3, 0.5, 0.7))]
    fig = pareto_figure(grid, grid[5:], selector, [], "close budgets")
    fig.canvas.draw()
    for ax in fig.axes:
        boxes = sorted((t.get_window_extent() for t in ax.texts), key=lambda b: b.y0)
        assert len(boxes) == 3
        assert all(upper.y0 >= lower.y1 - 1 for lower, upper in zip(boxes, boxes[1:]))  # no overlap (1 px slack)

"""The official PRANCE meta-networks: their state-dict layout, their config dicts, their FLOPs, their files, and
per-image configurations (random weights only: nothing downloads)."""

import argparse
import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import flop_counter, images, official_on_random_weights

import vit
from vit import official
from vit.official import DECISION_BLOCKS, LLN_BLOCKS

SIZES = {"tiny": 13_331_432, "small": 35_280_104, "base": 102_504_424}


def official_keys(embed: int, heads: int, ratio: float, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The release's state-dict layout, written from its description: AutoFormer names, `lln` at blocks 2, 5, 8."""
    hidden = int(embed * ratio)
    keys = {
        "pos_embed": (1, 197, embed),
        "cls_token": (1, 1, embed),
        "patch_embed_super.proj.weight": (embed, 3, 16, 16),
        "patch_embed_super.proj.bias": (embed,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        keys |= {b + "attn.qkv.weight": (3 * embed, embed), b + "attn.qkv.bias": (3 * embed,)}
        keys |= {b + "attn.proj.weight": (embed, embed), b + "attn.proj.bias": (embed,)}
        for norm in ("attn_layer_norm", "ffn_layer_norm"):
            keys |= {b + f"{norm}.weight": (embed,), b + f"{norm}.bias": (embed,)}
        keys |= {b + "fc1.weight": (hidden, embed), b + "fc1.bias": (hidden,)}
        keys |= {b + "fc2.weight": (embed, hidden), b + "fc2.bias": (embed,)}
        if i in (2, 5, 8):
            keys |= {b + "lln.weight": (embed, embed), b + "lln.bias": (embed,)}
    keys |= {"norm.weight": (embed,), "norm.bias": (embed,)}
    return keys | {"head.weight": (classes, embed), "head.bias": (classes,)}


LAYOUTS = {"tiny": (256, 3, 6), "small": (448, 7, 5), "base": (768, 12, 5)}


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
@pytest.mark.parametrize("size", SIZES)
def test_state_dict_is_the_official_layout(size, token_mode):
    with torch.device("meta"):
        model = vit.create_supernet(f"prance_official_{size}", token_mode=token_mode)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official_keys(*LAYOUTS[size])
    assert len(shapes) == 158 and sum(v.numel() for v in model.state_dict().values()) == SIZES[size]


def test_presets_are_timm_models_with_their_hub_tag():
    model = timm.create_model("prance_official_tiny", token_mode="merge")
    assert isinstance(model, official.OfficialViT) and model.token_mode == "merge"
    assert model.pretrained_cfg["architecture"] == "prance_official_tiny"
    assert "prance_official_small.meta" in timm.list_models("prance_official*", pretrained=True)


@pytest.fixture(scope="module")
def tiny():
    """The T meta-network in each token mode, on random weights with non-zero biases and non-unit norms."""
    return {mode: official_on_random_weights(mode) for mode in vit.TOKEN_MODES}


def mixed_subnets(space: official.OfficialSpace, count: int) -> list[vit.Subnet]:
    """`count` configurations with different embed widths inside groups and across them, reducing tokens."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        blocks = []
        for i in range(space.depth):
            embed = int(rng.choice(space.shape.embed_choices))
            ratio = int(rng.choice(space.shape.ratios))
            keep = (float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.3, 1.0))) if i in DECISION_BLOCKS else (1, 1)
            blocks.append(space.block(embed, ratio, keep[0], keep[1] if space.token_mode == "prune_merge" else 1.0))
        out.append(vit.Subnet(tuple(blocks)))
    return out


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_per_image_configurations_give_each_image_what_it_gets_alone(tiny, token_mode):
    model = tiny[token_mode]
    subnets = mixed_subnets(model.search_space, 5)
    subnets.insert(2, subnets[0])  # two images on one configuration share its buckets
    x = images(model, len(subnets))
    with torch.no_grad():
        together = model(x, subnets)
        for b, subnet in enumerate(subnets):
            torch.testing.assert_close(together[b : b + 1], model(x[b : b + 1], subnet), atol=1e-5, rtol=0)
    assert len({s[0].embed_dim for s in subnets}) > 1 and len({s[4].embed_dim for s in subnets}) > 1


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_count_macs_is_exact_against_flop_counter(tiny, token_mode):
    model = tiny[token_mode]
    space = model.search_space
    subnets = [*mixed_subnets(space, 3), space.largest(), space.smallest()]
    x = images(model, len(subnets))
    with flop_counter() as counter, torch.no_grad():
        model(x, subnets)
    assert counter.get_total_flops() == 2 * sum(vit.count_macs(model, subnets))
    E, F, qk = 240, 1440, 192  # the largest T subnet reads these slices of the 256-wide supernet
    block = 2 * E + 3 * qk * E + 3 * qk + E * qk + E + 2 * E + F * E + F + E * F + E
    expected = E * 768 + E + E + 197 * E + 12 * block + 3 * (E * E + E) + 2 * E + 1000 * E + 1000
    assert vit.count_params(model) == expected < sum(p.numel() for p in model.parameters())


def test_get_complexity_of_a_hand_computed_case(tiny):
    """Tiny, prune: every block 176 wide at MLP ratio 2, keep 0.5 at block 3 only; their formula by hand."""
    model = tiny["prune"]
    space = model.search_space
    subnet = vit.Subnet(tuple(space.block(176, 2, 0.5 if i == 3 else 1.0) for i in range(12)))
    E, Fh, qk, widest = 176, 352, 192, 240
    total = E * (1 + 196 * 768) + 98.5 * E
    for i in range(12):
        t_b = 197 if i <= 3 else 98  # int(0.5 * 197)
        t_a = 98 if i >= 3 else 197
        out = widest if i in LLN_BLOCKS else E
        total += (
            t_b * E + t_b * E * 3 * qk + 2 * t_b * t_b * qk + t_b * qk * E + t_a * E + t_a * E * Fh + t_a * Fh * out
        )
    total += 98 * E * 1000  # the head, once per token of the last block
    assert official.get_complexity(model, subnet) == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_official_config_dicts_round_trip(tiny, token_mode):
    model = tiny[token_mode]
    subnets = mixed_subnets(model.search_space, 4)
    config = official.config_from_subnets(model, subnets)
    assert config["embed_dim"].shape == config["mlp_ratio"].shape == config["prune_granularity"].shape == (4, 12)
    assert official.subnets_from_config(model, config) == subnets
    config["embed_dim"][1, 7] = 200
    with pytest.raises(vit.InvalidSubnetError, match="block 7: embed_dim=200"):
        official.subnets_from_config(model, config)
    with pytest.raises(ValueError, match="samples x 12 blocks"):
        official.subnets_from_config(model, {**config, "mlp_ratio": config["mlp_ratio"][:, :6]})


def test_small_runs_mlp_ratio_3_5_as_3_as_the_integer_config_arrays_do():
    with torch.device("meta"):
        model = official.create_official("small")
    assert model.shape.ratios == (2, 3, 5)
    config = official.config_from_subnets(model, [model.search_space.uniform(384, 3)])
    config["mlp_ratio"] = config["mlp_ratio"].astype(float) + 0.5  # a 3.5 read from their float choices
    assert official.subnets_from_config(model, config)[0][0].mlp_hidden == 384 * 3


def test_bad_configurations_say_what_does_not_fit(tiny):
    model = tiny["prune"]
    space = model.search_space
    full = space.largest()
    cases = {
        "embed_dim=100": space.block(100, 2),
        "runs 3 heads": vit.BlockConfig(4, 480, 1.0, 1.0, 240),
        "mlp_hidden=500": vit.BlockConfig(3, 500, 1.0, 1.0, 240),
        "at blocks": space.block(240, 2, 0.5),  # block 0 reduces no tokens
    }
    for message, config in cases.items():
        with pytest.raises(vit.InvalidSubnetError, match=message):
            model(images(model, 1), vit.Subnet((config,) + full.blocks[1:]))
    with pytest.raises(ValueError, match="3 subnets for a batch of 2"):
        model(images(model, 2), [full] * 3)
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((1, 3, 224, 224), float("nan")))
    with pytest.raises(vit.InvalidSubnetError, match="one embed width"):
        vit.SearchSpace.uniform(2, (1,), (4,)).validate(vit.Subnet((vit.BlockConfig(1, 4, embed_dim=8),) * 2))


def test_block_configs_print_and_parse_their_embed_width():
    config = vit.BlockConfig(3, 480, 0.7, 1.0, 240)
    assert str(config) == "e240-h3-m480-r0.7"
    assert vit.config._parse_block(0, str(config)) == config


class Script:
    """An object of a training script's class, pickled beside the weights: loading must not run it."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('ran')",))


def test_checkpoint_pth_loads_under_model_or_bare_and_says_what_does_not_fit(tiny, tmp_path):
    model = tiny["prune"]
    state = model.state_dict()
    wrapped = {"model": state, "args": argparse.Namespace(lr=1e-3), "script": Script(), "epoch": 299}
    torch.save(wrapped, tmp_path / "checkpoint.pth")
    torch.save(state, tmp_path / "bare.pth")
    for name in ("checkpoint.pth", "bare.pth"):
        loaded = vit.create_supernet("prance_official_tiny", checkpoint=tmp_path / name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="does not fit this OfficialViT: 157 shape mismatches"):
        vit.create_supernet("prance_official_small", checkpoint=tmp_path / "checkpoint.pth")
    torch.save({"model": vit.create_supernet("prance_fmnist").state_dict()}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="missing keys"):
        vit.create_supernet("prance_official_tiny", checkpoint=tmp_path / "foreign.pth")
    (tmp_path / "broken.pth").write_bytes(pickle.dumps({"model": 1})[:5])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        vit.create_supernet("prance_official_tiny", checkpoint=tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError):
        vit.create_supernet("prance_official_tiny", checkpoint=tmp_path / "absent.pth")


def test_the_model_moves_to_a_device_without_allocating():
    with torch.device("meta"):
        model = official.create_official("base", token_mode="merge")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_selector_decodes_actions_as_the_release_rounds_them(tiny):
    from agents.official import OfficialSelector

    selector = OfficialSelector(tiny["prune"])
    # MLP ratios 2/4/6 (3 choices): 0.25 and 0.75 fall on halves, which round to even; embed widths 176-240 (4)
    actions = np.array(
        [
            [0.0, 0.25, 0.75, 0.0, 0.5, 1.0, 0.3],  # indices (0, 0, 2), (0, 2, 3)
            [1.0, 1.5, -0.5, 1 / 3, 0.49, 0.51, 1.0],  # clipped to [0, 1]: (2, 2, 0); 1/3 * 3 = 1, 1.47 -> 1, 1.53 -> 2
        ]
    )
    first, second = selector.configs(actions, 3)
    assert [(c.embed_dim, c.mlp_hidden // c.embed_dim) for c in first] == [(176, 2), (216, 2), (240, 6)]
    assert [(c.embed_dim, c.mlp_hidden // c.embed_dim) for c in second] == [(192, 6), (192, 6), (216, 2)]
    assert [c.keep_ratio for c in first] == [0.3, 1.0, 1.0] and second[0].keep_ratio == 1.0  # raw, at block 3 only
    with pytest.raises(ValueError, match="decide at blocks"):
        selector.configs(actions, 4)
    with pytest.raises(ValueError, match=r"expected official actions \(B, 7\)"):
        selector.configs(actions[:, :6], 3)
    merge_then = OfficialSelector(tiny["prune_merge"])
    (config, *_), *_ = merge_then.configs(np.array([[0.5] * 6 + [0.4, 0.9]]), 6)
    assert (config.keep_ratio, config.merge_ratio) == (0.4, 0.9)


def test_selector_batch_mean_averages_and_snaps_as_the_release_does():
    from agents.official import OfficialSelector

    with torch.device("meta"):
        model = official.create_official("small", token_mode="prune")
    selector = OfficialSelector(model)
    # embed indices 0 and 1 (320, 352): mean 336 is as near to both, the first wins; MLP 2 and 5: mean 3.5 -> 4 -> 3.5
    actions = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6], [1.0, 1.0, 1.0, 0.2, 0.2, 0.2, 0.7]])
    group = selector.batch_mean(actions, 3)
    assert [(c.embed_dim, c.mlp_hidden) for c in group] == [(320, 960)] * 3  # 3.5 runs as 3
    assert group[0].keep_ratio == pytest.approx(0.65)


def test_the_official_pair_runs_each_image_on_its_own_decisions(tiny):
    from agents.official import OfficialSelector, run_official

    model = tiny["merge"]
    selector = OfficialSelector(model)
    with torch.no_grad():  # spread the randomly initialised actor's means (0.5 everywhere at the release's init)
        selector.actor.fc_mu.weight.mul_(15)
        selector.actor.fc_mu.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    x = images(model, 5)
    logits, subnets = run_official(model, selector, x)
    assert len(set(subnets)) > 1 and all(s[:3] == model.search_space.largest()[:3] for s in subnets)
    for b in range(5):
        alone, (subnet,) = run_official(model, selector, x[b : b + 1])
        # the actor's float32 means of one image alone may differ from the batch's in the last bit: the keep ratios
        assert [(c.embed_dim, c.mlp_hidden) for c in subnet] == [(c.embed_dim, c.mlp_hidden) for c in subnets[b]]
        np.testing.assert_allclose([c.keep_ratio for c in subnet], [c.keep_ratio for c in subnets[b]], atol=1e-6)
        torch.testing.assert_close(logits[b : b + 1], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(alone, model(x[b : b + 1], subnet), atol=1e-5, rtol=0)
    batch_logits, batch_subnets = run_official(model, selector, x, protocol="batch-mean")
    assert len(set(batch_subnets)) == 1 and batch_logits.shape == logits.shape
    with pytest.raises(ValueError, match="unknown protocol"):
        run_official(model, selector, x, protocol="mean")


def test_actor_pth_loads_and_a_foreign_one_says_what_it_is(tiny, tmp_path):
    from agents.official import OfficialSelector, PolicyNet

    model = tiny["prune"]
    actor = PolicyNet()
    torch.save(actor.state_dict(), tmp_path / "actor.pth")
    selector = OfficialSelector.load(tmp_path / "actor.pth", model)
    state = torch.randn(3, 197)
    np.testing.assert_array_equal(selector.act(state), actor(state).detach().double().numpy())
    with pytest.raises(ValueError, match="takes 8"):
        OfficialSelector.load(tmp_path / "actor.pth", tiny["prune_merge"])
    torch.save({"fc1.weight": torch.zeros(2, 2)}, tmp_path / "critic.pth")
    with pytest.raises(ValueError, match="not an official actor.pth"):
        OfficialSelector.load(tmp_path / "critic.pth", model)
    with pytest.raises(ValueError, match=r"expected states \(B, 197\)"):
        selector.act(torch.zeros(3, 196))
    with pytest.raises(ValueError, match="NaN"):
        selector.act(torch.full((1, 197), float("nan")))
    with pytest.raises(TypeError, match="official meta-network"):
        OfficialSelector(vit.create_supernet("prance_fmnist"))


@pytest.mark.parametrize("protocol", ["ours", "official"])
def test_evaluate_runs_an_official_pair_on_an_image_folder(tmp_path, protocol):
    from agents.official import PolicyNet
    from agents.report import EvaluateConfig, evaluate_selector
    from vit.data import write_image_folder

    data = write_image_folder(tmp_path / "data", 3, {"train": 1, "val": 2}, 224)
    model = vit.create_supernet("prance_official_tiny")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "checkpoint.pth")
    actor = PolicyNet()
    torch.nn.init.normal_(actor.fc_mu.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    torch.save(actor.state_dict(), tmp_path / "actor.pth")
    args = dict(actor=str(tmp_path / "actor.pth"), checkpoint=str(tmp_path / "checkpoint.pth"), device="cpu")
    args |= dict(supernet="prance_official_tiny", data_dir=str(data), batch_size=3, out=str(tmp_path / "out"))
    full, pair = evaluate_selector(EvaluateConfig(**args, protocol=protocol))
    assert pair["method"] == f"official pair, {'batch-mean' if protocol == 'official' else 'per-image'}"
    assert pair["gmacs"] < full["gmacs"] and pair["official_gflops"] < full["official_gflops"]
    assert full["official_gflops"] == pytest.approx(official.get_complexity(model, model.search_space.largest()) / 1e9)
    assert pair["params"] < full["params"] and pair["images_per_s"] > 0 and pair["top5"] >= pair["top1"]
    assert "GFLOPs (theirs)" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="ImageFolder"):
        evaluate_selector(EvaluateConfig(**{**args, "data_dir": None}))

"""The official PRANCE meta-networks: their state-dict layout, their config dicts, their FLOPs, their files, and
per-image configurations (random weights only: nothing downloads)."""

import argparse
import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import flop_counter, images

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
    models = {}
    for mode in vit.TOKEN_MODES:
        model = official.create_official("tiny", token_mode=mode).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.2 if "norm" in name else 0.05))
        models[mode] = model
    return models


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
    config = official.config_from_subnets(model, [model.search_space.static(384, 3)])
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

"""Every preset is a timm model in the ways timm users rely on (registry, pooling, features, intermediates,
TorchScript, FX), and a static subnet leaves the package as a timm ViT (`vit.extract_subnet`) that reloads from its
folder and exports to ONNX. At small shapes: DeiT presets at 32 px, random weights."""

import ast
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import flop_counter, images
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.feature_extraction import create_feature_extractor

import vit
from vit.extract import TokenReducingViT

# the package's presets (other test files register presets of their own)
PRESETS = ["prance_deit_base", "prance_deit_small", "prance_deit_tiny", "prance_fmnist", "prance_fmnist_stage1"]
WEIGHTS = set(PRESETS)


def small(name: str, **kwargs) -> vit.ElasticViT:
    """The preset through timm, DeiT shapes at 32 px (4 patches), seeded random weights."""
    torch.manual_seed(0)
    shape = {"img_size": 32} if "deit" in name else {}
    return timm.create_model(name, **shape, **kwargs)


def non_reducing(model: vit.ElasticViT, seed: int = 0) -> vit.Subnet:
    """A random subnet of `model` that keeps every token (random heads and MLP widths)."""
    rng = np.random.default_rng(seed)
    space = model.search_space
    blocks = [
        vit.BlockConfig(int(rng.choice(space.heads[i])), int(rng.choice(space.mlp_hidden[i])))
        for i in range(space.depth)
    ]
    return space.validate(vit.Subnet(tuple(blocks)))


def reduces(model: vit.ElasticViT, subnet: vit.Subnet) -> bool:
    return vit.extract.subnet_args(model, subnet).get("tokens") is not None


@pytest.mark.parametrize("name", PRESETS)
def test_forward_and_backward_reach_every_parameter(name):
    model = small(name)
    x = images(model, 2)
    out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


@pytest.mark.parametrize("name", PRESETS)
def test_pretrained_config_is_registered_with_timm(name):
    """timm's registry answers for the preset as for its own models; the config names the model's modules."""
    cfg = timm.get_pretrained_cfg(name)
    model = small(name).eval()
    full = timm.create_model(name, device="meta")
    assert cfg is not None and cfg.input_size == full.pretrained_cfg["input_size"]
    assert timm.get_pretrained_cfg_value(name, "input_size") == cfg.input_size
    assert timm.get_pretrained_cfg_value(name, "num_classes") == full.num_classes
    state = model.state_dict()
    assert f"{cfg.first_conv}.weight" in state and f"{cfg.classifier}.weight" in state
    assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
    x = images(model, 2)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + model.num_patches, model.num_features)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size) and model.head_hidden_size == model.num_features
    model.reset_classifier(0, "")
    torch.testing.assert_close(model(x), tokens, rtol=0, atol=0)


def test_list_models_pretrained_lists_the_presets_with_weights():
    assert set(PRESETS) <= set(vit.list_supernets())
    listed = set(timm.list_models("prance*", pretrained=True))
    official = {f"prance_official_{size}.meta" for size in ("tiny", "small", "base")}  # the release's, on its hub
    assert (
        listed
        == {f"{n}.fb_in1k" for n in WEIGHTS if "deit" in n}
        | {f"{n}.shipped" for n in WEIGHTS if "fmnist" in n}
        | official
    )
    assert "prance_subnet" in timm.list_models("prance*") and not any(n.startswith("prance_subnet") for n in listed)
    assert timm.get_pretrained_cfg("prance_fmnist").file.endswith("prance_fmnist.safetensors")


def test_global_pool_takes_timm_choices_and_refuses_others():
    x = images(small("prance_fmnist"), 3)
    token, avg, every = (small("prance_fmnist", global_pool=p, num_classes=0).eval() for p in ("token", "avg", ""))
    features = token.forward_features(x)
    torch.testing.assert_close(token(x), features[:, 0])
    assert every(x).shape == features.shape
    # timm's rule: average pooling normalises the pooled features (fc_norm), not the tokens
    assert isinstance(avg.norm, torch.nn.Identity) and isinstance(avg.fc_norm, torch.nn.LayerNorm)
    torch.testing.assert_close(avg(x), avg.fc_norm(avg.forward_features(x)[:, 1:].mean(1)))
    with pytest.raises(ValueError, match=r"unknown global_pool 'max'; expected one of 'token', 'avg', ''"):
        timm.create_model("prance_fmnist", global_pool="max")


@pytest.mark.parametrize("fc_norm", [None, False])
def test_average_pooling_per_sample_equals_each_subnet_alone(fc_norm):
    """Per-sample subnets pool by the size-weighted mean of their own tokens, normalised as the dense path does."""
    model = small("prance_fmnist", global_pool="avg", fc_norm=fc_norm).eval()
    x = images(model, 4)
    subnets = [model.search_space.sample(s) for s in range(4)]
    with torch.no_grad():
        together = model(x, subnets)
        alone = torch.cat([model(x[i : i + 1], s) for i, s in enumerate(subnets)])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, [model.search_space.largest()] * 4), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_features_only_gives_timm_feature_maps(name):
    features = small(name, features_only=True, out_indices=(1, -1)).eval()
    model = small(name).eval()
    x = images(model, 2)
    maps = features(x)
    side = model.patch_embed.img_size // model.patch_embed.patch_size
    assert [m.shape for m in maps] == [(2, model.embed_dim, side, side)] * 2
    assert features.feature_info.channels() == [model.embed_dim] * 2
    assert features.feature_info.reduction() == [model.patch_embed.patch_size] * 2
    expected = model.forward_intermediates(x, indices=[1, -1], intermediates_only=True)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)
    assert len(small(name, features_only=True)(x)) == 3  # timm's default: the last three blocks


@pytest.mark.parametrize("name", PRESETS)
def test_forward_intermediates_as_timm_vit(name):
    model = small(name).eval()
    x = images(model, 2)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=2, output_fmt="NLC", norm=True)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(maps[-1], final[:, 1:])  # the last block's tokens, normalised
        pairs = model.forward_intermediates(x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
        assert pairs[0][0].dim() == 4 and pairs[0][1].shape == (2, 1, model.embed_dim)
        subnet = non_reducing(model)
        final, maps = model.forward_intermediates(x, subnet=subnet, norm=True, output_fmt="NLC")
        torch.testing.assert_close(final, model.forward_features(x, subnet), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps[-1], final[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reduce no tokens; this one reduces at blocks"):
        model.forward_intermediates(x, subnet=model.search_space.smallest())
    with pytest.raises(ValueError, match=r"block indices must lie in \[-12, 12\)"):
        model.forward_intermediates(x, indices=[12])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.blocks) == 2 and model.search_space.depth == 2
    assert len(model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)) == 2


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", PRESETS)
def test_default_forward_scripts_and_traces(name):
    """TorchScript and FX follow the full model (the elastic paths stay eager) and compute what it computes."""
    model = small(name).eval()
    x = images(model, 2)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), atol=1e-6, rtol=1e-6)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(torch.jit.script(traced)(x), expected, atol=1e-6, rtol=1e-6)
        extractor = create_feature_extractor(model, {"blocks.1": "block1", "norm": "tokens"})
        out = extractor(x)
        torch.testing.assert_close(out["tokens"], model.forward_features(x), atol=1e-6, rtol=1e-6)
        assert out["block1"].shape == (2, 1 + model.num_patches, model.embed_dim)
    with pytest.raises(RuntimeError):  # TorchScript takes no subnet: an error, never the full model in silence
        scripted(x, model.search_space.smallest())


@pytest.mark.parametrize("name", PRESETS)
def test_extracted_subnet_is_a_timm_vit_with_the_same_logits_and_macs(name, tmp_path):
    model = small(name).eval()
    x = images(model, 3)
    plain, reducing = non_reducing(model, 1), model.search_space.sample(1)
    assert not reduces(model, plain) and reduces(model, reducing)
    for subnet in (plain, reducing):
        extracted = vit.extract_subnet(model, subnet)
        assert isinstance(extracted, VisionTransformer) and not extracted.training
        assert isinstance(extracted, TokenReducingViT) == (subnet is reducing)
        assert sum(p.numel() for p in extracted.parameters()) == vit.count_params(model, subnet)
        with torch.no_grad():
            expected = model(x, subnet)
            torch.testing.assert_close(extracted(x), expected, atol=1e-5, rtol=0)
            with flop_counter() as counter:
                extracted(x[:1])
        assert counter.get_total_flops() == 2 * vit.count_macs(model, subnet)
        folder = vit.save_subnet(extracted, tmp_path / str(subnet is reducing))
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert (
            type(loaded) is type(extracted)
            and loaded.pretrained_cfg["input_size"] == model.pretrained_cfg["input_size"]
        )
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), extracted(x), atol=0, rtol=0)
    blocks = vit.extract_subnet(model, plain).blocks
    assert all(type(b.attn) is Attention and type(b.mlp) is Mlp for b in blocks)
    assert [b.attn.num_heads for b in blocks] == [c.heads for c in plain]
    assert [b.mlp.fc1.out_features for b in blocks] == [c.mlp_hidden for c in plain]


MODES = [
    ("prune", "tome"),
    ("merge", "tome"),
    ("merge", "official"),
    ("prune_merge", "tome"),
    ("prune_merge", "official"),
]


@pytest.mark.parametrize("pool", ["token", "avg"])
@pytest.mark.parametrize(("mode", "variant"), MODES)
def test_extraction_reduces_tokens_as_the_supernet(mode, variant, pool):
    """Every token mode and merge variant, both poolings: the extracted model's logits and MACs are the supernet's."""
    torch.manual_seed(0)
    model = vit.create_supernet("prance_fmnist", token_mode=mode, merge_variant=variant, global_pool=pool).eval()
    x = images(model, 4)
    for seed in range(3):
        subnet = model.search_space.sample(seed)
        extracted = vit.extract_subnet(model, subnet)
        with torch.no_grad():
            torch.testing.assert_close(extracted(x), model(x, subnet), atol=1e-5, rtol=0)
            with flop_counter() as counter:
                extracted(x[:1])
        assert counter.get_total_flops() == 2 * vit.count_macs(model, subnet)


def test_extract_takes_subnet_text_and_keeps_device_dtype_and_mode():
    model = vit.create_supernet("prance_fmnist").to(torch.float64)
    extracted = vit.extract_subnet(model, "h2-m128-r1")
    assert extracted.training and extracted.cls_token.dtype == torch.float64
    assert [b.attn.num_heads for b in extracted.blocks] == [2] * 12
    with torch.device("meta"):
        meta = vit.create_supernet("prance_fmnist")
    assert vit.extract_subnet(meta, "h1-m64-r1").cls_token.is_meta
    with pytest.raises(vit.InvalidSubnetError, match=r"heads=5 is not one of the choices \(1, 2, 3, 4\)"):
        vit.extract_subnet(model, "h5-m128-r1")
    with pytest.raises(vit.InvalidSubnetError, match=r"is not of the form \[e<embed>-\]h<heads>-m<mlp_hidden>-r<keep>"):
        vit.extract_subnet(model, "half")
    with pytest.raises(ValueError, match="expected a model of vit.extract_subnet"):
        vit.save_subnet(timm.create_model("deit_tiny_patch16_224", device="meta"), "unused")


def test_subnet_text_round_trips():
    with torch.device("meta"):
        space = vit.create_supernet("prance_fmnist", token_mode="prune_merge").search_space
    for seed in range(5):
        subnet = space.sample(seed)
        assert space.parse(str(subnet)) == subnet
    assert space.parse("h4-m256-r0.9/0.8") == vit.Subnet((vit.BlockConfig(4, 256, 0.9, 0.8),) * 12)
    with pytest.raises(vit.InvalidSubnetError, match="gives 2 blocks; give one for all or one per block"):
        space.parse("h4-m256-r1 h4-m256-r1")


def test_onnx_export_of_the_model_and_an_extracted_subnet_runs_in_onnxruntime(tmp_path):
    """The dynamo exporter, a dynamic batch, onnxruntime's logits within 1e-4 of eager."""
    import onnxruntime

    model = vit.create_supernet("prance_fmnist", pretrained=True).eval()
    x = images(model, 2)
    for name, net in (("full", model), ("subnet", vit.extract_subnet(model, "h2-m128-r1"))):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(net, (x,), path, dynamo=True, dynamic_shapes={"x": {0: "batch"}}, verbose=False)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        other = images(model, 5, seed=1)
        (logits,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, net(other).numpy(), atol=1e-4, rtol=0)


def test_a_token_reducing_subnet_exports_with_torch_export():
    model = vit.create_supernet("prance_fmnist", pretrained=True).eval()
    extracted = vit.extract_subnet(model, "h4-m256-r0.9")
    x = images(model, 2)
    program = torch.export.export(extracted, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    other = images(model, 5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other, model.search_space.parse("h4-m256-r0.9")))


@pytest.mark.parametrize("first", ["vit", "timm"])
def test_import_vit_leaves_timm_out_until_it_is_imported_and_registers_with_it_either_way(first):
    """`import vit` imports neither timm nor torchvision (seconds of start-up); timm, imported before or after,
    knows every preset and `prance_subnet`."""
    second = "timm" if first == "vit" else "vit"
    program = (
        f"import sys; import {first}; light = 'timm' not in sys.modules and 'torchvision' not in sys.modules; "
        f"import {second}; import timm; print(light, sorted(timm.list_models('prance*')))"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    out = result.stdout.split(" ", 1)
    assert out[0] == ("True" if first == "vit" else "False")
    official = [f"prance_official_{size}" for size in ("tiny", "small", "base")]
    assert ast.literal_eval(out[1]) == sorted([*PRESETS, *official, "prance_subnet"])

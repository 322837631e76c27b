"""The elastic supernet: parity with timm, sliced subnets against a dense ViT, per-sample batches, gradients,
input and configuration errors, checkpoints, and the registry."""

import ast
import copy
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import timm
import timm.optim
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import dense_reduce, flop_counter, images, release_shared_supernets, shared_supernet, tiny_supernet

import vit
from vit.rewire import head_importance, neuron_importance
from vit.token_ops import token_schedule

PRESETS = ("prance_deit_base", "prance_deit_small", "prance_deit_tiny", "prance_fmnist")
LIGHT = ("prance_fmnist", "prance_deit_tiny")
TIMM_NAMES = {
    "prance_deit_tiny": "deit_tiny_patch16_224",
    "prance_deit_small": "deit_small_patch16_224",
    "prance_deit_base": "deit_base_patch16_224",
}


supernet = shared_supernet


@pytest.fixture(scope="module", autouse=True)
def release_models():
    """Free the cached models when this file's tests are done."""
    yield
    release_shared_supernets()


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Add noise to every parameter, so biases and norm parameters are not 0 and 1 and slicing errors show."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def with_blocks(subnet: vit.Subnet, **changes) -> vit.Subnet:
    """`subnet` with the given fields replaced in every block."""
    return vit.Subnet(tuple(dataclasses.replace(b, **changes) for b in subnet))


def find_subnet(space: vit.SearchSpace, accept) -> vit.Subnet:
    """The first sampled subnet (seeds 0, 1, ...) that `accept`s."""
    for seed in range(1000):
        subnet = space.sample(seed)
        if accept(subnet):
            return subnet
    raise AssertionError("no sampled subnet is accepted")


def reduces_tokens(subnet: vit.Subnet) -> bool:
    return any(b.keep_ratio < 1 or b.merge_ratio < 1 for b in subnet)


def narrower(subnet: vit.Subnet, space: vit.SearchSpace) -> bool:
    return any(b.heads < h[-1] and b.mlp_hidden < m[-1] for b, h, m in zip(subnet, space.heads, space.mlp_hidden))


def macs(model: nn.Module, *args) -> float:
    with flop_counter() as counter, torch.no_grad():
        model(*args)
    return counter.get_total_flops() / 2


# --- 1. parity with timm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_largest_subnet_equals_timm(name):
    """timm's DeiT weights load by name; the largest subnet computes timm's logits, also after rewiring."""
    torch.manual_seed(0)
    reference = perturb_(timm.create_model(TIMM_NAMES[name], pretrained=False)).eval()
    model = copy.deepcopy(supernet(name))
    model.load_state_dict(reference.state_dict())
    space = model.search_space
    x = images(model, 2)
    narrow = with_blocks(space.largest(), heads=space.heads[0][0], mlp_hidden=space.mlp_hidden[0][0])
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x, subnet=space.largest()), expected, atol=1e-5, rtol=0)
        narrow_before = model(x, narrow)

        qkv_before = [b.attn.qkv.weight.clone() for b in model.blocks]
        assert vit.rewire(model) is model
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x, subnet=space.largest()), expected, atol=1e-5, rtol=0)
        narrow_after = model(x, narrow)

    assert any(not torch.equal(b.attn.qkv.weight, w) for b, w in zip(model.blocks, qkv_before))
    assert not torch.allclose(narrow_before, narrow_after, atol=1e-3)  # the prefix slices now hold other heads
    for block in model.blocks:
        importance = head_importance(block)
        assert torch.all(importance[:-1] >= importance[1:])
        importance = neuron_importance(block)
        assert torch.all(importance[:-1] >= importance[1:])


# --- 1b. the presets are timm models ------------------------------------------------------------------------------


def test_timm_create_model_builds_the_preset():
    """timm's `create_model` and `vit.create_supernet` build the same model: same logits from the same weights."""
    ours = vit.create_supernet("prance_deit_tiny").eval()
    model = timm.create_model("prance_deit_tiny").eval()
    assert isinstance(model, vit.ElasticViT)
    assert model.search_space == ours.search_space and model.pretrained_cfg == ours.pretrained_cfg
    model.load_state_dict(perturb_(ours).state_dict())
    x = images(model, 1)
    with torch.no_grad():
        for subnet in (None, model.search_space.smallest()):
            assert torch.equal(model(x, subnet), ours(x, subnet))


def test_timm_lists_every_preset_and_builds_one_registered_later():
    assert timm.list_models("prance*") == sorted([*vit.list_supernets(), "prance_subnet"])  # and extracted subnets
    assert set(PRESETS) <= set(timm.list_models("prance*"))

    @vit.register_supernet
    def prance_test_two_blocks(pretrained: bool = False, **kwargs) -> vit.ElasticViT:
        return vit.create_supernet("prance_fmnist", **{"depth": 2, "head_choices": (2, 4), **kwargs})

    assert "prance_test_two_blocks" in timm.list_models("prance*")
    model = timm.create_model("prance_test_two_blocks", num_classes=3)
    assert (model.depth, model.num_classes, model.pretrained_cfg["architecture"]) == (2, 3, "prance_test_two_blocks")

    def deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> vit.ElasticViT:
        return vit.create_supernet("prance_deit_tiny", **kwargs)

    with pytest.raises(ValueError, match="'deit_tiny_patch16_224' is one of timm's models"):
        vit.register_supernet(deit_tiny_patch16_224)
    assert "deit_tiny_patch16_224" not in vit.list_supernets()


def test_pretrained_cfg_is_complete_and_follows_the_model():
    """Every key of timm's own ViT `pretrained_cfg` (less where the weights come from), describing this model."""
    source_keys = {"url", "hf_hub_id", "tag", "custom_load"}
    timm_keys = set(timm.create_model("deit_tiny_patch16_224").pretrained_cfg) - source_keys
    default = supernet("prance_deit_tiny").pretrained_cfg
    assert timm_keys <= set(default)
    assert default["input_size"] == (3, 224, 224) and default["num_classes"] == 1000 and len(default["mean"]) == 3
    assert default["first_conv"] == "patch_embed.proj" and default["classifier"] == "head"

    for model in (
        timm.create_model("prance_deit_tiny", num_classes=10, img_size=32, in_chans=1),
        vit.create_supernet("prance_deit_tiny", num_classes=10, img_size=32, in_chans=1),
    ):
        cfg = model.pretrained_cfg
        assert (cfg["num_classes"], cfg["input_size"], cfg["architecture"]) == (10, (1, 32, 32), "prance_deit_tiny")
        assert len(cfg["mean"]) == len(cfg["std"]) == 1
        assert timm.data.resolve_model_data_config(model)["input_size"] == (1, 32, 32)
        with torch.no_grad():
            assert model(images(model, 1)).shape == (1, 10)
        model.reset_classifier(4)
        assert model.pretrained_cfg["num_classes"] == 4

    model = timm.create_model("prance_fmnist", pretrained_cfg_overlay={"crop_pct": 0.9, "input_size": (1, 32, 32)})
    assert model.pretrained_cfg["crop_pct"] == 0.9 and model.pretrained_cfg["mean"] == (0.2860,)
    assert model.patch_embed.img_size == 32  # as in timm, the config sets the default shape
    with pytest.raises(ValueError, match=r"no pretrained tag .in1k.; registered: prance_fmnist.shipped"):
        timm.create_model("prance_fmnist.in1k")


def test_timm_pretrained_and_checkpoint_path_load_the_shipped_weights():
    """`pretrained` and `checkpoint_path` work through timm; a new `num_classes` keeps the weights, new head."""
    shipped = vit.create_supernet("prance_fmnist", pretrained=True).eval()
    path = vit.registry.CHECKPOINT_DIR / "prance_fmnist.safetensors"
    x = images(shipped, 2)
    with torch.no_grad():
        for model in (
            timm.create_model("prance_fmnist", pretrained=True),
            timm.create_model("prance_fmnist", checkpoint_path=str(path)),
        ):
            assert torch.equal(model.eval()(x), shipped(x))
        model = timm.create_model("prance_fmnist", pretrained=True, num_classes=5).eval()
        assert torch.equal(model.forward_features(x), shipped.forward_features(x))
        assert model(x).shape == (2, 5)


def test_reset_classifier_and_get_classifier_round_trip():
    model = copy.deepcopy(supernet("prance_fmnist"))
    x = images(model, 2)
    subnet = model.search_space.smallest()
    assert model.get_classifier() is model.head
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    features = model(x, [subnet] * 2)  # per-sample subnets, with gradients: features without a head
    with torch.no_grad():
        torch.testing.assert_close(features, model.forward_head(model.forward_features(x, subnet), pre_logits=True))

    model.reset_classifier(7, global_pool="token")
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (model.embed_dim, 7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown global_pool 'max'; expected one of 'token', 'avg', ''"):
        model.reset_classifier(7, global_pool="max")


def test_no_weight_decay_names_parameters_that_timm_optimizers_exempt():
    model = copy.deepcopy(supernet("prance_fmnist"))
    params = dict(model.named_parameters())
    assert model.no_weight_decay() and model.no_weight_decay() <= set(params)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", weight_decay=0.05)
    exempt = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(params[name]) in exempt for name in model.no_weight_decay())
    assert id(params["blocks.0.attn.qkv.weight"]) not in exempt


@pytest.mark.parametrize("token_mode", ["merge", "prune_merge"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(token_mode):
    """Checkpointed blocks run again in the backward pass, and change nothing: largest, one and per-sample subnets."""
    model = tiny_supernet(token_mode, drop_path_rate=0.2).train()  # stochastic depth: the recompute replays its RNG
    space = model.search_space
    x = images(model, 3)
    labels = torch.tensor([0, 3, 7])
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    for subnet in (None, find_subnet(space, reduces_tokens), [space.smallest(), space.largest(), space.sample(1)]):
        results = []
        for enable in (False, True):
            model.set_grad_checkpointing(enable)
            model.zero_grad()
            calls.clear()
            torch.manual_seed(0)
            loss = F.cross_entropy(model(x, subnet), labels)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
        (loss, grads, runs), (loss_ckpt, grads_ckpt, runs_ckpt) = results
        torch.testing.assert_close(loss_ckpt, loss)
        torch.testing.assert_close(grads_ckpt, grads)
        assert runs_ckpt == 2 * runs  # each block's forward ran again in the backward pass

    calls.clear()
    with torch.no_grad():
        model(x)
    assert len(calls) == 1  # nothing to recompute without gradients


def test_group_matcher_covers_every_parameter():
    """timm's `group_parameters` reads the matcher: stem, one group per block (final norm last), head at the end."""
    model = supernet("prance_fmnist")
    names = [n for n, _ in model.named_parameters()]
    for coarse in (False, True):
        groups = list(timm.models.group_parameters(model, model.group_matcher(coarse)).values())
        assert sorted(n for g in groups for n in g) == sorted(names)
        assert len(groups) == model.depth + 2
        assert set(groups[0]) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
        for i in range(model.depth):
            assert all(n.startswith(f"blocks.{i}.") or n.startswith("norm.") for n in groups[i + 1])
        assert {"norm.weight", "norm.bias"} <= set(groups[model.depth])
        assert groups[-1] == ["head.weight", "head.bias"]
    layer_decay = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in layer_decay) == len(names)


# --- 2. a sliced subnet is a dense ViT of the sliced widths -------------------------------------------------------


class DenseAttention(nn.Module):
    """Plain multi-head attention with separate q, k, v projections and an explicit softmax."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output, CLS attention to the patches (mean over heads) and patch keys, with log(size) attention bias."""
        B, T, _ = x.shape
        keys = self.k(x)  # (B, T, heads * head_dim)
        q, k, v = (y.view(B, T, self.heads, self.head_dim).transpose(1, 2) for y in (self.q(x), keys, self.v(x)))
        logits = q @ k.transpose(-2, -1) * self.head_dim**-0.5  # (B, h, T, T)
        if size is not None:
            logits = logits + size.log()[:, None, None, :]
        attn = logits.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, T, -1)
        return self.proj(out), attn[:, :, 0, 1:].mean(dim=1), keys[:, 1:]


class DenseBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = DenseAttention(dim, heads, head_dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, size, config: vit.BlockConfig, token_mode: str):
        out, scores, keys = self.attn(self.norm1(x), size)
        x = x + out
        schedule = token_schedule(x.shape[1] - 1, config, token_mode)
        x, size = dense_reduce(x, size, scores, keys, schedule)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))), size


class DenseViT(nn.Module):
    """A plain ViT built at the widths of `subnet`, with the supernet's weights sliced into it."""

    def __init__(self, model: vit.ElasticViT, subnet: vit.Subnet) -> None:
        super().__init__()
        C, d = model.embed_dim, model.blocks[0].attn.head_dim
        pe = model.patch_embed
        self.subnet, self.token_mode = subnet, model.token_mode
        self.patch = nn.Conv2d(pe.in_chans, C, pe.patch_size, stride=pe.patch_size)
        self.blocks = nn.ModuleList(DenseBlock(C, b.heads, d, b.mlp_hidden) for b in subnet)
        self.norm, self.head = nn.LayerNorm(C, eps=1e-6), nn.Linear(C, model.num_classes)
        with torch.no_grad():
            self.cls_token, self.pos_embed = model.cls_token.clone(), model.pos_embed.clone()
            self.patch.load_state_dict(pe.proj.state_dict())
            self.norm.load_state_dict(model.norm.state_dict())
            self.head.load_state_dict(model.head.state_dict())
            for dense, block, config in zip(self.blocks, model.blocks, subnet):
                inner = config.heads * d
                dense.norm1.load_state_dict(block.norm1.state_dict())
                dense.norm2.load_state_dict(block.norm2.state_dict())
                for j, linear in enumerate((dense.attn.q, dense.attn.k, dense.attn.v)):
                    linear.weight.copy_(block.attn.qkv.weight[j * C : j * C + inner])
                    linear.bias.copy_(block.attn.qkv.bias[j * C : j * C + inner])
                dense.attn.proj.weight.copy_(block.attn.proj.weight[:, :inner])
                dense.attn.proj.bias.copy_(block.attn.proj.bias)
                dense.fc1.weight.copy_(block.mlp.fc1.weight[: config.mlp_hidden])
                dense.fc1.bias.copy_(block.mlp.fc1.bias[: config.mlp_hidden])
                dense.fc2.weight.copy_(block.mlp.fc2.weight[:, : config.mlp_hidden])
                dense.fc2.bias.copy_(block.mlp.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        size = None
        for block, config in zip(self.blocks, self.subnet):
            x, size = block(x, size, config, self.token_mode)
        return self.head(self.norm(x[:, 0]))


@pytest.mark.parametrize("token_mode", [None, *vit.TOKEN_MODES])
@pytest.mark.parametrize("name", LIGHT)
def test_sliced_subnet_equals_dense_vit(name, token_mode):
    """token_mode None: channels only (keep ratios 1.0); otherwise a subnet that also reduces tokens."""
    model = perturb_(copy.deepcopy(supernet(name, token_mode or "merge")))
    space = model.search_space
    if token_mode is None:
        subnet = find_subnet(space, lambda s: narrower(with_blocks(s, keep_ratio=1.0), space))
        subnet = with_blocks(subnet, keep_ratio=1.0)
    else:
        subnet = find_subnet(space, lambda s: narrower(s, space) and reduces_tokens(s))
    dense = DenseViT(model, subnet).eval()
    x = images(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, subnet), dense(x), atol=1e-5, rtol=0)

    sliced = macs(model, x, subnet)
    assert sliced < 0.8 * macs(model, x)  # a narrower subnet really computes less: it is sliced, not masked
    if token_mode is None:
        assert sliced == macs(dense, x)  # exactly the matrix products of the dense model of those widths


# --- 3. per-sample subnets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_one_subnet_per_sample_is_that_subnet_and_the_deprecated_consensus_its_median(token_mode):
    # mixtures of subnets against each image alone: test_properties::test_any_per_sample_mixture_equals_each_image_alone
    model = supernet("prance_fmnist", token_mode)
    space = model.search_space
    subnets = [space.sample(seed) for seed in range(8)]
    assert len(set(subnets)) == 8 and all(reduces_tokens(s) for s in subnets)
    x = images(model, 8)
    with torch.no_grad():
        with pytest.warns(DeprecationWarning, match="consensus"):
            consensus = model(x, subnets, "consensus")
        torch.testing.assert_close(consensus, model(x, space.consensus(subnets)), atol=1e-4, rtol=0)
        assert not torch.allclose(consensus, model(x, subnets), atol=1e-3)  # one subnet vs. eight
        with pytest.warns(DeprecationWarning, match="layout"):
            torch.testing.assert_close(model(x, subnets, execution="bucketed"), model(x, subnets), atol=1e-4, rtol=0)
        for layout in ("packed", "bucketed"):
            same = model(x, [subnets[3]] * 8, layout=layout)
            torch.testing.assert_close(same, model(x, subnets[3]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_padded_length_classes_give_the_results_of_one_image_at_a_time(token_mode, monkeypatch):
    monkeypatch.setattr(vit.packed, "CLASS_PAD_WASTE_MACS", {})  # pad length classes on a CPU too
    padded = []
    classes = vit.packed.length_classes

    def spy(lengths, width, budget):
        out = classes(lengths, width, budget)
        padded.extend(len(set(lengths[first : first + m])) > 1 for first, m in out)
        return out

    monkeypatch.setattr(vit.packed, "length_classes", spy)
    model = supernet("prance_fmnist", token_mode)
    subnets = [model.search_space.sample(seed) for seed in range(8)]
    x = images(model, 8)
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1], subnets[i]) for i in range(8)])
        padded.clear()
        torch.testing.assert_close(model(x, subnets), alone, atol=1e-4, rtol=0)
    assert any(padded)


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_packed_blocks_keep_batch_order_and_leave_their_input_alone(token_mode):
    """Samples are reordered by width inside a block; cls(), num_patches() and the tokens come back in batch
    order, equal to each sample's block run alone, and the batch a block started from is unchanged."""
    model = supernet("prance_fmnist", token_mode)
    space = model.search_space
    configs = [space.sample(seed)[0] for seed in range(40)]
    configs = list({(c.heads, c.mlp_hidden): c for c in configs if c.keep_ratio < 1}.values())[:6]
    assert len({c.heads for c in configs}) > 1 and len({c.mlp_hidden for c in configs}) > 1
    x = model.embed(images(model, len(configs)))
    with torch.no_grad():
        tokens = vit.PackedBatch(x)
        before = tokens.x.clone()
        after = model.run_block(0, tokens, configs)
        twice = model.run_block(1, after, configs[::-1])
        assert torch.equal(tokens.x, before) and tokens.lengths == [x.shape[1]] * len(configs)
        for i, c in enumerate(configs):
            alone = model.run_block(0, vit.PackedBatch(x[i : i + 1]), c)
            assert int(after.num_patches()[i]) == int(alone.num_patches()[0])
            torch.testing.assert_close(after.cls()[i], alone.cls()[0], atol=1e-5, rtol=0)
            alone = model.run_block(1, alone, configs[::-1][i])
            torch.testing.assert_close(twice.cls()[i], alone.cls()[0], atol=1e-5, rtol=0)


def test_single_threaded_restores_the_thread_count_and_long_tensor_matches_torch_tensor():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with vit.utils.single_threaded("cpu"):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), vit.utils.single_threaded("cpu"):
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with vit.utils.single_threaded("cuda"):  # only CPU work is made single-threaded
            assert torch.get_num_threads() == 2
        model = supernet("prance_fmnist")
        subnets = [model.search_space.sample(seed) for seed in range(4)]
        with torch.no_grad():
            model(images(model, 4), subnets)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    values = [3, 0, 7, 2**40]
    assert torch.equal(vit.utils.long_tensor(values, "cpu"), torch.tensor(values))
    assert vit.utils.long_tensor([], "cpu").dtype == torch.int64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_repeated_forwards_from_page_faulting():
    # in a fresh process (the setting is process-wide): with glibc's default, each forward of the full model at
    # batch 32 takes thousands of minor page faults; with freed memory kept, next to none once the heap has grown
    code = """
import resource, torch, vit
from vit.bench import keep_freed_memory
assert keep_freed_memory()
torch.manual_seed(0)
model = vit.create_supernet("prance_fmnist").eval()
x = torch.randn(32, 1, 28, 28)
faults = []
with torch.inference_mode():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    faults = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert sum(faults[2:]) <= 1000, faults  # glibc's default: thousands per forward


def test_per_sample_subnets_accept_an_empty_batch():
    model = supernet("prance_fmnist")
    x = images(model, 0)
    assert model(x).shape == (0, 10)
    assert model(x, []).shape == (0, 10)


# --- 4. gradients -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIGHT)
def test_every_parameter_gets_a_gradient(name):
    model = perturb_(copy.deepcopy(supernet(name))).train()
    x = images(model, 2)
    logits = model(x, model.search_space.largest())
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    for key, p in model.named_parameters():
        assert p.grad is not None, key
        assert torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, key


@pytest.mark.parametrize("layout", ["packed", "bucketed"])
def test_per_sample_subnets_train(layout):
    """With gradients enabled, per-sample subnets give the gradients of each sample run alone."""
    model = copy.deepcopy(supernet("prance_fmnist")).train()
    subnets = [model.search_space.sample(seed) for seed in range(5)]
    x, labels = images(model, 5), torch.tensor([0, 1, 2, 3, 4])
    F.cross_entropy(model(x, subnets, layout=layout), labels, reduction="sum").backward()
    batched = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    for i, s in enumerate(subnets):
        F.cross_entropy(model(x[i : i + 1], s), labels[i : i + 1], reduction="sum").backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(batched[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_smallest_subnet_trains(token_mode):
    model = copy.deepcopy(supernet("prance_fmnist", token_mode)).train()
    logits = model(images(model, 4), model.search_space.smallest())
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[-1].mlp.fc1.weight.grad[:64].abs().sum() > 0  # the sliced rows learn
    assert model.blocks[-1].mlp.fc1.weight.grad[64:].abs().sum() == 0  # the rest is not computed


# --- 5. errors ----------------------------------------------------------------------------------------------------


def corrupt(kind: str) -> torch.Tensor:
    x = images(supernet("prance_fmnist"), 2)
    if kind == "nan":
        x[1, 0, 3, 4] = float("nan")
    elif kind == "inf":
        x[0, 0, 0, 0] = float("inf")
    return x


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.randn(2, 1, 32, 32), ValueError, r"expected images of shape \(B, 1, 28, 28\), got \(2, 1, 32"),
        (lambda: torch.randn(2, 3, 28, 28), ValueError, r"\(B, 1, 28, 28\), got \(2, 3, 28, 28\)"),
        (lambda: torch.randn(1, 28, 28), ValueError, r"\(B, 1, 28, 28\)"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.uint8), TypeError, "floating-point.*uint8"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.int64), TypeError, "int64"),
        (lambda: np.zeros((2, 1, 28, 28), dtype=np.float32), TypeError, "torch.Tensor"),
        (lambda: corrupt("nan"), ValueError, "NaN"),
        (lambda: corrupt("inf"), ValueError, "Inf"),
    ],
    ids=["size", "channels", "no-batch-dim", "uint8", "int64", "numpy", "nan", "inf"],
)
def test_bad_images_raise(make, error, match):
    model = supernet("prance_fmnist")
    x = make()
    with pytest.raises(error, match=match):
        model(x)
    if isinstance(x, torch.Tensor) and x.dim() == 4:  # the per-sample path checks its input too
        with pytest.raises(error, match=match):
            model(x, [model.search_space.largest()] * x.shape[0])


def replace_block(subnet: vit.Subnet, i: int, **changes) -> vit.Subnet:
    blocks = list(subnet)
    blocks[i] = dataclasses.replace(blocks[i], **changes)
    return vit.Subnet(tuple(blocks))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s: replace_block(s, 0, heads=5), "heads=5"),
        (lambda s: replace_block(s, 3, heads=0), "heads=0"),
        (lambda s: replace_block(s, 2, mlp_hidden=100), "mlp_hidden=100"),
        (lambda s: replace_block(s, 5, keep_ratio=0.65), "keep_ratio=0.65"),
        (lambda s: replace_block(s, 1, merge_ratio=0.5), "merge_ratio"),  # only for prune_merge
        (lambda s: vit.Subnet(s.blocks[:-1]), "11 blocks"),
        (lambda s: vit.Subnet(s.blocks + s.blocks[:1]), "13 blocks"),
    ],
    ids=["heads", "no-heads", "mlp", "keep-ratio", "merge-ratio", "short", "long"],
)
def test_subnet_outside_the_space_raises(make, match):
    model = supernet("prance_fmnist")
    subnet = make(model.search_space.largest())
    x = images(model, 2)
    assert issubclass(vit.InvalidSubnetError, ValueError)
    with pytest.raises(vit.InvalidSubnetError, match=match):
        model(x, subnet)
    with pytest.raises(vit.InvalidSubnetError, match=match):
        model(x, [model.search_space.largest(), subnet])
    with pytest.raises(vit.InvalidSubnetError, match=match):
        model(x, [model.search_space.largest(), subnet], layout="bucketed")


def test_wrong_number_of_per_sample_subnets_raises():
    model = supernet("prance_fmnist")
    largest = model.search_space.largest()
    with pytest.raises(ValueError, match="3 subnets for a batch of 2"):
        model(images(model, 2), [largest] * 3)
    with pytest.raises(ValueError, match="1 subnets for a batch of 2"):
        model(images(model, 2), [largest], layout="bucketed")
    with pytest.raises(ValueError, match="unknown layout 'padded'; expected one of packed, bucketed"):
        model(images(model, 2), [largest] * 2, layout="padded")


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown token_mode 'drop'; expected one of prune, merge, prune_merge"):
        vit.create_supernet("prance_fmnist", token_mode="drop")
    with pytest.raises(ValueError, match="unknown supernet 'prance_deit_huge'.*prance_deit_tiny.*prance_fmnist"):
        vit.create_supernet("prance_deit_huge")


def test_checkpoint_round_trip(tmp_path):
    model = perturb_(copy.deepcopy(supernet("prance_fmnist", "prune_merge")))
    path = vit.save_checkpoint(model, tmp_path / "run" / "supernet.safetensors", metadata={"epoch": 3})
    torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
    loaded = vit.create_supernet("prance_fmnist", token_mode="prune_merge", checkpoint=path).eval()
    subnets = [None, model.search_space.smallest(), model.search_space.sample(0)]
    x = images(model, 3)
    with torch.no_grad():
        for subnet in subnets:
            assert torch.equal(loaded(x, subnet), model(x, subnet))
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["supernet.safetensors"]  # no temporary file left


def write_truncated(path):
    vit.save_checkpoint(supernet("prance_fmnist"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_foreign(path):
    vit.save_checkpoint(supernet("prance_deit_tiny"), path)


def write_text(path):
    path.write_text("epoch,loss\n1,0.93\n2,0.71\n")


@pytest.mark.parametrize(
    "filename, write, match",
    [
        ("supernet.safetensors", write_truncated, "not a readable checkpoint"),
        ("supernet.safetensors", write_text, "not a readable checkpoint"),
        ("supernet.safetensors", write_foreign, r"does not fit this ElasticViT: .*shape mismatches \(cls_token"),
        ("log.txt", write_text, "not a readable checkpoint"),
        ("notes.pt", lambda path: path.write_text("hello"), "not a readable checkpoint"),
    ],
    ids=["truncated", "text", "deit_tiny", "text-txt", "text-pt"],
)
def test_bad_checkpoints_raise(tmp_path, filename, write, match):
    path = tmp_path / filename
    write(path)
    with pytest.raises(ValueError, match=match) as info:
        vit.create_supernet("prance_fmnist", checkpoint=path)
    assert str(path) in str(info.value)


def test_missing_checkpoint_raises(tmp_path):
    path = tmp_path / "nowhere" / "supernet.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere/supernet.safetensors"):
        vit.create_supernet("prance_fmnist", checkpoint=path)


# --- 6. registry and search space ---------------------------------------------------------------------------------


def test_list_supernets():
    assert set(PRESETS) <= set(vit.list_supernets())


@pytest.mark.parametrize("name", vit.list_supernets())
def test_presets_build_and_run(name):
    model = supernet(name)
    assert isinstance(model, (vit.official.OfficialViT if name.startswith("prance_official") else vit.ElasticViT))
    assert model.pretrained_cfg["architecture"] == name
    batch = 2 if name in LIGHT else 1
    x = images(model, batch)
    with torch.no_grad():
        for subnet in (None, model.search_space.smallest()):
            logits = model(x, subnet)
            assert logits.shape == (batch, model.num_classes)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
@pytest.mark.parametrize("name", LIGHT)
def test_create_supernet_token_mode(name, token_mode):
    model = supernet(name, token_mode)
    assert model.token_mode == model.search_space.token_mode == token_mode
    assert ("merge_ratio" in model.search_space.fields) == (token_mode == "prune_merge")
    subnet = model.search_space.smallest()
    with torch.no_grad():
        logits = model(images(model, 2), subnet)
    assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
@pytest.mark.parametrize("name", LIGHT)
def test_search_space(name, token_mode):
    model = supernet(name, token_mode)
    space = model.search_space
    assert space.depth == model.depth == len(space.largest()) == len(space.smallest())
    for i, (big, small) in enumerate(zip(space.largest(), space.smallest())):
        block = model.blocks[i]
        assert (big.heads, big.mlp_hidden) == (block.attn.num_heads, block.mlp.fc1.out_features)
        assert big.keep_ratio == big.merge_ratio == 1.0
        assert (small.heads, small.mlp_hidden, small.keep_ratio) == (
            space.heads[i][0],
            space.mlp_hidden[i][0],
            space.keep_ratio[i][0],
        )
        assert small.merge_ratio == (space.merge_ratio[i][0] if token_mode == "prune_merge" else 1.0)
        assert small.keep_ratio < 1.0 and small.heads < big.heads

    assert space.sample(7) == space.sample(7) == space.sample(np.random.default_rng(7))
    assert space.sample(7) != space.sample(8)
    rng = np.random.default_rng(0)
    first, second = space.sample(rng), space.sample(rng)
    assert first != second and first == space.sample(0)  # a generator is consumed, not reseeded
    for subnet in (space.sample(7), space.largest(), space.smallest()):
        assert space.validate(subnet) is subnet
        assert space.consensus([subnet] * 3) == subnet
    assert space.consensus([space.largest(), space.smallest(), space.largest()]) == space.largest()
    with pytest.raises(ValueError, match="empty"):
        space.consensus([])


def test_the_model_modules_import_nothing_of_the_data_pipeline():
    for module in (vit.supernet, vit.config, vit.registry):
        tree = ast.parse(open(module.__file__).read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "data" not in imported and "vit.data" not in imported, module.__name__


def test_shape_ladder_covers_every_row_count_with_few_sizes():
    sizes = [vit.packed.shape_ladder(n) for n in range(1, 20001)]
    assert all(n <= s <= max(8 * -(-n // 8), n + n // 4) for n, s in zip(range(1, 20001), sizes))
    assert len(set(sizes)) < 60  # oneDNN keeps 1,024 kernels: a few dozen row counts per weight shape fit


def test_bf16_per_sample_matmuls_on_the_ladder_give_the_unpadded_results(monkeypatch):
    """The padding rows of the ladder never reach a sample's tokens: the same logits as without it."""
    model = copy.deepcopy(supernet("prance_fmnist")).to(torch.bfloat16)
    subnets = [model.search_space.sample(seed) for seed in range(8)]
    x = images(model, 8).to(torch.bfloat16)
    assert vit.packed.repeat_shapes(x)
    with torch.no_grad():
        laddered = model(x, subnets)
        monkeypatch.setattr(vit.packed, "repeat_shapes", lambda x: False)
        plain = model(x, subnets)
    torch.testing.assert_close(laddered.float(), plain.float(), atol=2e-2, rtol=0)
    assert not vit.packed.repeat_shapes(x.float())  # fp32 runs through MKL, which builds no kernels per shape


@pytest.mark.parametrize("token_mode", ["merge", "prune_merge"])
def test_official_merge_variant_takes_plain_means_of_hidden_states_per_sample_as_alone(token_mode):
    """The PRANCE release's merging: no sizes are kept (plain means, unweighted attention), tokens differ from ToMe's
    variant, and per-sample subnets get what each image gets alone."""
    official = copy.deepcopy(supernet("prance_fmnist", token_mode))
    official.merge_variant = "official"
    tome = supernet("prance_fmnist", token_mode)
    space = official.search_space
    subnets = [s for s in (space.sample(seed) for seed in range(40)) if reduces_tokens(s)][:6]
    x = images(official, len(subnets))
    with torch.no_grad():
        tokens = vit.PackedBatch(official.embed(x))
        merged = official.run_block(0, tokens, space.smallest()[0])
        assert (
            merged.size is None
            and tome.run_block(0, vit.PackedBatch(tome.embed(x)), space.smallest()[0]).size is not None
        )
        batched = official(x, subnets)
        alone = torch.cat([official(x[i : i + 1], s) for i, s in enumerate(subnets)])
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)
        assert not torch.allclose(batched, tome(x, subnets), atol=1e-3)
    with pytest.raises(ValueError, match="merge_variant"):
        vit.create_supernet("prance_fmnist", merge_variant="cosine")


@pytest.mark.parametrize("source", ["file", "timm"])
def test_pretrained_weights_adapt_to_the_image_size_channels_and_classes_as_timm_adapts_them(
    source, tmp_path, monkeypatch
):
    """DeiT-Tiny weights (random, 224 px, RGB, 1000 classes) into a 32-px grey 10-class supernet: the same features as
    timm's own model built from those weights at those shapes (rewiring reorders neurons, not what they compute)."""
    name = "deit_tiny_patch16_224"
    path = tmp_path / "deit_tiny.safetensors"
    safetensors.torch.save_file(timm.create_model(name).state_dict(), path)
    shapes = dict(num_classes=10, img_size=32, in_chans=1)
    reference = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **shapes).eval()
    if source == "timm":  # the hub's weights are this file, in a hub cache as the hub client lays it out
        snapshot = tmp_path / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
        (snapshot / "refs").mkdir(parents=True)
        (snapshot / "refs" / "main").write_text("0" * 40)
        (snapshot / "snapshots" / ("0" * 40)).mkdir(parents=True)
        (snapshot / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(path.read_bytes())
        model = vit.create_supernet("prance_deit_tiny", pretrained=True, cache_dir=tmp_path / "hub", **shapes)
    else:
        model = vit.registry.load_pretrained(vit.create_supernet("prance_deit_tiny", **shapes), path)
    model.eval()
    assert model.pos_embed.shape == (1, 5, 192) and model.patch_embed.proj.in_channels == 1
    assert model.head.out_features == 10
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)


def test_the_shipped_weights_adapt_to_another_image_size_and_channels():
    shipped = vit.create_supernet("prance_fmnist", pretrained=True)
    model = vit.create_supernet("prance_fmnist", pretrained=True, img_size=32, in_chans=3, num_classes=5)
    assert model.pos_embed.shape == (1, 1 + 64, 64) and model.head.out_features == 5
    own = shipped.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items() if k.startswith("blocks."))
    torch.testing.assert_close(model.patch_embed.proj.weight, own["patch_embed.proj.weight"].repeat(1, 3, 1, 1) / 3)
    assert model(images(model, 2)).shape == (2, 5)

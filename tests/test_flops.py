"""Analytic MACs (`vit.count_macs`) against torch's FlopCounterMode, and the reference sizes of the DeiT presets."""

import copy
import dataclasses

import pytest
import torch
from conftest import flop_counter, images, release_shared_supernets, shared_supernet, tiny_supernet

import vit

LIGHT = ["prance_fmnist", "prance_deit_tiny"]


supernet = shared_supernet


@pytest.fixture(scope="module", autouse=True)
def release_models():
    """Free the cached models when this file's tests are done."""
    yield
    release_shared_supernets()


def measured_macs(model: vit.ElasticViT, x: torch.Tensor, subnet=None, layout: str = "bucketed") -> float:
    """Multiply-accumulates of one forward, as counted by FlopCounterMode (2 FLOPs per MAC)."""
    with flop_counter() as counter, torch.no_grad():
        model(x, subnet, layout=layout)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("grad", [False, True])
def test_flop_counter_counts_attention(grad):
    """The oracle itself: a bare SDPA call costs 2 matrix products of (L x D) by (D x S), forward and backward."""
    b, h, n, d = 2, 4, 50, 16
    q, k, v = (torch.randn(b, h, n, d, requires_grad=grad) for _ in range(3))
    with flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if grad:
            out.sum().backward()
    forward = 2 * (2 * b * h * n * n * d)
    assert counter.get_total_flops() == (3.5 if grad else 1) * forward


def reducing_subnets(space: vit.SearchSpace, count: int) -> list[vit.Subnet]:
    """`count` sampled subnets, each reducing tokens in some block and narrower than the full width somewhere."""
    full = space.largest()
    out = []
    for seed in range(100):
        s = space.sample(seed)
        if any(b.keep_ratio < 1 or b.merge_ratio < 1 for b in s) and any(
            (b.heads, b.mlp_hidden) != (f.heads, f.mlp_hidden) for b, f in zip(s, full)
        ):
            out.append(s)
        if len(out) == count:
            return out
    raise AssertionError("the search space yields no subnets with token reduction")


def check_against_flop_counter(model: vit.ElasticViT, subnets: list[vit.Subnet], batch: int) -> None:
    """count_macs within 2% of FlopCounterMode; in fact exact, as both count the same matrix products."""
    x = images(model, batch)
    for subnet in subnets:
        expected = measured_macs(model, x, subnet) / batch
        counted = vit.count_macs(model, subnet)
        assert abs(counted - expected) / expected < 0.02, str(subnet)
        assert counted == expected, f"{subnet}: off by {counted - expected:+g} MACs"


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_count_macs_matches_flop_counter(token_mode):
    model = supernet("prance_fmnist", token_mode)
    space = model.search_space
    check_against_flop_counter(model, [*reducing_subnets(space, 3), space.smallest(), space.largest()], batch=2)


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
@pytest.mark.parametrize("name", [name for name in vit.list_supernets() if name != "prance_fmnist"])
def test_count_macs_matches_flop_counter_at_224px(name, token_mode):
    """The 224 px presets on one sampled subnet each (the cheapest of a few, to keep the test fast)."""
    model = supernet(name, token_mode)
    subnet = min(reducing_subnets(model.search_space, 4), key=lambda s: vit.count_macs(model, s))
    check_against_flop_counter(model, [subnet], batch=1)


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_count_macs_of_per_sample_subnets(token_mode):
    """A bucketed batch costs exactly the sum of its samples' counts: nothing is padded or masked."""
    model = supernet("prance_fmnist", token_mode)
    space = model.search_space
    subnets = [space.sample(seed) for seed in range(6)]
    counts = vit.count_macs(model, subnets)
    assert isinstance(counts, list) and len(counts) == len(subnets)
    assert counts == [vit.count_macs(model, s) for s in subnets]
    expected = measured_macs(model, images(model, len(subnets)), subnets)
    assert abs(sum(counts) - expected) / expected < 0.02
    assert sum(counts) == expected


@pytest.mark.parametrize("merge_variant", vit.supernet.MERGE_VARIANTS)
@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_packed_execution_computes_little_more_than_the_count(token_mode, merge_variant):
    """Packed execution pads token reduction's CLS attention row and merging's similarity, and nothing else."""
    model = copy.deepcopy(supernet("prance_fmnist", token_mode))
    model.merge_variant = merge_variant
    subnets = [model.search_space.sample(seed) for seed in range(6)]
    counted = sum(vit.count_macs(model, subnets))
    packed = measured_macs(model, images(model, len(subnets)), subnets, layout="packed")
    assert counted <= packed < 1.05 * counted


@pytest.mark.parametrize(
    "name, low, high",
    [("prance_deit_tiny", 1.22e9, 1.30e9), ("prance_deit_small", 4.5e9, 4.7e9), ("prance_deit_base", 17.3e9, 17.9e9)],
)
def test_deit_sizes(name, low, high):
    """DeiT-T/S/B are 1.3 / 4.6 / 17.6 GMACs at 224 px."""
    assert low < vit.count_macs(supernet(name)) < high


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
@pytest.mark.parametrize("name", LIGHT)
def test_count_macs_ordering(name, token_mode):
    model = supernet(name, token_mode)
    space = model.search_space
    full = vit.count_macs(model)
    assert full == vit.count_macs(model, space.largest())
    assert vit.count_macs(model, space.smallest()) < full
    # narrowing one block, or reducing tokens earlier, strictly lowers the cost
    largest = space.largest()
    first = dataclasses.replace(largest[0], heads=space.heads[0][0])
    assert vit.count_macs(model, vit.Subnet((first, *largest.blocks[1:]))) < full
    late = vit.Subnet((*largest.blocks[:-1], dataclasses.replace(largest[-1], keep_ratio=space.keep_ratio[-1][0])))
    early = vit.Subnet((dataclasses.replace(largest[0], keep_ratio=space.keep_ratio[0][0]), *largest.blocks[1:]))
    assert vit.count_macs(model, early) < vit.count_macs(model, late) < full


def test_count_macs_rejects_invalid_subnets():
    model = supernet("prance_fmnist")
    largest = model.search_space.largest()
    with pytest.raises(vit.InvalidSubnetError):
        vit.count_macs(model, vit.Subnet(largest.blocks[:-1]))
    with pytest.raises(vit.InvalidSubnetError):
        vit.count_macs(model, vit.Subnet((dataclasses.replace(largest[0], heads=5), *largest.blocks[1:])))


def test_count_params_are_the_parameters_a_subnet_reads():
    """The largest subnet reads every parameter; a smaller one exactly those its forward gives a gradient (up to key
    biases, whose gradient is zero in exact arithmetic: attention is invariant to them)."""
    torch.manual_seed(0)
    model = vit.create_supernet("prance_fmnist")
    space = model.search_space
    assert vit.count_params(model) == sum(p.numel() for p in model.parameters())
    for subnet in (space.smallest(), space.sample(0), space.sample(1)):
        model.zero_grad()
        model(torch.randn(4, 1, 28, 28), subnet).square().sum().backward()
        read = sum(int((p.grad != 0).sum()) for p in model.parameters() if p.grad is not None)
        key_biases = sum(c.heads * model.blocks[0].attn.head_dim for c in subnet)
        assert 0 <= vit.count_params(model, subnet) - read <= key_biases
    assert vit.count_params(model, [space.smallest(), space.largest()]) == [
        vit.count_params(model, space.smallest()),
        vit.count_params(model),
    ]


def test_sampled_subnets_cost_the_ratio_asked_for_and_differ():
    model = tiny_supernet(depth=4, keep_ratio_choices=(0.5, 0.75, 1.0))
    full = vit.count_macs(model)
    subnets = vit.flops.sample_subnets(model, 32, 0.6, rng=0, tolerance=0.05)
    ratios = [m / full for m in vit.count_macs(model, subnets)]
    assert all(abs(r - 0.6) <= 0.05 for r in ratios)
    assert any(r < 0.6 for r in ratios) and any(r > 0.6 for r in ratios)  # both sides of the target
    assert len(set(subnets)) > 8
    assert vit.flops.sample_subnets(model, 32, 0.6, rng=0, tolerance=0.05) == subnets  # seeded
    smallest = vit.count_macs(model, model.search_space.smallest()) / full
    with pytest.raises(ValueError, match="outside"):
        vit.flops.sample_subnets(model, 1, smallest - 0.02, tolerance=0.05)  # within tolerance, still unreachable
    with pytest.raises(ValueError, match="outside"):
        vit.flops.sample_subnets(model, 1, 1.02, tolerance=0.05)


@pytest.mark.parametrize("token_mode", ["merge", "prune_merge"])
def test_count_macs_of_the_official_merge_variant(token_mode):
    """Matching by hidden states costs C per pair instead of heads x head_dim: still exactly FlopCounterMode's count
    (per-sample packed execution: `test_packed_execution_computes_little_more_than_the_count`)."""
    model = tiny_supernet(token_mode, merge_variant="official", depth=3)
    subnets = reducing_subnets(model.search_space, 3)
    check_against_flop_counter(model, subnets, batch=2)
    tome = tiny_supernet(token_mode, depth=3)
    pairs = [(vit.count_macs(model, s), vit.count_macs(tome, s)) for s in [*subnets, model.search_space.smallest()]]
    assert all(a >= b for a, b in pairs) and any(a > b for a, b in pairs)  # C > heads x head_dim where fewer heads run

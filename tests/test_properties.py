"""Properties over the whole search space, checked on examples drawn by hypothesis: any subnet or per-sample mixture
of subnets gives finite logits of the right shape (and bucketing equals running each image alone), MACs never fall
when one block grows, and any valid action sequence ends the episode after its fixed number of steps with finite
rewards. Tiny supernets with several choices per field, built once per module."""

import functools

import gymnasium
import numpy as np
import pytest
import torch
from conftest import images, tiny_supernet
from hypothesis import given, settings
from hypothesis import strategies as st

import prance_env  # noqa: F401  (registers PranceViT-v1)
import vit

DEPTH = 3
RATIOS = (0.25, 0.5, 0.75, 1.0)
FAST = settings(max_examples=25, deadline=None)


@functools.cache
def supernet(token_mode: str) -> vit.ElasticViT:
    """A 3-block tiny supernet with four keep (and merge) ratios per block, parameters perturbed off their init."""
    model = tiny_supernet(token_mode, depth=DEPTH, keep_ratio_choices=RATIOS, merge_ratio_choices=RATIOS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@st.composite
def subnets(draw, space: vit.SearchSpace) -> vit.Subnet:
    """Any subnet of `space`: per block, one drawn index per field."""
    return space.from_indices(
        [tuple(draw(st.integers(0, n - 1)) for n in space.num_choices(i)) for i in range(space.depth)]
    )


token_modes = st.sampled_from(vit.TOKEN_MODES)


# --- the model ----------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), token_mode=token_modes, batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_any_subnet_gives_finite_logits_of_the_right_shape(data, token_mode, batch, seed):
    model = supernet(token_mode)
    subnet = data.draw(subnets(model.search_space))
    with torch.no_grad():
        logits = model(images(model, batch, seed), subnet)
    assert logits.shape == (batch, model.num_classes)
    assert torch.isfinite(logits).all()


@FAST
@given(data=st.data(), token_mode=token_modes, seed=st.integers(0, 2**16))
def test_any_per_sample_mixture_equals_each_image_alone(data, token_mode, seed):
    model = supernet(token_mode)
    mixture = data.draw(st.lists(subnets(model.search_space), min_size=1, max_size=5))
    x = images(model, len(mixture), seed)
    with torch.no_grad():
        packed = model(x, mixture)
        bucketed = model(x, mixture, layout="bucketed")
        consensus = model(x, model.search_space.consensus(mixture))
        alone = torch.cat([model(x[i : i + 1], s) for i, s in enumerate(mixture)])
    assert packed.shape == bucketed.shape == consensus.shape == (len(mixture), model.num_classes)
    assert torch.isfinite(packed).all() and torch.isfinite(consensus).all()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(bucketed, alone, atol=1e-5, rtol=0)


# --- MACs -----------------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), token_mode=token_modes)
def test_count_macs_never_falls_when_one_block_grows(data, token_mode):
    model = supernet(token_mode)
    space = model.search_space
    subnet = data.draw(subnets(space))
    block = data.draw(st.integers(0, space.depth - 1))
    field = data.draw(st.integers(0, len(space.fields) - 1))
    indices = [list(space.indices(i, b)) for i, b in enumerate(subnet)]
    largest = space.num_choices(block)[field] - 1
    if indices[block][field] == largest:
        indices[block][field] -= data.draw(st.integers(1, largest))  # grow from a smaller choice instead
    base = space.from_indices(indices)
    indices[block][field] = data.draw(st.integers(indices[block][field] + 1, largest))
    grown = space.from_indices(indices)
    assert vit.count_macs(model, grown) >= vit.count_macs(model, base), (space.fields[field], block, base, grown)


# --- PranceViT-v1 ---------------------------------------------------------------------------------------------------

ENV_CONFIGS = [
    dict(token_mode=mode, reward=reward, stem_blocks=stem, blocks_per_step=per_step, action_type=action)
    for mode in vit.TOKEN_MODES
    for reward in ("delta", "terminal")
    for stem, per_step in ((1, 1), (0, 1), (1, 2))
    for action in ("discrete", "continuous")
]


@pytest.fixture(scope="module")
def make_env(fmnist_dir):
    """PranceViT-v1 (single or vector) on the tiny supernet, one per configuration, built on first use."""

    @functools.cache
    def make(config: int, num_envs: int | None) -> gymnasium.Env:
        kwargs = dict(supernet=supernet(ENV_CONFIGS[config]["token_mode"]), data_dir=fmnist_dir, device="cpu")
        kwargs |= {k: v for k, v in ENV_CONFIGS[config].items() if k != "token_mode"}
        if num_envs is None:
            return gymnasium.make("PranceViT-v1", quality="logprob", **kwargs)
        return gymnasium.make_vec("PranceViT-v1", num_envs=num_envs, quality="logprob", **kwargs)

    return make


def actions(space: gymnasium.Space, nvec: tuple[int, ...], batch: int | None) -> st.SearchStrategy:
    """Valid actions: choice indices, or values in [-1, 1] for a Box; a leading batch dimension for a vector env."""
    if isinstance(space, gymnasium.spaces.MultiDiscrete):
        one = st.tuples(*(st.integers(0, n - 1) for n in nvec))
        dtype = np.int64
    else:
        one = st.tuples(*(st.floats(-1.0, 1.0, width=32) for _ in nvec))
        dtype = np.float32
    if batch is None:
        return one.map(lambda a: np.array(a, dtype=dtype))
    return st.lists(one, min_size=batch, max_size=batch).map(lambda a: np.array(a, dtype=dtype))


@FAST
@given(data=st.data(), config=st.integers(0, len(ENV_CONFIGS) - 1), num_envs=st.sampled_from([None, 3]))
def test_any_valid_action_sequence_ends_after_its_steps_with_finite_rewards(make_env, data, config, num_envs):
    env = make_env(config, num_envs)
    cfg = ENV_CONFIGS[config]
    codec = env.unwrapped.codec
    steps = (DEPTH - cfg["stem_blocks"]) // cfg["blocks_per_step"]
    assert codec.num_steps == steps
    space = env.single_action_space if num_envs else env.action_space
    strategy = actions(space, codec.nvec, num_envs)
    env.reset(seed=data.draw(st.integers(0, 2**16)))
    for t in range(1, steps + 1):
        obs, reward, terminated, truncated, info = env.step(data.draw(strategy))
        assert np.all(terminated == (t == steps)) and not np.any(truncated)
        assert np.all(np.isfinite(reward)) and (t == steps or cfg["reward"] != "terminal" or np.all(reward == 0))
        assert all(np.isfinite(v).all() for v in obs.values())
    model = env.unwrapped.model
    last = zip(info["subnet"], info["macs"]) if num_envs else [(info["subnet"], info["macs"])]
    for subnet, macs in last:
        assert macs == vit.count_macs(model, subnet)
    assert np.all((0 < np.asarray(info["flops_ratio"])) & (np.asarray(info["flops_ratio"]) <= 1))

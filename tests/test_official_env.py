"""The official meta-networks and selector in the package's MDP: `vit.inference.OfficialRunner`, the env with their
state, actions and reward, and `agents.AdaptiveViT` (random weights only: nothing downloads)."""

import argparse

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import images, official_on_random_weights, write_image_folder

import prance_env  # noqa: F401  (registers PranceViT-v1)
import vit
from agents import AdaptiveViT
from agents.official import OfficialSelector, run_official
from prance_env.mdp import ActionCodec
from vit import official
from vit.inference import DECISIONS, OfficialRunner, make_runner


def spread(selector: OfficialSelector, seed: int = 0) -> OfficialSelector:
    """The selector with its actor's means spread over (0, 1) (0.5 everywhere at the release's initialisation)."""
    with torch.no_grad():
        selector.actor.fc_mu.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        selector.actor.fc_mu.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return selector


@pytest.fixture(scope="module")
def tiny():
    """The T meta-network in each token mode, 10 classes, random weights with non-zero biases."""
    return {mode: official_on_random_weights(mode, num_classes=10) for mode in vit.TOKEN_MODES}


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_the_runner_runs_each_image_as_the_model_does_and_counts_its_macs(tiny, token_mode):
    model = tiny[token_mode]
    selector = spread(OfficialSelector(model))
    x = images(model, 4)
    runner = make_runner(model)
    assert isinstance(runner, OfficialRunner) and runner.schedule == DECISIONS["grouped"]
    state = runner.start(x)
    torch.testing.assert_close(runner.complete(state), model(x), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(
        (state.macs + runner.completion_macs(state)).numpy(), [official.count_macs(model)] * 4
    )
    obs = runner.observe(state, torch.ones(4))
    assert obs["cls"].shape == (4, 256) and obs["official_state"].shape == (4, official.STATE_DIM)
    while not state.done:
        block = runner.schedule.blocks(state.step).start
        state = runner.advance(state, selector.decide(runner.observe(state, torch.ones(4))["official_state"], block))
        subnets = [runner._padded(r) for r in state.subnets()]
        rest = runner.completion_macs(state)
        # spent so far plus the reference rest is the count of the subnet completed at the reference
        np.testing.assert_array_equal((state.macs + rest).numpy(), official.count_macs(model, subnets))
    subnets = [vit.Subnet(c) for c in state.subnets()]
    assert len(set(subnets)) > 1
    np.testing.assert_array_equal(state.macs.numpy(), official.count_macs(model, subnets))
    torch.testing.assert_close(runner.complete(state), model(x, subnets), atol=1e-5, rtol=0)
    assert state.tokens.num_patches().tolist() == [
        official.token_counts(s, model.num_tokens, token_mode)[-1][2] - 1 for s in subnets
    ]


def test_the_runner_takes_the_releases_decision_blocks_only(tiny):
    model = tiny["prune"]
    with pytest.raises(ValueError, match="decides at blocks"):
        make_runner(model, DECISIONS["per-block"])
    with pytest.raises(ValueError, match="its own token mode"):
        OfficialRunner(model, token_mode="merge")
    runner = make_runner(model, DECISIONS["one-shot"])
    state = runner.start(images(model, 2))
    with pytest.raises(vit.InvalidSubnetError, match="embed_dim=100"):
        runner.advance(state, [model.search_space.block(100, 2)] * 2)


def test_the_codec_decodes_the_releases_actions_and_rejects_bad_ones(tiny):
    space = tiny["prune_merge"].search_space
    codec = ActionCodec(DECISIONS["grouped"], space, "official")
    assert codec.space.shape == (8,) and codec.fields[0] == "mlp_ratio[0]" and codec.fields[-1] == "merge_ratio[0]"
    action = np.array([0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.25, 0.75])
    (configs,) = codec.decode(0, action)
    assert [(c.embed_dim, space.ratio(c)) for c in configs] == [(240, 2), (216, 4), (176, 6)]  # round(1.5) = 2
    assert (configs[0].keep_ratio, configs[0].merge_ratio) == (0.25, 0.75) and configs[1].keep_ratio == 1.0
    with pytest.raises(ValueError, match=r"mlp_ratio\[0\] value 1.5: official actions must lie in \[0, 1\]"):
        codec.decode(0, np.r_[1.5, action[1:]])
    with pytest.raises(ValueError, match="NaN"):
        codec.decode(0, np.r_[np.nan, action[1:]])
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        codec.decode(0, action[:7])
    with pytest.raises(ValueError, match="no action masks"):
        codec.masks(np.array([5]))
    with pytest.raises(ValueError, match="official meta-network"):
        ActionCodec(DECISIONS["grouped"], vit.create_supernet("prance_fmnist").search_space, "official")
    with pytest.raises(ValueError, match="official meta-network"):
        ActionCodec(DECISIONS["one-shot"], space, "official")
    discrete = ActionCodec(DECISIONS["grouped"], space)  # an SB3 agent's MultiDiscrete choices
    assert discrete.nvec == (4, 3, 4, 3, 4, 3, 10, 10)
    assert discrete.decode(2, np.array(discrete.nvec) - 1) == [tuple(space.largest()[9:])]


@pytest.mark.parametrize("snap, protocol", [(None, "per-image"), ("batch-mean", "batch-mean")])
def test_adaptive_vit_runs_the_official_pair_as_the_release_decides(tiny, snap, protocol):
    model = tiny["prune"]
    selector = spread(OfficialSelector(model))
    x = images(model, 5)
    adaptive = AdaptiveViT(model, selector, snap=snap)
    logits, macs, decisions = adaptive(x, return_decisions=True)
    expected, subnets = run_official(model, selector, x, protocol)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    assert decisions.subnets == subnets and decisions.indices.shape == (5, 3, 7)
    np.testing.assert_allclose(macs.numpy(), official.count_macs(model, subnets), rtol=1e-6)
    assert (len(set(subnets)) == 1) == (protocol == "batch-mean")
    with pytest.raises(ValueError, match="snap='batch-mean' or None"):
        AdaptiveViT(model, selector, snap="prototypes")


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """An ImageFolder of 224-px images (3 classes) and a random T meta-network's `checkpoint.pth`."""
    root = tmp_path_factory.mktemp("official")
    data = write_image_folder(root / "data", 3, {"train": 2, "val": 1}, 224)
    model = official.create_official("tiny", num_classes=3)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-3)}, root / "checkpoint.pth")
    return data, root / "checkpoint.pth"


def make_env(official_files, **kwargs):
    data, checkpoint = official_files
    settings = dict(supernet="prance_official_tiny", checkpoint=checkpoint, data="imagefolder", data_dir=data)
    settings |= dict(num_classes=3, decisions="grouped", device="cpu")
    return gym.make("PranceViT-v1", **(settings | kwargs))


def test_the_env_runs_the_official_pair_with_their_state_actions_and_reward(official_files):
    env = make_env(official_files, official_state=True, action_type="official", reward="official")
    model = env.unwrapped.model
    selector = spread(OfficialSelector(model))
    assert env.action_space == selector.action_space
    assert env.observation_space["official_state"].shape == (197,)
    obs, _ = env.reset(seed=0)
    x, y = env.unwrapped.source.get(np.array([env.unwrapped.index]))
    full = int(model(x).argmax())
    done, blocks = False, 3
    while not done:
        action, _ = selector.predict(obs)
        keep = float(np.clip(action[-1], 0, 1))
        obs, reward, done, _, info = env.step(action)
        # the release's reward, on the subnet run so far completed at the reference
        completed = vit.Subnet((*info["subnet"][: blocks + 3], *model.search_space.largest()[blocks + 3 :]))
        pred = int(model(x, completed).argmax())
        accuracy = float(pred == int(y) or full != int(y))
        expected = accuracy - 0.008 * official.get_complexity(model, completed) / 1e8 - 0.1 * keep
        assert reward == pytest.approx(expected, abs=1e-9)
        blocks += 3
    _, (subnet,) = run_official(model, selector, x)
    assert info["subnet"] == subnet and info["pred"] == int(model(x, subnet).argmax())
    assert info["macs"] == official.count_macs(model, subnet)


def test_the_env_runs_discrete_grouped_decisions_on_an_official_meta_network(official_files):
    env = make_env(official_files)
    assert "official_state" not in env.observation_space.spaces
    assert env.observation_space["cls"].shape == (256,)
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    total, done = 0.0, False
    while not done:  # every field at its largest choice: the full model, no reward lost (delta)
        obs, reward, done, _, info = env.step(env.action_space.nvec - 1)
        total += reward
    assert total == pytest.approx(0.0, abs=1e-9) and info["subnet"] == env.unwrapped.model.search_space.largest()
    obs, _ = env.reset(seed=2)
    obs, *_ = env.step(np.zeros_like(env.action_space.nvec))
    assert obs["progress"][2] < 0.2  # keep 0.1 at block 3


def test_the_env_says_what_an_official_run_needs(official_files):
    data, _ = official_files
    with pytest.raises(ValueError, match="no weights shipped here: pass checkpoint="):
        gym.make("PranceViT-v1", supernet="prance_official_tiny", data="imagefolder", data_dir=data)
    with pytest.raises(ValueError, match="decides at blocks"):
        make_env(official_files, decisions="per-block")
    with pytest.raises(ValueError, match="needs an official meta-network"):
        gym.make("PranceViT-v1", official_state=True, device="cpu")


def test_supernet_training_trains_an_official_meta_network_on_its_subnets(official_files, tmp_path):
    from vit.train import TrainConfig, train_supernet

    data, _ = official_files
    cfg = TrainConfig(
        supernet="prance_official_tiny",
        token_mode="prune_merge",
        data="imagefolder",
        data_dir=str(data),
        out=str(tmp_path),
        epochs=1,
        batch_size=2,
        steps_per_epoch=2,
        eval_batches=1,
        num_random=1,
        largest_only_epochs=0,
        decisions="grouped",
        device="cpu",
        workers=0,
    )
    given = official.create_official("tiny", token_mode="prune_merge", num_classes=3)
    before = {k: v.clone() for k, v in given.state_dict().items()}
    model = train_supernet(cfg, model=given)
    assert isinstance(model, official.OfficialViT) and model.num_classes == 3
    loaded = vit.create_supernet("prance_official_tiny", checkpoint=tmp_path / "supernet.safetensors")
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    assert not torch.equal(model.blocks[4].fc1.weight, before["blocks.4.fc1.weight"])  # a decided block trained
    with pytest.raises(ValueError, match="no stochastic depth"):
        train_supernet(TrainConfig(**{**cfg.__dict__, "drop_path": 0.1}))

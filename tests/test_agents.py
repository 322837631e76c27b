"""agents: the CLS features extractor under SB3 algorithms, selector files, baselines, AdaptiveViT against the env
image by image, calibration, and selector training end to end. Tiny supernets on a generated Fashion-MNIST folder."""

import ast
import copy
import dataclasses
import json
import math
import os
import shutil
import stat
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import stable_baselines3.common.logger
import torch
from conftest import images, tiny_supernet, write_image_folder
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_env import PRICE, supernet
from torch import nn

import agents
import prance_env
import vit
from agents import (
    AdaptiveViT,
    CLSFeaturesExtractor,
    FullModelPolicy,
    RandomPolicy,
    StaticPolicy,
    UniformMergePolicy,
)
from agents.prototypes import snap_to_mean, snap_to_prototypes
from agents.selector import supernet_signature
from vit.token_ops import kept_tokens

N = 8  # sub-envs
HIDDEN = 32  # the extractor's MLP width in the trained model


def make_venv(data_dir, model: vit.ElasticViT | None = None, num_envs: int = N, **kwargs) -> prance_env.SB3VecEnv:
    """The SB3 adapter over `gymnasium.make_vec("PranceViT-v1", ...)` on a tiny supernet and the generated data."""
    envs = gymnasium.make_vec(
        "PranceViT-v1",
        num_envs=num_envs,
        supernet=supernet() if model is None else model,
        data="fashion-mnist",
        data_dir=data_dir,
        device="cpu",
        **kwargs,
    )
    return prance_env.to_sb3(envs)


def make_env(data_dir, model: vit.ElasticViT, **kwargs) -> prance_env.PranceViTEnv:
    """The single env over `model` and the generated test split."""
    return prance_env.PranceViTEnv(
        supernet=model, data="fashion-mnist", data_dir=data_dir, split="test", device="cpu", **kwargs
    )


def extractor_kwargs(**kwargs) -> dict:
    return dict(features_extractor_class=CLSFeaturesExtractor, **kwargs)


def parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())


@pytest.fixture(scope="module")
def trained(fmnist_dir):
    """A PPO selector with the CLS extractor, trained for 128 steps; its venv and its parameters before training."""
    venv = make_venv(fmnist_dir)
    venv.seed(0)
    model = PPO(
        "MultiInputPolicy",
        venv,
        n_steps=8,
        batch_size=32,
        n_epochs=2,
        seed=0,
        device="cpu",
        policy_kwargs=extractor_kwargs(features_extractor_kwargs=dict(hidden=HIDDEN)),
    )
    before = parameters(model)
    model.learn(128)
    return model, venv, before


# --- the CLS features extractor under PPO, save/load ------------------------------------------------------------------


def test_ppo_trains_the_cls_extractor(trained):
    model, venv, before = trained
    assert model.num_timesteps >= 128
    assert changed(before, model)
    extractor = model.policy.features_extractor
    assert isinstance(extractor, CLSFeaturesExtractor)
    assert extractor.features_dim == HIDDEN + 3 + 1
    norms = [m for m in extractor.modules() if isinstance(m, nn.LayerNorm)]
    assert [m.normalized_shape for m in norms] == [(venv.envs.model.embed_dim,)]


def test_extractor_normalises_cls_and_passes_progress_and_price(trained):
    model, venv, _ = trained
    extractor = model.policy.features_extractor
    obs = {k: torch.as_tensor(v) for k, v in venv.reset().items()}
    with torch.no_grad():
        features = extractor(obs)
        rescaled = extractor({**obs, "cls": 3.0 * obs["cls"] + 1.0})  # LayerNorm: invariant to scale and shift
    assert features.shape == (N, HIDDEN + 4)
    torch.testing.assert_close(rescaled, features, atol=1e-4, rtol=0)
    torch.testing.assert_close(features[:, HIDDEN:], torch.cat([obs["progress"], obs["price"]], dim=1))


def test_save_load_gives_the_same_deterministic_actions(trained, tmp_path):
    model, venv, _ = trained
    model.save(tmp_path / "ppo")
    loaded = PPO.load(tmp_path / "ppo", device="cpu")
    assert isinstance(loaded.policy.features_extractor, CLSFeaturesExtractor)
    obs = venv.reset()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_selector_files_round_trip(trained, tmp_path):
    model, venv, _ = trained
    settings = {"algo": "ppo", "signature": supernet_signature(venv.envs.model), "env": {"stem_blocks": 1}}
    path = agents.save_selector(model, tmp_path / "run" / "selector", settings)
    assert path == tmp_path / "run" / "selector.zip" and path.is_file()
    assert (tmp_path / "run" / "selector.json").is_file()
    loaded, read = agents.load_selector(tmp_path / "run" / "selector.zip", venv.envs.model, device="cpu")
    assert isinstance(loaded, PPO) and read == settings
    obs = venv.reset()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize(
    "other, difference",
    [
        (lambda: tiny_supernet(depth=4, embed_dim=32, mlp_hidden_choices=(64, 128)), "embed_dim"),
        (lambda: tiny_supernet(token_mode="prune", depth=4), "token_mode"),
        (lambda: tiny_supernet(depth=3), "depth"),
        (lambda: tiny_supernet(depth=4, keep_ratio_choices=(0.25, 1.0)), "choices"),
    ],
)
def test_loading_a_selector_onto_another_supernet_names_the_difference(trained, tmp_path, other, difference):
    model, venv, _ = trained
    settings = {"algo": "ppo", "signature": supernet_signature(venv.envs.model)}
    agents.save_selector(model, tmp_path / "selector", settings)
    with pytest.raises(ValueError, match=difference):
        agents.load_selector(tmp_path / "selector", other(), device="cpu")


def test_missing_selector_files_raise(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="selector.zip"):
        agents.load_selector(tmp_path / "selector")
    with pytest.raises(FileNotFoundError, match="selector.json"):
        agents.load_adaptive(tmp_path / "selector", device="cpu")
    model, venv, _ = trained
    model.save(tmp_path / "selector.zip")  # the model without its settings
    with pytest.raises(FileNotFoundError, match="selector.json"):
        agents.load_selector(tmp_path / "selector")


# --- other algorithms on the same env ---------------------------------------------------------------------------------


def test_algorithm_names():
    assert agents.algorithm("ppo") is PPO and agents.algorithm("a2c") is A2C
    with pytest.raises(ValueError, match="unknown algo"):
        agents.algorithm("dqn")


def test_a2c_trains_with_the_extractor_at_its_default_width(fmnist_dir):
    venv = make_venv(fmnist_dir)
    model = agents.algorithm("a2c")(
        "MultiInputPolicy", venv, n_steps=3, seed=0, device="cpu", policy_kwargs=extractor_kwargs()
    )
    before = parameters(model)
    model.learn(2 * 3 * N)
    assert changed(before, model)
    assert model.policy.features_extractor.features_dim == 128 + 3 + 1


def test_maskable_ppo_reads_action_masks_through_the_adapter(fmnist_dir):
    # keep ratio 0.01 leaves one patch token of 49: after it, only keep ratio 1.0 is valid
    model = tiny_supernet(depth=3, keep_ratio_choices=(0.01, 1.0))
    venv = make_venv(fmnist_dir, model)
    nvec = venv.action_space.nvec
    venv.reset()
    masks = get_action_masks(venv)
    assert masks.shape == (N, sum(nvec)) and masks.all()
    spent = np.arange(N) < N // 2
    venv.step(np.stack([[1, 1, 0 if s else 1] for s in spent]))
    np.testing.assert_array_equal(venv.envs.episodes.inference.tokens.num_patches().numpy(), np.where(spent, 1, 49))
    masks = get_action_masks(venv)
    assert masks.shape == (N, sum(nvec))
    assert masks[~spent].all() and masks[spent, : nvec[0] + nvec[1]].all()
    np.testing.assert_array_equal(masks[spent, nvec[0] + nvec[1] :], [[False, True]] * (N // 2))

    ppo = agents.algorithm("maskable_ppo")(
        "MultiInputPolicy",
        venv,
        n_steps=4,
        batch_size=16,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=extractor_kwargs(),
    )
    ppo.learn(2 * 4 * N)
    venv.reset()
    obs, *_ = venv.step(np.stack([[1, 1, 0 if s else 1] for s in spent]))
    for _ in range(5):
        actions, _ = ppo.predict(obs, action_masks=get_action_masks(venv), deterministic=False)
        assert np.all(actions[spent, 2] == 1)


def test_recurrent_ppo_trains_and_runs_in_adaptive_vit(fmnist_dir):
    venv = make_venv(fmnist_dir)
    model = agents.algorithm("recurrent_ppo")(
        "MultiInputLstmPolicy",
        venv,
        n_steps=4,
        batch_size=16,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=extractor_kwargs(lstm_hidden_size=16),
    )
    before = parameters(model)
    model.learn(2 * 4 * N)
    assert changed(before, model)
    adaptive = AdaptiveViT(venv.envs.model, model, price=PRICE)
    images, _ = venv.envs.source.get(np.arange(6))
    logits, macs = adaptive(images)
    assert logits.shape == (6, 10) and torch.isfinite(logits).all()
    assert torch.all(macs <= adaptive.full_macs) and torch.all(macs > 0)


LEARNING_PRICE = 1.0  # so dear that the cheapest subnets win: what a selector learns first


def held_out_return(model: vit.ElasticViT, policy, test: list) -> float:
    """The final result a policy reaches on held-out images at `LEARNING_PRICE`: the mean log-probability of the
    true class (the env's quality) less the price times the mean MACs ratio."""
    result = agents.measure(AdaptiveViT(model, policy, price=LEARNING_PRICE), test)
    return result["logprob"] - LEARNING_PRICE * result["flops_ratio"]


@pytest.mark.parametrize("algo", ["ppo", "a2c", "recurrent_ppo"])
def test_selectors_learn_to_beat_random_decisions_at_a_fixed_price(fmnist_dir, algo):
    """Trained for 960 env steps at a fixed price, a selector beats random decisions on the held-out images by more
    than 0.1 of held-out return with either seed; untrained, it does not."""
    model = supernet()
    test = vit.train.held_out_batches("fashion-mnist", fmnist_dir, model, None, 48, torch.device("cpu"))
    settings = {
        "ppo": dict(n_steps=6, batch_size=48, n_epochs=4),
        "a2c": dict(n_steps=3),
        "recurrent_ppo": dict(n_steps=6, batch_size=48, n_epochs=4),
    }[algo]
    policy_kwargs = extractor_kwargs(**(dict(lstm_hidden_size=16) if algo == "recurrent_ppo" else {}))
    for seed in (0, 1):
        venv = make_venv(fmnist_dir, model, price=LEARNING_PRICE)
        venv.seed(seed)
        policy = "MultiInputLstmPolicy" if algo == "recurrent_ppo" else "MultiInputPolicy"
        selector = agents.algorithm(algo)(
            policy, venv, learning_rate=3e-3, seed=seed, device="cpu", policy_kwargs=policy_kwargs, **settings
        )
        random = held_out_return(model, RandomPolicy(venv.action_space.nvec, seed=seed), test)
        assert held_out_return(model, selector, test) < random + 0.1  # untrained, it does not
        selector.learn(960)
        assert held_out_return(model, selector, test) > random + 0.1, seed


# --- AdaptiveViT against the env, image by image ----------------------------------------------------------------------


class ImagePolicy:
    """A deterministic policy that reads the CLS token, so images get different subnets: at the first step, field k
    takes its largest choice where the CLS token lies above `centre` along axis k, else its smallest; later steps
    take their smallest choices."""

    def __init__(self, nvec, centre: np.ndarray) -> None:
        self.nvec, self.centre = np.asarray(nvec), np.asarray(centre)[: len(nvec)]

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        cls = np.asarray(observation["cls"])[..., : len(self.nvec)]
        first = np.asarray(observation["progress"])[..., :1] == 0.0
        return np.where(first & (cls > self.centre), self.nvec - 1, 0), state

    @classmethod
    def for_images(cls, model: vit.ElasticViT, images: torch.Tensor, nvec) -> "ImagePolicy":
        """Centred on the mean first CLS token of `images`, so about half of them fall on either side."""
        mdp = prance_env.BatchedMDP(model, prance_env.MDPConfig(reward="terminal"))
        centre = mdp.observe(mdp.reset(images, torch.zeros(len(images), dtype=torch.long)))["cls"].mean(0)
        return cls(nvec, centre.numpy())


def make_policy(name: str, nvec, trained_model, model, images):
    return {
        "ppo": lambda: trained_model,
        "static": lambda: StaticPolicy(nvec, [0, -1, 0]),
        "uniform_merge": lambda: UniformMergePolicy(nvec, 0),
        "full": lambda: FullModelPolicy(nvec),
        "image": lambda: ImagePolicy.for_images(model, images, nvec),
    }[name]()


def single_env_episode(env: prance_env.PranceViTEnv, policy, index: int, price: float) -> dict:
    """The last info of the episode of image `index` at `price` under `policy`'s deterministic actions."""
    obs, _ = env.reset(options={"index": index, "price": price})
    done = False
    while not done:
        action, _ = policy.predict(obs, deterministic=True)
        obs, _, done, _, info = env.step(action)
    return info


@pytest.mark.parametrize("name", ["ppo", "static", "uniform_merge", "full", "image"])
def test_adaptive_vit_matches_the_single_env_image_by_image(trained, fmnist_dir, name):
    model = trained[1].envs.model
    env = make_env(fmnist_dir, model)
    indices = np.arange(12)
    images, _ = env.source.get(indices)
    policy = make_policy(name, env.action_space.nvec, trained[0], model, images)
    price = 0.05
    logits, macs, decisions = AdaptiveViT(model, policy)(images, price=price, return_decisions=True)
    assert logits.shape == (len(indices), 10) and macs.shape == (len(indices),)
    steps = model.depth - 1  # the registered shape: one stem block, one block per decision
    assert decisions.indices.shape == (len(indices), steps, len(env.action_space.nvec))
    bucketed_logits, bucketed_macs = AdaptiveViT(model, policy, price=price, layout="bucketed")(images)
    torch.testing.assert_close(bucketed_logits, logits, atol=1e-5, rtol=0)
    assert torch.equal(bucketed_macs, macs)
    subnets = []
    for i in indices:
        info = single_env_episode(env, policy, int(i), price)
        subnets.append(info["subnet"])
        assert decisions.subnets[i] == vit.Subnet(info["subnet"])  # the env decides as the deployed model
        assert int(decisions.tokens[i]) == int(info["tokens"])
        space = model.search_space
        assert [space.config(1 + t, row) for t, row in enumerate(decisions.indices[i].tolist())] == list(
            info["subnet"][1:]
        )
        assert int(logits[i].argmax()) == info["pred"]
        assert float(macs[i]) == info["macs"] == vit.count_macs(model, info["subnet"])
        with torch.no_grad():
            alone = model(images[i : i + 1], subnet=info["subnet"])[0]
        torch.testing.assert_close(logits[i], alone, atol=1e-5, rtol=0)
    if name == "image":
        assert len(set(subnets)) > 1  # the batch was bucketed over several subnets


def test_adaptive_vit_decodes_continuous_actions_as_the_env_does(trained, fmnist_dir):
    model = trained[1].envs.model
    venv = make_venv(fmnist_dir, model, action_type="continuous")
    ppo = PPO(
        "MultiInputPolicy",
        venv,
        n_steps=4,
        batch_size=16,
        n_epochs=1,
        seed=0,
        device="cpu",
        policy_kwargs=extractor_kwargs(features_extractor_kwargs=dict(hidden=HIDDEN)),
    )
    ppo.learn(2 * 4 * N)
    env = make_env(fmnist_dir, model, action_type="continuous")
    images, _ = env.source.get(np.arange(6))
    logits, macs = AdaptiveViT(model, ppo, price=PRICE)(images)
    for i in range(6):
        info = single_env_episode(env, ppo, i, PRICE)
        assert int(logits[i].argmax()) == info["pred"] and float(macs[i]) == info["macs"]


def test_full_model_policy_gives_the_full_model(trained):
    model = trained[1].envs.model
    images, _ = trained[1].envs.source.get(np.arange(10))
    adaptive = AdaptiveViT(model, FullModelPolicy(trained[1].action_space.nvec))
    logits, macs = adaptive(images)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), atol=1e-5, rtol=0)
    assert adaptive.full_macs == vit.count_macs(model)
    assert torch.all(macs == vit.count_macs(model))


def test_consensus_is_one_prototype_and_runs_one_subnet_for_the_batch(trained):
    model = trained[1].envs.model
    nvec = trained[1].action_space.nvec
    images, _ = trained[1].envs.source.get(np.arange(12))
    policy = ImagePolicy.for_images(model, images, nvec)
    _, _, bucketed = AdaptiveViT(model, policy)(images, return_decisions=True)
    assert len(set(bucketed.subnets)) > 1
    with pytest.warns(DeprecationWarning, match="layout= and snap="):
        consensus = AdaptiveViT(model, policy, execution="consensus")
    assert (consensus.layout, consensus.snap, consensus.prototypes) == ("packed", "prototypes", 1)
    logits, macs, decisions = consensus(images, return_decisions=True)
    chosen = set(decisions.subnets)
    assert len(chosen) == 1
    subnet = chosen.pop()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images, subnet=subnet), atol=1e-5, rtol=0)
    assert torch.all(macs == vit.count_macs(model, subnet))
    with pytest.raises(ValueError, match="unknown snap 'per_sample'"):
        AdaptiveViT(model, policy, snap="per_sample")


# --- execution modes: K prototypes per batch, bf16 weights ------------------------------------------------------------


def modes_supernet() -> vit.ElasticViT:
    """A tiny supernet of 4 blocks (3 decisions) with 2 x 2 x 3 choices per decision, its parameters perturbed so
    that images differ; a random batch holds many of its 12 configurations at every step."""
    model = tiny_supernet(depth=4, keep_ratio_choices=(0.5, 0.75, 1.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


class Recorded:
    """A policy that keeps the actions its wrapped policy returns, step by step."""

    def __init__(self, policy) -> None:
        self.policy, self.actions = policy, []

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        actions, state = self.policy.predict(observation, state, episode_start, deterministic)
        self.actions.append(torch.as_tensor(np.array(actions)))
        return actions, state


def test_snapping_keeps_at_most_k_prototypes_each_row_moving_to_its_nearest():
    g = torch.Generator().manual_seed(0)
    for B in (1, 2, 7, 64):
        rows = torch.stack([torch.randint(0, n, (B,), generator=g) for n in (4, 4, 5)], 1)
        distinct = len(rows.unique(dim=0))
        assert torch.equal(snap_to_prototypes(rows, 1), rows.median(dim=0).values.expand(B, -1))  # the lower median
        assert torch.equal(snap_to_prototypes(rows, distinct), rows)
        for k in (2, 3, 5):
            snapped = snap_to_prototypes(rows, k)
            prototypes = snapped.unique(dim=0)
            assert len(prototypes) <= k and snapped.dtype == rows.dtype
            if k < distinct:
                assert not torch.equal(snapped, rows)
            # every row moved to a prototype at the least L1 distance from it
            distance = (rows[:, None] - prototypes[None]).abs().sum(2)
            assert torch.equal((rows - snapped).abs().sum(1), distance.min(1).values)
            order = torch.randperm(B, generator=g)  # the images' order does not change the prototypes
            assert torch.equal(snap_to_prototypes(rows[order], k), snapped[order])
    with pytest.raises(ValueError, match="at least 1"):
        snap_to_prototypes(rows, 0)


def test_one_prototype_is_the_consensus_of_the_batch():
    model = modes_supernet()
    x = images(model, 12)
    nvec = model.search_space.num_choices(1)
    policy = Recorded(RandomPolicy(nvec, seed=0))
    logits, macs, decisions = AdaptiveViT(model, policy, snap="prototypes", prototypes=1)(x, return_decisions=True)
    assert len(policy.actions) == decisions.indices.shape[1] == 3
    for t, actions in enumerate(policy.actions):
        assert len(actions.unique(dim=0)) > 1  # the policy's own choices differ between images
        median = actions.median(dim=0).values  # per field the lower median choice: what consensus has always run
        assert (decisions.indices[:, t] == median).all()
    (subnet,) = set(decisions.subnets)
    torch.testing.assert_close(logits, model(x, subnet), atol=1e-5, rtol=0)
    assert torch.all(macs == vit.count_macs(model, subnet))


def test_the_official_protocol_runs_the_batch_mean_choice_rounded_for_every_image():
    rows = torch.tensor([[0, 3, 1], [1, 3, 4], [1, 0, 2], [3, 1, 2]])  # means 1.25, 1.75, 2.25
    assert torch.equal(snap_to_mean(rows), torch.tensor([[1, 2, 2]]).expand(4, -1))
    assert torch.equal(snap_to_mean(torch.tensor([[0, 1], [1, 2]])), torch.tensor([[1, 2], [1, 2]]))  # halves up
    model = modes_supernet()
    x = images(model, 12)
    nvec = model.search_space.num_choices(1)
    policy = Recorded(RandomPolicy(nvec, seed=0))
    logits, macs, decisions = AdaptiveViT(model, policy, snap="batch-mean")(x, return_decisions=True)
    for t, actions in enumerate(policy.actions):
        assert len(actions.unique(dim=0)) > 1
        assert (decisions.indices[:, t] == torch.floor(actions.double().mean(0) + 0.5).long()).all()
    (subnet,) = set(decisions.subnets)
    torch.testing.assert_close(logits, model(x, subnet), atol=1e-5, rtol=0)
    assert torch.all(macs == vit.count_macs(model, subnet))


def test_as_many_prototypes_as_decisions_run_the_packed_decisions():
    model = modes_supernet()
    x = images(model, 16)
    nvec = model.search_space.num_choices(1)
    packed = AdaptiveViT(model, RandomPolicy(nvec, seed=0))(x, return_decisions=True)
    k = int(np.prod(nvec))  # as many as there are configurations: nothing to snap
    logits, macs, decisions = AdaptiveViT(model, RandomPolicy(nvec, seed=0), snap="prototypes", prototypes=k)(
        x, return_decisions=True
    )
    assert torch.equal(decisions.indices, packed[2].indices) and decisions.subnets == packed[2].subnets
    assert len(set(decisions.subnets)) > 8  # per-image decisions, not a handful
    torch.testing.assert_close(logits, packed[0], atol=1e-5, rtol=0)
    assert torch.equal(macs, packed[1])


@pytest.mark.parametrize("k", [2, 3])
def test_prototypes_run_at_most_k_configurations_per_step_and_return_them(k):
    model = modes_supernet()
    x = images(model, 16)
    nvec = model.search_space.num_choices(1)
    policy = Recorded(RandomPolicy(nvec, seed=0))
    adaptive = AdaptiveViT(model, policy, snap="prototypes", prototypes=k)
    logits, macs, decisions = adaptive(x, return_decisions=True)
    runs = [{s[1 + t] for s in decisions.subnets} for t in range(3)]  # the configurations each step ran
    assert [len(r) for r in runs] == [len(decisions.indices[:, t].unique(dim=0)) for t in range(3)]
    assert all(len(r) <= k for r in runs) and max(len(r) for r in runs) == k
    for t, actions in enumerate(policy.actions):
        assert len(actions.unique(dim=0)) > k  # the policy asked for more
        assert torch.equal(decisions.indices[:, t], snap_to_prototypes(actions, k))
    assert len(set(decisions.subnets)) > k  # over the steps, images still take different paths
    # the decisions returned are the ones that ran, image by image
    torch.testing.assert_close(logits, model(x, decisions.subnets), atol=1e-5, rtol=0)
    assert macs.tolist() == [float(m) for m in vit.count_macs(model, decisions.subnets)]
    with pytest.raises(ValueError, match="prototypes must be at least 1"):
        AdaptiveViT(model, policy, snap="prototypes", prototypes=0)


@pytest.mark.parametrize("layout, snap", [("packed", None), ("bucketed", None), ("packed", "prototypes")])
def test_bf16_weights_give_float32_logits_and_the_fp32_predictions(layout, snap):
    model = modes_supernet()
    x = images(model, 32)
    nvec = model.search_space.num_choices(1)
    settings = dict(layout=layout, snap=snap, prototypes=3)
    fp32 = AdaptiveViT(model, RandomPolicy(nvec, seed=0), **settings)
    bf16 = AdaptiveViT(copy.deepcopy(model), RandomPolicy(nvec, seed=0), **settings)
    bf16.to(torch.bfloat16)
    assert bf16.supernet.pos_embed.dtype == torch.bfloat16 and model.pos_embed.dtype == torch.float32
    expected, expected_macs, decisions = fp32(x, return_decisions=True)
    logits, macs, bf16_decisions = bf16(x, return_decisions=True)  # float32 images, cast on entry
    assert logits.dtype == torch.float32 and macs.dtype == torch.float32
    assert torch.equal(bf16_decisions.indices, decisions.indices) and torch.equal(macs, expected_macs)
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 rounding, not another model
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    assert not torch.equal(logits, expected)  # it did run in bf16


# --- baselines --------------------------------------------------------------------------------------------------------

NVEC = np.array([2, 4, 5])


def observation(batch: int | None = None) -> dict[str, np.ndarray]:
    shape = () if batch is None else (batch,)
    return {
        "cls": np.ones((*shape, 16), np.float32),
        "progress": np.zeros((*shape, 3), np.float32),
        "price": np.zeros((*shape, 1), np.float32),
    }


@pytest.mark.parametrize(
    "policy",
    [StaticPolicy(NVEC, [0, 1, 2]), FullModelPolicy(NVEC), UniformMergePolicy(NVEC, 1), RandomPolicy(NVEC, seed=0)],
    ids=["static", "full", "uniform_merge", "random"],
)
def test_baselines_follow_the_sb3_predict_signature(policy):
    state = object()
    single = policy.predict(observation(), state, None, deterministic=True)
    assert isinstance(single, tuple) and len(single) == 2 and single[1] is state
    assert single[0].shape == (3,) and np.all((0 <= single[0]) & (single[0] < NVEC))
    actions, no_state = policy.predict(observation(5))
    assert no_state is None and actions.shape == (5, 3) and np.all((0 <= actions) & (actions < NVEC))
    assert gymnasium.spaces.MultiDiscrete(NVEC).contains(single[0])


def test_static_policies():
    np.testing.assert_array_equal(StaticPolicy(NVEC, [-1, 0, -2]).predict(observation())[0], [1, 0, 3])
    np.testing.assert_array_equal(FullModelPolicy(NVEC).predict(observation(2))[0], [[1, 3, 4]] * 2)
    np.testing.assert_array_equal(UniformMergePolicy(NVEC, 2).predict(observation(2))[0], [[1, 3, 2]] * 2)
    np.testing.assert_array_equal(UniformMergePolicy([2, 4, 5, 5], 1).predict(observation())[0], [1, 3, 1, 1])
    grouped = ("heads[0]", "mlp_hidden[0]", "heads[1]", "mlp_hidden[1]", "keep_ratio[0]", "merge_ratio[0]")
    policy = UniformMergePolicy([2, 4, 2, 4, 5, 5], 1, fields=grouped)
    np.testing.assert_array_equal(policy.predict(observation())[0], [1, 3, 1, 3, 1, 1])
    with pytest.raises(ValueError, match="expected 3 field names"):
        UniformMergePolicy(NVEC, 1, fields=("heads", "keep_ratio"))
    with pytest.raises(ValueError, match="expected 3 indices"):
        StaticPolicy(NVEC, [0, 0])
    policy = StaticPolicy(NVEC, [0, 1, 2])
    policy.predict(observation(2))[0][:] = 0  # the caller's copy, not the policy's action
    np.testing.assert_array_equal(policy.predict(observation())[0], [0, 1, 2])


def test_random_policy_is_seeded():
    a, b, c = (RandomPolicy(NVEC, seed=s).predict(observation(64))[0] for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for field, n in enumerate(NVEC):
        assert set(a[:, field]) == set(range(n))


# --- calibration and measurement --------------------------------------------------------------------------------------


class PricePolicy:
    """Every field's index falls from the largest to 0 as the log-price rises over [0.01, 1]."""

    def __init__(self, nvec) -> None:
        self.nvec = np.asarray(nvec)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        price = np.asarray(observation["price"])[..., :1]
        t = np.clip((price - math.log(0.01)) / (math.log(1.0) - math.log(0.01)), 0.0, 1.0)
        return np.rint((1.0 - t) * (self.nvec - 1)).astype(np.int64), state


@pytest.fixture(scope="module")
def price_setup(fmnist_dir):
    model = tiny_supernet(depth=4, keep_ratio_choices=(0.25, 0.5, 0.75, 1.0))
    data = vit.load_dataset("fashion-mnist", split="test", root=fmnist_dir, model=model)
    loader = list(torch.utils.data.DataLoader(data, batch_size=16))[:2]
    nvec = (2, 2, 4)
    return AdaptiveViT(model, PricePolicy(nvec), price_range=(0.01, 1.0)), loader


def test_measure_reports_fractions(price_setup):
    adaptive, loader = price_setup
    ratios = []
    for price in (0.01, 0.05, 1.0):
        result = agents.measure(adaptive, loader, price=price)
        assert set(result) == {"top1", "top5", "flops_ratio", "tokens_kept", "params", "logprob"}
        assert all(0.0 <= result[k] <= 1.0 for k in ("top1", "top5", "flops_ratio", "tokens_kept")), result
        assert -5.0 <= result["logprob"] <= 0.0
        ratios.append(result["flops_ratio"])
    assert ratios[0] == pytest.approx(1.0) and ratios[0] > ratios[1] > ratios[2]
    tokens = 49
    for _ in range(3):  # the smallest keep ratio at every decided block
        tokens = kept_tokens(tokens, 0.25)
    assert result["tokens_kept"] == pytest.approx(tokens / 49)
    images, labels = loader[0]
    top1 = float((adaptive(images, price=1.0)[0].argmax(-1) == labels).float().mean())
    logprob = adaptive(images, price=1.0)[0].log_softmax(-1).gather(1, labels[:, None]).clamp_min(-5.0).mean()
    first = agents.measure(adaptive, loader[:1], price=1.0)
    assert first["top1"] == pytest.approx(top1) and first["logprob"] == pytest.approx(float(logprob), abs=1e-5)
    with pytest.raises(ValueError, match="no images"):
        agents.measure(adaptive, [])


@pytest.mark.parametrize("reached_at", [0.03, 0.3])
def test_calibrate_finds_the_price_of_a_target(price_setup, reached_at):
    adaptive, loader = price_setup
    target = agents.measure(adaptive, loader, price=reached_at)["flops_ratio"]
    default = adaptive.price
    price = agents.calibrate(adaptive, loader, target)
    assert adaptive.price == default  # the price is returned, not written into the model
    assert 0.01 <= price <= 1.0
    assert abs(agents.measure(adaptive, loader, price=price)["flops_ratio"] - target) <= 0.02


def test_calibrate_rejects_an_impossible_target(price_setup):
    adaptive, loader = price_setup
    for target in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="target_flops_ratio"):
            agents.calibrate(adaptive, loader, target)


def test_price_is_an_argument_one_per_image_or_the_default(price_setup):
    adaptive, loader = price_setup
    images = loader[0][0][:6]
    prices = torch.tensor([0.01, 1.0, 0.05, 0.3, 0.01, 1.0])
    logits, macs, decisions = adaptive(images, price=prices, return_decisions=True)
    for i, price in enumerate(prices.tolist()):
        alone, alone_macs, alone_decisions = adaptive(images[i : i + 1], price=price, return_decisions=True)
        torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-5, rtol=0)
        assert float(macs[i]) == float(alone_macs[0]) and decisions.subnets[i] == alone_decisions.subnets[0]
    assert len(set(decisions.subnets)) > 1  # the prices were seen: cheap images ran other subnets
    default, _ = adaptive(images)
    assert torch.equal(default, adaptive(images, price=adaptive.price)[0])
    with pytest.raises(ValueError, match="one per image"):
        adaptive(images, price=torch.ones(5))


def test_calibrate_returns_the_price_and_leaves_the_model_as_it_was(price_setup):
    adaptive, loader = price_setup
    images = loader[0][0]
    before = adaptive(images)
    price = agents.calibrate(adaptive, loader, 0.5)
    assert price != adaptive.price
    after = adaptive(images)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(AttributeError):
        adaptive.price = price  # the default is set at construction; a caller passes the price instead


def test_adaptive_vit_leaves_the_supernet_trainable():
    model = tiny_supernet()
    adaptive = AdaptiveViT(model, FullModelPolicy(model.search_space.num_choices(1)))
    logits, _ = adaptive(torch.randn(3, 1, 28, 28))
    assert all(p.requires_grad for p in model.parameters())
    assert logits.shape == (3, 10) and not logits.requires_grad  # decided under inference mode only
    model.train()
    loss = model(torch.randn(2, 1, 28, 28), subnet=model.search_space.smallest()).sum()
    loss.backward()  # the supernet trains on as before
    assert model.head.weight.grad is not None


def test_adaptive_vit_depends_on_the_model_package_and_the_mdp_definitions_only():
    """agents.adaptive imports of the env package only its MDP definitions (the action codec and the defaults),
    which import nothing of the env, its data or the agents; vit imports neither the env nor the agents (no arrow
    back up)."""
    root = Path(agents.__file__).parent.parent

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.ImportFrom):
                names.add(f"{path.parent.name}.{node.module}")
        return names

    def top(names: set[str]) -> set[str]:
        return {name.split(".")[0] for name in names}

    adaptive = imported(root / "agents" / "adaptive.py")
    assert "vit" in top(adaptive)  # the check sees imports
    assert {n for n in adaptive if n.startswith("prance_env")} == {"prance_env.mdp"}
    assert not {n for n in imported(root / "prance_env" / "mdp.py") if n.startswith(("prance_env", "agents"))}
    assert "vit.data" not in imported(root / "prance_env" / "mdp.py")
    for path in (root / "vit").glob("*.py"):
        assert not top(imported(path)) & {"prance_env", "agents"}, path


# --- selector training end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selector_run(fmnist_dir, tmp_path_factory):
    """A PPO selector trained by `train_selector` for 352 steps on a randomly initialised prance_fmnist checkpoint,
    evaluated and saved every 176 steps: (config, model, history)."""
    root = tmp_path_factory.mktemp("selector")
    checkpoint = vit.save_checkpoint(vit.create_supernet("prance_fmnist"), root / "supernet.safetensors")
    cfg = agents.SelectorConfig(
        checkpoint=str(checkpoint),
        data_dir=str(fmnist_dir),
        num_envs=16,
        n_steps=11,
        minibatch_size=88,
        n_epochs=1,
        hidden=32,
        total_steps=352,
        eval_every=176,
        images=16,
        save_every=176,
        out=str(root / "run"),
        device="cpu",
    )
    model, history = agents.train_selector(cfg)
    return cfg, model, history


@pytest.fixture(scope="module")
def resumed_run(selector_run, tmp_path_factory):
    """`selector_run` resumed, in a copy of its folder, up to 528 steps: (config, model, history)."""
    cfg = selector_run[0]
    out = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(cfg.out, out)
    cfg = dataclasses.replace(cfg, out=str(out), resume=True, total_steps=528)
    model, history = agents.train_selector(cfg)
    return cfg, model, history


def checkpoint_steps(cfg: agents.SelectorConfig) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (Path(cfg.out) / "checkpoints").glob("selector_*.zip"))


def test_train_selector_writes_the_selector_settings_history_and_checkpoints(selector_run):
    cfg, model, history = selector_run
    out = Path(cfg.out)
    assert model.num_timesteps == 352
    for name in ("selector.zip", "selector.json", "eval_history.json"):
        assert (out / name).is_file(), name
    assert checkpoint_steps(cfg) == [176, 352]
    settings = json.loads((out / "selector.json").read_text())
    assert settings["algo"] == "ppo" and settings["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert settings["signature"] == supernet_signature(vit.create_supernet("prance_fmnist"))
    assert json.loads((out / "eval_history.json").read_text()) == history
    assert {row["steps"] for row in history} == {176, 352}
    assert {row["price"] for row in history} == set(cfg.eval_prices)
    for row in history:
        assert all(0.0 <= row[k] <= 1.0 for k in ("top1", "flops_ratio", "tokens_kept")), row


def test_train_selector_history_has_one_row_per_step_count_and_price(selector_run):
    history = selector_run[2]
    keys = [(row["steps"], row["price"]) for row in history]
    assert len(keys) == len(set(keys)), keys


def test_newest_checkpoint_is_the_final_selector(selector_run):
    cfg, model, _ = selector_run
    out = Path(cfg.out)
    newest = PPO.load(out / "checkpoints" / "selector_352.zip", device="cpu")
    final = PPO.load(out / "selector.zip", device="cpu")
    torch.testing.assert_close(final.policy.state_dict(), model.policy.state_dict(), atol=0, rtol=0)
    torch.testing.assert_close(newest.policy.state_dict(), final.policy.state_dict(), atol=0, rtol=0)


def test_load_adaptive_builds_the_trained_selector(selector_run):
    cfg, model, _ = selector_run
    adaptive = agents.load_adaptive(Path(cfg.out) / "selector", price=0.3, device="cpu")
    assert isinstance(adaptive, AdaptiveViT) and adaptive.price == 0.3
    expected = vit.create_supernet("prance_fmnist", checkpoint=cfg.checkpoint)
    torch.testing.assert_close(adaptive.supernet.state_dict(), expected.state_dict(), atol=0, rtol=0)
    images = torch.randn(4, 1, 28, 28)
    logits, macs = adaptive(images)
    assert logits.shape == (4, 10) and torch.all(macs <= adaptive.full_macs)
    reference, _ = AdaptiveViT(expected, model, price=0.3)(images)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="embed_dim"):
        agents.load_adaptive(Path(cfg.out) / "selector", supernet=tiny_supernet(), device="cpu")


def test_resume_continues_from_the_newest_checkpoint(resumed_run):
    _, model, history = resumed_run
    assert model.num_timesteps >= 528
    assert model._num_timesteps_at_start == 352  # learning started from the 352-step checkpoint, not from scratch
    assert max(row["steps"] for row in history) == model.num_timesteps


def test_resume_keeps_saving_every_save_every_steps(resumed_run):
    assert checkpoint_steps(resumed_run[0]) == [176, 352, 528]


def test_resume_keeps_the_earlier_evaluations(resumed_run):
    cfg, _, history = resumed_run
    written = json.loads((Path(cfg.out) / "eval_history.json").read_text())
    assert {row["steps"] for row in written} == {176, 352, 528}


@pytest.mark.parametrize("algo", ["a2c", "maskable_ppo", "recurrent_ppo"])
def test_train_selector_with_other_algorithms(selector_run, tmp_path, algo):
    cfg = dataclasses.replace(
        selector_run[0], algo=algo, total_steps=176, eval_every=10**6, save_every=10**6, out=str(tmp_path)
    )
    model, history = agents.train_selector(cfg)
    assert isinstance(model, agents.algorithm(algo)) and model.num_timesteps >= 176
    assert [row["steps"] for row in history] == [model.num_timesteps] * len(cfg.eval_prices)
    adaptive = agents.load_adaptive(tmp_path / "selector", device="cpu")
    assert isinstance(adaptive.policy, agents.algorithm(algo))
    logits, _ = adaptive(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)


def test_calibrate_warns_and_takes_the_nearest_endpoint_out_of_reach(price_setup):
    adaptive, loader = price_setup
    cheapest = agents.measure(adaptive, loader, price=1.0)["flops_ratio"]
    with pytest.warns(UserWarning, match="out of reach"):
        price = agents.calibrate(adaptive, loader, cheapest / 2)
    assert price == 1.0
    with pytest.warns(UserWarning, match="out of reach"):
        assert agents.calibrate(adaptive, loader, 0.01, price_range=(0.01, 0.1)) == 0.1


def test_fine_tuning_starts_from_the_saved_selector(selector_run, tmp_path):
    cfg, model, _ = selector_run
    saved = Path(cfg.out) / "selector"
    tuned_cfg = dataclasses.replace(cfg, out=str(tmp_path / "tuned"), init=str(saved), total_steps=176, lr=0.0)
    tuned, _ = agents.train_selector(tuned_cfg)
    assert tuned.num_timesteps == 176
    before, after = model.policy.state_dict(), tuned.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0: the weights are the saved ones
    wider, _ = agents.train_selector(dataclasses.replace(tuned_cfg, out=str(tmp_path / "wider"), price_high=1.0))
    assert wider.observation_space["price"].high[0] == pytest.approx(math.log(1.0))  # a new price range fine-tunes
    assert json.loads((tmp_path / "wider" / "selector.json").read_text())["env"]["price_range"][1] == 1.0
    with pytest.raises(ValueError, match="trained with 'ppo'"):
        agents.train_selector(dataclasses.replace(tuned_cfg, algo="a2c"))
    with pytest.raises(FileNotFoundError, match="no shipped selector for 'nope'"):
        agents.train_selector(dataclasses.replace(tuned_cfg, init="shipped:nope"))
    with pytest.raises(FileNotFoundError, match="selector file not found"):
        agents.train_selector(dataclasses.replace(tuned_cfg, init=str(tmp_path / "missing")))


def test_tensorboard_holds_every_evaluation_at_its_step_and_the_config(selector_run):
    cfg, _, history = selector_run
    events = EventAccumulator(str(Path(cfg.out) / "tb" / f"{cfg.algo}_1"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for price in cfg.eval_prices:
        rows = [row for row in history if row["price"] == price]
        for key in ("top1", "flops_ratio", "tokens_kept"):
            logged = events.Scalars(f"eval/{key}@{price:g}")
            assert [e.step for e in logged] == [176, 352] == [row["steps"] for row in rows]  # the final one too
            assert [e.value for e in logged] == pytest.approx([row[key] for row in rows], rel=1e-6)
    (text,) = events.Tensors("config/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 0
    for name, value in dataclasses.asdict(cfg).items():
        assert f"| {name} | {value} |" in table


class InterruptAt(BaseCallback):
    """Interrupts training (as Ctrl-C does) at the start of the first rollout from `steps` on."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def _on_rollout_start(self) -> None:
        if self.num_timesteps >= self.steps:
            raise KeyboardInterrupt

    def _on_step(self) -> bool:
        return True


def test_an_interrupted_run_keeps_every_evaluation_and_its_resume_appends(selector_run, tmp_path):
    cfg = dataclasses.replace(selector_run[0], total_steps=528, out=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        agents.train_selector(cfg, callback=InterruptAt(352))  # after the evaluation and checkpoint at 352 steps
    measured = json.loads((tmp_path / "eval_history.json").read_text())
    assert [(row["steps"], row["price"]) for row in measured] == [(s, p) for s in (176, 352) for p in cfg.eval_prices]
    agents.train_selector(dataclasses.replace(cfg, resume=True))
    written = json.loads((tmp_path / "eval_history.json").read_text())
    assert written[: len(measured)] == measured
    assert [row["steps"] for row in written] == [s for s in (176, 352, 528) for _ in cfg.eval_prices]


def test_selector_run_files_follow_the_umask(selector_run, tmp_path):
    cfg = dataclasses.replace(selector_run[0], total_steps=176, out=str(tmp_path))
    old = os.umask(0o022)
    try:
        agents.train_selector(cfg)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {str(p.relative_to(tmp_path)) for p in files}
    assert {"selector.zip", "selector.json", "eval_history.json", "checkpoints/selector_176.zip"} <= names
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(0o644) for p in files}


def test_measure_reports_top5_and_the_parameters_each_image_read():
    torch.manual_seed(0)
    model = tiny_supernet()
    images, labels = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    adaptive = agents.AdaptiveViT(model, RandomPolicy(model.search_space.num_choices(1), seed=0))
    row = agents.measure(adaptive, [(images, labels)])
    adaptive.policy = RandomPolicy(adaptive.nvec, seed=0)  # the same draws again
    choices = adaptive(images, return_decisions=True)[2].subnets
    assert len(set(choices)) > 1  # per-image subnets: the average is over different counts
    assert row["params"] == pytest.approx(np.mean(vit.count_params(model, choices)))
    assert row["params"] < vit.count_params(model)
    top5 = model(images, choices).topk(5, dim=-1).indices
    assert row["top5"] == pytest.approx(float((top5 == labels[:, None]).any(-1).float().mean()))
    assert row["top1"] <= row["top5"]
    bf16_adaptive = agents.AdaptiveViT(model, RandomPolicy(adaptive.nvec, seed=0), amp=True)
    bf16 = agents.measure(bf16_adaptive, [(images, labels)])
    assert bf16["flops_ratio"] == row["flops_ratio"]  # the same decisions (random), in bf16


def test_held_out_batches_default_to_the_held_out_split_of_an_image_folder(tmp_path):
    root = write_image_folder(tmp_path, classes=2, per_class={"train": 1, "val": 3}, size=32)
    model = tiny_supernet(in_chans=3, img_size=32)
    batches = vit.train.held_out_batches("ImageNet", str(root), model, 6, 4, torch.device("cpu"))
    assert [len(y) for _, y in batches] == [4, 2]  # the 6 val images: there is no test split


def test_train_selector_closes_its_envs_and_logger_when_training_fails(fmnist_dir, tmp_path, monkeypatch):
    closed = []
    for cls in (prance_env.source.ImageSource, stable_baselines3.common.logger.Logger):
        monkeypatch.setattr(cls, "close", lambda self, name=cls.__name__: closed.append(name))

    class Fail(BaseCallback):
        def _on_step(self) -> bool:
            raise RuntimeError("stopped")

    checkpoint = vit.save_checkpoint(vit.create_supernet("prance_fmnist"), tmp_path / "supernet.safetensors")
    cfg = agents.SelectorConfig(
        checkpoint=str(checkpoint),  # the run's supernet goes into the env as a module, without its checkpoint
        data_dir=str(fmnist_dir),
        num_envs=4,
        n_steps=2,
        minibatch_size=8,
        hidden=8,
        total_steps=8,
        images=4,
        out=str(tmp_path / "run"),
        device="cpu",
    )
    with pytest.raises(RuntimeError, match="stopped"):
        agents.train_selector(cfg, callback=Fail())
    assert {"ImageSource", "Logger"} <= set(closed)

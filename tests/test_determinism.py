"""Same seed, same bits on the CPU: supernet training, env episodes (whatever the global random state and other env
instances do in between) and PPO training of a selector; a different seed gives a different result, so each
comparison can fail."""

import random

import gymnasium
import numpy as np
import pytest
import torch
from conftest import tiny_supernet
from gymnasium.utils.env_checker import data_equivalence
from stable_baselines3 import PPO
from test_env import env_kwargs, random_actions
from test_train import tiny_config, weights

import prance_env
from agents import CLSFeaturesExtractor
from vit.train import train_supernet


def scramble_global_random_state(seed: int) -> None:
    """Reseed every global generator, so a run that drew from one would change."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- supernet training ------------------------------------------------------------------------------------------------


def test_supernet_training_is_bit_identical_for_a_seed(tmp_path, fmnist_dir):
    # Random subnets from the first step (no largest-only phase), stochastic depth and augmentation draw randomness.
    def train(name: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = tiny_config(tmp_path / name, fmnist_dir, epochs=1, seed=seed, largest_only_epochs=0, num_random=2)
        scramble_global_random_state(1000 + len(name))  # training must seed everything it draws from itself
        return weights(train_supernet(cfg, tiny_supernet(drop_path_rate=0.1)))

    first, second, other = train("a", 0), train("bb", 0), train("c", 1)
    assert equal_weights(first, second)
    assert not equal_weights(first, other)
    assert not equal_weights(first, weights(tiny_supernet(drop_path_rate=0.1)))  # training changed the weights


# --- env episodes -----------------------------------------------------------------------------------------------------


def episodes(env, actions: list, seed: int, count: int, meddle=None) -> list:
    """Everything `count` episodes of `actions` return after `env.reset(seed=seed)`; `meddle(t)` runs between steps."""
    out = [env.reset(seed=seed)]
    for _ in range(count):
        for t, action in enumerate(actions):
            if meddle is not None:
                meddle(t)
            out.append(env.step(action))
        if isinstance(env.unwrapped, gymnasium.Env):
            out.append(env.reset())
    return out


@pytest.mark.parametrize("action_type", ["discrete", "continuous"])
@pytest.mark.parametrize("num_envs", [None, 4], ids=["single", "vector"])
def test_episodes_depend_only_on_the_seed_and_the_actions(fmnist_dir, num_envs, action_type):
    def make():
        kwargs = env_kwargs(fmnist_dir, token_mode="prune_merge", quality="logprob", action_type=action_type)
        if num_envs is None:
            return gymnasium.make("PranceViT-v1", **kwargs)
        return gymnasium.make_vec("PranceViT-v1", num_envs=num_envs, **kwargs)

    env, twin, other = make(), make(), make()
    steps = env.unwrapped.codec.num_steps
    # The vector env resets itself on the step after the last one (reward 0), so it takes one more action.
    actions = random_actions(env.action_space, steps if num_envs is None else steps + 1, seed=5)
    other.reset(seed=9)
    other_actions = random_actions(other.action_space, steps, seed=6)

    def meddle(t: int) -> None:  # another instance steps and the global generators are reseeded in between
        scramble_global_random_state(t)
        other.step(other_actions[t % steps])
        if t == steps - 1:
            other.reset()

    reference = episodes(env, actions, seed=3, count=2)
    assert data_equivalence(episodes(twin, actions, seed=3, count=2, meddle=meddle), reference, exact=True)
    assert not data_equivalence(episodes(twin, actions, seed=4, count=2), reference, exact=True)


def test_sb3_adapter_episodes_depend_only_on_the_seed(fmnist_dir):
    def run(seed: int) -> list:
        venv = prance_env.to_sb3(gymnasium.make_vec("PranceViT-v1", num_envs=4, **env_kwargs(fmnist_dir)))
        venv.seed(seed)
        scramble_global_random_state(seed + 17)
        out = [venv.reset()]
        for action in random_actions(venv.envs.action_space, 2 * venv.envs.codec.num_steps, seed=0):
            out.append(venv.step(action))
        return out

    assert data_equivalence(run(0), run(0), exact=True)
    assert not data_equivalence(run(0), run(1), exact=True)


# --- PPO ------------------------------------------------------------------------------------------------------------


def train_ppo(data_dir, seed: int) -> dict[str, torch.Tensor]:
    """The policy parameters after 192 steps of PPO (CLS extractor) on 8 sub-envs of the tiny supernet."""
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=8, **env_kwargs(data_dir, quality="logprob"))
    scramble_global_random_state(seed + 31)  # PPO must seed everything it draws from itself
    model = PPO(
        "MultiInputPolicy",
        prance_env.to_sb3(envs),
        n_steps=8,
        batch_size=32,
        n_epochs=2,
        seed=seed,
        device="cpu",
        policy_kwargs=dict(features_extractor_class=CLSFeaturesExtractor, features_extractor_kwargs=dict(hidden=32)),
    )
    model.learn(192)
    assert model.num_timesteps == 192
    return {k: v.detach().clone() for k, v in model.policy.state_dict().items()}


def test_ppo_training_is_bit_identical_for_a_seed(fmnist_dir):
    first, second, other = train_ppo(fmnist_dir, 0), train_ppo(fmnist_dir, 0), train_ppo(fmnist_dir, 1)
    assert equal_weights(first, second)
    assert not equal_weights(first, other)

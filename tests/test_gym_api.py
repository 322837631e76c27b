"""What Gymnasium and stable-baselines3 users rely on beyond the MDP: the registered time limit, `make_vec`'s
arguments, a flat `Discrete` action space for agents that take no other (DQN), and SB3's negative indices."""

import gymnasium
import numpy as np
import pytest
from stable_baselines3 import DQN
from test_env import env_kwargs

import agents
import prance_env
import vit


def test_the_registered_time_limit_is_the_registered_mdp_s_episode_length(fmnist_dir):
    spec = gymnasium.spec("PranceViT-v1")
    env = gymnasium.make("PranceViT-v1", data_dir=fmnist_dir, device="cpu")
    assert spec.max_episode_steps == prance_env.EPISODE_STEPS == env.unwrapped.codec.num_steps == 11
    env = gymnasium.wrappers.TimeAwareObservation(env, flatten=False)  # refuses envs without a time limit
    obs, _ = env.reset(seed=0)
    assert obs["time"] == 0
    steps, done = 0, False
    while not done:
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        steps, done = steps + 1, terminated or truncated
    assert steps == 11 and terminated


def test_make_vec_honours_max_episode_steps_and_refuses_make_s_wrapper_arguments(fmnist_dir):
    with pytest.warns(UserWarning, match="max_episode_steps=2 truncates this MDP's episodes of 3 decisions"):
        envs = gymnasium.make_vec("PranceViT-v1", num_envs=3, max_episode_steps=2, **env_kwargs(fmnist_dir))
    envs.reset(seed=0)
    ends = []
    for _ in range(6):
        _, reward, terminated, truncated, _ = envs.step(envs.action_space.sample())
        ends.append((bool(terminated.any()), bool(truncated.all()), float(np.abs(reward).sum()) == 0))
    # truncated after 2 steps, reset by the next step (reward 0), again and again
    assert ends == [(False, False, False), (False, True, False), (False, False, True)] * 2
    full = gymnasium.make_vec("PranceViT-v1", num_envs=3, **env_kwargs(fmnist_dir))  # the spec's limit: no cut
    full.reset(seed=0)
    results = [full.step(full.action_space.sample())[2:4] for _ in range(3)]
    assert [bool(t.all()) for t, _ in results] == [False, False, True] and not any(r.any() for _, r in results)
    with pytest.raises(TypeError, match="disable_env_checker is an argument of gymnasium.make's wrappers"):
        gymnasium.make_vec("PranceViT-v1", num_envs=2, disable_env_checker=True, **env_kwargs(fmnist_dir))


def test_flat_actions_are_every_combination_of_choices_in_c_order(fmnist_dir):
    flat = gymnasium.make_vec("PranceViT-v1", num_envs=2, action_type="flat", **env_kwargs(fmnist_dir))
    multi = gymnasium.make_vec("PranceViT-v1", num_envs=2, **env_kwargs(fmnist_dir))
    nvec = multi.single_action_space.nvec
    assert flat.single_action_space == gymnasium.spaces.Discrete(int(np.prod(nvec)))
    flat.reset(seed=1)
    multi.reset(seed=1)
    for step in range(3):
        chosen = np.array([step, int(np.prod(nvec)) - 1 - step])
        a, b = flat.step(chosen), multi.step(np.stack(np.unravel_index(chosen, nvec), axis=1))
        assert np.array_equal(a[0]["cls"], b[0]["cls"]) and np.array_equal(a[1], b[1])
    codec = flat.unwrapped.codec
    masks, per_field = codec.masks(np.array([1, 9])), multi.unwrapped.codec.masks(np.array([1, 9]))
    combos = np.stack(np.unravel_index(np.arange(masks.shape[1]), nvec), axis=1)
    offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]])
    assert np.array_equal(masks, per_field[:, combos + offsets].all(axis=2))
    with pytest.raises(ValueError, match=rf"actions\[1\] = {np.prod(nvec)}: flat actions must be whole numbers"):
        codec.indices(np.array([0, np.prod(nvec)]), 2)
    with pytest.raises(ValueError, match=r"expected flat actions of shape \(2,\)"):
        codec.indices(np.zeros((2, 3), dtype=int), 2)


def test_dqn_learns_on_the_flat_variant_and_deploys_in_adaptive_vit(fmnist_dir):
    kwargs = env_kwargs(fmnist_dir)
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=4, action_type="flat", **kwargs)
    venv = prance_env.to_sb3(envs)
    model = DQN("MultiInputPolicy", venv, learning_starts=100, buffer_size=2000, train_freq=4, seed=0, device="cpu")
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    model.learn(1000)
    assert model.num_timesteps >= 1000
    assert any(not np.allclose(before[k].numpy(), v.numpy()) for k, v in model.policy.state_dict().items())
    adaptive = agents.AdaptiveViT(kwargs["supernet"], model)
    assert adaptive.codec.action_type == "flat"
    logits, macs = adaptive(vit.load_dataset("fashion-mnist", split="test", root=fmnist_dir)[0][0][None])
    assert logits.shape == (1, 10) and 0 < float(macs) <= adaptive.full_macs


def test_the_sb3_adapter_takes_negative_indices_as_dummy_vec_env_does(fmnist_dir):
    venv = prance_env.to_sb3(gymnasium.make_vec("PranceViT-v1", num_envs=3, **env_kwargs(fmnist_dir)))
    assert venv.env_is_wrapped(gymnasium.Wrapper, indices=[-1, -3]) == [False, False]
    assert venv.get_attr("num_envs", indices=-1) == [3]
    with pytest.raises(IndexError, match=r"sub-env indices \[-4\] out of range for 3 sub-envs"):
        venv.get_attr("num_envs", indices=[-4])

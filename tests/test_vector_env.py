"""The native batched PranceViT-v1 and its stable-baselines3 adapter: image-by-image equality with the single env,
determinism, next-step autoreset, sampling without replacement, vector infos, and SB3's VecEnv contract."""

import subprocess
import sys
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector.utils import batch_space
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from test_env import (
    DEPTH,
    PRICE,
    env_kwargs,
    needs_checkpoint,
    random_actions,
    run_episode,
    supernet,
    tensor_dataset,
)

import prance_env
import vit

N = 4


def make_vec(data_dir, num_envs: int = N, **kwargs) -> prance_env.PranceViTVectorEnv:
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=num_envs, **env_kwargs(data_dir, **kwargs))
    assert isinstance(envs, prance_env.PranceViTVectorEnv)
    return envs


def first_observation(obs: dict, i: int | slice = slice(None)) -> bool:
    """Whether `obs` (batched) is the first observation of an episode with the default stem: no step taken and every
    patch token alive."""
    return bool(np.all(obs["progress"][i, 0] == 0.0) and np.all(obs["progress"][i, 2] == 1.0))


def test_make_vec_gives_the_native_batched_env(fmnist_dir):
    envs = make_vec(fmnist_dir, token_mode="prune_merge")
    assert envs.num_envs == N and envs.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    single = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, token_mode="prune_merge"))
    assert envs.single_observation_space == single.observation_space
    assert envs.single_action_space == single.action_space
    assert envs.observation_space == batch_space(single.observation_space, N)
    assert envs.action_space.shape == (N, 4)
    obs, _ = envs.reset(seed=0)
    assert envs.observation_space.contains(obs)


@pytest.mark.parametrize("subset", ["every_other", "stratified"])
def test_make_vec_on_a_fashion_mnist_subset_holds_its_images_in_memory(fmnist_dir, subset):
    data = vit.load_dataset("fashion-mnist", root=fmnist_dir)
    picked = (
        torch.utils.data.Subset(data, list(range(1, len(data), 2)))
        if subset == "every_other"
        else vit.data.stratified_subset(data, 24)
    )
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=N, **env_kwargs(fmnist_dir, data=picked))
    assert envs.source.tensors is not None
    _, info = envs.reset(seed=0)
    assert torch.equal(envs.images, torch.stack([picked[i][0] for i in info["index"]]))
    envs.close()


@needs_checkpoint
def test_make_vec_defaults_run_an_episode():
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=N)
    assert isinstance(envs, prance_env.PranceViTVectorEnv)
    _, _, infos = run_episode(envs, random_actions(envs.action_space, envs.codec.num_steps), seed=0)
    assert np.all(infos[-1]["flops_ratio"] <= 1.0)


# --- determinism and equality with the single env -----------------------------------------------------------------


def test_different_seeds_give_different_images(fmnist_dir):
    envs = make_vec(fmnist_dir)
    (obs_0, info_0), (obs_1, info_1) = envs.reset(seed=0), envs.reset(seed=1)
    assert not np.array_equal(info_0["index"], info_1["index"])
    assert not np.array_equal(obs_0["cls"], obs_1["cls"])


def assert_infos_match(single: dict, batched: dict, i: int) -> None:
    assert set(single) <= set(batched), set(single) - set(batched)
    for key, value in single.items():
        if isinstance(value, float):
            assert batched[key][i] == pytest.approx(value, abs=1e-6), key
        else:
            assert batched[key][i] == value, key


@pytest.mark.parametrize("kind", prance_env.QUALITIES)
@pytest.mark.parametrize("reward", prance_env.REWARD_MODES)
def test_vector_env_matches_the_single_env_image_by_image(fmnist_dir, reward, kind):
    envs = make_vec(fmnist_dir, reward=reward, quality=kind)
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, reward=reward, quality=kind))
    indices = [5, 17, 17, 60]  # one image twice, under different actions
    actions = random_actions(envs.action_space, envs.codec.num_steps, seed=2)
    batch_obs, batch_rewards, batch_infos = run_episode(envs, actions, options={"indices": indices, "price": PRICE})
    assert len({tuple(s) for s in batch_infos[-1]["subnet"]}) > 1  # sub-envs ran different subnets
    for i, index in enumerate(indices):
        observations, rewards, infos = run_episode(
            env, [a[i] for a in actions], options={"index": index, "price": PRICE}
        )
        np.testing.assert_allclose([r[i] for r in batch_rewards], rewards, rtol=0, atol=1e-6)
        for obs, batched in zip(observations, batch_obs):
            for key, value in obs.items():
                np.testing.assert_allclose(batched[key][i], value, rtol=0, atol=1e-5, err_msg=key)
        for info, batched in zip(infos[1:], batch_infos[1:]):
            assert_infos_match(info, batched, i)
        assert batch_infos[0]["index"][i] == infos[0]["index"]


def test_reset_info_is_not_changed_by_later_steps(fmnist_dir):
    envs = make_vec(fmnist_dir)
    _, info = envs.reset(seed=0)
    kept = {key: np.copy(value) for key, value in info.items()}
    for action in random_actions(envs.action_space, envs.codec.num_steps, seed=0):
        envs.step(action)
    for key, value in kept.items():
        np.testing.assert_array_equal(info[key], value, err_msg=key)


def test_reset_with_a_scalar_price_warns_nothing():
    # torch warns once per process about non-writable arrays, so this runs in a fresh interpreter
    code = (
        "import warnings, prance_env, test_env\n"
        "envs = prance_env.PranceViTVectorEnv(\n"
        "    num_envs=2, supernet=test_env.supernet(), data=test_env.tensor_dataset(4), device='cpu'\n"
        ")\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    envs.reset(seed=0, options={'price': 0.1})\n"
        "print([str(w.message) for w in caught])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- autoreset, sampling, infos ---------------------------------------------------------------------------------------


def test_step_after_the_last_resets_with_next_step_semantics(fmnist_dir):
    envs = make_vec(fmnist_dir)
    steps = envs.codec.num_steps
    actions = random_actions(envs.action_space, steps, seed=0)
    _, _, infos = run_episode(envs, actions, seed=0)
    obs, reward, terminated, truncated, info = envs.step(actions[0])
    np.testing.assert_array_equal(reward, np.zeros(N))
    assert not terminated.any() and not truncated.any()
    assert first_observation(obs)
    assert not set(info["index"]) & set(infos[0]["index"])
    _, _, more = run_episode(envs, actions)  # the new batch runs a whole episode
    assert len(more) == steps + 1


@pytest.mark.parametrize("size, num_envs", [(10, 4), (12, 4), (96, 32), (9, 4)])
def test_images_are_drawn_without_replacement(size, num_envs):
    """Each pass over the data is a shuffle cut into whole batches: no image twice in a batch or in a pass."""
    data = tensor_dataset(size)
    envs = prance_env.PranceViTVectorEnv(num_envs=num_envs, supernet=supernet(), data=data, device="cpu")
    per_pass = size // num_envs
    envs.reset(seed=0)
    batches = [envs.indices.copy()]
    for _ in range(3 * per_pass - 1):
        envs.reset()
        batches.append(envs.indices.copy())
    for p in range(3):
        images = np.concatenate(batches[p * per_pass : (p + 1) * per_pass])
        assert len(set(images)) == len(images) == per_pass * num_envs, f"pass {p} repeats an image"
    assert not all(np.array_equal(a, b) for a, b in zip(batches[:per_pass], batches[per_pass : 2 * per_pass]))


def assert_vector_info(info: dict) -> None:
    """Every key of a vector info has its `_key` mask: a boolean (num_envs,) array, all True here."""
    for key in [k for k in info if not k.startswith("_")]:
        assert f"_{key}" in info, f"no mask _{key}"
        mask = info[f"_{key}"]
        assert mask.dtype == bool and mask.shape == (N,) and mask.all()
        assert len(info[key]) == N


def test_infos_carry_key_masks(fmnist_dir):
    envs = make_vec(fmnist_dir)
    actions = random_actions(envs.action_space, envs.codec.num_steps, seed=0)
    _, _, infos = run_episode(envs, actions, seed=0)
    for info in infos[1:]:
        assert_vector_info(info)
    assert {"pred", "label", "correct", "flops_ratio", "subnet"} <= set(infos[-1])
    assert_vector_info(infos[0])  # reset
    assert_vector_info(envs.step(actions[0])[4])  # autoreset


@pytest.mark.parametrize("stem_blocks", [0, 2])
def test_blocks_per_step_two_halves_the_steps(fmnist_dir, stem_blocks):
    one = make_vec(fmnist_dir, quality="logprob", stem_blocks=stem_blocks)
    two = make_vec(fmnist_dir, quality="logprob", stem_blocks=stem_blocks, blocks_per_step=2)
    assert one.codec.num_steps == DEPTH - stem_blocks == 2 * two.codec.num_steps
    actions = random_actions(two.action_space, two.codec.num_steps, seed=0)
    options = {"indices": [0, 1, 2, 3], "price": PRICE}
    _, rewards_two, infos_two = run_episode(two, actions, options=options)
    _, rewards_one, infos_one = run_episode(one, [a for a in actions for _ in range(2)], options=options)
    for key in ("macs", "tokens", "pred", "flops_ratio", "subnet"):
        np.testing.assert_array_equal(infos_two[-1][key], infos_one[-1][key], err_msg=key)
    np.testing.assert_allclose(np.sum(rewards_two, axis=0), np.sum(rewards_one, axis=0), atol=1e-9)


def test_stem_blocks_zero_runs_every_block(fmnist_dir):
    envs = make_vec(fmnist_dir, stem_blocks=0, action_type="continuous")
    assert envs.codec.num_steps == DEPTH
    _, _, infos = run_episode(envs, random_actions(envs.action_space, DEPTH, seed=0), seed=0)
    assert all(len(s) == DEPTH for s in infos[-1]["subnet"])


# --- errors ----------------------------------------------------------------------------------------------------------


def test_step_before_reset_raises(fmnist_dir):
    envs = make_vec(fmnist_dir)
    with pytest.raises(RuntimeError, match="reset"):
        envs.step(envs.action_space.sample())


@pytest.mark.parametrize(
    "options", [{"indices": [0, 1, 2]}, {"indices": [0, 1, 2, 96]}, {"indices": [-1, 0, 1, 2]}, {"price": 5.0}]
)
def test_invalid_reset_options_raise(fmnist_dir, options):
    with pytest.raises(ValueError):
        make_vec(fmnist_dir).reset(options=options)


def test_invalid_construction_raises(fmnist_dir, tmp_path):
    with pytest.raises(ValueError, match="num_envs"):
        make_vec(fmnist_dir, num_envs=0)
    with pytest.raises(TypeError):
        make_vec(fmnist_dir, reward_mode="delta")
    with pytest.raises(FileNotFoundError):
        make_vec(tmp_path / "absent")


# --- stable-baselines3 ------------------------------------------------------------------------------------------------


def test_sb3_adapter_is_a_vec_env_with_batched_dict_observations(fmnist_dir):
    venv = prance_env.to_sb3(make_vec(fmnist_dir))
    assert isinstance(venv, VecEnv) and venv.num_envs == N
    obs = venv.reset()
    assert set(obs) == set(venv.observation_space.spaces)
    for key, space in venv.observation_space.spaces.items():
        assert obs[key].shape == (N, *space.shape) and obs[key].dtype == space.dtype
    for i in range(N):
        assert venv.observation_space.contains({k: v[i] for k, v in obs.items()})


def test_sb3_adapter_resets_at_the_end_and_keeps_the_terminal_observation(fmnist_dir):
    envs = make_vec(fmnist_dir)
    venv = prance_env.to_sb3(envs)
    venv.seed(0)
    venv.reset()
    first_indices = envs.indices.copy()
    steps = envs.codec.num_steps
    for t, action in enumerate(random_actions(envs.action_space, steps, seed=0)):
        obs, rewards, dones, infos = venv.step(action)
        assert rewards.shape == (N,) and len(infos) == N
        assert dones.all() == (t == steps - 1) and dones.any() == (t == steps - 1)
    for info in infos:
        assert info["terminal_observation"]["progress"][0] == 1.0
        assert not info["TimeLimit.truncated"]
        assert {"pred", "correct", "flops_ratio"} <= set(info)
    assert first_observation(obs)
    assert not set(envs.indices) & set(first_indices)  # the next batch of images
    assert not np.array_equal(obs["cls"], np.stack([info["terminal_observation"]["cls"] for info in infos]))


def test_sb3_seed_then_reset_is_deterministic(fmnist_dir):
    venv = prance_env.to_sb3(make_vec(fmnist_dir))
    assert venv.seed(5) == [5, 6, 7, 8]  # one seed per sub-env, as DummyVecEnv gives
    obs_a = venv.reset()
    venv.step(random_actions(venv.envs.action_space, 1)[0])
    venv.seed(5)
    obs_b = venv.reset()
    obs_c = venv.reset()
    assert data_equivalence(obs_a, obs_b, exact=True)
    assert not np.array_equal(obs_a["cls"], obs_c["cls"])
    drawn = venv.seed()  # no seed: a random one, still one per sub-env
    assert drawn == list(range(drawn[0], drawn[0] + N))


def test_sb3_set_options_fix_each_sub_envs_image_and_price(fmnist_dir):
    venv = prance_env.to_sb3(make_vec(fmnist_dir))
    venv.set_options([{"index": i, "price": 0.01 * (i + 1)} for i in (5, 6, 7, 8)])
    obs = venv.reset()
    np.testing.assert_array_equal(venv.envs.indices, [5, 6, 7, 8])
    np.testing.assert_allclose(obs["price"][:, 0], np.log([0.06, 0.07, 0.08, 0.09]), rtol=1e-6)
    assert [info["index"] for info in venv.reset_infos] == [5, 6, 7, 8]
    venv.reset()  # options are used once
    assert not np.array_equal(venv.envs.indices, [5, 6, 7, 8])
    venv.set_options([{"index": 1}, {}, {}, {}])
    with pytest.raises(ValueError, match="'index' must be given for every sub-env"):
        venv.reset()
    venv.set_options({"label": 3})
    with pytest.raises(ValueError, match="unknown reset options"):
        venv.reset()


def test_sb3_attributes_and_methods_honour_indices(fmnist_dir):
    envs = make_vec(fmnist_dir)
    venv = prance_env.to_sb3(envs)
    venv.reset()
    venv.set_attr("tag", "all")
    assert venv.get_attr("tag") == ["all"] * N and venv.get_attr("tag", indices=[1, 3]) == ["all"] * 2
    assert venv.get_attr("tag", indices=2) == ["all"]
    with pytest.raises(ValueError, match="whole batch"):
        venv.set_attr("tag", "one", indices=[0])  # the sub-envs share their attributes: it would set them all
    assert envs.tag == "all"
    venv.set_attr("tag", "every", indices=range(N))
    assert envs.tag == "every"
    masks = envs.action_masks()
    for indices in ([2], [3, 0], 1):
        expected = [masks[i] for i in ([indices] if isinstance(indices, int) else indices)]
        np.testing.assert_array_equal(venv.env_method("action_masks", indices=indices), expected)
    with pytest.raises(ValueError, match="whole batch"):
        venv.env_method("reset", indices=[0])
    assert len(venv.env_method("reset")) == N
    assert venv.env_is_wrapped(VecMonitor, indices=[0, 1]) == [False, False]
    with pytest.raises(IndexError, match=r"\[4\]"):
        venv.get_attr("tag", indices=[0, 4])


def test_vector_render_draws_each_sub_env_as_the_single_env_does(fmnist_dir):
    envs = make_vec(fmnist_dir, render_mode="rgb_array")
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, render_mode="rgb_array"))
    indices = [5, 17, 60, 3]
    actions = random_actions(envs.action_space, envs.codec.num_steps, seed=2)
    envs.reset(options={"indices": indices, "price": PRICE})
    for t in range(2):
        envs.step(actions[t])
    frames = envs.render()
    assert isinstance(frames, tuple) and len(frames) == N
    for i, index in enumerate(indices):
        env.reset(options={"index": index, "price": PRICE})
        for t in range(2):
            env.step(actions[t][i])
        np.testing.assert_array_equal(frames[i], env.render())
    assert not np.array_equal(frames[0], frames[1])
    assert make_vec(fmnist_dir).render() is None


def test_sb3_get_images_are_the_sub_envs_token_maps(fmnist_dir):
    envs = make_vec(fmnist_dir, render_mode="rgb_array")
    venv = prance_env.to_sb3(envs)
    assert venv.render_mode == "rgb_array"
    venv.reset()
    venv.step(random_actions(envs.action_space, 1, seed=0)[0])
    images = venv.get_images()
    assert len(images) == N
    for image, frame in zip(images, envs.render()):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        np.testing.assert_array_equal(image, frame)
    np.testing.assert_array_equal(venv.env_method("render", indices=[2])[0], images[2])
    tiled = venv.render()  # SB3 tiles the sub-envs' images into one
    assert tiled.dtype == np.uint8 and tiled.size >= N * images[0].size
    plain = prance_env.to_sb3(make_vec(fmnist_dir))
    with pytest.warns(UserWarning, match="rgb_array"):
        assert plain.get_images() == [None] * N


def test_vec_monitor_reports_the_episode(fmnist_dir):
    envs = make_vec(fmnist_dir, quality="logprob")
    venv = VecMonitor(prance_env.to_sb3(envs))
    venv.reset()
    total = np.zeros(N)
    for action in random_actions(envs.action_space, envs.codec.num_steps, seed=0):
        _, rewards, dones, infos = venv.step(action)
        total += rewards
    assert dones.all()
    for i, info in enumerate(infos):
        assert info["episode"]["l"] == envs.codec.num_steps
        assert info["episode"]["r"] == pytest.approx(total[i], abs=1e-5)


def test_to_sb3_rejects_other_envs(fmnist_dir):
    with pytest.raises(TypeError, match="PranceViTVectorEnv"):
        prance_env.to_sb3(gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir)))


@pytest.mark.parametrize("action_type", ["discrete", "continuous"])
def test_ppo_trains_a_few_steps_on_the_adapter_and_acts_in_its_space(fmnist_dir, action_type):
    venv = prance_env.to_sb3(make_vec(fmnist_dir, action_type=action_type))
    model = PPO("MultiInputPolicy", venv, n_steps=6, batch_size=12, n_epochs=1, seed=0, device="cpu")
    model.learn(2 * 6 * N)
    obs = venv.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert venv.action_space.contains(actions[0])


@pytest.mark.parametrize("layout", ["packed", "bucketed"])
def test_amp_runs_the_supernet_in_bf16_with_the_same_episode(fmnist_dir, layout):
    """amp=True: per-sample configurations run under bf16 autocast (CPU here), observations and rewards keep their
    dtypes, and the episode is the fp32 one up to bf16 rounding."""
    episodes = {}
    for amp in (False, True):
        envs = make_vec(fmnist_dir, token_mode="prune_merge", layout=layout, amp=amp)
        actions = random_actions(envs.action_space, DEPTH - 1, seed=3)
        episodes[amp] = run_episode(envs, actions, seed=0, options={"price": PRICE})
    (fp32_obs, fp32_rewards, _), (bf16_obs, bf16_rewards, _) = episodes[False], episodes[True]
    assert bf16_obs[-1]["cls"].dtype == np.float32 and bf16_rewards[-1].dtype == fp32_rewards[-1].dtype
    cls = np.stack([o["cls"] for o in bf16_obs[1:]]), np.stack([o["cls"] for o in fp32_obs[1:]])
    assert not np.array_equal(*cls)  # autocast took effect
    np.testing.assert_allclose(*cls, atol=0.1 * np.abs(cls[1]).max())
    assert np.isfinite(np.stack(bf16_rewards)).all()

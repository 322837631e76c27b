"""PranceViT-v1, one image per episode: the env checkers, determinism, the Result-to-Go algebra, MACs and token
bookkeeping against `vit`, and errors. Runs on a tiny 4-block supernet over a generated Fashion-MNIST folder."""

import copy
import dataclasses
import json
import warnings

import gymnasium
import numpy as np
import pytest
import stable_baselines3.common.env_checker
import torch
from conftest import tiny_supernet
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env, data_equivalence
from stable_baselines3 import PPO
from torch.utils.data import TensorDataset

import agents
import prance_env
import vit
from agents.selector import SHIPPED as SHIPPED_SELECTORS
from prance_env.render import GAP, PANEL_PIXELS, UNRUN_GREY
from vit.flops import embed_macs
from vit.inference import DecisionSchedule
from vit.registry import CHECKPOINT_DIR
from vit.token_ops import token_schedule

DEPTH = 4
PRICE = 0.1
SHIPPED = CHECKPOINT_DIR / "prance_fmnist.safetensors"
needs_checkpoint = pytest.mark.skipif(
    not SHIPPED.is_file(), reason=f"the shipped prance_fmnist checkpoint ({SHIPPED}) has not been trained yet"
)


# --- helpers shared with test_vector_env.py ---------------------------------------------------------------------------


def supernet(token_mode: str = "merge") -> vit.ElasticViT:
    """`tiny_supernet(depth=4)` with its parameters perturbed: at initialisation every image gets the same class and
    every subnet the full model's prediction, which would hide errors in `correct`, `agree` and `pred`."""
    model = tiny_supernet(token_mode=token_mode, depth=DEPTH)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def env_kwargs(data_dir, token_mode: str = "merge", **overrides) -> dict:
    """Keyword arguments of PranceViT-v1 over a fresh tiny supernet and the generated Fashion-MNIST folder."""
    kwargs = dict(supernet=supernet(token_mode), data="fashion-mnist", data_dir=data_dir, device="cpu")
    return {**kwargs, **overrides}


def tensor_dataset(n: int = 12, seed: int = 0) -> TensorDataset:
    """`n` random (1, 28, 28) images with labels, as a plain torch Dataset."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def random_actions(space: gymnasium.Space, steps: int, seed: int = 0) -> list[np.ndarray]:
    """`steps` actions drawn from `space` (a single or a batched action space) with a fixed seed."""
    space = copy.deepcopy(space)
    space.seed(seed)
    return [space.sample() for _ in range(steps)]


def full_actions(env) -> np.ndarray:
    """The action that runs a block at full width with no token reduction."""
    return np.asarray(env.unwrapped.codec.nvec) - 1


def run_episode(env, actions, seed=None, options=None) -> tuple[list, list, list]:
    """Observations (the first included), rewards and infos (the reset's first) of one episode of `actions`, of the
    single env or of the vector env (its sub-envs' synchronised episodes)."""
    obs, info = env.reset(seed=seed, options=options)
    observations, rewards, infos = [obs], [], [info]
    for t, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
        assert np.all(terminated == (t == len(actions) - 1)) and not np.any(truncated)
    return observations, rewards, infos


def num_steps(env) -> int:
    """Steps of an episode."""
    return env.unwrapped.codec.num_steps


def quality(logits: torch.Tensor, label: int, full_pred: int, kind: str, floor: float = -5.0) -> float:
    """q of a result, computed from the model's logits (C,)."""
    if kind == "logprob":
        return max(float(logits.log_softmax(-1)[label]), floor)
    if kind == "no_worse":
        return float(int(logits.argmax()) == label or full_pred != label)
    return float(int(logits.argmax()) == (label if kind == "correct" else full_pred))


def result(model: vit.ElasticViT, image: torch.Tensor, label: int, subnet: vit.Subnet | None, kind: str) -> float:
    """R = q - price * F / F_full of `subnet` (the full model when None) on one image, straight from `vit`."""
    with torch.no_grad():
        full = model(image[None])[0]
        logits = full if subnet is None else model(image[None], subnet)[0]
    ratio = vit.count_macs(model, subnet) / vit.count_macs(model)
    return quality(logits, label, int(full.argmax()), kind) - PRICE * ratio


# --- the env checkers -------------------------------------------------------------------------------------------------


def assert_checkers_pass_silently(**kwargs) -> None:
    """`gymnasium.make("PranceViT-v1", **kwargs)`, Gymnasium's and SB3's env checkers, render checks included (every
    declared render mode, through the spec): not one warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gymnasium.make("PranceViT-v1", **kwargs)
        check_env(env.unwrapped, skip_render_check=False)
        stable_baselines3.common.env_checker.check_env(env, skip_render_check=False)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


@pytest.mark.parametrize(
    "token_mode, action_type, fields",
    [
        ("merge", "discrete", 3),
        ("merge", "continuous", 3),
        ("prune_merge", "discrete", 4),
        ("prune_merge", "continuous", 4),
        ("prune", "discrete", 3),
    ],
)
def test_env_checkers_pass_without_warnings(fmnist_dir, token_mode, action_type, fields):
    kwargs = env_kwargs(fmnist_dir, token_mode, action_type=action_type)
    assert gymnasium.make("PranceViT-v1", **kwargs).action_space.shape == (fields,)
    assert_checkers_pass_silently(**kwargs)


@pytest.mark.parametrize("reward", prance_env.REWARD_MODES)
def test_env_checkers_pass_on_a_torch_dataset(reward):
    assert_checkers_pass_silently(supernet=supernet(), data=tensor_dataset(), device="cpu", reward=reward)


def test_env_checkers_pass_at_a_fixed_price(fmnist_dir):
    assert_checkers_pass_silently(**env_kwargs(fmnist_dir, price=0.05))


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_env_checkers_pass_in_rgb_array_mode(fmnist_dir, token_mode):
    assert_checkers_pass_silently(**env_kwargs(fmnist_dir, token_mode, render_mode="rgb_array"))


@needs_checkpoint
def test_env_checkers_pass_on_the_defaults():
    assert_checkers_pass_silently()


@pytest.mark.parametrize("price", [0.05, 0.4, 0.7, 1.5])
def test_observation_lies_in_its_space_at_a_fixed_price(fmnist_dir, price):
    # The price bounds of the space and the observed log-price must agree to the last float32 bit.
    env = prance_env.PranceViTEnv(**env_kwargs(fmnist_dir, price=price))
    obs, _ = env.reset(seed=0)
    assert env.observation_space["price"].contains(obs["price"]), (obs["price"], env.observation_space["price"])


# --- determinism ------------------------------------------------------------------------------------------------------


def test_different_seeds_give_different_images(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir))
    (obs_0, info_0), (obs_1, info_1) = env.reset(seed=0), env.reset(seed=1)
    assert info_0["index"] != info_1["index"]
    assert not np.array_equal(obs_0["cls"], obs_1["cls"])
    assert not np.array_equal(obs_0["price"], obs_1["price"])


def test_reset_options_fix_the_image_and_the_price(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir))
    (obs_0, info_0), (obs_1, info_1) = (env.reset(seed=s, options={"index": 5, "price": PRICE}) for s in (0, 1))
    assert info_0["index"] == info_1["index"] == 5
    assert data_equivalence(obs_0, obs_1, exact=True)
    np.testing.assert_allclose(obs_0["price"], np.log(PRICE), rtol=1e-6)


# --- Result-to-Go -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logprob", "correct"])
def test_delta_return_is_the_final_result_relative_to_the_full_model(fmnist_dir, kind):
    data = vit.load_dataset("fashion-mnist", root=fmnist_dir)
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, quality=kind))
    model = env.unwrapped.model
    for seed in range(4):
        actions = random_actions(env.action_space, num_steps(env), seed=seed)
        _, rewards, infos = run_episode(env, actions, seed=seed, options={"price": PRICE})
        image, label = data[infos[0]["index"]]
        subnet = infos[-1]["subnet"]
        expected = result(model, image, label, subnet, kind) - result(model, image, label, None, kind)
        assert sum(rewards) == pytest.approx(expected, abs=1e-5)
        assert infos[-1]["flops_ratio"] == vit.count_macs(model, subnet) / vit.count_macs(model)


@pytest.mark.parametrize("kind", prance_env.QUALITIES)
def test_full_width_episode_earns_nothing_at_any_step(fmnist_dir, kind):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, quality=kind))
    for seed in range(3):
        _, rewards, infos = run_episode(env, [full_actions(env)] * num_steps(env), seed=seed)
        assert rewards == [0.0] * num_steps(env)
        assert infos[-1]["flops_ratio"] == 1.0


@pytest.mark.parametrize("kind", ["logprob", "correct"])
def test_terminal_reward_is_the_final_result_paid_at_the_end(fmnist_dir, kind):
    data = vit.load_dataset("fashion-mnist", root=fmnist_dir)
    returns = {}
    for reward in ("delta", "terminal"):
        env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, quality=kind, reward=reward))
        returns[reward] = [
            run_episode(env, random_actions(env.action_space, num_steps(env), seed), seed, {"price": PRICE})[1:]
            for seed in range(4)
        ]
    model = env.unwrapped.model
    for (delta, _), (terminal, infos) in zip(returns["delta"], returns["terminal"]):
        image, label = data[infos[0]["index"]]
        assert terminal[:-1] == [0.0] * (len(terminal) - 1)
        assert terminal[-1] == pytest.approx(result(model, image, label, infos[-1]["subnet"], kind), abs=1e-5)
        # the same return as delta's but for the constant R_{-1}, the full model's result
        assert terminal[-1] - sum(delta) == pytest.approx(result(model, image, label, None, kind), abs=1e-5)


@pytest.mark.parametrize("kind", prance_env.QUALITIES)
def test_direct_reward_is_the_result_to_go_of_every_step(fmnist_dir, kind):
    data = vit.load_dataset("fashion-mnist", root=fmnist_dir)
    kwargs = env_kwargs(fmnist_dir, quality=kind)
    envs = {reward: gymnasium.make("PranceViT-v1", **kwargs, reward=reward) for reward in ("delta", "direct")}
    model = envs["direct"].unwrapped.model
    for seed in range(4):
        actions = random_actions(envs["direct"].action_space, num_steps(envs["direct"]), seed=seed)
        (_, delta, _), (_, direct, infos) = (run_episode(env, actions, seed, {"price": PRICE}) for env in envs.values())
        image, label = data[infos[0]["index"]]
        final, full = result(model, image, label, infos[-1]["subnet"], kind), result(model, image, label, None, kind)
        assert direct[-1] == pytest.approx(final, abs=1e-5)
        np.testing.assert_allclose(direct, full + np.cumsum(delta), atol=1e-5)


# --- MACs, tokens, predictions ----------------------------------------------------------------------------------------


def spent_macs(model: vit.ElasticViT, configs) -> int:
    """MACs of the patch embedding and of the blocks run at `configs` (no head)."""
    macs, n = embed_macs(model), model.num_patches
    for config in configs:
        block, n = vit.block_macs(model, n, config)
        macs += block
    return macs


def alive_tokens(model: vit.ElasticViT, configs) -> int:
    """Patch tokens left after the blocks run at `configs`, by `token_schedule`."""
    n = model.num_patches
    for config in configs:
        n = token_schedule(n, config, model.token_mode)[1]
    return n


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_largest_actions_give_the_full_model(fmnist_dir, token_mode):
    data = vit.load_dataset("fashion-mnist", root=fmnist_dir)
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, token_mode, quality="agree"))
    model = env.unwrapped.model
    preds = []
    for index in range(8):
        _, _, infos = run_episode(env, [full_actions(env)] * num_steps(env), options={"index": index})
        with torch.no_grad():
            assert infos[-1]["pred"] == int(model(data[index][0][None]).argmax())
        assert infos[-1]["label"] == data[index][1]
        assert infos[-1]["flops_ratio"] == 1.0 and infos[-1]["macs"] == vit.count_macs(model)
        assert infos[-1]["subnet"] == model.search_space.largest()
        preds.append(infos[-1]["pred"])
    assert len(set(preds)) > 1  # the perturbed model does not predict one class for every image


@pytest.mark.parametrize("blocks_per_step, stem_blocks", [(1, 1), (2, 0), (1, 0)])
@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_macs_tokens_and_progress_follow_the_subnet(fmnist_dir, token_mode, blocks_per_step, stem_blocks):
    kwargs = env_kwargs(fmnist_dir, token_mode, blocks_per_step=blocks_per_step, stem_blocks=stem_blocks)
    env = gymnasium.make("PranceViT-v1", **kwargs)
    model = env.unwrapped.model
    steps = (DEPTH - stem_blocks) // blocks_per_step
    assert num_steps(env) == steps
    for seed in range(3):
        observations, _, infos = run_episode(env, random_actions(env.action_space, steps, seed), seed=seed)
        assert infos[0]["macs"] == spent_macs(model, model.search_space.largest()[:stem_blocks])
        for t, (obs, info) in enumerate(zip(observations[1:], infos[1:]), start=1):
            configs = tuple(info["subnet"])
            assert len(configs) == stem_blocks + t * blocks_per_step
            assert configs[:stem_blocks] == tuple(model.search_space.largest()[:stem_blocks])
            assert info["tokens"] == alive_tokens(model, configs)
            if t < steps:
                assert info["macs"] == spent_macs(model, configs)
            np.testing.assert_allclose(
                obs["progress"], [t / steps, info["macs"] / vit.count_macs(model), info["tokens"] / 49], rtol=1e-6
            )
        last = infos[-1]
        assert isinstance(last["subnet"], vit.Subnet)
        assert last["macs"] == vit.count_macs(model, last["subnet"])
        assert np.all(np.diff([info["macs"] for info in infos]) > 0)
        assert np.all(np.diff([info["tokens"] for info in infos]) <= 0)


def test_continuous_actions_decode_by_rounding(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, action_type="continuous"))
    largest, smallest = env.unwrapped.model.search_space.largest(), env.unwrapped.model.search_space.smallest()
    fields = env.action_space.shape
    cases = (
        (np.ones(fields), largest),
        (-np.ones(fields), smallest),
        (np.full(fields, -0.01), smallest),  # (a + 1) / 2 = 0.495 rounds down
        (np.full(fields, 0.1), largest),  # 0.55 rounds up
    )
    for action, expected in cases:
        _, _, infos = run_episode(env, [action.astype(np.float32)] * num_steps(env), seed=0)
        assert tuple(infos[-1]["subnet"])[1:] == tuple(expected)[1:]


def test_stem_blocks_zero_starts_from_the_embedding(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, stem_blocks=0))
    assert num_steps(env) == DEPTH
    (obs_0, _), (obs_1, _) = env.reset(options={"index": 0}), env.reset(options={"index": 1})
    np.testing.assert_array_equal(obs_0["cls"], obs_1["cls"])  # the CLS token has seen no image yet
    _, _, infos = run_episode(env, random_actions(env.action_space, DEPTH), seed=0)
    assert len(infos[-1]["subnet"]) == DEPTH


# --- errors -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def discrete_env(fmnist_dir):
    return prance_env.PranceViTEnv(**env_kwargs(fmnist_dir))


@pytest.fixture(scope="module")
def continuous_env(fmnist_dir):
    return prance_env.PranceViTEnv(**env_kwargs(fmnist_dir, action_type="continuous"))


def test_invalid_subnet_error_is_a_value_error():
    assert issubclass(vit.InvalidSubnetError, ValueError)


def test_step_before_reset_raises(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir))
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(full_actions(env))
    with pytest.raises(RuntimeError, match="reset"):
        env.unwrapped.step(full_actions(env))


def test_step_after_the_end_raises(discrete_env):
    run_episode(discrete_env, [full_actions(discrete_env)] * num_steps(discrete_env), seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        discrete_env.step(full_actions(discrete_env))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"reward": "sparse"}, "unknown reward 'sparse'"),
        ({"quality": "accuracy"}, "unknown quality 'accuracy'"),
        ({"action_type": "box"}, "unknown action_type 'box'"),
        ({"token_mode": "prune"}, "token_mode"),  # a module brings its own token mode
        ({"checkpoint": "w.safetensors"}, "checkpoint applies"),  # and its own weights
        ({"supernet": "prance_fmnist", "token_mode": "drop"}, "unknown token_mode 'drop'"),
        ({"supernet": "prance_fmnist", "choices": {"depth": (1, 2)}, "checkpoint": "x"}, "unknown choices"),
        ({"stem_blocks": 1, "blocks_per_step": 2}, "multiple of blocks_per_step"),
        ({"stem_blocks": -1}, "stem_blocks"),
        ({"price_range": (0.0, 1.0)}, "0 < low <= high"),
        ({"price_range": (1.0, 0.1)}, "0 < low <= high"),
    ],
)
def test_invalid_configuration_raises(fmnist_dir, overrides, match):
    with pytest.raises(ValueError, match=match):
        gymnasium.make("PranceViT-v1", **{**env_kwargs(fmnist_dir), **overrides})


def test_unknown_keyword_raises_type_error(fmnist_dir):
    with pytest.raises(TypeError, match="reward_mode"):
        gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, reward_mode="delta"))


def test_missing_dataset_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST"):
        gymnasium.make("PranceViT-v1", **env_kwargs(tmp_path / "absent"))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"index": 96}, "index 96"),
        ({"index": -1}, "index -1"),
        ({"price": 3.0}, "price"),  # above the price range
        ({"price": float("nan")}, "price"),
    ],
)
def test_invalid_reset_options_raise(discrete_env, options, match):
    with pytest.raises(ValueError, match=match):
        discrete_env.reset(options=options)


# --- rendering --------------------------------------------------------------------------------------------------------


def panels(frame: np.ndarray, count: int) -> list[np.ndarray]:
    """The `count` panels of a token-map frame of a 28-pixel image (drawn 4 times larger): the image, then one per
    decided block."""
    assert frame.dtype == np.uint8 and frame.shape == (PANEL_PIXELS, count * PANEL_PIXELS + (count - 1) * GAP, 3)
    return [frame[:, k * (PANEL_PIXELS + GAP) :][:, :PANEL_PIXELS] for k in range(count)]


def blank(panel: np.ndarray) -> bool:
    """Whether a panel is that of a block not run yet."""
    return bool(np.all(panel == round(UNRUN_GREY * 255)))


def rendered_episode(env, actions, seed: int) -> tuple[list, list]:
    """The frames (after reset and after every step) and the steps' results of one episode."""
    env.reset(seed=seed)
    frames, results = [env.render()], []
    for action in actions:
        results.append(env.step(action))
        frames.append(env.render())
    return frames, results


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_render_draws_the_token_map_after_reset_and_every_step(fmnist_dir, token_mode):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, token_mode, render_mode="rgb_array"))
    data = vit.load_dataset("fashion-mnist", root=fmnist_dir)
    steps = num_steps(env)
    smallest = [np.zeros(env.action_space.shape, dtype=np.int64)] * steps  # the fewest tokens kept at every block
    frames, results = rendered_episode(env, smallest, seed=0)
    image = data[env.unwrapped.index][0]
    cfg = env.unwrapped.model.pretrained_cfg
    grey = np.rint((image[0].numpy() * cfg["std"][0] + cfg["mean"][0]).clip(0, 1) * 255)
    picture = np.repeat(np.repeat(grey, 4, 0), 4, 1)[..., None].repeat(3, -1)
    drawn = []
    for t, frame in enumerate(frames):
        first, *blocks = panels(frame, 1 + steps)
        np.testing.assert_allclose(first, picture, atol=1)
        assert [blank(panel) for panel in blocks] == [False] * t + [True] * (steps - t)
        drawn.append(blocks[t - 1] if t else None)
    # tokens are reduced at every block, so every block's map differs from the one before
    assert all(not np.array_equal(a, b) for a, b in zip(drawn[1:], drawn[2:]))
    # rendering changes nothing in the episode
    plain = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, token_mode))
    plain.reset(seed=0)
    assert data_equivalence(results, [plain.step(action) for action in smallest], exact=True)


def test_render_replays_the_episode_under_its_autocast(fmnist_dir, monkeypatch):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, render_mode="rgb_array", amp=True))
    model = env.unwrapped.model
    autocast_on, run_block = [], model.run_block

    def recorded(*args, **kwargs):
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return run_block(*args, **kwargs)

    env.reset(seed=0)
    env.step(np.zeros(env.action_space.shape, dtype=np.int64))
    monkeypatch.setattr(model, "run_block", recorded)
    env.render()
    assert autocast_on and all(autocast_on)


def test_render_of_a_full_width_episode_keeps_every_patch(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, render_mode="rgb_array"))
    steps = num_steps(env)
    frames, _ = rendered_episode(env, [full_actions(env)] * steps, seed=0)
    full = panels(frames[-1], 1 + steps)[1:]
    assert all(np.array_equal(panel, full[0]) for panel in full)  # nothing merged or pruned: the same map
    reduced, _ = rendered_episode(env, [np.zeros(env.action_space.shape, dtype=np.int64)] * steps, seed=0)
    assert not np.array_equal(panels(reduced[-1], 1 + steps)[-1], full[-1])


def test_render_without_a_render_mode_returns_none(discrete_env):
    discrete_env.reset(seed=0)
    assert discrete_env.render_mode is None and discrete_env.render() is None


def test_unknown_render_mode_raises(fmnist_dir):
    with pytest.raises(ValueError, match="unknown render_mode 'ansi'"):
        prance_env.PranceViTEnv(**env_kwargs(fmnist_dir, render_mode="ansi"))


def test_render_before_reset_raises(fmnist_dir):
    env = prance_env.PranceViTEnv(**env_kwargs(fmnist_dir, render_mode="rgb_array"))
    with pytest.raises(RuntimeError, match="reset"):
        env.render()


# --- the registered defaults: the MDP of the shipped selector ---------------------------------------------------------

SELECTOR = SHIPPED_SELECTORS / "prance_fmnist"
MDP_FIELDS = ("reward", "quality")


def test_registered_defaults_are_the_mdp_the_shipped_selector_was_trained_on():
    settings = json.loads(SELECTOR.with_suffix(".json").read_text())
    mdp, training = prance_env.MDPConfig(), agents.SelectorConfig()
    defaults = {f.name: f.default for f in dataclasses.fields(prance_env.EnvConfig)}
    for key in MDP_FIELDS:
        assert settings["env"][key] == getattr(mdp, key) == defaults[key] == getattr(training, key), key
    # the schedule is vit's: per-block decisions, each default resolved as the env resolves it
    env, named = settings["env"], DecisionSchedule.named
    recorded = named(env.get("decisions", "per-block"), env["stem_blocks"], env["blocks_per_step"])
    registered = named(defaults["decisions"], defaults["stem_blocks"], defaults["blocks_per_step"])
    per_block = DecisionSchedule(stem_blocks=1, blocks_per_step=1)
    assert recorded == mdp.schedule == registered == training.schedule() == per_block
    price_range = tuple(settings["env"]["price_range"])
    assert price_range == mdp.price_range == defaults["price_range"] == (training.price_low, training.price_high)
    for key in ("checkpoint", "token_mode", "data", "data_dir", "split"):
        assert settings["env"][key] == defaults[key], key
    # no supernet named: the checkpoint's preset, else prance_fmnist, the shipped selector's
    assert settings["env"]["supernet"] == vit.registry.preset_name(defaults["supernet"], defaults["checkpoint"])
    assert settings["env"]["supernet"] == training.preset


def test_v0_is_the_mdp_of_the_stage_one_pair_and_differs_from_v1_by_its_prices(fmnist_dir):
    settings = json.loads((SHIPPED_SELECTORS / "prance_fmnist_stage1.json").read_text())
    assert tuple(settings["env"]["price_range"]) == prance_env.V0_PRICE_RANGE != prance_env.MDPConfig().price_range
    assert settings["env"]["supernet"] == "prance_fmnist_stage1"
    with pytest.warns(DeprecationWarning, match="upgrading to version `v1`"):  # Gymnasium's note on an older version
        old = gymnasium.make("PranceViT-v0", data_dir=fmnist_dir, device="cpu")
        envs = gymnasium.make_vec("PranceViT-v0", num_envs=2, data_dir=fmnist_dir, device="cpu")
    new = gymnasium.make("PranceViT-v1", data_dir=fmnist_dir, device="cpu")
    assert np.exp(old.observation_space["price"].high[0]) == pytest.approx(prance_env.V0_PRICE_RANGE[1])
    assert old.observation_space["cls"] == new.observation_space["cls"] and old.action_space == new.action_space
    assert envs.single_observation_space == old.observation_space
    PPO.load((SHIPPED_SELECTORS / "prance_fmnist_stage1").with_suffix(".zip"), env=old, device="cpu")


@needs_checkpoint
def test_shipped_selector_loads_on_the_registered_env_and_decides_as_load_adaptive(fmnist_dir):
    env = gymnasium.make("PranceViT-v1", data_dir=fmnist_dir, device="cpu")
    ppo = PPO.load(SELECTOR.with_suffix(".zip"), env=env, device="cpu")
    adaptive = agents.load_adaptive("shipped:prance_fmnist", device="cpu")
    decisions = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            action, _ = ppo.predict(obs, deterministic=True)
            decided, _ = adaptive.decide({k: torch.as_tensor(v)[None] for k, v in obs.items()})
            np.testing.assert_array_equal(action, decided[0])
            decisions.append(tuple(action))
            obs, _, done, _, _ = env.step(action)
    assert len(set(decisions)) > 1  # the selector's decisions vary with the observation
    envs = prance_env.to_sb3(gymnasium.make_vec("PranceViT-v1", num_envs=2, data_dir=fmnist_dir, device="cpu"))
    PPO.load(SELECTOR.with_suffix(".zip"), env=envs, device="cpu")  # the batched env has the same defaults
    other = gymnasium.make("PranceViT-v1", data_dir=fmnist_dir, device="cpu", price_range=(0.01, 1.0))
    with pytest.raises(ValueError, match="Observation spaces do not match"):
        PPO.load(SELECTOR.with_suffix(".zip"), env=other, device="cpu")


def test_no_worse_quality_is_one_unless_the_full_model_is_right_and_the_prediction_wrong():
    """The official code's quality: labels are the full model's prediction for the first half of the images (so a
    differing prediction scores 0) and another class for the rest (so every prediction scores 1)."""
    model = supernet("merge")
    images = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(images).argmax(-1)
    labels = torch.cat([full[:20], (full[20:] + 1) % 10])
    mdp = prance_env.BatchedMDP(model, prance_env.MDPConfig(reward="direct", quality="no_worse"))
    episodes = mdp.reset(images, labels)  # price 0: the reward is the quality
    smallest = [model.search_space.smallest()[1]] * 40
    while not episodes.done:
        episodes, reward, info = mdp.step(episodes, smallest)
    expected = torch.cat([(info["pred"][:20] == full[:20]).double(), torch.ones(20, dtype=torch.float64)])
    assert torch.equal(reward, expected)
    assert 0 < reward[:20].sum() < 20  # the smallest subnet keeps some predictions and changes others


def test_direct_reward_token_penalty_is_the_fraction_of_tokens_alive(fmnist_dir):
    """The official code's extra term: the same episode's direct rewards, less 0.1 x the tokens alive after each
    step; refused with another reward."""
    envs = {
        penalty: gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, reward="direct", token_penalty=penalty))
        for penalty in (0.0, 0.1)
    }
    actions = random_actions(envs[0.0].action_space, num_steps(envs[0.0]), seed=1)
    (_, plain, infos), (_, penalised, _) = (run_episode(env, actions, 1, {"price": PRICE}) for env in envs.values())
    alive = np.array([info["tokens"] for info in infos[1:]]) / envs[0.0].unwrapped.model.num_patches
    assert alive.min() < 1  # the episode reduces tokens
    np.testing.assert_allclose(np.array(penalised), np.array(plain) - 0.1 * alive, atol=1e-9)
    with pytest.raises(ValueError, match="token_penalty"):
        gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, token_penalty=0.1))


def test_the_data_folder_is_data_dir_as_in_the_scripts_and_data_path_is_deprecated(fmnist_dir):
    with pytest.warns(DeprecationWarning, match="data_path is now data_dir"):
        old = gymnasium.make("PranceViT-v1", data_path=fmnist_dir, device="cpu")
    new = gymnasium.make("PranceViT-v1", data_dir=fmnist_dir, device="cpu")
    assert np.array_equal(old.reset(seed=3)[0]["cls"], new.reset(seed=3)[0]["cls"])
    with pytest.raises(TypeError, match="pass data_dir or its old name data_path, not both"):
        gymnasium.make("PranceViT-v1", data_path=fmnist_dir, data_dir=fmnist_dir, device="cpu")

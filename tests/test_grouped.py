"""Grouped decisions (PRANCE's: a 3-block stem, then one decision per group of 3 blocks setting each block's widths
and one token reduction at the group's first block, keep ratios down to 0.1) and the one-shot baseline, beside the
per-block MDP: the loop's shape, its MACs ledger, the env, AdaptiveViT, selector training and files, the scripts, and
the sandwich rule's grouped sampler. Tiny 12-block supernets on a generated Fashion-MNIST folder."""

import json
import warnings

import gymnasium
import numpy as np
import pytest
import stable_baselines3.common.env_checker
import torch
from conftest import flop_counter, run_script, tiny_supernet
from gymnasium.utils.env_checker import check_env
from stable_baselines3 import PPO
from test_train import tiny_config

import agents
import prance_env
import vit
import vit.train
from vit.cli import parse_dataclass
from vit.flops import block_macs, embed_macs
from vit.inference import GROUPED_KEEP_RATIOS, DecisionSchedule, InferenceRunner
from vit.token_ops import token_schedule

DEPTH = 12
GROUPED = DecisionSchedule.named("grouped")
ONE_SHOT = DecisionSchedule.named("one-shot")
PRICE = 0.05


def grouped_supernet(token_mode: str = "merge") -> vit.ElasticViT:
    """A tiny 12-block supernet offering the grouped keep ratios, its parameters perturbed so that images and
    subnets get different predictions (as `test_env.supernet`)."""
    model = tiny_supernet(token_mode, depth=DEPTH, **GROUPED.supernet_kwargs())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def make_env(data_dir, model: vit.ElasticViT, **kwargs) -> gymnasium.Env:
    kwargs = dict(supernet=model, data="fashion-mnist", data_dir=data_dir, device="cpu", **kwargs)
    return gymnasium.make("PranceViT-v1", **{"decisions": "grouped", **kwargs})


def reachable(space: vit.SearchSpace, subnet) -> bool:
    """Whether grouped decisions reach `subnet`, read off its values: the 3 stem blocks at full width, then any
    widths and a reduction (keep ratio 0.1 to 1.0) at blocks 3, 6 and 9 only."""
    subnet = tuple(subnet)
    if len(subnet) != DEPTH or subnet[:3] != tuple(space.largest()[:3]):
        return False
    for i, c in enumerate(subnet[3:], start=3):
        ratios = {c.keep_ratio, c.merge_ratio}
        if not (ratios <= set(GROUPED_KEEP_RATIOS) if i % 3 == 0 else ratios == {1.0}):
            return False
        if c.heads not in space.heads[i] or c.mlp_hidden not in space.mlp_hidden[i]:
            return False
    return True


def random_rows(nvec, batch: int, seed: int) -> torch.Tensor:
    """(batch, fields) random choice indices, the first sample at every field's first choice (keep ratio 0.1)."""
    rows = np.random.default_rng(seed).integers(0, nvec, size=(batch, len(nvec)))
    rows[0] = 0
    return torch.as_tensor(rows)


class ObservationHash:
    """Choices that look random but depend on the observation alone, so a batch and single episodes decide alike:
    field f reads CLS coordinate f (cycled), in tenths, plus the step."""

    def __init__(self, nvec) -> None:
        self.nvec = np.asarray(nvec)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        cls = np.asarray(observation["cls"], dtype=np.float64)
        coordinates = np.take(cls, np.arange(len(self.nvec)) % cls.shape[-1], axis=-1)
        step = np.rint(np.asarray(observation["progress"])[..., :1] * 100).astype(np.int64)
        return (np.floor(coordinates * 10).astype(np.int64) + step + np.arange(len(self.nvec))) % self.nvec, state


# --- the decision schedule ------------------------------------------------------------------------------------------


def test_named_schedules_and_their_checks():
    assert (
        DecisionSchedule.named("per-block") == DecisionSchedule() == DecisionSchedule(stem_blocks=1, blocks_per_step=1)
    )
    assert GROUPED == DecisionSchedule(
        3, 3, group_blocks=3, keep_ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    )
    assert ONE_SHOT == DecisionSchedule(3, 9, group_blocks=3, keep_ratios=GROUPED_KEEP_RATIOS)
    assert [list(GROUPED.blocks(t)) for t in range(GROUPED.num_steps(DEPTH))] == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert ONE_SHOT.num_steps(DEPTH) == 1 and DecisionSchedule.named("grouped", stem_blocks=0).num_steps(DEPTH) == 4
    assert DecisionSchedule(3, 3, 3, [0.5, 1]).keep_ratios == (0.5, 1.0)  # as read back from a JSON list
    with pytest.raises(ValueError, match="unknown decisions 'paper'"):
        DecisionSchedule.named("paper")
    with pytest.raises(ValueError, match="divide blocks_per_step"):
        DecisionSchedule(3, 3, group_blocks=2)
    with pytest.raises(ValueError, match="for grouped decisions"):
        DecisionSchedule(keep_ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match="end with 1.0"):
        DecisionSchedule(3, 3, 3, keep_ratios=(0.1, 0.5))


def test_grouped_decisions_need_a_supernet_offering_their_keep_ratios(fmnist_dir):
    per_block_space = tiny_supernet(depth=DEPTH)  # keep ratios (0.5, 1.0)
    with pytest.raises(ValueError, match=r"no keep_ratio \[0.1, 0.2, 0.3, 0.4, 0.6.*build it with keep_ratio_choices"):
        prance_env.ActionCodec(GROUPED, per_block_space.search_space)
    with pytest.raises(ValueError, match="keep_ratio_choices"):
        make_env(fmnist_dir, per_block_space)
    # its own keep ratios serve a grouped shape that names none
    codec = prance_env.ActionCodec(DecisionSchedule(3, 3, group_blocks=3), per_block_space.search_space)
    assert codec.nvec == (2, 2, 2, 2, 2, 2, 2)
    # a supernet built by name offers them: the env builds it with `supernet_kwargs`
    built = prance_env.build.build_supernet("prance_fmnist", None, None, None, torch.device("cpu"), GROUPED)
    assert all(built.search_space.keep_ratio[i] == GROUPED_KEEP_RATIOS for i in range(DEPTH))
    assert prance_env.ActionCodec(GROUPED, built.search_space).nvec == (4, 4, 4, 4, 4, 4, 10)


# --- the MACs ledger and per-sample execution -------------------------------------------------------------------------


@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_grouped_ledger_is_count_macs_and_the_flop_counter(token_mode):
    model = grouped_supernet(token_mode)
    runner, codec = InferenceRunner(model, GROUPED, "bucketed"), prance_env.ActionCodec(GROUPED, model.search_space)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    state = runner.start(images)
    for step in range(3):
        rest = tuple(runner.reference[state.next_block :])
        expected = [vit.count_macs(model, vit.Subnet(c + rest)) for c in state.subnets()]
        assert (state.macs + runner.completion_macs(state)).tolist() == expected
        state = runner.advance(state, codec.configs(step, random_rows(codec.nvec, 4, step)))
    subnets = [vit.Subnet(c) for c in state.subnets()]
    assert all(reachable(model.search_space, s) for s in subnets)
    first = subnets[0][3]  # every field at its first choice: keep (and merge) ratio 0.1
    assert (first.keep_ratio, first.merge_ratio) == (0.1, 0.1 if token_mode == "prune_merge" else 1.0)
    assert state.macs.tolist() == vit.count_macs(model, subnets)
    for i, subnet in enumerate(subnets):  # the analytic count is what torch counts
        with flop_counter() as counter, torch.no_grad():
            model(images[i : i + 1], subnet)
        assert counter.get_total_flops() / 2 == vit.count_macs(model, subnet), str(subnet)


@pytest.mark.parametrize("layout", ["packed", "bucketed"])
@pytest.mark.parametrize("token_mode", vit.TOKEN_MODES)
def test_grouped_decisions_in_a_batch_give_each_image_its_own_logits(layout, token_mode):
    model = grouped_supernet(token_mode)
    runner, codec = InferenceRunner(model, GROUPED, layout), prance_env.ActionCodec(GROUPED, model.search_space)
    images = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    state = runner.start(images)
    while not state.done:
        state = runner.advance(state, codec.configs(state.step, random_rows(codec.nvec, 6, state.step + 10)))
    subnets = [vit.Subnet(c) for c in state.subnets()]
    assert len(set(subnets)) == 6
    logits = runner.complete(state)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images, subnets), atol=1e-5, rtol=0)
        for i, subnet in enumerate(subnets):
            torch.testing.assert_close(logits[i : i + 1], model(images[i : i + 1], subnet), atol=1e-5, rtol=0)


# --- the env ----------------------------------------------------------------------------------------------------------


def test_grouped_episode_has_three_steps_of_seven_fields_after_a_three_block_stem(fmnist_dir):
    model = grouped_supernet()
    env = make_env(fmnist_dir, model, price=PRICE)
    space, largest = model.search_space, model.search_space.largest()
    assert env.action_space == gymnasium.spaces.MultiDiscrete([2, 2, 2, 2, 2, 2, 10])
    assert env.unwrapped.codec.fields == (
        "heads[0]", "mlp_hidden[0]", "heads[1]", "mlp_hidden[1]", "heads[2]", "mlp_hidden[2]", "keep_ratio[0]",
    )  # fmt: skip
    obs, info = env.reset(seed=0)
    image = env.unwrapped.image
    with torch.no_grad():  # the first observation reads the CLS token after 3 full-width blocks
        tokens = vit.PackedBatch(model.embed(image[None]))
        for i in range(3):
            tokens = model.run_block(i, tokens, largest[i])
    np.testing.assert_allclose(obs["cls"], tokens.cls()[0].numpy(), atol=1e-5, rtol=0)
    stem = embed_macs(model) + 3 * block_macs(model, model.num_patches, largest[0])[0]
    assert info["macs"] == stem and obs["progress"][0] == 0.0
    actions = [np.array([1, 0, 0, 1, 1, 1, 0]), np.array([0, 1, 1, 0, 0, 0, 4]), np.array([1, 1, 1, 1, 0, 1, 9])]
    tokens = model.num_patches
    for t, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        assert terminated == (t == 2) and not truncated and np.isfinite(reward)
        configs = info["subnet"][3 + 3 * t :]
        assert len(info["subnet"]) == 6 + 3 * t and len(configs) == 3
        for j, c in enumerate(configs):  # each block its own widths; the reduction at the group's first block
            block = 3 + 3 * t + j
            assert (c.heads, c.mlp_hidden) == (
                space.heads[block][action[2 * j]],
                space.mlp_hidden[block][action[2 * j + 1]],
            )
            assert c.keep_ratio == (GROUPED_KEEP_RATIOS[action[6]] if j == 0 else 1.0)
            tokens = token_schedule(tokens, c, model.token_mode)[1]
        assert info["tokens"] == tokens and obs["progress"][0] == pytest.approx((t + 1) / 3)
    assert isinstance(info["subnet"], vit.Subnet) and reachable(space, info["subnet"])
    assert info["macs"] == vit.count_macs(model, info["subnet"]) and tokens == 3  # 0.1 of 49 leaves 5, 0.5 of 5: 3
    assert info["flops_ratio"] == pytest.approx(info["macs"] / vit.count_macs(model))


def test_one_shot_is_one_step_of_twenty_one_fields(fmnist_dir):
    model = grouped_supernet()
    env = make_env(fmnist_dir, model, decisions="one-shot")
    assert env.action_space.shape == (21,) and env.unwrapped.codec.num_steps == 1
    assert list(env.action_space.nvec) == [2, 2, 2, 2, 2, 2, 10] * 3
    obs, info = env.reset(seed=0)
    assert (
        info["macs"] == embed_macs(model) + 3 * block_macs(model, model.num_patches, model.search_space.largest()[0])[0]
    )
    obs, _, terminated, _, info = env.step(np.array([0, 0, 1, 1, 0, 1, 7] * 3))
    assert terminated and reachable(model.search_space, info["subnet"])
    assert [c.keep_ratio for c in info["subnet"]] == [1.0] * 3 + [0.8, 1.0, 1.0] * 3
    assert info["macs"] == vit.count_macs(model, info["subnet"])


def assert_checkers_pass_silently(env: gymnasium.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=False)
        stable_baselines3.common.env_checker.check_env(env, skip_render_check=False)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


@pytest.mark.parametrize(
    "decisions, token_mode, action_type, fields",
    [
        ("grouped", "merge", "discrete", 7),
        ("grouped", "merge", "continuous", 7),
        ("grouped", "prune_merge", "discrete", 8),
        ("one-shot", "prune", "continuous", 21),
    ],
)
def test_env_checkers_pass_for_grouped_decisions(fmnist_dir, decisions, token_mode, action_type, fields):
    model = grouped_supernet(token_mode)
    env = make_env(fmnist_dir, model, decisions=decisions, action_type=action_type, render_mode="rgb_array")
    assert env.action_space.shape == (fields,)
    assert_checkers_pass_silently(env)


def test_grouped_render_draws_every_decided_block(fmnist_dir):
    env = make_env(fmnist_dir, grouped_supernet(), render_mode="rgb_array")
    env.reset(seed=0)
    blank = env.render()
    env.step(np.array([0, 0, 0, 0, 0, 0, 0]))  # keep 0.1 at block 3: its patches merge into 5 tokens
    frame = env.render()
    assert frame.shape == blank.shape and frame.dtype == np.uint8
    assert not np.array_equal(frame, blank)


def test_invalid_grouped_actions_raise_and_change_nothing(fmnist_dir):
    env = make_env(fmnist_dir, grouped_supernet())
    env.reset(seed=0)
    before = env.unwrapped.episodes
    for action, match in [
        (
            np.array([0, 0, 0, 0, 0, 0, 10]),
            r"action \[0, 0, 0, 0, 0, 0, 10\]: keep_ratio\[0\] index 10 out of range \[0, 10\)",
        ),
        (np.array([0, 0, 2, 0, 0, 0, 1]), r"heads\[1\] index 2 out of range \[0, 2\)"),
        (np.zeros(3, dtype=np.int64), r"expected actions of shape \(7,\) for fields \('heads\[0\]', 'mlp_hidden\[0\]'"),
        (np.zeros((1, 7), dtype=np.int64), "expected actions of shape"),
        (np.full(7, 0.5), "whole numbers"),
    ]:
        with pytest.raises(ValueError, match=match):
            env.step(action)
        assert env.unwrapped.episodes is before  # immutable: nothing was run
    env.step(np.zeros(7, dtype=np.int64))  # the episode goes on
    assert env.unwrapped.episodes.inference.step == 1


def test_grouped_vector_env_runs_each_image_as_the_single_env(fmnist_dir):
    model = grouped_supernet()
    kwargs = dict(supernet=model, data_dir=fmnist_dir, device="cpu", decisions="grouped")
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=3, **kwargs)
    assert envs.single_action_space.shape == (7,) and envs.action_space.shape == (3, 7)
    single = gymnasium.make("PranceViT-v1", **kwargs)
    actions = [np.array(a) for a in np.random.default_rng(0).integers(0, [2, 2, 2, 2, 2, 2, 10], size=(3, 3, 7))]
    envs.reset(seed=0, options={"indices": [5, 6, 7], "price": PRICE})
    assert envs.action_masks().shape == (3, 22)
    rewards = []
    for t, action in enumerate(actions):
        _, reward, terminated, _, info = envs.step(action)
        rewards.append(reward)
        assert terminated.all() == (t == 2)
    for i, index in enumerate([5, 6, 7]):
        single.reset(options={"index": index, "price": PRICE})
        for t, action in enumerate(actions):
            _, reward, _, _, alone = single.step(action[i])
            assert reward == pytest.approx(rewards[t][i], abs=1e-6)
        assert alone["subnet"] == info["subnet"][i] and alone["macs"] == info["macs"][i]
    venv = prance_env.to_sb3(envs)
    venv.reset()
    for t in range(3):
        _, _, dones, infos = venv.step(actions[t])
    assert dones.all() and "terminal_observation" in infos[0] and venv.envs.episodes.inference.step == 0


# --- AdaptiveViT, selectors and the scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("decisions", ["grouped", "one-shot"])
def test_adaptive_vit_with_a_random_grouped_policy_equals_the_env(fmnist_dir, decisions):
    model = grouped_supernet()
    shape = DecisionSchedule.named(decisions)
    env = make_env(fmnist_dir, model, decisions=decisions, split="test")
    policy = ObservationHash(env.action_space.nvec)
    indices = np.arange(8)
    images, _ = env.unwrapped.source.get(indices)
    adaptive = agents.AdaptiveViT(model, policy, schedule=shape)
    logits, macs, decisions_made = adaptive(images, price=PRICE, return_decisions=True)
    steps = shape.num_steps(DEPTH)
    assert decisions_made.indices.shape == (len(indices), steps, len(env.action_space.nvec))
    for i in indices:
        obs, _ = env.reset(options={"index": int(i), "price": PRICE})
        done = False
        while not done:
            obs, _, done, _, info = env.step(policy.predict(obs)[0])
        assert decisions_made.subnets[i] == info["subnet"] and reachable(model.search_space, info["subnet"])
        assert float(macs[i]) == info["macs"] and int(logits[i].argmax()) == info["pred"]
        with torch.no_grad():
            torch.testing.assert_close(logits[i], model(images[i : i + 1], info["subnet"])[0], atol=1e-5, rtol=0)
    assert len(set(decisions_made.subnets)) > 1


@pytest.fixture(scope="module")
def grouped_selector(fmnist_dir, tmp_path_factory):
    """A PPO selector trained by `scripts/train_selector.py --decisions grouped` for 24 steps on random prance_fmnist
    weights: (path without suffix, weights file)."""
    root = tmp_path_factory.mktemp("grouped")
    torch.manual_seed(0)
    weights = vit.save_checkpoint(vit.create_supernet("prance_fmnist"), root / "w.safetensors")
    run_script(
        "train_selector.py",
        "--decisions",
        "grouped",
        *("--checkpoint", str(weights), "--data-dir", str(fmnist_dir), "--device", "cpu", "--hidden", "16"),
        *("--num-envs", "8", "--n-steps", "3", "--minibatch-size", "24", "--total-steps", "24"),
        *("--eval-every", "24", "--save-every", "24", "--images", "8", "--out", str(root / "run")),
    )
    return root / "run" / "selector", weights


def test_a_grouped_selector_saves_and_loads_back_with_its_shape(grouped_selector, fmnist_dir):
    path, weights = grouped_selector
    settings = json.loads(path.with_suffix(".json").read_text())
    assert settings["config"]["decisions"] == settings["env"]["decisions"] == "grouped"
    assert (settings["env"]["stem_blocks"], settings["env"]["blocks_per_step"]) == (3, 3)
    adaptive = agents.load_adaptive(path, device="cpu")
    assert adaptive.schedule == GROUPED and adaptive.nvec == (4, 4, 4, 4, 4, 4, 10)
    expected = vit.create_supernet("prance_fmnist", checkpoint=weights)
    torch.testing.assert_close(adaptive.supernet.state_dict(), expected.state_dict(), atol=0, rtol=0)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits, macs, decisions = adaptive(images, return_decisions=True)
    assert decisions.indices.shape == (4, 3, 7) and all(
        reachable(adaptive.supernet.search_space, s) for s in decisions.subnets
    )
    # the same spaces as the grouped env, so SB3 loads it there
    kwargs = dict(checkpoint=str(weights), data_dir=fmnist_dir, device="cpu")
    PPO.load(path.with_suffix(".zip"), env=gymnasium.make("PranceViT-v1", decisions="grouped", **kwargs), device="cpu")
    with pytest.raises(ValueError, match="Action spaces do not match"):
        PPO.load(path.with_suffix(".zip"), env=gymnasium.make("PranceViT-v1", **kwargs), device="cpu")


@pytest.mark.long
def test_evaluate_and_visualize_a_grouped_selector(grouped_selector, fmnist_dir, tmp_path):
    path, _ = grouped_selector
    common = ("--selector", str(path), "--data-dir", str(fmnist_dir), "--device", "cpu", "--threads", "1")
    out = run_script(
        "evaluate.py",
        *common,
        *("--budgets", "0.5", "--images", "16", "--calib-images", "16", "--batch-size", "16"),
        *("--out", str(tmp_path / "evaluate")),
    ).stdout
    table = json.loads((tmp_path / "evaluate" / "results.json").read_text())["table"]
    methods = [row["method"] for row in table]
    assert methods[0] == "full model" and methods[-1] == "random decisions"
    assert any(m.startswith("PRANCE selector") for m in methods)
    assert all(0 < row["flops_ratio"] <= 1 for row in table) and "16 images" in out
    run_script("visualize.py", *common, "--images", "2", "--out", str(tmp_path / "visualize"))
    assert (tmp_path / "visualize" / "tokens.png").stat().st_size > 10_000


# --- supernet training: the grouped sampler ---------------------------------------------------------------------------


def test_grouped_sandwich_yields_only_subnets_the_grouped_env_reaches():
    model = grouped_supernet()
    space = model.search_space
    subnets = vit.train.sandwich(model, 40, np.random.default_rng(0), GROUPED)
    assert subnets[0] == space.largest()
    smallest = subnets[1]
    assert [c.keep_ratio for c in smallest] == [1.0] * 3 + [0.1, 1.0, 1.0] * 3
    assert all(c.heads == 1 and c.mlp_hidden == 32 for c in smallest[3:])
    assert all(reachable(space, s) for s in subnets)
    assert {c.keep_ratio for s in subnets[2:] for c in s[3::3]} == set(GROUPED_KEEP_RATIOS)  # every ratio is drawn
    # the per-block sampler draws from the whole space: the stem narrows and every block reduces
    per_block = vit.train.sandwich(model, 40, np.random.default_rng(0))
    assert not all(reachable(space, s) for s in per_block)


def test_train_supernet_with_grouped_decisions_trains_reachable_subnets(tmp_path, fmnist_dir, monkeypatch):
    assert parse_dataclass(vit.train.TrainConfig, ["--decisions", "grouped"]).decisions == "grouped"
    seen = []
    sample = vit.train.sandwich

    def recording(*args):
        seen.extend(subnets := sample(*args))
        return subnets

    monkeypatch.setattr(vit.train, "sandwich", recording)
    cfg = tiny_config(
        tmp_path, fmnist_dir, epochs=1, steps_per_epoch=2, num_random=2, largest_only_epochs=0, decisions="grouped"
    )
    model = grouped_supernet().train()
    vit.train.train_supernet(cfg, model)
    space = model.search_space
    assert len(seen) == 2 * 4 + 2 and all(reachable(space, s) for s in seen)
    assert any(c.keep_ratio < 0.6 for s in seen for c in s)
    with pytest.raises(ValueError, match="keep_ratio_choices"):
        vit.train.train_supernet(cfg, tiny_supernet(depth=DEPTH))


@pytest.mark.parametrize("token_mode", ["merge", "prune_merge"])
def test_uniform_merging_with_the_field_names_reduces_at_every_group_at_full_width(token_mode):
    model = grouped_supernet(token_mode)
    space, keep = model.search_space, 2
    policy = agents.UniformMergePolicy(GROUPED.nvec(space), keep, fields=GROUPED.fields(space))
    action = policy.predict({"cls": np.zeros(4, dtype=np.float32)})[0]
    subnet = GROUPED.subnet(space, [action] * GROUPED.num_steps(DEPTH))
    largest = space.largest()
    assert reachable(space, subnet)
    assert all((c.heads, c.mlp_hidden) == (full.heads, full.mlp_hidden) for c, full in zip(subnet, largest))
    ratio = GROUPED_KEEP_RATIOS[keep]
    assert [c.keep_ratio for c in subnet] == [ratio if i in (3, 6, 9) else 1.0 for i in range(DEPTH)]
    assert {c.merge_ratio for c in subnet} == ({1.0, ratio} if token_mode == "prune_merge" else {1.0})

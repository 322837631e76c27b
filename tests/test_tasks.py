"""Named benchmark tasks and scores with bootstrap intervals."""

import json
from pathlib import Path

import numpy as np
import pytest

import prance_env.tasks as tasks
import vit
from agents import leaderboard
from agents.baselines import FullModelPolicy, StaticPolicy
from agents.score import Score, Scorer, bootstrap_mean, budget_status, paired_difference
from prance_env.tasks import DECISIONS


def test_the_registered_tasks_are_both_mdps_at_three_budgets():
    names = tasks.list_tasks()
    assert len(names) == 6 and {tasks.get_task(n).decisions for n in names} == {"per-block", "grouped"}
    assert {tasks.get_task(n).budget for n in names} == {0.3, 0.5, 0.7}
    with pytest.raises(ValueError, match="unknown task 'nope'; registered: fmnist-per-block-0.3"):
        tasks.get_task("nope")
    with pytest.raises(ValueError, match=r"budget is a fraction of the full model's MACs in \(0, 1\]"):
        tasks.Task("bad", budget=1.5)
    custom = tasks.Task.custom("prance_deit_tiny", "imagefolder", 0.5)
    assert custom.name == "prance_deit_tiny-imagefolder-per-block-0.5"


def test_a_task_s_calibration_and_held_out_images_never_overlap(fmnist_dir):
    task = tasks.Task("t", data_dir=fmnist_dir, calibration_images=40)
    env = task.make_env(device="cpu")
    calibration, held_out = task.datasets(env.unwrapped.model)
    assert len(calibration) == 40 and len(held_out) == 48  # the whole held-out split
    train = vit.load_dataset("fashion-mnist", split="train", root=fmnist_dir)
    pixels = {train[i][0].numpy().tobytes() for i in calibration.indices}
    assert not pixels & {held_out[i][0].numpy().tobytes() for i in range(len(held_out))}
    again, _ = task.datasets(env.unwrapped.model)
    assert list(again.indices) == list(calibration.indices)  # seeded
    labels = vit.data.labels_of(train)[np.asarray(calibration.indices)]
    assert len(set(labels.tolist())) == 10  # stratified: every class


def test_a_policy_against_itself_differs_by_zero_with_an_interval_holding_zero():
    outcomes = np.random.default_rng(0).integers(0, 2, 500)
    same = paired_difference(outcomes, outcomes)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and same.contains(0) and not same.significant


def test_a_better_policy_is_significant_and_a_noisy_equal_one_is_not():
    rng = np.random.default_rng(1)
    worse = rng.random(2000) < 0.80
    better = worse | (rng.random(2000) < 0.25)  # right wherever the worse one is, and on a quarter of the rest
    assert paired_difference(worse, better).significant and paired_difference(worse, better).low > 0
    other = rng.random(2000) < 0.80  # as good, independent errors
    assert paired_difference(worse, other).contains(0)
    interval = bootstrap_mean(worse.astype(float))
    assert interval.low < worse.mean() < interval.high
    with pytest.raises(ValueError, match="one value per image for both"):
        paired_difference([1, 0], [1, 0, 1])


# --- scoring policies on tasks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_scorer(fmnist_dir):
    """The shipped supernet's per-block task on the tiny random-pixel folder (96 train, 48 held-out images)."""
    return Scorer(tasks.Task("tiny", data_dir=fmnist_dir, calibration_images=40), device="cpu", resamples=500)


def test_random_decisions_against_themselves_differ_by_zero(tiny_scorer):
    score = tiny_scorer.score("random", [tiny_scorer.random])
    assert (score.vs_random.mean, score.vs_random.low, score.vs_random.high) == (0.0, 0.0, 0.0)
    assert score.vs_random.contains(0) and not score.vs_random.significant
    assert score.top1.low <= score.top1.mean <= score.top1.high and score.seeds == 1


def test_an_unreachable_budget_is_flagged_and_never_scored_as_met(tiny_scorer):
    full = FullModelPolicy(tiny_scorer.nvec)
    score = tiny_scorer.score_policy(full, budget=0.5, entry="full model")
    assert score.status == "out of reach" and score.macs_ratio.mean == pytest.approx(1.0)
    runs = tiny_scorer.policy_outcomes(full, (0.3, 0.5))
    assert tiny_scorer.auc(runs) is None  # a curve with a budget out of reach has no area
    cheap = StaticPolicy(tiny_scorer.nvec, [0] * len(tiny_scorer.nvec))  # the smallest subnet
    assert tiny_scorer.score_policy(cheap, budget=0.5).status == "under"
    assert tiny_scorer.auc(tiny_scorer.policy_outcomes(cheap, (0.3, 0.5))) is not None
    assert [budget_status(r, 0.5) for r in (0.49, 0.515, 0.47, 0.53)] == ["met", "met", "under", "out of reach"]


def test_a_saved_selector_a_predicter_and_a_callable_are_all_policies(tiny_scorer):
    shipped = tiny_scorer.score_policy("shipped:prance_fmnist", budget=0.5, entry="shipped")
    assert shipped.settings[0].startswith("price ") and shipped.task == "tiny"
    nvec = np.asarray(tiny_scorer.nvec)
    same = tiny_scorer.score_policy(lambda obs: np.zeros((len(obs["cls"]), len(nvec)), dtype=np.int64), budget=0.5)
    static = tiny_scorer.score_policy(StaticPolicy(nvec, [0] * len(nvec)), budget=0.5)
    assert same.top1 == static.top1 and same.macs_ratio == static.macs_ratio
    seeds = tiny_scorer.score_policy([StaticPolicy(nvec, [0] * len(nvec)), FullModelPolicy(nvec)], budget=0.5)
    full = tiny_scorer.score_policy(FullModelPolicy(nvec), budget=0.5)
    assert seeds.seeds == 2 and seeds.top1.mean == pytest.approx((static.top1.mean + full.top1.mean) / 2)
    with pytest.raises(TypeError, match="a policy has SB3's predict"):
        tiny_scorer.score_policy(42)
    again = Score.from_dict(shipped.to_dict())
    assert again == shipped


def test_the_full_model_scores_significantly_better_than_random_decisions_at_the_same_price():
    # the shipped supernet on the grouped task (keep ratios down to 0.1), scored on the whole Fashion-MNIST test split
    scorer = Scorer(tasks.Task("t", decisions="grouped", calibration_images=256), device="cpu", batch_size=500)
    full = scorer.score_policy(FullModelPolicy(scorer.nvec), budget=0.7, entry="full model")
    assert len(scorer.random.correct) == 10_000
    assert full.vs_random.significant and full.vs_random.low > 0, full.vs_random


def test_seeds_are_resampled_with_the_images():
    rng = np.random.default_rng(0)
    images = rng.random(400) < 0.8
    spread = np.stack([images, images & (rng.random(400) < 0.7), images | (rng.random(400) < 0.7)])
    one, three = bootstrap_mean(images.astype(float)), bootstrap_mean(spread)
    assert three.high - three.low > 2 * (one.high - one.low)  # the seeds disagree: a wider interval
    assert paired_difference(images, spread).mean == pytest.approx(spread.mean() - images.mean())
    with pytest.raises(ValueError, match="as many seeds or one"):
        paired_difference(spread[:2], spread)


# --- the leaderboard --------------------------------------------------------------------------------------------


def test_the_leaderboard_trains_every_algorithm_and_reward_for_three_seeds():
    runs = leaderboard.agent_runs(DECISIONS, leaderboard.ALGOS, leaderboard.REWARDS, (0, 1, 2))
    assert len(runs) == 33 and len({r.label for r in runs}) == 33
    assert {r.entry for r in runs if r.tasks == "grouped"} >= {
        "PPO from scratch, terminal reward",
        "one-shot PPO (no MDP)",
    }
    cfg = leaderboard.run_config(runs[0], leaderboard.TrainSettings(steps=1000), Path("out"))
    assert (cfg.algo, cfg.reward, cfg.decisions, cfg.total_steps, cfg.resume) == (
        "ppo",
        "delta",
        "per-block",
        1000,
        True,
    )
    mine = leaderboard.LeaderboardConfig(agent=("shipped:prance_fmnist",), algos=(), rewards=(), one_shot=False)
    yours = [e for e in leaderboard.entries(mine) if e.name.endswith("(yours)")]
    assert [(e.decisions, e.paths) for e in yours] == [("per-block", ("shipped:prance_fmnist",))]
    with pytest.raises(ValueError, match="shard must be k/n"):
        leaderboard.train_runs(runs, leaderboard.TrainSettings(), Path("out"), shard=(2, 2))


def test_the_leaderboard_writes_its_tables_and_validates_them(fmnist_dir, tmp_path, capsys):
    cfg = leaderboard.LeaderboardConfig(
        out=str(tmp_path / "lb"), decisions=("per-block",), budgets=(0.3, 0.5), algos=(), rewards=(), one_shot=False,
        heuristics=False, data_dir=str(fmnist_dir), device="cpu",
    )  # fmt: skip
    results = leaderboard.leaderboard(cfg)
    names = [e["name"] for e in results["entries"]]
    assert names[:3] == ["full model", "best static subnet", "random decisions"] and "uniform merging" in names
    assert len(results["scores"]) == 2 * len(names) and {s["task"] for s in results["scores"]} == {
        "fmnist-per-block-0.3", "fmnist-per-block-0.5"}  # fmt: skip
    full = [s for s in results["scores"] if s["entry"] == "full model"]
    assert {s["status"] for s in full} == {"out of reach"}
    text = (tmp_path / "lb" / "results.md").read_text()
    assert "### fmnist-per-block-0.5" in text and "| full model | " in text and "out of reach" in text
    assert (tmp_path / "lb" / "results.png").stat().st_size > 10_000
    saved = tmp_path / "lb" / "results.json"
    rows = leaderboard.validate(leaderboard.LeaderboardConfig(validate=str(saved), only=("random", "shipped")))
    assert rows and all(r["inside"] for r in rows)
    edited = json.loads(saved.read_text())
    target = next(s for s in edited["scores"] if s["entry"] == "random decisions")
    target["top1"]["mean"] += 0.5  # 50 points: far outside on 48 images
    saved.write_text(json.dumps(edited))
    rows = leaderboard.validate(leaderboard.LeaderboardConfig(validate=str(saved), only=("random",)))
    assert [r["inside"] for r in rows] == [r["task"] != target["task"] for r in rows]
    assert "OUTSIDE" in capsys.readouterr().out

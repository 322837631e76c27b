"""Named benchmark tasks and scores with bootstrap intervals."""

import numpy as np
import pytest

import prance_env.tasks as tasks
import vit
from agents.score import bootstrap_mean, paired_difference


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

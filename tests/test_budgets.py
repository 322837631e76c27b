"""Prices are checked wherever a model is deployed, as the env checks them, and budgets are first-class: a selector
file records its calibration and `AdaptiveViT(..., budget=)` spends what it asks."""

import math
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from conftest import images

import agents
import prance_env  # noqa: F401  (registers PranceViT-v1)
import vit
from agents import Calibration
from agents.selector import selector_batches


@pytest.fixture(scope="module")
def shipped() -> agents.AdaptiveViT:
    return agents.load_adaptive("shipped:prance_fmnist", device="cpu")


@pytest.mark.parametrize("price", [-1.0, 0.0, math.nan, math.inf])
def test_every_entry_point_refuses_a_price_that_is_not_positive_and_finite(shipped, price, fmnist_dir):
    message = "price must be a positive, finite number"
    x = images(shipped.supernet, 2)
    with pytest.raises(ValueError, match=message):
        shipped(x, price=price)
    with pytest.raises(ValueError, match=message):
        shipped(x, price=torch.tensor([0.01, price]))
    with pytest.raises(ValueError, match=message):
        shipped.replace(price=price)
    with pytest.raises(ValueError, match=message):
        gymnasium.make("PranceViT-v1", price=price, data_dir=str(fmnist_dir), device="cpu")
    env = gymnasium.make("PranceViT-v1", data_dir=str(fmnist_dir), device="cpu")
    with pytest.raises(ValueError, match=message):
        env.reset(seed=0, options={"price": price})
    env.close()


def test_a_price_outside_the_trained_range_warns_once(shipped):
    x = images(shipped.supernet, 2)
    adaptive = shipped.replace()
    with pytest.warns(UserWarning, match=r"price 100 lies outside the prices the selector was trained on"):
        adaptive(x, price=100.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptive(x, price=1e-6)  # once per model
        adaptive(x, price=0.01)
    with pytest.warns(UserWarning, match="lies outside"):
        shipped.replace(price=1e-5)


def test_calibration_interpolates_log_price_and_refuses_budgets_out_of_reach():
    calibration = Calibration(prices=(0.001, 0.01, 0.1), ratios=(0.8, 0.6, 0.3), images=10)
    assert calibration.price_for(0.6) == pytest.approx(0.01)
    assert calibration.price_for(0.7) == pytest.approx(math.sqrt(0.001 * 0.01))
    assert calibration.price_for(0.45) == pytest.approx(math.sqrt(0.01 * 0.1))
    with pytest.raises(ValueError, match=r"budget 0.9 is out of reach: .* spends 0.300 to 0.800 .*\(10 train"):
        calibration.price_for(0.9)
    with pytest.raises(ValueError, match=r"budget must lie in \(0, 1\]"):
        calibration.price_for(1.5)
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_a_budget_needs_a_calibration(shipped):
    uncalibrated = agents.AdaptiveViT(shipped.supernet, shipped.policy)
    with pytest.raises(ValueError, match="no calibration to turn a budget into a price"):
        uncalibrated(images(shipped.supernet, 1), budget=0.5)
    with pytest.raises(ValueError, match="give the price or the budget"):
        shipped(images(shipped.supernet, 1), price=0.01, budget=0.5)


def test_the_shipped_selector_spends_its_budget_on_test_images(shipped):
    """The calibration the shipped file records (1000 training images) holds on 2000 test images within 0.02."""
    assert shipped.calibration is not None and shipped.calibration.split == "train"
    test = selector_batches("shipped:prance_fmnist", "held-out", shipped.supernet, 2000, 500, torch.device("cpu"))
    full = shipped.full_macs
    for budget in (0.3, 0.5, 0.7):
        spent = np.mean([float(shipped(x, budget=budget)[1].mean()) for x, _ in test]) / full
        assert spent == pytest.approx(budget, abs=0.02)
    at_half = agents.load_adaptive("shipped:prance_fmnist", device="cpu", budget=0.5)
    assert at_half.price == pytest.approx(shipped.price_for(0.5))


def test_calibrate_selector_records_a_curve_that_load_adaptive_reads(tmp_path, fmnist_dir):
    """A freshly calibrated file: prices ascending over the trained range, ratios within [smallest, 1]."""
    source = agents.resolve_selector("shipped:prance_fmnist")
    for suffix in (".zip", ".json"):
        (tmp_path / f"copy{suffix}").write_bytes(source.with_suffix(suffix).read_bytes())
    settings = agents.selector.read_settings(tmp_path / "copy") | {"calibration": None}
    settings["env"]["data_dir"] = str(fmnist_dir)
    agents.selector.write_settings(tmp_path / "copy", settings)
    calibration = agents.calibrate_selector(tmp_path / "copy", images=40, device="cpu", points=5)
    adaptive = agents.load_adaptive(tmp_path / "copy", device="cpu")
    assert adaptive.calibration == calibration and calibration.images == 40
    assert calibration.prices[0] == pytest.approx(adaptive.price_range[0])
    assert calibration.prices[-1] == pytest.approx(adaptive.price_range[1])
    smallest = vit.count_macs(adaptive.supernet, adaptive.supernet.search_space.smallest()) / adaptive.full_macs
    assert all(smallest - 1e-9 <= r <= 1 for r in calibration.ratios)
    assert calibration.ratios[0] > calibration.ratios[-1]  # dearer compute, fewer MACs


def test_a_budget_out_of_reach_is_labelled_with_what_was_reached():
    from agents.report import budget_setting

    assert budget_setting(0.5, 2.0, 0.305, (3e-4, 2.0)) == "budget 0.5 out of reach (reached 0.305), price 2"
    assert budget_setting(0.3, 2.0, 0.31, (3e-4, 2.0)) == "budget 0.3, price 2"  # reached at the range's end
    assert budget_setting(0.5, 0.02, 0.46, (3e-4, 2.0)) == "budget 0.5, price 0.02"  # calibrated inside the range


def test_the_results_table_has_a_top5_column_only_beyond_five_classes():
    from agents.report import markdown

    row = dict(method="m", setting="s", top1=0.5, top5=1.0, gmacs=0.1, flops_ratio=0.5, params=1e6, tokens_kept=1.0)
    row |= dict(images_per_s=10.0, speedup=1.0)
    assert "Top-5" in markdown([row], 8, 8, "fp32") and "| 100.00 |" in markdown([row], 8, 8, "fp32")
    five = markdown([row], 8, 8, "fp32", top5=False)
    assert "Top-5" not in five and "| 100.00 |" not in five
    assert all(line.count("|") == 10 for line in five.splitlines()[2:])

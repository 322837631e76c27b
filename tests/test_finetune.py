"""agents.finetune, PRANCE's stage three: a supernet fine-tuned on the subnets its selector picks. Tiny supernets under
tiny saved selectors on the generated Fashion-MNIST folder; the script end to end on prance_fmnist under the shipped
selector."""

import dataclasses
import json
import math
from pathlib import Path

import gymnasium
import pytest
import torch
from conftest import run_script, tiny_supernet
from stable_baselines3 import PPO

import agents
import prance_env
import vit
from agents import finetune as finetune_module
from agents.finetune import FinetuneConfig, distill_loss, joint_finetune, selector_subnets
from agents.selector import supernet_signature
from vit.train import Batches

PRICE_RANGE = (0.001, 1.0)


def save_tiny_selector(path: Path, model: vit.ElasticViT, fmnist_dir: Path, smallest: bool = False) -> Path:
    """An untrained PPO selector for `model`, saved as `train_selector` saves one. Its action logits are scaled up so
    that its choices vary with the image and the price; with `smallest`, it always picks the first (smallest) choice
    of every field."""
    envs = gymnasium.make_vec(
        "PranceViT-v1",
        num_envs=2,
        supernet=model,
        data="fashion-mnist",
        data_dir=str(fmnist_dir),
        device="cpu",
        price_range=PRICE_RANGE,
    )
    ppo = PPO("MultiInputPolicy", prance_env.to_sb3(envs), n_steps=8, batch_size=16, seed=0, device="cpu")
    action = ppo.policy.action_net
    with torch.no_grad():
        action.weight.mul_(0.0 if smallest else 300.0)
        if smallest:
            firsts = torch.cumsum(torch.tensor([0, *envs.single_action_space.nvec[:-1]]), 0)
            action.bias.zero_()[firsts] = 10.0
    env = {"data": "fashion-mnist", "data_dir": str(fmnist_dir), "price_range": list(PRICE_RANGE)}
    settings = {
        "algo": "ppo",
        "signature": supernet_signature(model),
        "env": {**env, "stem_blocks": 1, "blocks_per_step": 1},
    }
    envs.close()
    return agents.save_selector(ppo, path, settings).with_suffix("")


@pytest.fixture(scope="module")
def selector(fmnist_dir, tmp_path_factory) -> Path:
    return save_tiny_selector(tmp_path_factory.mktemp("selector") / "selector", tiny_supernet(), fmnist_dir)


@pytest.fixture(scope="module")
def smallest_selector(fmnist_dir, tmp_path_factory) -> Path:
    return save_tiny_selector(tmp_path_factory.mktemp("smallest") / "selector", tiny_supernet(), fmnist_dir, True)


def config(selector: Path, out: Path, **kwargs) -> FinetuneConfig:
    """A few supernet steps of batch 16 on the generated data (the selector's), no selector fine-tuning."""
    defaults = dict(steps=4, batch_size=16, lr=3e-3, warmup_steps=1, selector_steps=0, images=16, workers=0)
    return FinetuneConfig(selector=str(selector), out=str(out), device="cpu", **{**defaults, **kwargs})


def first_batch(model: vit.ElasticViT, fmnist_dir: Path, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    data = vit.load_dataset("fashion-mnist", split="train", root=str(fmnist_dir), model=model)
    return next(Batches(data, size, torch.device("cpu"), 0, 1, 0, 0).epoch(0, shuffle=False))


def spread_prices(n: int) -> torch.Tensor:
    return torch.exp(torch.linspace(math.log(PRICE_RANGE[0]), math.log(PRICE_RANGE[1]), n))


def confident_supernet() -> vit.ElasticViT:
    """A tiny supernet whose head is scaled up, so that its predictions are as confident as a trained model's."""
    model = tiny_supernet()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    return model


def test_fine_tuning_lowers_the_loss_on_the_selectors_subnets(selector, fmnist_dir, tmp_path):
    model = confident_supernet()
    teacher = confident_supernet().eval()  # the same weights: the full model before fine-tuning
    x, y = first_batch(model, fmnist_dir)
    with torch.no_grad():
        target = teacher(x, teacher.search_space.largest()).softmax(-1)

    def loss(adaptive: agents.AdaptiveViT) -> tuple[float, list[vit.Subnet]]:
        subnets, _ = selector_subnets(adaptive, x, spread_prices(len(x)))
        with torch.no_grad():
            return distill_loss(adaptive.supernet.eval()(x, subnets), target, y, 0.5).item(), subnets

    before, subnets = loss(agents.load_adaptive(selector, supernet=model, device="cpu"))
    assert len(set(subnets)) > 1  # per-sample subnets: the selector's choices vary with the image and price
    adaptive, history = joint_finetune(config(selector, tmp_path, steps=30, augment=False), supernet=model)
    assert adaptive.supernet is model
    after, _ = loss(adaptive)
    assert after < 0.85 * before, (before, after)
    assert [(row["round"], row["step"]) for row in history if row["price"] is None] == [(0, 0), (1, 30)]


def test_each_image_gets_its_own_price_drawn_log_uniformly_in_the_selectors_range(selector, tmp_path, monkeypatch):
    seen = []

    def recording(adaptive, images, prices):
        seen.append(prices.clone())
        return selector_subnets(adaptive, images, prices)

    monkeypatch.setattr(finetune_module, "selector_subnets", recording)
    joint_finetune(config(selector, tmp_path, steps=20, images=1, eval_prices=()), supernet=tiny_supernet())
    prices = torch.stack(seen)  # (steps, batch)
    assert prices.shape == (20, 16) and len(prices.unique()) == prices.numel()
    assert PRICE_RANGE[0] <= prices.min() and prices.max() <= PRICE_RANGE[1]
    logs = (prices.log() - math.log(PRICE_RANGE[0])) / (math.log(PRICE_RANGE[1]) - math.log(PRICE_RANGE[0]))
    assert abs(logs.mean() - 0.5) < 0.05 and abs((logs < 0.25).float().mean() - 0.25) < 0.06  # uniform in log


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(selector, tmp_path):
    cfg = config(selector, tmp_path / "whole", steps=9, save_every=3)  # 6 batches an epoch: the run crosses one
    whole, _ = joint_finetune(cfg, supernet=tiny_supernet())

    class Interrupted(Exception):
        pass

    def interrupt(r: int, step: int, losses: dict) -> None:
        if step == 5:
            raise Interrupted

    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        joint_finetune(cut, supernet=tiny_supernet(), on_step=interrupt)
    state = torch.load(tmp_path / "cut" / "finetune_state.pt", weights_only=True)
    assert (state["round"], state["step"]) == (1, 3)  # steps 4 and 5 are lost, and redone
    steps = []
    resumed, _ = joint_finetune(
        dataclasses.replace(cut, resume=True), supernet=tiny_supernet(), on_step=lambda r, s, _: steps.append(s)
    )
    assert steps == [4, 5, 6, 7, 8, 9]
    expected, actual = whole.supernet.state_dict(), resumed.supernet.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not torch.equal(expected["head.weight"], tiny_supernet().state_dict()["head.weight"])  # it trained
    saved = vit.checkpoint.read_state_dict(tmp_path / "cut" / "supernet.safetensors")
    assert all(torch.equal(saved[k], actual[k]) for k in actual)


def test_the_largest_subnet_in_the_loss_trains_the_weights_the_selectors_subnets_leave(smallest_selector, tmp_path):
    """The selector picks the smallest subnet (MLP width 32 of 64): the MLP's other rows are read by the largest
    subnet alone, and change only when it is in the loss."""
    changed = {}
    for weight in (1.0, 0.0):
        model = tiny_supernet()
        fc1 = model.blocks[1].mlp.fc1.weight.detach().clone()
        cfg = config(smallest_selector, tmp_path / str(weight), steps=2, weight_decay=0.0, largest_weight=weight)
        joint_finetune(cfg, supernet=model)
        after = model.blocks[1].mlp.fc1.weight.detach()
        assert not torch.equal(after[:32], fc1[:32])  # the smallest subnet's rows train either way
        changed[weight] = not torch.equal(after[32:], fc1[32:])
    assert changed == {1.0: True, 0.0: False}


def test_the_teacher_is_the_full_model_before_fine_tuning_at_every_step(selector, tmp_path, monkeypatch):
    """The distillation targets of the last step are the predictions of the model before fine-tuning, for the
    selector's subnets and the largest one alike (a teacher that moved with the model would predict otherwise)."""
    seen = {"images": [], "targets": []}

    def recording_subnets(adaptive, images, prices):
        seen["images"].append(images.clone())
        return selector_subnets(adaptive, images, prices)

    def recording_loss(logits, teacher_probs, labels, *args):
        seen["targets"].append(teacher_probs.clone())
        return distill_loss(logits, teacher_probs, labels, *args)

    monkeypatch.setattr(finetune_module, "selector_subnets", recording_subnets)
    monkeypatch.setattr(finetune_module, "distill_loss", recording_loss)
    model = confident_supernet()
    joint_finetune(config(selector, tmp_path, steps=5, images=1, eval_prices=()), supernet=model)
    original = confident_supernet().eval()
    with torch.no_grad():
        expected = original(seen["images"][-1], original.search_space.largest()).softmax(-1)
        now = model.eval()(seen["images"][-1], original.search_space.largest()).softmax(-1)
    assert len(seen["targets"]) == 2 * 5  # the selector's subnets and the largest, every step
    for target in seen["targets"][-2:]:
        torch.testing.assert_close(target, expected)
    assert (now - expected).abs().max() > 1e-3  # the model itself has moved away


def test_a_supernet_module_and_a_checkpoint_or_selector_fine_tuning_are_refused(selector, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        joint_finetune(config(selector, tmp_path, checkpoint="w.safetensors"), supernet=tiny_supernet())
    with pytest.raises(ValueError, match="selector_steps=0"):
        joint_finetune(config(selector, tmp_path, selector_steps=100), supernet=tiny_supernet())


TWO_ROUNDS = dict(steps=2, batch_size=16, images=16, rounds=2, selector_steps=176, num_envs=16, threads=1)


@pytest.fixture(scope="module")
def two_rounds(fmnist_dir, tmp_path_factory) -> Path:
    """`scripts/finetune.py` on prance_fmnist under the shipped selector, two rounds of 2 supernet steps and 176
    selector steps: its output folder."""
    out = tmp_path_factory.mktemp("two_rounds") / "run"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TWO_ROUNDS.items()]
    run_script("finetune.py", *args, "--data-dir", str(fmnist_dir), "--device", "cpu", "--out", str(out))
    return out


def test_the_script_alternates_supernet_and_selector_fine_tuning_of_prance_fmnist(two_rounds):
    out = two_rounds
    shipped = vit.create_supernet("prance_fmnist", pretrained=True)
    tuned = vit.create_supernet("prance_fmnist", checkpoint=out / "supernet.safetensors")
    first = vit.create_supernet("prance_fmnist", checkpoint=out / "round1" / "supernet.safetensors")
    assert not torch.equal(first.head.weight, shipped.head.weight)
    assert not torch.equal(tuned.head.weight, first.head.weight)  # the second round trained on
    state = torch.load(out / "finetune_state.pt", weights_only=True)
    assert (state["round"], state["step"]) == (2, 2)
    history = json.loads((out / "eval_history.json").read_text())
    assert {(row["round"], row["step"]) for row in history} == {(0, 0), (1, 2), (2, 2)}

    def policy(path) -> dict[str, torch.Tensor]:
        return agents.load_selector(path, device="cpu")[0].policy.state_dict()

    # each round's selector fine-tunes the one before; the last, on the fine-tuned weights, is the deployable pair
    shipped_policy, first_policy, second_policy = (
        policy(p) for p in ("shipped:prance_fmnist", out / "round1" / "selector", out / "round2" / "selector")
    )
    assert not all(torch.equal(v, shipped_policy[k]) for k, v in first_policy.items())
    assert not all(torch.equal(v, first_policy[k]) for k, v in second_policy.items())
    adaptive = agents.load_adaptive(out / "selector", device="cpu")
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in adaptive.supernet.state_dict().items())
    assert all(torch.equal(v, second_policy[k]) for k, v in adaptive.policy.policy.state_dict().items())
    on_tuned = agents.load_adaptive("shipped:prance_fmnist", checkpoint=out / "supernet.safetensors", device="cpu")
    assert torch.equal(on_tuned.supernet.head.weight, tuned.head.weight)


def test_a_run_interrupted_in_its_second_round_resumes_to_the_same_supernet_and_selector(
    two_rounds, fmnist_dir, tmp_path
):
    class Interrupted(Exception):
        pass

    def interrupt(r: int, step: int, losses: dict) -> None:
        if (r, step) == (2, 1):
            raise Interrupted

    cfg = FinetuneConfig(**TWO_ROUNDS, data_dir=str(fmnist_dir), device="cpu", save_every=1, out=str(tmp_path))
    with pytest.raises(Interrupted):
        joint_finetune(cfg, on_step=interrupt)
    first_selector = (tmp_path / "round1" / "selector.zip").stat().st_mtime_ns
    steps = []
    adaptive, _ = joint_finetune(dataclasses.replace(cfg, resume=True), on_step=lambda *a: steps.append(a[:2]))
    assert steps == [(2, 2)]  # round 2 went on from its checkpoint
    assert (tmp_path / "round1" / "selector.zip").stat().st_mtime_ns == first_selector  # round 1 was done
    expected = vit.checkpoint.read_state_dict(two_rounds / "supernet.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in adaptive.supernet.state_dict().items())
    policy = agents.load_selector(two_rounds / "selector", device="cpu")[0].policy.state_dict()
    assert all(torch.equal(v, policy[k]) for k, v in adaptive.policy.policy.state_dict().items())


def record_decisions(monkeypatch) -> list[tuple]:
    """Every `selector_subnets` call of a run: (the supernet read, images, prices, the subnets picked)."""
    seen = []

    def recording(adaptive, images, prices):
        subnets, macs = selector_subnets(adaptive, images, prices)
        seen.append((adaptive.supernet, images.clone(), prices.clone(), subnets))
        return subnets, macs

    monkeypatch.setattr(finetune_module, "selector_subnets", recording)
    return seen


@pytest.mark.parametrize("subnets", ["on-the-fly", "recorded"])
def test_recorded_decisions_read_the_weights_before_fine_tuning_and_on_the_fly_ones_the_current(
    subnets, selector, tmp_path, monkeypatch
):
    seen = record_decisions(monkeypatch)
    model = confident_supernet()
    cfg = config(selector, tmp_path, steps=6, images=1, eval_prices=(), subnets=subnets, augment=False)
    joint_finetune(cfg, supernet=model)
    assert len(seen) == 6
    original = agents.load_adaptive(selector, supernet=confident_supernet(), device="cpu")
    differ = 0
    for supernet, images, prices, picked in seen:
        assert (supernet is model) == (subnets == "on-the-fly")
        differ += picked != selector_subnets(original, images, prices)[0]
    # recorded: every step's subnets are those the selector picks on the model before fine-tuning; on the fly, the
    # moving weights change some of them
    assert (differ == 0) == (subnets == "recorded"), differ


def test_the_random_control_trains_random_subnets_of_the_selectors_mdp(selector, tmp_path, monkeypatch):
    seen = record_decisions(monkeypatch)
    trained = []
    model = tiny_supernet()
    forward = model.forward

    def recording_forward(x, subnet=None, *args, **kwargs):
        trained.append(subnet)
        return forward(x, subnet, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    cfg = config(selector, tmp_path, steps=3, images=1, eval_prices=(), subnets="random")
    joint_finetune(cfg, supernet=model)
    assert not seen  # no selector decides
    randoms = [s for s in trained if isinstance(s, list)]  # the per-sample passes (the largest is one subnet)
    assert len(randoms) == 3 and all(len(s) == 16 for s in randoms)
    picked = [subnet for step in randoms for subnet in step]
    assert len(set(picked)) >= 4  # drawn for every image (the tiny MDP reaches 8 subnets)
    space, stem = model.search_space, agents.load_adaptive(selector, supernet=model, device="cpu").schedule.stem_blocks
    assert all(subnet[i] == space.largest()[i] for subnet in picked for i in range(stem))  # reachable: stem in full


def test_an_unknown_subnets_option_is_refused(selector, tmp_path):
    with pytest.raises(ValueError, match="on-the-fly, recorded, random"):
        joint_finetune(config(selector, tmp_path, subnets="sandwich"), supernet=tiny_supernet())
    with pytest.raises(SystemExit):
        vit.cli.parse_dataclass(FinetuneConfig, ["--subnets", "sandwich"])

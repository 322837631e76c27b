"""Bad input at every entry point: `ElasticViT.forward`, `agents.AdaptiveViT.forward`, the single and the vector env,
checkpoints and selector files. Every case gives an error whose type and message name the problem, or a documented
behaviour (a batch of one, an empty batch); an invalid action loses nothing. The docs' "Bad input" page lists
each case with its test here or elsewhere."""

import io
import json
import zipfile
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from conftest import images, tiny_supernet
from gymnasium.utils.env_checker import data_equivalence
from stable_baselines3 import PPO
from test_env import env_kwargs, num_steps, random_actions, run_episode
from torch.utils.data import TensorDataset

import agents
import prance_env
import vit
from agents import AdaptiveViT, StaticPolicy
from agents.selector import check_supernet, supernet_signature
from vit.inference import DecisionSchedule

TOKEN_MODES = vit.TOKEN_MODES


@pytest.fixture(scope="module")
def model() -> vit.ElasticViT:
    return tiny_supernet(depth=4).eval()


def adaptive(model: vit.ElasticViT) -> AdaptiveViT:
    """A deployable model whose static policy reduces tokens at every block."""
    return AdaptiveViT(model, StaticPolicy(model.search_space.num_choices(1), [0, -1, 0]))


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 0, 3, 4] = float("nan")
    return x


def with_inf(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = -float("inf")
    return x


# --- images: ElasticViT.forward and AdaptiveViT.forward ---------------------------------------------------------------

BAD_IMAGES = {
    "size": (
        lambda x: torch.randn(2, 1, 32, 32),
        ValueError,
        r"expected images of shape \(B, 1, 28, 28\), got \(2, 1, 32",
    ),
    "channels": (lambda x: x.expand(2, 3, 28, 28), ValueError, r"\(B, 1, 28, 28\), got \(2, 3, 28, 28\)"),
    "no-batch-dim": (lambda x: x[0], ValueError, r"\(B, 1, 28, 28\), got \(1, 28, 28\)"),
    "uint8": (lambda x: x.to(torch.uint8), TypeError, "floating-point.*uint8"),
    "float64": (lambda x: x.double(), TypeError, "images are torch.float64 but the model's weights are torch.float32"),
    "float16": (lambda x: x.half(), TypeError, "torch.float16 but the model's weights are torch.float32"),
    "bfloat16": (lambda x: x.bfloat16(), TypeError, "torch.bfloat16 but the model's weights are torch.float32"),
    "numpy": (lambda x: x.numpy(), TypeError, "torch.Tensor, got ndarray"),
    "device": (lambda x: x.to("meta"), ValueError, "images are on meta but the model is on cpu"),
    "nan": (with_nan, ValueError, "NaN or Inf"),
    "inf": (with_inf, ValueError, "NaN or Inf"),
}
# test_supernet.py::test_bad_images_raise covers size, channels, no batch dim, uint8, numpy, NaN and Inf for the model.
NEW_FOR_THE_MODEL = ("float64", "float16", "bfloat16", "device")


@pytest.mark.parametrize("case", NEW_FOR_THE_MODEL)
@pytest.mark.parametrize("layout", ["one subnet", "packed", "bucketed"])
def test_images_of_another_dtype_or_device_raise_in_the_model(model, case, layout):
    make, error, match = BAD_IMAGES[case]
    x = make(images(model, 2))
    space = model.search_space
    with pytest.raises(error, match=match):
        if layout == "one subnet":
            model(x, space.smallest())
        else:
            model(x, [space.smallest(), space.largest()], layout=layout)


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_raise_in_adaptive_vit(model, case):
    make, error, match = BAD_IMAGES[case]
    with pytest.raises(error, match=match):
        adaptive(model)(make(images(model, 2)))


def test_images_in_the_models_own_dtype_run(model):
    x = images(model, 2)
    half = tiny_supernet(depth=4).eval().to(torch.bfloat16)
    assert half(x.bfloat16(), model.search_space.smallest()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the images itself
        assert torch.isfinite(model(x.bfloat16(), model.search_space.smallest()).float()).all()


# --- batch sizes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_mode", TOKEN_MODES)
def test_empty_batch_gives_empty_logits(token_mode):
    # A single subnet (token reduction included) and per-sample subnets in either layout return (0, classes);
    # test_supernet.py::test_per_sample_subnets_accept_an_empty_batch covers the largest subnet and [].
    model = tiny_supernet(token_mode, depth=4).eval()
    x = images(model, 0)
    with torch.no_grad():
        assert model(x, model.search_space.smallest()).shape == (0, 10)
        assert model(x, [], layout="bucketed").shape == (0, 10)
    assert vit.count_macs(model, []) == []


def test_empty_batch_raises_in_adaptive_vit(model):
    with pytest.raises(ValueError, match="no images: a batch needs at least one image"):
        adaptive(model)(images(model, 0))


@pytest.mark.parametrize("token_mode", TOKEN_MODES)
def test_batch_of_one_equals_the_same_image_in_a_larger_batch(token_mode):
    model = tiny_supernet(token_mode, depth=4).eval()
    space = model.search_space
    x = images(model, 6)
    subnets = [space.sample(seed) for seed in range(6)]
    with torch.no_grad():
        batch_one = model(x, space.smallest())
        batch_many = model(x, subnets)
        for i in range(6):
            torch.testing.assert_close(model(x[i : i + 1], space.smallest()), batch_one[i : i + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(model(x[i : i + 1], [subnets[i]]), batch_many[i : i + 1], atol=1e-5, rtol=0)


def test_batch_of_one_equals_the_same_image_in_a_larger_batch_in_adaptive_vit(model):
    deployed = adaptive(model)
    x = images(model, 5)
    logits, macs = deployed(x)
    for i in range(5):
        one_logits, one_macs = deployed(x[i : i + 1])
        assert one_logits.shape == (1, 10) and one_macs.shape == (1,)
        torch.testing.assert_close(one_logits, logits[i : i + 1], atol=1e-5, rtol=0)
        assert float(one_macs[0]) == float(macs[i])


def test_vector_env_of_one_equals_the_single_env(fmnist_dir):
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=1, **env_kwargs(fmnist_dir, quality="logprob"))
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, quality="logprob"))
    actions = random_actions(env.action_space, num_steps(env), seed=3)
    single = run_episode(env, actions, options={"index": 7, "price": 0.1})
    obs, _ = envs.reset(options={"indices": [7], "price": 0.1})
    np.testing.assert_array_equal(obs["cls"][0], single[0][0]["cls"])
    for t, action in enumerate(actions):
        obs, reward, terminated, _, info = envs.step(action[None])
        assert data_equivalence({k: v[0] for k, v in obs.items()}, single[0][t + 1], exact=True)
        assert float(reward[0]) == single[1][t] and bool(terminated[0]) == (t == len(actions) - 1)
    assert info["subnet"][0] == single[2][-1]["subnet"]


# --- subnets ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda s: "largest", "expected a vit.Subnet or one per image, got str"),
        (lambda s: 3, "expected a vit.Subnet or one per image, got int"),
        (lambda s: s.largest().blocks[:2], "expected a vit.Subnet, got BlockConfig"),
        (lambda s: [0, 1], "expected a vit.Subnet, got int"),
        (lambda s: [s.largest(), s.largest().blocks], "expected a vit.Subnet, got tuple"),
    ],
    ids=["str", "int", "block-configs", "ints", "tuple-in-list"],
)
def test_what_is_not_a_subnet_raises_invalid_subnet_error(model, make, match):
    # Subnets outside the search space: test_supernet.py::test_subnet_outside_the_space_raises.
    with pytest.raises(vit.InvalidSubnetError, match=match):
        model(images(model, 2), make(model.search_space))


# --- env actions ------------------------------------------------------------------------------------------------------

BAD_ACTIONS = [
    (lambda a: a + np.array([2, 0, 0]), "heads index [0-9] out of range"),
    (lambda a: a - np.array([0, 0, 3]), "keep_ratio index -[0-9] out of range"),
    (lambda a: a[..., :2], "expected actions of shape"),
    (lambda a: np.concatenate([a, a], axis=-1), "expected actions of shape"),
    (lambda a: np.where(np.arange(3) == 1, np.nan, a), "NaN or Inf"),
    (lambda a: a + 0.5, "whole numbers"),
    (lambda a: a.astype(bool), "got dtype bool"),
    (lambda a: a.astype(str), "got dtype <U"),
    (lambda a: np.full(a.shape, None), "got dtype object"),
    (lambda a: a[None], "expected actions of shape"),  # one more batch axis, even of one
    (
        lambda a: np.where(np.arange(3) == 2, np.uint64(2**64 - 1), a.astype(np.uint64)),
        "keep_ratio index 18446744073709551615 out of range",
    ),
    (lambda a: np.where(np.arange(3) == 0, 1e20, a), r"heads index 1e\+20 out of range"),
]
BAD_ACTION_IDS = [
    "above",
    "negative",
    "short",
    "long",
    "nan",
    "fraction",
    "bool",
    "str",
    "none",
    "batched",
    "uint64-max",
    "1e20",
]


def snapshot(envs) -> tuple:
    """What an invalid action must leave as it was: the episodes (immutable: the same object) and what they hold."""
    episodes = envs.unwrapped.episodes
    inference = episodes.inference
    return episodes, inference.step, inference.macs.clone(), inference.tokens.num_patches().clone()


def assert_same_state(a: tuple, b: tuple) -> None:
    assert a[0] is b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
def test_invalid_actions_raise_mid_episode_and_lose_nothing(fmnist_dir, vector):
    """An episode interrupted by every kind of invalid action at every step equals the uninterrupted episode."""
    kwargs = env_kwargs(fmnist_dir, quality="logprob")
    env = (
        gymnasium.make_vec("PranceViT-v1", num_envs=3, **kwargs) if vector else gymnasium.make("PranceViT-v1", **kwargs)
    )
    actions = random_actions(env.action_space, env.unwrapped.codec.num_steps, seed=2)
    runs = []
    for interrupt in (False, True):
        run = [env.reset(seed=4)]
        for action in actions:
            if interrupt:
                before = snapshot(env)
                for bad, match in BAD_ACTIONS:
                    with pytest.raises(ValueError, match=match):
                        env.step(bad(np.asarray(action)))
                    assert_same_state(snapshot(env), before)
            run.append(env.step(action))
        runs.append(run)
    assert data_equivalence(runs[0], runs[1], exact=True)


@pytest.mark.parametrize("bad, match", BAD_ACTIONS, ids=BAD_ACTION_IDS)
def test_invalid_vector_actions_raise(fmnist_dir, bad, match):
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=3, **env_kwargs(fmnist_dir))
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        envs.step(bad(np.zeros((3, 3), dtype=np.int64)))


@pytest.mark.parametrize(
    "action_type, batch, action, message",
    [
        (
            "discrete",
            None,
            np.array([0, 0, 2**64 - 1], dtype=np.uint64),
            "action [0, 0, 18446744073709551615]: keep_ratio index 18446744073709551615 out of range [0, 2)",
        ),
        (
            "discrete",
            None,
            np.array([0.0, 0.0, 1e20]),
            "action [0.0, 0.0, 1e+20]: keep_ratio index 1e+20 out of range [0, 2)",
        ),
        (
            "discrete",
            None,
            np.array([0, -3, 0], dtype=np.int8),
            "action [0, -3, 0]: mlp_hidden index -3 out of range [0, 2)",
        ),
        ("discrete", None, np.array([2, 0, 0]), "action [2, 0, 0]: heads index 2 out of range [0, 2)"),  # index == nvec
        (
            "discrete",
            None,
            np.array([0.0, 0.5, 0.0]),
            "action [0.0, 0.5, 0.0]: mlp_hidden index 0.5: discrete actions must be whole numbers",
        ),
        (
            "discrete",
            None,
            np.array([np.inf, 0.0, 0.0]),
            "action [inf, 0.0, 0.0]: heads value inf: actions contain NaN or Inf",
        ),
        (
            "continuous",
            None,
            np.array([0.0, 0.0, 1e20], dtype=np.float32),
            "action [0.0, 0.0, 1e+20]: keep_ratio value 1e+20: continuous actions must lie in [-1, 1]",
        ),
        (
            "continuous",
            None,
            np.array([0.0, -1.5, 0.0]),
            "action [0.0, -1.5, 0.0]: mlp_hidden value -1.5: continuous actions must lie in [-1, 1]",
        ),
        (
            "discrete",
            None,
            np.zeros((1, 3), dtype=np.int64),  # a batch of one is not an action of the single env
            "expected actions of shape (3,) for fields ('heads', 'mlp_hidden', 'keep_ratio'), got (1, 3)",
        ),
        (
            "discrete",
            2,
            np.array([[0, 0, 0], [0, 0, 2**64 - 1]], dtype=np.uint64),
            "actions[1] = [0, 0, 18446744073709551615]: keep_ratio index 18446744073709551615 out of range [0, 2)",
        ),
        (
            "continuous",
            2,
            np.array([[0, 0, 0], [-1e20, 0, 0]], dtype=np.float32),
            "actions[1] = [-1e+20, 0.0, 0.0]: heads value -1e+20: continuous actions must lie in [-1, 1]",
        ),
        (
            "continuous",
            2,
            np.zeros(3, dtype=np.float32),
            "expected actions of shape (2, 3) for fields ('heads', 'mlp_hidden', 'keep_ratio'), got (3,)",
        ),
    ],
)
def test_invalid_action_messages_quote_the_actions_as_given(model, action_type, batch, action, message):
    """The one action codec of the env, the vector env and AdaptiveViT: its messages quote the value as given, in
    the caller's dtype (no cast shows 2**64 - 1 as -1)."""
    codec = prance_env.ActionCodec(DecisionSchedule(), model.search_space, action_type)
    with pytest.raises(ValueError) as raised:
        codec.indices(action, batch)
    assert str(raised.value) == message


class BadPolicy:
    """A policy that chooses a heads index one past the last."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        return np.tile([2, 0, 0], (len(observation["cls"]), 1)), state


def test_adaptive_vit_refuses_a_policy_s_invalid_actions_as_the_env_does(model):
    with pytest.raises(ValueError, match=r"actions\[0\] = \[2, 0, 0\]: heads index 2 out of range \[0, 2\)"):
        agents.AdaptiveViT(model, BadPolicy())(images(model, 2))


@pytest.mark.parametrize("action_type", ["discrete", "continuous"])
def test_vector_env_of_one_takes_batched_actions_only(fmnist_dir, action_type):
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=1, **env_kwargs(fmnist_dir, action_type=action_type))
    envs.reset(seed=0)
    action = envs.action_space.sample()
    with pytest.raises(ValueError, match=r"expected actions of shape \(1, 3\) .* got \(3,\)"):
        envs.step(action[0])
    assert envs.unwrapped.episodes.inference.step == 0
    envs.step(action)
    assert envs.unwrapped.episodes.inference.step == 1


@pytest.mark.parametrize("action", [np.array([True, False, True]), np.array(["0", "1", "0"]), None])
def test_continuous_actions_of_another_type_raise(fmnist_dir, action):
    env = gymnasium.make("PranceViT-v1", **env_kwargs(fmnist_dir, action_type="continuous"))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="actions must be numbers"):
        env.step(action)


# --- env construction -------------------------------------------------------------------------------------------------


def test_unknown_vector_env_keyword_raises_type_error(fmnist_dir):
    # The single env: test_env.py::test_unknown_keyword_raises_type_error.
    with pytest.raises(TypeError, match="unexpected keyword argument 'reward_mode'"):
        gymnasium.make_vec("PranceViT-v1", num_envs=2, **env_kwargs(fmnist_dir, reward_mode="delta"))


@pytest.mark.parametrize("vector", [False, True], ids=["single", "vector"])
def test_empty_dataset_folder_says_how_to_get_the_data(tmp_path, vector):
    make = gymnasium.make_vec if vector else gymnasium.make
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        make("PranceViT-v1", **env_kwargs(tmp_path))


def test_empty_torch_dataset_raises(model):
    empty = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="the dataset is empty"):
        gymnasium.make("PranceViT-v1", supernet=model, data=empty, device="cpu")


def test_missing_supernet_checkpoint_raises_in_the_env(fmnist_dir, tmp_path):
    kwargs = {**env_kwargs(fmnist_dir), "supernet": "prance_fmnist", "checkpoint": tmp_path / "none.safetensors"}
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*none.safetensors"):
        gymnasium.make("PranceViT-v1", **kwargs)


# --- checkpoints ------------------------------------------------------------------------------------------------------


def write_truncated(path):
    vit.save_checkpoint(tiny_supernet(depth=4), path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    "filename, write, error, match",
    [
        ("absent.safetensors", lambda path: None, FileNotFoundError, "checkpoint not found"),
        ("supernet.safetensors", write_truncated, ValueError, "not a readable checkpoint"),
        ("supernet.pt", lambda path: path.write_text("hello"), ValueError, "not a readable checkpoint"),
        ("supernet.pt", lambda path: torch.save([1, 2], path), ValueError, "does not hold a state dict of tensors"),
        (
            "supernet.safetensors",
            lambda path: vit.save_checkpoint(tiny_supernet(depth=3), path),
            ValueError,
            r"does not fit this ElasticViT: \d+ missing keys \(blocks\.3\.",
        ),
        (
            "supernet.safetensors",
            lambda path: vit.save_checkpoint(tiny_supernet(depth=4, embed_dim=32, mlp_hidden_choices=(64, 128)), path),
            ValueError,
            r"shape mismatches \(cls_token: \(1, 1, 32\) vs \(1, 1, 16\)",
        ),
    ],
    ids=["missing", "truncated", "text", "list", "fewer-blocks", "wider"],
)
def test_bad_checkpoints_raise_in_load_pretrained(tmp_path, filename, write, error, match):
    # create_supernet(checkpoint=...): test_supernet.py::test_bad_checkpoints_raise and test_missing_checkpoint_raises.
    path = tmp_path / filename
    write(path)
    target = tiny_supernet(depth=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(error, match=match) as info:
        vit.registry.load_pretrained(target, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # the model is left as it was


# --- selector files ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def selector(model, fmnist_dir, tmp_path_factory):
    """An (untrained) PPO selector for `model`, saved with its settings: (path, PPO model)."""
    envs = gymnasium.make_vec("PranceViT-v1", num_envs=2, **{**env_kwargs(fmnist_dir), "supernet": model})
    ppo = PPO(
        "MultiInputPolicy",
        prance_env.to_sb3(envs),
        n_steps=4,
        batch_size=8,
        seed=0,
        device="cpu",
        policy_kwargs=dict(features_extractor_class=agents.CLSFeaturesExtractor),
    )
    settings = {"algo": "ppo", "signature": supernet_signature(model), "env": {}}
    return agents.save_selector(ppo, tmp_path_factory.mktemp("selector") / "selector", settings), ppo


def copy_selector(selector, folder, change) -> Path:
    """The saved selector copied to `folder`, its `.zip` bytes and `.json` text replaced by `change(data, text)`."""
    path, _ = selector
    data, text = change(path.read_bytes(), path.with_suffix(".json").read_text())
    folder.mkdir()
    (folder / "selector.zip").write_bytes(data)
    (folder / "selector.json").write_text(text)
    return folder / "selector.zip"


def zip_of(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "change",
    [lambda data, text: (data[:100], text), lambda data, text: (b"epoch,loss\n1,0.93\n", text)],
    ids=["cut-in-the-header", "text"],
)
def test_selector_zip_that_is_no_zip_raises(selector, model, tmp_path, change):
    # Missing .zip or .json: test_agents.py::test_missing_selector_files_raise.
    path = copy_selector(selector, tmp_path / "copy", change)
    with pytest.raises(ValueError, match=r"selector\.zip wasn't a zip-file"):
        agents.load_selector(path, model, device="cpu")


@pytest.mark.parametrize(
    "change",
    [
        lambda data, text: (data[: len(data) // 3], text),  # zipfile then finds a zip stored inside
        lambda data, text: (zip_of({"readme.txt": "not a model"}), text),
        lambda data, text: (data, text[: len(text) // 2]),
        lambda data, text: (data, json.dumps({"epoch": 3})),
    ],
    ids=["truncated-zip", "foreign-zip", "truncated-json", "foreign-json"],
)
def test_foreign_selector_files_raise_value_error_naming_the_file(selector, model, tmp_path, change):
    path = copy_selector(selector, tmp_path / "copy", change)
    with pytest.raises(ValueError, match=r"selector\.(zip|json)"):
        agents.load_selector(path, model, device="cpu")


def test_check_supernet_names_the_difference(selector, model):
    # load_selector(path, other_supernet): test_agents.py::test_loading_a_selector_onto_another_supernet_names_the_...
    settings = json.loads(selector[0].with_suffix(".json").read_text())
    check_supernet(settings, model)
    other = tiny_supernet(depth=4, head_choices=(2,))
    with pytest.raises(ValueError, match=r"trained on supernet 'prance_fmnist' with choices=.*has choices="):
        check_supernet(settings, other)
    with pytest.raises(ValueError, match="token_mode=merge, but the given supernet .* has token_mode=prune"):
        agents.load_adaptive(selector[0], tiny_supernet("prune", depth=4), device="cpu")


@pytest.mark.parametrize(
    "other, difference",
    [
        (lambda: tiny_supernet(depth=4, embed_dim=32, mlp_hidden_choices=(64, 128)), "embed_dim|cls"),
        (lambda: tiny_supernet(depth=4, keep_ratio_choices=(0.25, 0.5, 1.0)), "choices|nvec"),
    ],
    ids=["wider", "more-choices"],
)
def test_adaptive_vit_rejects_a_selector_of_another_supernet(selector, other, difference):
    other = other().eval()
    with pytest.raises(ValueError, match=difference):
        AdaptiveViT(other, selector[1])(images(other, 2))


def test_a_failed_run_removes_the_output_folder_it_created_and_nothing_else(tmp_path):
    from vit.cli import output_folder

    def fail(folder, write=False):
        with pytest.raises(RuntimeError), output_folder(folder):
            (folder / "tb").mkdir(parents=True, exist_ok=True)
            if write:
                (folder / "checkpoint.pt").write_text("resume from me")
            raise RuntimeError("failed")

    fail(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # created, nothing written: gone
    fail(tmp_path / "written", write=True)
    assert (tmp_path / "written" / "checkpoint.pt").is_file()  # what a run wrote stays (resumable)
    (tmp_path / "mine").mkdir()
    fail(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # a folder that existed stays


def test_a_hub_download_without_network_fails_at_once_in_one_line(tmp_path, monkeypatch):
    """No cached weights and HF_HUB_OFFLINE: one line naming the way out, within seconds, and no --out left."""
    from conftest import run_script

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ConnectionError, match="not in the hub cache and HF_HUB_OFFLINE is set: pass a local"):
        vit.registry.hub_state_dict("deit_tiny_patch16_224", cache_dir=tmp_path / "empty_cache")
    out = tmp_path / "run"
    args = ("--supernet", "prance_deit_tiny", "--img-size", "32", "--init", "timm:deit_tiny_patch16_224")
    result = run_script("train_supernet.py", *args, "--out", str(out), check=False, timeout=60)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.strip().splitlines() == [
        "error: timm's deit_tiny_patch16_224 weights are not in the hub cache and HF_HUB_OFFLINE is set: pass a "
        "local weights file instead (--init FILE, a timm state dict or .safetensors), or download them once where "
        "there is a network"
    ]

"""The native batched PranceViT-v1: sub-env i is image i of a batch held on the env's device.

Episodes are synchronised (every image has the same number of blocks), so the whole batch resets together with
the next batch of images. `gymnasium.make_vec("PranceViT-v1", num_envs=N)` returns it; `to_sb3` adapts it to
stable-baselines3's `VecEnv`, which does not take Gymnasium vector envs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices

from vit import Subnet

from .build import EnvConfig
from .core import Episodes
from .env import to_numpy
from .mdp import ActionCodec, Prices, observation_space, warn_if_truncating
from .render import RENDER_FPS, RENDER_MODES, check_render_mode, render_episode


class PranceViTVectorEnv(VectorEnv):
    """`num_envs` synchronised PranceViT-v1 episodes run as one batch (see `PranceViTEnv` for the MDP).

    Images are drawn without replacement in an order shuffled by the env's seed; each reset takes the next
    `num_envs`. `options` of `reset` may fix `indices` (num_envs dataset indices) and `price` (a scalar or one per
    sub-env). Autoreset follows Gymnasium's next-step mode: the step after the last one resets every sub-env,
    returning reward 0. Actions are (num_envs, fields), even for one sub-env. `render()` returns one token map per
    sub-env (see `PranceViTEnv`'s Rendering).

    An ImageFolder's images are decoded by parallel loader processes, and each reset starts decoding the next
    reset's images in the background, so they are ready when these episodes end (with `workers=0`, each reset
    decodes its own images in the env's thread).

    Args:
        num_envs: images per batch.
        workers: loader processes decoding an ImageFolder (default: `vit.data.default_workers()`); in-memory
            Fashion-MNIST needs none.
        **kwargs: those of `PranceViTEnv`.
    """

    metadata = {
        "autoreset_mode": AutoresetMode.NEXT_STEP,
        "render_modes": list(RENDER_MODES),
        "render_fps": RENDER_FPS,
    }

    def __init__(
        self,
        num_envs: int = 256,
        price: float | None = None,
        action_type: str = "discrete",
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        **kwargs,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        make_only = sorted(set(kwargs) & set(MAKE_ONLY))
        if make_only:
            raise TypeError(
                f"{make_only[0]} is an argument of gymnasium.make's wrappers, which a native vector env has none "
                "of; PranceViTVectorEnv takes max_episode_steps, price, action_type, render_mode and EnvConfig's"
            )
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = max_episode_steps
        self.num_envs = num_envs
        self.render_mode = check_render_mode(render_mode)
        self.mdp, self.source = EnvConfig.of(**kwargs).build()
        self.prices = Prices(price, self.mdp.config.price_range)
        self.codec = ActionCodec(self.mdp.config.schedule, self.model.search_space, action_type)
        self.single_observation_space = observation_space(
            self.model.embed_dim, self.prices, self.mdp.config.official_state
        )
        self.single_action_space = self.codec.space
        warn_if_truncating(max_episode_steps, self.codec.num_steps)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._order, self._cursor = np.zeros(0, dtype=np.int64), 0
        self.episodes: Episodes | None = None

    @property
    def model(self):
        """The frozen supernet."""
        return self.mdp.model

    def close_extras(self, **kwargs: Any) -> None:
        """Stop the image source's loader workers and fetching thread."""
        self.source.close()

    def _next_indices(self, peek: bool = False) -> np.ndarray:
        """The next `num_envs` images of a shuffled pass over the data; a pass drops its incomplete last batch,
        so a batch never holds an image twice (unless the dataset has fewer images than sub-envs). `peek` gives
        those of the next reset without drawing them (from a copy of the generator, left as it is)."""
        rng = copy.deepcopy(self.np_random) if peek else self.np_random
        n = len(self.source)
        if n < self.num_envs:  # a small dataset: wrap around
            return np.concatenate([rng.permutation(n) for _ in range(-(-self.num_envs // n))])[: self.num_envs]
        order, cursor = self._order, self._cursor
        if cursor + self.num_envs > len(order):
            order, cursor = rng.permutation(n), 0
        if not peek:
            self._order, self._cursor = order, cursor + self.num_envs
        return order[cursor : cursor + self.num_envs]

    def reset(
        self, *, seed: int | None = None, options: Mapping[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start a batch of episodes on the next `num_envs` images (or `options["indices"]`)."""
        super().reset(seed=seed)
        if seed is not None:
            self._order, self._cursor = np.zeros(0, dtype=np.int64), 0
        options = dict(options or {})
        if "indices" in options:
            indices = np.asarray(options["indices"], dtype=np.int64)
            if indices.shape != (self.num_envs,) or indices.min() < 0 or indices.max() >= len(self.source):
                raise ValueError(f"indices must be {self.num_envs} dataset indices in [0, {len(self.source)})")
        else:
            indices = self._next_indices()
        if "price" in options:
            price = self.prices.check(np.array(np.broadcast_to(options["price"], (self.num_envs,))))
        else:
            price = self.prices.draw(self.np_random, self.num_envs)
        images, labels = self.source.get(indices)
        self.source.prefetch(self._next_indices(peek=True))  # decoded while these episodes run
        self.episodes = self.mdp.reset(images, labels, torch.as_tensor(price, dtype=torch.float32))
        self.indices, self.images = indices, images
        inference = self.episodes.inference
        info = {
            "index": indices,
            "macs": inference.macs.cpu().numpy().copy(),
            "tokens": inference.tokens.num_patches().cpu().numpy(),
        }
        info |= {f"_{key}": np.ones(self.num_envs, dtype=bool) for key in list(info)}
        return to_numpy(self.mdp.observe(self.episodes)), info

    def step(self, actions) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Run the next block(s) of every sub-env; after the last step, the next call resets them all."""
        if self.episodes is None:
            raise RuntimeError("call reset() before step()")
        false = np.zeros(self.num_envs, dtype=bool)
        if self.episodes.done or self._truncated():
            obs, info = self.reset()
            return obs, np.zeros(self.num_envs), false, false, info
        configs = self.codec.decode(self.episodes.inference.step, actions, self.num_envs)
        self.episodes, reward, info = self.mdp.step(self.episodes, configs)
        done = self.episodes.done
        obs = to_numpy(self.mdp.observe(self.episodes))
        truncated = np.full(self.num_envs, not done and self._truncated())
        return obs, reward.cpu().numpy(), np.full(self.num_envs, done), truncated, self._numpy_info(info, done)

    def _truncated(self) -> bool:
        """Whether the episodes have run `max_episode_steps` steps (Gymnasium's time limit)."""
        return self.max_episode_steps is not None and self.episodes.inference.step >= self.max_episode_steps

    def render(self) -> tuple[np.ndarray, ...] | None:
        """One token map per sub-env, (H, W, 3) uint8 each, in `rgb_array` mode; None without a render mode."""
        if self.render_mode is None:
            return None
        if self.episodes is None:
            raise RuntimeError("call reset() before render()")
        runner = self.mdp.runner
        return tuple(
            render_episode(self.model, image, configs, runner.schedule.stem_blocks, runner.amp)
            for image, configs in zip(self.images, self.episodes.inference.subnets())
        )

    def action_masks(self) -> np.ndarray:
        """Valid choices per sub-env, fields concatenated (N, sum(nvec)), for sb3-contrib's MaskablePPO
        (`prance_env.mdp.ActionCodec.masks`: a sample down to one patch token can reduce no further)."""
        if self.episodes is None:
            raise RuntimeError("call reset() before action_masks()")
        return self.codec.masks(self.episodes.inference.tokens.num_patches().cpu().numpy())

    def _numpy_info(self, info: dict, done: bool) -> dict[str, np.ndarray]:
        out = {}
        for key, value in info.items():
            if key == "subnet":
                array = np.empty(self.num_envs, dtype=object)
                array[:] = [Subnet(s) if done else s for s in value]
            else:
                array = value.cpu().numpy()
            out[key] = array
            out[f"_{key}"] = np.ones(self.num_envs, dtype=bool)
        return out


#: keyword arguments of `gymnasium.make` (for its wrappers) that `make_vec` would pass on to the vector env
MAKE_ONLY = ("disable_env_checker", "order_enforce", "autoreset", "apply_api_compatibility")


BATCHED_METHODS = ("action_masks", "render")  # methods answering one row per sub-env
RESET_OPTIONS = ("index", "price")  # the single env's reset options, given per sub-env through `set_options`


class SB3VecEnv(VecEnv):
    """A `PranceViTVectorEnv` as a stable-baselines3 `VecEnv` (reset at the end, `terminal_observation` in info).

    The sub-envs are the rows of one batch: they share one random generator and every attribute. `seed(s)` gives
    sub-env i the seed s + i, as SB3's `DummyVecEnv` does, and the batch is reseeded with sub-env 0's at the next
    reset. `get_attr` gives each selected sub-env the shared value; `env_method("action_masks")` and
    `env_method("render")` give each its own row; `set_attr` and other methods act on the whole batch, so they take
    every sub-env (`indices=None`) and raise `ValueError` for a subset rather than change the others too.
    `set_options` takes the single env's reset options (`index`, `price`), one dict per sub-env.
    """

    def __init__(self, envs: PranceViTVectorEnv) -> None:
        self.envs = envs
        super().__init__(envs.num_envs, envs.single_observation_space, envs.single_action_space)
        self._actions = None

    def reset(self) -> dict[str, np.ndarray]:
        """Reset the batch (with the seed and options set since the last reset); the observations."""
        obs, info = self.envs.reset(seed=self._seeds[0], options=self._batch_options())
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = self._split(info)
        return obs

    def _batch_options(self) -> dict[str, list]:
        """The vector env's reset options (`indices`, `price`) from the per-sub-env options of `set_options`."""
        given = {key for options in self._options for key in options}
        unknown = sorted(given - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset options {unknown}; expected keys among {list(RESET_OPTIONS)}")
        partial = sorted(key for key in given if any(key not in options for options in self._options))
        if partial:
            raise ValueError(f"reset option {partial[0]!r} must be given for every sub-env (they reset as one batch)")
        batch = {"indices": "index", "price": "price"}
        return {name: [options[key] for options in self._options] for name, key in batch.items() if key in given}

    def _split(self, info: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Per sub-env dicts of a vector info (its `_key` masks left out)."""
        return [{k: v[i] for k, v in info.items() if not k.startswith("_")} for i in range(self.num_envs)]

    def step_async(self, actions: np.ndarray) -> None:
        """Keep the actions for `step_wait`."""
        self._actions = actions

    def step_wait(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step the batch; at the end, reset it and keep each sub-env's `terminal_observation` in its info."""
        obs, reward, terminated, truncated, info = self.envs.step(self._actions)
        done = terminated | truncated
        infos = [item | {"TimeLimit.truncated": False} for item in self._split(info)]
        if done.all():
            for i, item in enumerate(infos):
                item["terminal_observation"] = {k: v[i] for k, v in obs.items()}
            obs, reset_info = self.envs.reset()
            self.reset_infos = self._split(reset_info)
        return obs, reward.astype(np.float32), done, infos

    def close(self) -> None:
        """Close the batched env."""
        self.envs.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        """Each sub-env's token map (`render_mode="rgb_array"`); Nones, with a warning, in another mode."""
        if self.render_mode != "rgb_array":
            warnings.warn(f"get_images needs render_mode='rgb_array', the env's is {self.render_mode!r}", stacklevel=2)
            return [None] * self.num_envs
        return list(self.envs.render())

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The (shared) value of `attr_name` for each selected sub-env."""
        value = getattr(self.envs, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set `attr_name` of the batch: `indices` must select every sub-env."""
        self._whole_batch(indices, f"set_attr({attr_name!r})")
        setattr(self.envs, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Call `method_name` of the batch; one result per selected sub-env (its own row for `BATCHED_METHODS`)."""
        selected = self._get_indices(indices)
        if method_name not in BATCHED_METHODS:
            self._whole_batch(indices, f"env_method({method_name!r})")
        result = getattr(self.envs, method_name)(*method_args, **method_kwargs)
        if method_name in BATCHED_METHODS:
            return [None if result is None else result[i] for i in selected]
        return [result for _ in selected]

    def env_is_wrapped(self, wrapper_class, indices: VecEnvIndices = None) -> list[bool]:
        """False for each selected sub-env: the batch is not a stack of wrapped Gymnasium envs."""
        return [False for _ in self._get_indices(indices)]

    def _get_indices(self, indices: VecEnvIndices) -> list[int]:
        """The sub-envs `indices` selects (None: all; an int: one; else an iterable; negative ones from the end),
        checked to exist."""
        if indices is None:
            return list(range(self.num_envs))
        given = [int(indices)] if isinstance(indices, (int, np.integer)) else [int(i) for i in indices]
        outside = [i for i in given if not -self.num_envs <= i < self.num_envs]
        if outside:
            raise IndexError(f"sub-env indices {outside} out of range for {self.num_envs} sub-envs")
        return [i % self.num_envs for i in given]  # negative ones count from the end, as in DummyVecEnv

    def _whole_batch(self, indices: VecEnvIndices, what: str) -> None:
        """Raise `ValueError` unless `indices` selects every sub-env."""
        if set(self._get_indices(indices)) != set(range(self.num_envs)):
            raise ValueError(
                f"{what} acts on the whole batch: the {self.num_envs} sub-envs of a PranceViTVectorEnv share it; "
                f"pass indices=None (all sub-envs), not {indices!r}"
            )


def to_sb3(envs: PranceViTVectorEnv) -> SB3VecEnv:
    """Adapt a native batched env (e.g. `gymnasium.make_vec("PranceViT-v1", num_envs=N)`) to SB3's `VecEnv`."""
    envs = getattr(envs, "unwrapped", envs)
    if not isinstance(envs, PranceViTVectorEnv):
        raise TypeError(f"to_sb3 takes a PranceViTVectorEnv, got {type(envs).__name__}")
    return SB3VecEnv(envs)


__all__ = ["PranceViTVectorEnv", "SB3VecEnv", "to_sb3"]

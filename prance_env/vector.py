"""The native batched PranceViT-v0: sub-env i is image i of a batch held on the env's device.

Episodes are synchronised (every image has the same number of blocks), so the whole batch resets together with
the next batch of images. `gymnasium.make_vec("PranceViT-v0", num_envs=N)` returns it; `to_sb3` adapts it to
stable-baselines3's `VecEnv`, which does not take Gymnasium vector envs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from stable_baselines3.common.vec_env import VecEnv

from vit import Subnet

from .factory import Prices, action_indices, make_inference, single_spaces, to_numpy


class PranceViTVectorEnv(VectorEnv):
    """`num_envs` synchronised PranceViT-v0 episodes run as one batch (see `PranceViTEnv` for the MDP).

    Images are drawn without replacement in an order shuffled by the env's seed; each reset takes the next
    `num_envs`. `options` of `reset` may fix `indices` (num_envs dataset indices) and `price` (a scalar or one per
    sub-env). Autoreset follows Gymnasium's next-step mode: the step after the last one resets every sub-env,
    returning reward 0.

    Args:
        num_envs: images per batch.
        **kwargs: those of `PranceViTEnv`.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(
        self,
        num_envs: int = 256,
        price: float | None = None,
        price_range: Sequence[float] = (0.01, 1.0),
        action_type: str = "discrete",
        **kwargs,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.inference, self.source = make_inference(**kwargs)
        self.prices = Prices(price, price_range)
        self.action_type = action_type
        self.single_observation_space, self.single_action_space = single_spaces(
            self.inference, self.prices, action_type
        )
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._order, self._cursor = np.zeros(0, dtype=np.int64), 0
        self._needs_reset = True

    @property
    def model(self):
        """The frozen supernet."""
        return self.inference.model

    def _next_indices(self) -> np.ndarray:
        """The next `num_envs` images of a shuffled pass over the data; a pass drops its incomplete last batch,
        so a batch never holds an image twice (unless the dataset has fewer images than sub-envs)."""
        n = len(self.source)
        if n < self.num_envs:  # a small dataset: wrap around
            return np.concatenate([self.np_random.permutation(n) for _ in range(-(-self.num_envs // n))])[
                : self.num_envs
            ]
        if self._cursor + self.num_envs > len(self._order):
            self._order, self._cursor = self.np_random.permutation(n), 0
        self._cursor += self.num_envs
        return self._order[self._cursor - self.num_envs : self._cursor]

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
        obs = self.inference.reset(images, labels, torch.as_tensor(price, dtype=torch.float32))
        self._needs_reset = False
        self.indices = indices
        info = {
            "index": indices,
            "macs": self.inference.macs.cpu().numpy().copy(),
            "tokens": self.inference.tokens.num_patches().cpu().numpy(),
        }
        info |= {f"_{key}": np.ones(self.num_envs, dtype=bool) for key in list(info)}
        return to_numpy(obs), info

    def step(self, actions) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Run the next block(s) of every sub-env; after the last step, the next call resets them all."""
        if self.inference.step_index < 0:
            raise RuntimeError("call reset() before step()")
        false = np.zeros(self.num_envs, dtype=bool)
        if self._needs_reset:
            obs, info = self.reset()
            return obs, np.zeros(self.num_envs), false, false, info
        indices = action_indices(self.inference, actions, self.action_type, self.num_envs)
        obs, reward, done, info = self.inference.step(indices)
        self._needs_reset = done
        return to_numpy(obs), reward.cpu().numpy(), np.full(self.num_envs, done), false, self._numpy_info(info, done)

    def action_masks(self) -> np.ndarray:
        """Valid choices per sub-env, fields concatenated (N, sum(nvec)), for sb3-contrib's MaskablePPO.

        Every choice is valid, except that a sample down to one patch token can reduce no further: only the
        keep (and merge) ratio 1.0 is left to it.
        """
        nvec = self.inference.nvec
        masks = np.ones((self.num_envs, sum(nvec)), dtype=bool)
        spent = self.inference.tokens.num_patches().cpu().numpy() <= 1
        offset = nvec[0] + nvec[1]
        for n in nvec[2:]:
            masks[spent, offset : offset + n - 1] = False
            offset += n
        return masks

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


BATCHED_METHODS = ("action_masks",)


class SB3VecEnv(VecEnv):
    """A `PranceViTVectorEnv` as a stable-baselines3 `VecEnv` (reset at the end, `terminal_observation` in info)."""

    def __init__(self, envs: PranceViTVectorEnv) -> None:
        self.envs = envs
        super().__init__(envs.num_envs, envs.single_observation_space, envs.single_action_space)
        self._seed: int | None = None
        self._actions = None

    def reset(self) -> dict[str, np.ndarray]:
        obs, _ = self.envs.reset(seed=self._seed)
        self._seed = None
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, reward, terminated, truncated, info = self.envs.step(self._actions)
        done = terminated | truncated
        infos = [
            {k: v[i] for k, v in info.items() if not k.startswith("_")} | {"TimeLimit.truncated": False}
            for i in range(self.num_envs)
        ]
        if done.all():
            for i, item in enumerate(infos):
                item["terminal_observation"] = {k: v[i] for k, v in obs.items()}
            obs, _ = self.envs.reset()
        return obs, reward.astype(np.float32), done, infos

    def seed(self, seed: int | None = None) -> Sequence[None | int]:
        self._seed = seed
        return [seed] * self.num_envs

    def close(self) -> None:
        self.envs.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.envs, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.envs, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        result = getattr(self.envs, method_name)(*method_args, **method_kwargs)
        if method_name in BATCHED_METHODS:  # one row per sub-env
            return [result[i] for i in self._get_indices(indices)]
        return [result] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._get_indices(indices))

    def _get_indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)


def to_sb3(envs: PranceViTVectorEnv) -> SB3VecEnv:
    """Adapt a native batched env (e.g. `gymnasium.make_vec("PranceViT-v0", num_envs=N)`) to SB3's `VecEnv`."""
    envs = getattr(envs, "unwrapped", envs)
    if not isinstance(envs, PranceViTVectorEnv):
        raise TypeError(f"to_sb3 takes a PranceViTVectorEnv, got {type(envs).__name__}")
    return SB3VecEnv(envs)


__all__ = ["PranceViTVectorEnv", "SB3VecEnv", "to_sb3"]

"""PranceViT-v1: the inference of one image by an elastic ViT, as a Gymnasium environment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

import vit

from .build import EnvConfig
from .core import Episodes
from .mdp import ActionCodec, Prices, observation_space, warn_if_truncating
from .render import RENDER_FPS, RENDER_MODES, check_render_mode, render_episode


class PranceViTEnv(gym.Env):
    """
    ## Description

    PRANCE's selector as a Markov decision process: an episode is the inference of one image by a frozen
    weight-sharing ViT supernet. The patch embedding and the first `stem_blocks` blocks run at reset; each step
    then chooses how much of the next `blocks_per_step` blocks runs (attention heads, MLP width, token keep
    ratio) and runs them. The reward is Result-to-Go: after every action, the inference is completed from the
    current tokens with the full-width network and scored, so every step is credited with the result it leads to.

    Two decision structures (`decisions`, a name of `vit.inference.DecisionSchedule.named`): `per-block` (the default: a
    1-block stem, then one decision before every block) and `grouped` (PRANCE's: a 3-block stem, then decisions at
    blocks 3, 6 and 9, each setting the widths of the 3 blocks of its group and one token reduction at the group's
    first block, keep ratios 0.1 to 1.0); `one-shot` makes the grouped choices of all groups in one step.

    ## Action Space

    `MultiDiscrete(nvec)`: indices into the choices. Per-block decisions: one per field of `search_space.fields`,
    for every block of the step:

    | index | field       | meaning                                                          |
    |-------|-------------|------------------------------------------------------------------|
    | 0     | heads       | active attention heads (a prefix; head dim fixed)               |
    | 1     | mlp_hidden  | active MLP hidden width (a prefix)                              |
    | 2     | keep_ratio  | fraction of patch tokens kept (pruned or merged by CLS attention)|
    | 3     | merge_ratio | `prune_merge` only: fraction of the survivors kept after merging |

    Grouped decisions: per group, `heads[j]` and `mlp_hidden[j]` for each of its blocks (j: the block's place in the
    step), then `keep_ratio[j]` (and `merge_ratio[j]`) of the reduction at its first block: 7 fields for groups of
    3 blocks (8 in `prune_merge` mode), 21 for `one-shot`. The names are `env.unwrapped.codec.fields`.

    The largest index of every field is the full block. With `action_type="continuous"` the action is a
    `Box(-1, 1, (fields,))` decoded by rounding `(a + 1) / 2 * (n - 1)`. Invalid actions (another shape, even a
    batch of one, a non-numeric dtype, NaN, an index out of range, a fraction, a value outside [-1, 1]) raise
    `ValueError` quoting the value as given, and change nothing.

    ## Observation Space

    `Dict` of float32 arrays:

    | key      | shape        | meaning                                                                     |
    |----------|--------------|-----------------------------------------------------------------------------|
    | cls      | (embed_dim,) | the CLS token entering the step's first block                               |
    | progress | (3,)         | steps taken / steps; MACs spent / full-model MACs; patch tokens alive / all |
    | price    | (1,)         | log of the episode's compute price λ                                         |

    ## Rewards

    `R_t = q(prediction_t) − λ · F_t / F_full`, where prediction_t is that of the completion after step t and F_t
    the MACs spent plus the completion's. `q` is `logprob` (default: log-prob of the true class, clipped at -5),
    `correct` (1 if right), `agree` (1 if it equals the full model's prediction; no labels needed) or `no_worse` (the
    official code's: 1 unless the full model is right and this prediction wrong). `reward="delta"`
    (default) gives `R_t − R_{t−1}` with `R_{−1}` the full model's result, so the return is the final result
    relative to the full model (0 when every action is the maximum); `"direct"` gives `R_t` (less `token_penalty`
    times the fraction of patch tokens alive, the official code's extra term, when given); `"terminal"` gives 0
    but at the last step, `R_T` (no completion is run: the ablation without Result-to-Go).

    ## Starting State

    An image drawn uniformly from the dataset split (or `options["index"]`), a price drawn log-uniformly in
    `price_range` (or `price`, or `options["price"]`); the stem has run.

    ## Episode End

    Terminates after the last block (`(depth − stem_blocks) / blocks_per_step` steps: 11 per block, 3 grouped, 1
    one-shot on a 12-block supernet). Never truncated.

    ## Info

    Every step: `macs` (spent so far), `tokens` (patch tokens alive), `subnet` (the `BlockConfig`s run so far,
    stem included; a `vit.Subnet` at the last step). Last step also: `pred`, `label`, `correct` and
    `flops_ratio` (the episode's MACs over the full model's).

    ## Rendering

    `render_mode="rgb_array"`: `render()` returns the episode's token map, an (H, W, 3) uint8 image of fixed size:
    the image, then the patches after each decided block (blank until run): kept patches show the image, merged
    ones the colour of their token, pruned ones are grey and hatched (`prance_env.render`).

    ## Arguments

    ```python
    gymnasium.make("PranceViT-v1", supernet=None, checkpoint=None, data="fashion-mnist",
                   data_dir=None, split="train", device="auto", token_mode=None, choices=None, reward="delta",
                   quality="logprob", price=None, price_range=(3e-4, 2.0), token_penalty=0.0, decisions="per-block",
                   num_classes=None, img_size=None, in_chans=None, stem_blocks=None, blocks_per_step=None,
                   action_type="discrete", render_mode=None, layout="packed", amp=False, workers=0)
    ```

    `price`, `action_type` and `render_mode` are the env's own; the others are `prance_env.EnvConfig`'s, which the
    vector env shares.

    `decisions` is `per-block`, `grouped`, `one-shot` or a `vit.inference.DecisionSchedule`; `stem_blocks` and
    `blocks_per_step` replace its values when given. A supernet given by name is built with the ratios the decisions
    choose (grouped: keep ratios 0.1 to 1.0 at every block); a module must offer them already.

    The defaults (those of `prance_env.MDPConfig` and its `vit.inference.DecisionSchedule`) are the MDP the shipped
    selector was trained on, so
    `PPO.load("agents/checkpoints/prance_fmnist.zip", env=gymnasium.make("PranceViT-v1"))` runs it.

    `supernet` is a registered name (its shipped weights, or `checkpoint`; default: the preset the checkpoint file
    records, else `prance_fmnist`) or a `vit.ElasticViT`; `num_classes`, `img_size`, `in_chans` set a named preset's
    shape, as in the scripts (default: the checkpoint's, else the preset's); `data` a
    dataset name for `vit.load_dataset` or a torch Dataset of (image, label); `choices` overrides the per-block
    choices of a named supernet, e.g. `{"keep_ratio": (0.5, 0.75, 1.0)}`. `layout` is how the batch of per-sample
    configurations is held (`packed` or `bucketed`: the same episodes). `amp=True` runs the supernet under bf16
    autocast on its device, CUDA or CPU (observations and rewards keep their dtypes; values move by bf16 rounding).
    `workers` is the number of loader processes decoding an ImageFolder; the default, 0, decodes each reset's one
    image in the env's own thread (in-memory Fashion-MNIST needs none).

    ## Version History

    * v1: the default price range widened from (3e-4, 0.3) to (3e-4, 2.0) (the observed log-price's bounds), so
      that the shipped selector, trained on it, reaches a MACs ratio of 0.3.
    * v0: initial version; the `decisions` argument (grouped and one-shot decisions) added, its default the
      per-block MDP of before. Still registered, with its price range.
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": RENDER_FPS}

    def __init__(
        self, price: float | None = None, action_type: str = "discrete", render_mode: str | None = None, **kwargs
    ) -> None:
        self.render_mode = check_render_mode(render_mode)
        self.mdp, self.source = EnvConfig.of(**{"workers": 0, **kwargs}).build()
        self.prices = Prices(price, self.mdp.config.price_range)
        self.codec = ActionCodec(self.mdp.config.schedule, self.model.search_space, action_type)
        self.observation_space = observation_space(self.model.embed_dim, self.prices, self.mdp.config.official_state)
        self.action_space = self.codec.space
        self.episodes: Episodes | None = None

    @property
    def model(self) -> vit.ElasticViT:
        """The frozen supernet."""
        return self.mdp.model

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start the inference of one image; `options` may fix `index` (dataset index) and `price`."""
        super().reset(seed=seed)
        if self.spec is not None and self.episodes is None:  # gymnasium.make's time limit, once
            warn_if_truncating(self.spec.max_episode_steps, self.codec.num_steps)
        options = options or {}
        index = options.get("index")
        if index is None:
            index = int(self.np_random.integers(len(self.source)))
        elif not 0 <= int(index) < len(self.source):
            raise ValueError(f"index {index} out of range for a dataset of {len(self.source)} images")
        price = self.prices.check([options["price"]]) if "price" in options else self.prices.draw(self.np_random, 1)
        images, labels = self.source.get(np.array([index]))
        self.episodes = self.mdp.reset(images, labels, torch.as_tensor(price, dtype=torch.float32))
        self.index, self.image = int(index), images[0]
        info = {"index": self.index, "macs": float(self.episodes.inference.macs[0]), "tokens": self.model.num_patches}
        return _first(to_numpy(self.mdp.observe(self.episodes))), info

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Run the next block(s) at the configuration `action` chooses."""
        if self.episodes is None:
            raise RuntimeError("call reset() before step()")
        if self.episodes.done:
            raise RuntimeError("the episodes have ended; call reset() to start new ones")
        configs = self.codec.decode(self.episodes.inference.step, action)
        self.episodes, reward, info = self.mdp.step(self.episodes, configs)
        done = self.episodes.done
        out = {"macs": float(info["macs"][0]), "tokens": int(info["tokens"][0])}
        out["subnet"] = vit.Subnet(info["subnet"][0]) if done else info["subnet"][0]
        if done:
            out.update(
                pred=int(info["pred"][0]), correct=bool(info["correct"][0]), flops_ratio=float(info["flops_ratio"][0])
            )
            if "label" in info:
                out["label"] = int(info["label"][0])
        return _first(to_numpy(self.mdp.observe(self.episodes))), float(reward[0]), done, False, out

    def close(self) -> None:
        """Stop the image source's loader workers and fetching thread."""
        self.source.close()

    def render(self) -> np.ndarray | None:
        """The episode's token map so far, (H, W, 3) uint8, in `rgb_array` mode; None without a render mode."""
        if self.render_mode is None:
            return None
        if self.episodes is None:
            raise RuntimeError("call reset() before render()")
        runner, configs = self.mdp.runner, self.episodes.inference.subnets()[0]
        return render_episode(self.model, self.image, configs, runner.schedule.stem_blocks, runner.amp)


def to_numpy(obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Observation tensors as float32 numpy arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=False) for k, v in obs.items()}


def _first(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in obs.items()}


__all__ = ["PranceViTEnv"]

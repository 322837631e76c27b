"""prance_env: ViT inference as a Gymnasium MDP with the Result-to-Go reward (PranceViT-v1; v0 differs by its prices).

env = gymnasium.make("PranceViT-v1")                      # one image per episode; defaults: MDPConfig()
env = gymnasium.make("PranceViT-v1", render_mode="rgb_array")  # env.render(): the episode's token map
envs = gymnasium.make_vec("PranceViT-v1", num_envs=256)   # native batched env
venv = prance_env.to_sb3(envs)                            # stable-baselines3 VecEnv
"""

from gymnasium.envs.registration import register, registry

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

from .build import EnvConfig
from .core import BatchedMDP, Episodes
from .env import PranceViTEnv
from .mdp import QUALITIES, REWARD_MODES, ActionCodec, MDPConfig, Prices
from .vector import PranceViTVectorEnv, SB3VecEnv, to_sb3

V0_PRICE_RANGE = (3e-4, 0.3)  # PranceViT-v0's default prices (v1: `MDPConfig.price_range`)

#: the episode length of the registered MDP: the shipped supernet's decisions (`MDPConfig().schedule`)
EPISODE_STEPS = MDPConfig().schedule.num_steps(vit.registry.FMNIST_DEFAULTS["depth"])

for env_id, kwargs in (("PranceViT-v1", {}), ("PranceViT-v0", {"price_range": V0_PRICE_RANGE})):
    if env_id not in registry:
        register(
            id=env_id,
            entry_point="prance_env.env:PranceViTEnv",
            vector_entry_point="prance_env.vector:PranceViTVectorEnv",
            kwargs=kwargs,
            max_episode_steps=EPISODE_STEPS,
        )

__all__ = [
    "QUALITIES",
    "REWARD_MODES",
    "ActionCodec",
    "BatchedMDP",
    "EnvConfig",
    "Episodes",
    "MDPConfig",
    "Prices",
    "PranceViTEnv",
    "PranceViTVectorEnv",
    "SB3VecEnv",
    "EPISODE_STEPS",
    "V0_PRICE_RANGE",
    "to_sb3",
]

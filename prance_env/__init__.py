"""prance_env: ViT inference as a Gymnasium MDP with the Result-to-Go reward (PranceViT-v0).

env = gymnasium.make("PranceViT-v0")                      # one image per episode; defaults: MDPConfig()
env = gymnasium.make("PranceViT-v0", render_mode="rgb_array")  # env.render(): the episode's token map
envs = gymnasium.make_vec("PranceViT-v0", num_envs=256)   # native batched env
venv = prance_env.to_sb3(envs)                            # stable-baselines3 VecEnv
"""

from gymnasium.envs.registration import register, registry

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

from .core import QUALITIES, REWARD_MODES, BatchedInference, MDPConfig
from .env import PranceViTEnv
from .vector import PranceViTVectorEnv, SB3VecEnv, to_sb3

if "PranceViT-v0" not in registry:
    register(
        id="PranceViT-v0",
        entry_point="prance_env.env:PranceViTEnv",
        vector_entry_point="prance_env.vector:PranceViTVectorEnv",
    )

__all__ = [
    "QUALITIES",
    "REWARD_MODES",
    "BatchedInference",
    "MDPConfig",
    "PranceViTEnv",
    "PranceViTVectorEnv",
    "SB3VecEnv",
    "to_sb3",
]

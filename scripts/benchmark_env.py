"""Speed of the batched PranceViT-v1 against a plain forward pass of the same subnets, in one run.

Whole episodes of `--num-envs` images and seeded random actions, without (`terminal`) and with (`delta`) Result-to-Go
completion, against a packed forward pass of the subnets they chose, in interleaved rounds (`prance_env.bench`).

    python scripts/benchmark_env.py                     # prance_fmnist, 256 sub-envs
    python scripts/benchmark_env.py --device cpu --threads 1
"""

from prance_env.bench import EnvBenchConfig, benchmark_env
from vit.cli import run

if __name__ == "__main__":
    run(benchmark_env, EnvBenchConfig)

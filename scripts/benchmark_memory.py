"""Resident memory of the batched PranceViT-v1 over many episodes: does a long run stay within its budget?

Plays `--episodes` episodes of random actions on `--num-envs` sub-envs and reads the process's resident set size
after each one (`prance_env.bench`): the peak against a limit and the growth over the run. Writes `OUT/memory.md`
(the report), `OUT/memory.json` (the per-episode series) and `OUT/memory.png` (the plot).

    python scripts/benchmark_memory.py                       # 1024 sub-envs, 100 episodes, delta reward
    python scripts/benchmark_memory.py --reward terminal --out runs/memory_terminal  # no Result-to-Go completion
    python scripts/benchmark_memory.py --trim --out runs/memory_trim  # memory in use, without the free pages
    python scripts/benchmark_memory.py --threads 1           # a CPU shared with other jobs: no threads left waiting
"""

from prance_env.bench import MemoryConfig, benchmark_memory
from vit.cli import run

if __name__ == "__main__":
    run(benchmark_memory, MemoryConfig)

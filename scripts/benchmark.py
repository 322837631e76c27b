"""Real speed of the adaptive model, as speed-ups over the full model of the same precision, in one run.

Part 1: the selector's supernet on a batch of held-out images, `AdaptiveViT` in each execution mode against the full
model and the static subnet nearest in MACs; part 2: random per-sample subnets on `--supernet` (random weights).
Every model runs in interleaved rounds, in each precision of `--precisions` (`agents.bench`). It writes the tables to
`OUT/benchmark.md` and every number to `OUT/benchmark.json`.

    python scripts/benchmark.py --selector shipped:prance_fmnist --threads 1     # both parts, fp32 and bf16
    python scripts/benchmark.py --precisions fp32 --supernet none                # the selector in fp32 only
"""

from agents.bench import BenchmarkConfig, benchmark
from vit.cli import run

if __name__ == "__main__":
    run(benchmark, BenchmarkConfig)

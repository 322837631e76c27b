"""Wall-clock cost of elastic execution on this machine, as ratios taken in one run (`vit.bench`).

1. A static subnet with about half the MACs of the full model: throughput ratio against the full model.
2. Per-sample execution, packed and bucketed: the batch split over k different subnets, against one subnet for
   the batch, both as MACs per second (so the ratio is the efficiency of per-sample execution; 1.0 means free).

    python scripts/benchmark_supernet.py                     # prance_fmnist, batch 256
    python scripts/benchmark_supernet.py --supernet prance_deit_tiny --batch-size 64 --device cpu --threads 1
"""

from vit.bench import SupernetBenchConfig, benchmark_supernet
from vit.cli import run

if __name__ == "__main__":
    run(benchmark_supernet, SupernetBenchConfig)

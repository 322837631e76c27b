"""The whole chain on one machine, in one command: a Markdown table of stages, results and seconds.

Supernet training (DeiT's recipe, DDP through torchrun over every visible GPU), env steps per second, PPO,
calibration, the evaluation report and the benchmark, at DeiT-Small shapes on a generated ImageFolder
(`agents.check`). Every stage runs even when an earlier one failed, where it can; the exit status is non-zero when
any stage failed. The table is printed last and written to `OUT/gpu_check.md`; the training run's logs to
`OUT/train.log`.

    make gpu-check                                            # python scripts/gpu_check.py
    python scripts/gpu_check.py --device cpu --tiny           # the same stages at tiny sizes, in about a minute
    python scripts/gpu_check.py --data-dir /data/imagenet     # on an ImageFolder of your own
"""

import sys

from agents.check import GpuCheckConfig, gpu_check
from vit.cli import run

if __name__ == "__main__":
    sys.exit(0 if run(gpu_check, GpuCheckConfig) else 1)

"""Evaluate a trained selector on held-out images against the full model and static baselines, in one run.

Rows: the full model; the selector at each MACs budget (calibrated on training images) in each execution mode of
`--executions`; the best static subnet, uniform merging and the PPT- and Prune-and-Merge-style heuristics at matched
MACs; random decisions; all on the same images and batch size, timed in the same pass (`agents.report`). Held-out
images are the selector's dataset's (Fashion-MNIST's test split, an ImageFolder's val split). It writes
`OUT/results.md` (the table, also printed), `OUT/results.json` (every row) and `OUT/pareto.png`.

    python scripts/evaluate.py                                   # runs/selector/selector on Fashion-MNIST
    python scripts/evaluate.py --selector runs/demo/selector/selector --budgets 0.4 0.5 0.6 --out runs/demo
    python scripts/evaluate.py --executions packed bucketed prototypes --prototypes 1 4 --threads 1
    python scripts/evaluate.py --protocol official --out runs/evaluate_official
    python scripts/evaluate.py --actor ppo/prune/small/N/actor.pth --checkpoint ckpt.pth --data-dir /data/imagenet
"""

from agents.report import EvaluateConfig, evaluate_selector
from vit.cli import run

if __name__ == "__main__":
    run(evaluate_selector, EvaluateConfig)

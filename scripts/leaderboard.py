"""The PranceViT leaderboard: every agent and baseline on every registered task, with 95% intervals.

python scripts/leaderboard.py --out runs/leaderboard                          # train what is missing, score all
python scripts/leaderboard.py --out runs/leaderboard --train-only --shard 0/2 # two processes share the training
python scripts/leaderboard.py --out runs/leaderboard --agent runs/mine/selector   # add a selector of yours
python scripts/leaderboard.py --validate runs/leaderboard/results.json        # re-run and check every score
"""

import sys

from agents.leaderboard import LeaderboardConfig, leaderboard, validate
from vit.cli import one_line_errors, output_folder, parse_dataclass

if __name__ == "__main__":
    cfg = parse_dataclass(LeaderboardConfig)
    with one_line_errors():
        if cfg.validate:
            sys.exit(0 if all(row["inside"] for row in validate(cfg)) else 1)
        with output_folder(cfg.out):
            leaderboard(cfg)

"""Pictures of a policy's decisions: token maps of a few held-out images (`OUT/tokens.png`), or (`--stats`) the
decisions over a dataset (`OUT/decisions.png` and `OUT/decisions.json`); see `agents.visualize`.

    python scripts/visualize.py                                   # runs/selector/selector at its price
    python scripts/visualize.py --price 0.03 --out runs/visualize_0.03
    python scripts/visualize.py --selector shipped:prance_fmnist --budget 0.5     # half the MACs
    python scripts/visualize.py --stats --images 2000             # the decisions over 2000 held-out images
    python scripts/visualize.py --policy uniform --keep-index 0   # a baseline: no selector needed
"""

from agents.visualize import VisualizeConfig, visualize
from vit.cli import run

if __name__ == "__main__":
    run(visualize, VisualizeConfig)

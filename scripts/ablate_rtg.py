"""Result-to-Go ablation: learning curves of PPO selectors trained with `delta`, `direct` and `terminal` rewards.

Every reward mode trains for the same steps and seeds; each checkpoint is scored by its held-out return at a fixed
price and its Top-1 at a calibrated MACs budget (`agents.ablation`). `--decisions` picks the MDP; `--one-shot` adds,
per seed, a selector that decides everything at once from the stem's features. It writes `OUT/ablation.json`,
`OUT/ablation.md` (a table of the curves) and `OUT/ablation.png`.

    python scripts/ablate_rtg.py                       # 3 modes x 240k steps x seed 0 on prance_fmnist
    python scripts/ablate_rtg.py --seeds 0 1 2 --steps 200000
    python scripts/ablate_rtg.py --decisions grouped --rewards delta terminal --one-shot --seeds 0 1
"""

from agents.ablation import AblationConfig, ablate_rtg
from vit.cli import run

if __name__ == "__main__":
    run(ablate_rtg, AblationConfig)

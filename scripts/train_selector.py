"""Train a PRANCE selector (PPO by default) on the batched PranceViT-v1 env.

python scripts/train_selector.py                                  # prance_fmnist, shipped supernet
python scripts/train_selector.py --algo a2c --out runs/a2c
python scripts/train_selector.py --out runs/selector --resume     # continue from the newest checkpoint
python scripts/train_selector.py --clip-range 0.1 --target-kl 0.02 --minibatch-size 2816   # PPO's settings
"""

from agents.training import SelectorConfig, train_selector
from vit.cli import one_line_errors, output_folder, parse_dataclass
from vit.utils import resolve_device, use_tf32

if __name__ == "__main__":
    cfg = parse_dataclass(SelectorConfig)
    if resolve_device(cfg.device).type == "cuda":
        use_tf32()
    with output_folder(cfg.out), one_line_errors():
        train_selector(cfg)

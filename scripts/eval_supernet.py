"""Top-1 and MACs of static subnets of a supernet on the held-out split, as a Markdown table (`vit.evaluation`).

The largest, the smallest, and a grid of uniform width levels x keep ratios, for every token mode and, in the modes
that merge, every merge variant asked (`--merge-variants`: ToMe's, and the PRANCE release's), on the whole held-out
split or a class-stratified subset of it (`--images`). It prints the table and writes it to `OUT/static_grid.md`.
With `--extract SUBNET`, one subnet instead, written to `--out` as a timm model folder and checked against the
supernet (Top-1, logits, images/s).

    python scripts/eval_supernet.py                                  # the shipped prance_fmnist
    python scripts/eval_supernet.py --checkpoint runs/fmnist_supernet/supernet.safetensors --out runs/grid
    python scripts/eval_supernet.py --modes merge --merge-variants tome official   # the two ways of merging
    python scripts/eval_supernet.py --extract h2-m128-r1 --out runs/subnet         # one subnet as a timm model
"""

from vit.cli import run
from vit.evaluation import GridConfig, eval_supernet

if __name__ == "__main__":
    run(eval_supernet, GridConfig)

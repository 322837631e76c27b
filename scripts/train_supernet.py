"""Train a PRANCE supernet with the sandwich rule (one process, or several under torchrun).

    python scripts/train_supernet.py                                  # prance_fmnist on Fashion-MNIST
    torchrun --nproc_per_node 2 scripts/train_supernet.py --epochs 1  # DDP (gloo on CPU, nccl on CUDA)
    python scripts/train_supernet.py --supernet prance_deit_small --data imagenet --data-dir /data/imagenet \\
        --init timm:deit_small_patch16_224 --batch-size 256 --lr 5e-4 --epochs 30
"""

from vit.cli import one_line_errors, output_folder, parse_dataclass
from vit.train import TrainConfig, train_supernet
from vit.utils import resolve_device, use_tf32

if __name__ == "__main__":
    cfg = parse_dataclass(TrainConfig)
    if resolve_device(cfg.device).type == "cuda":
        use_tf32()
    with output_folder(cfg.out), one_line_errors():
        train_supernet(cfg)

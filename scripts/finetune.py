"""Joint fine-tuning (PRANCE's stage three): the supernet on the subnets its selector picks, then the selector.

python scripts/finetune.py --out runs/finetune                        # prance_fmnist under the shipped selector
python scripts/finetune.py --out runs/finetune --resume               # continue after an interruption
python scripts/finetune.py --rounds 2 --selector-steps 100000 --out runs/finetune2   # alternate twice
python scripts/finetune.py --subnets recorded --out runs/recorded   # decide from the weights the selector knows
torchrun --nproc_per_node 2 scripts/finetune.py --out runs/finetune   # DDP (gloo on CPU, nccl on CUDA)
"""

from agents.finetune import FinetuneConfig, joint_finetune
from vit.cli import one_line_errors, output_folder, parse_dataclass
from vit.utils import resolve_device, use_tf32

if __name__ == "__main__":
    cfg = parse_dataclass(FinetuneConfig)
    if resolve_device(cfg.device).type == "cuda":
        use_tf32()
    with output_folder(cfg.out), one_line_errors():
        joint_finetune(cfg)

"""vit: the elastic ViT supernet of PRANCE — widths, token reduction, MACs, per-sample execution, the
block-by-block inference runner, data.

Importing vit registers its presets with timm, so `timm.create_model("prance_deit_small")` builds one too, and the
architecture of extracted subnets (`extract_subnet`), `prance_subnet`.
"""

import os

# OpenMP threads that spin while they wait make small models crawl (tens of times slower) as soon as another
# process shares the CPU cores; sleeping waits cost nothing measurable here. Effective when vit is imported before
# torch; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import bench, cli, official  # noqa: F401  (vit.bench, vit.cli, vit.official; the official presets registered)
from .bucketed import BucketedBatch
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TOKEN_MODES, BlockConfig, InvalidSubnetError, SearchSpace, Subnet
from .data import load_dataset
from .flops import block_macs, count_flops, count_macs, count_params
from .inference import DecisionSchedule, InferenceRunner, InferenceState
from .packed import PackedBatch
from .registry import create_supernet, list_supernets, register_supernet
from .rewire import rewire
from .supernet import LAYOUTS, ElasticViT


def __getattr__(name: str):
    if name in ("extract_subnet", "save_subnet"):  # timm's models: imported when asked for
        from . import extract

        return getattr(extract, name)
    if name == "LoopShape":  # deprecated: the name of a schedule of decisions
        from . import inference

        return inference.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYOUTS",
    "TOKEN_MODES",
    "BlockConfig",
    "DecisionSchedule",
    "ElasticViT",
    "InferenceRunner",
    "InferenceState",
    "InvalidSubnetError",
    "PackedBatch",
    "SearchSpace",
    "Subnet",
    "BucketedBatch",
    "block_macs",
    "count_flops",
    "count_macs",
    "count_params",
    "create_supernet",
    "extract_subnet",
    "list_supernets",
    "load_checkpoint",
    "load_dataset",
    "register_supernet",
    "rewire",
    "save_checkpoint",
    "save_subnet",
]

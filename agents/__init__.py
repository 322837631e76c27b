"""agents: the decision side of PRANCE — the CLS features extractor, selector training, baselines, AdaptiveViT,
joint fine-tuning."""

import vit  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)

from .adaptive import AdaptiveViT, Calibration, calibrate, calibration_curve, measure
from .baselines import FullModelPolicy, RandomPolicy, StaticPolicy, UniformMergePolicy
from .extractor import CLSFeaturesExtractor
from .finetune import FinetuneConfig, joint_finetune
from .selector import (
    algorithm,
    calibrate_selector,
    check_supernet,
    load_adaptive,
    load_selector,
    resolve_selector,
    save_selector,
)
from .training import SelectorConfig, train_selector

__all__ = [
    "AdaptiveViT",
    "CLSFeaturesExtractor",
    "FinetuneConfig",
    "FullModelPolicy",
    "RandomPolicy",
    "SelectorConfig",
    "StaticPolicy",
    "UniformMergePolicy",
    "algorithm",
    "Calibration",
    "calibrate",
    "calibrate_selector",
    "calibration_curve",
    "check_supernet",
    "joint_finetune",
    "load_adaptive",
    "load_selector",
    "measure",
    "resolve_selector",
    "save_selector",
    "train_selector",
]

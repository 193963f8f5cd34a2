"""tokenprune: token merging and pruning for timm Vision Transformers.

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    tokenprune.patch(model, r=16)          # ToMe merging: up to 16 tokens fewer per block
"""

from . import _kernels  # noqa: F401  (first: refuses a package named kernels that is not ours)
from .api import ReductionPlan, patch, plan, source, unpatch
from .flops import FlopReport, flops
from .merge import TokenState
from .methods import (
    METHODS,
    AttentionDropConfig,
    BackgroundMergeConfig,
    DynamicViTConfig,
    LocalGlobalConfig,
    MergeUnmergeConfig,
    PiToMeConfig,
    TemporalMergeConfig,
    ToMeConfig,
)

__all__ = [
    "METHODS",
    "AttentionDropConfig",
    "BackgroundMergeConfig",
    "DynamicViTConfig",
    "FlopReport",
    "LocalGlobalConfig",
    "MergeUnmergeConfig",
    "PiToMeConfig",
    "ReductionPlan",
    "TemporalMergeConfig",
    "ToMeConfig",
    "TokenState",
    "flops",
    "patch",
    "plan",
    "source",
    "unpatch",
]
__version__ = "0.1.0"

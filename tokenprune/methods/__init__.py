"""Reduction methods: each is a config dataclass that builds one reducer per block."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from ..patch.vit import TokenReducer
from .dynamicvit import DynamicViTConfig, DynamicViTLoss, TokenPredictor
from .evit import AttentionDrop, AttentionDropConfig
from .local_global import LocalGlobalConfig, PositionalBipartiteMerge, WindowMerge
from .merge_unmerge import MergeUnmergeConfig, MergeUnmergeStep
from .pitome import EnergyMerge, PiToMeConfig
from .temporal import BackgroundMerge, BackgroundMergeConfig, TemporalMerge, TemporalMergeConfig
from .tome import BipartiteMerge, ToMeConfig


class MethodConfig(Protocol):
    """What a method config provides to :func:`tokenprune.patch`."""

    prop_attn: bool
    trace_source: bool
    track_positions: bool  # whether reducers need token centroids (TokenState.pos)
    supports_video: bool  # whether it works on a (frames, rows, cols) token grid (default False)
    drops_tokens: bool  # whether tokens leave without being merged into others (default False)
    supports_padding: bool  # whether it merges padding tokens of size 0 (NaFlexVit's packed inputs; default False)

    def reducers(self, model: nn.Module) -> list[TokenReducer | None]:
        """One reducer per block (``None`` where the block keeps all its tokens)."""
        ...

    # Optional: ``adds_parameters(model) -> bool``, whether ``reducers`` would create modules
    # with parameters the model does not hold yet (DynamicViT's predictors); absent: never.
    # ``masks_in_training``: whether in train() dropped tokens stay in place, masked, so that the
    # head must be given their keep mask (DynamicViT); absent: False.
    # ``replaced_options() -> dict[str, str]``: options these settings leave unread, each with the
    # option that replaces it, which patch refuses when given (local_global's local_ratio while
    # local_threshold is set); absent: none.


METHODS: dict[str, type] = {
    "tome": ToMeConfig,
    "pitome": PiToMeConfig,
    "local_global": LocalGlobalConfig,
    "dynamicvit": DynamicViTConfig,
    "evit": AttentionDropConfig,
    "temporal": TemporalMergeConfig,
    "background": BackgroundMergeConfig,
    "merge_unmerge": MergeUnmergeConfig,
}

__all__ = [
    "METHODS",
    "AttentionDrop",
    "AttentionDropConfig",
    "BackgroundMerge",
    "BackgroundMergeConfig",
    "DynamicViTConfig",
    "DynamicViTLoss",
    "EnergyMerge",
    "MergeUnmergeConfig",
    "MergeUnmergeStep",
    "TokenPredictor",
    "BipartiteMerge",
    "LocalGlobalConfig",
    "MethodConfig",
    "PiToMeConfig",
    "PositionalBipartiteMerge",
    "TemporalMerge",
    "TemporalMergeConfig",
    "ToMeConfig",
    "WindowMerge",
]

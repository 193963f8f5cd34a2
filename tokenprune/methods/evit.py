"""Training-free token dropping by class-token attention (after EViT: Liang et al., "Not All
Patches are What You Need", ICLR 2022).

Between attention and MLP of a few blocks, keep the patch tokens the class token attends to
most (averaged over heads) and optionally fuse the others into one token, their
attention-weighted average (EViT's inattentive-token fusion, normalised: EViT fine-tunes with
an attention-weighted sum, whose scale an unchanged model has not learned). Where positions
follow tokens (RoPE, relative position bias), the fused token's is the plain average over its
patches, as for any merged token: only its features are weighted by attention. Same schedule
as DynamicViT: stage s keeps ρ^s of the input patch tokens. ``score="random"`` keeps random
tokens instead (fusing the others into the mean of their patches), the baseline that learned
and attention-based dropping must beat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..merge import TokenState, keep_top_tokens
from ..patch.vit import block_prefix_tokens, head_dim
from ._options import check_common_options, check_keep_ratio, check_stage_blocks, check_stages
from .dynamicvit import default_stages, kept_count

SCORES = ("attention", "random")


@dataclass(frozen=True)
class AttentionDrop:
    """One block's step: keep the ``keep_fraction`` (of input patches) most attended tokens."""

    keep_fraction: float
    fuse: bool
    score: str
    num_protected: int
    before_attention = False

    @property
    def metric(self) -> str | None:
        return "cls_attention" if self.score == "attention" else None

    def num_kept(self, num_tokens: int, grid: tuple[int, int]) -> int:
        # A fused token from an earlier stage counts among the candidates.
        return min(kept_count(grid, self.keep_fraction), num_tokens - self.num_protected)

    def num_removed(self, num_tokens: int, grid: tuple[int, int]) -> int:
        kept = self.num_kept(num_tokens, grid)
        dropped = num_tokens - self.num_protected - kept
        return dropped - 1 if self.fuse and dropped > 0 else dropped

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        # the class token's row of q·kᵀ, recomputed because fused SDPA does not return weights
        return 2 * num_tokens * attn.num_heads * head_dim(attn) if self.score == "attention" else 0

    def __call__(self, state: TokenState, cls_attention: Tensor | None) -> TokenState:
        p = self.num_protected
        kept = self.num_kept(state.num_tokens, state.grid)
        if kept == state.num_tokens - p:
            return state
        if self.score == "attention":
            scores = cls_attention[:, p:]
        else:
            scores = torch.rand(state.x.shape[:2], device=state.x.device)[:, p:]
        # Random scores rank the tokens but say nothing about them: the fused token is the mean
        # of the patches it covers, so an earlier stage's fused token weighs as its patches.
        weights = None
        if self.fuse:
            weights = scores if self.score == "attention" else state.sizes()[:, p:, 0]
        return keep_top_tokens(state, scores, kept, p, fuse_weights=weights)


@dataclass(frozen=True)
class AttentionDropConfig:
    """Drop the tokens the class token attends to least, with no training.

    Args:
        keep_ratio: ρ; stage s keeps ρ^s of the input patch tokens (0.7).
        stages: blocks (0-based) whose attention decides, pruning before their MLP (default:
            DeiT's 3, 6, 9 scaled to the depth).
        fuse: fuse the dropped tokens into one extra token (EViT); False drops them.
        score: "attention" (class-token attention) or "random" (a baseline).
        prop_attn: proportional attention for the fused token (off, as in EViT: a fused token
            of many patches would otherwise draw attention the model never learned to give).
        trace_source: as in :class:`~tokenprune.ToMeConfig`.
    """

    keep_ratio: float = 0.7
    stages: tuple[int, ...] | None = None
    fuse: bool = True
    score: str = "attention"
    prop_attn: bool = False
    trace_source: bool = False
    track_positions = False

    @property
    def drops_tokens(self) -> bool:
        """Whether patches leave without a token holding them (fused: the extra token holds them)."""
        return not self.fuse

    def __post_init__(self) -> None:
        check_common_options(self)
        check_keep_ratio(self.keep_ratio)
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        object.__setattr__(self, "stages", check_stages(self.stages))

    def reducers(self, model: nn.Module) -> list[AttentionDrop | None]:
        depth = len(model.blocks)
        protected = block_prefix_tokens(model)
        # (NaFlexVit keeps its class token in its embedding and says so in has_class_token)
        class_token = getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)
        if self.score == "attention" and (not class_token or protected == 0):
            after = " (it adds its class token after them)" if class_token else ""  # CaiT
            raise ValueError(
                f"method 'evit' with score='attention' needs a class token in the blocks, and "
                f"{type(model).__name__} has none there{after}; use score='random' or another method"
            )
        stages = check_stage_blocks(self.stages if self.stages is not None else default_stages(depth), depth, first=0)
        reducers: list[AttentionDrop | None] = [None] * depth
        if self.keep_ratio == 1.0:  # keeps every token: no reducer, as ToMe at r=0 (timm's head takes the tokens)
            return reducers
        for stage, block in enumerate(stages, 1):
            reducers[block] = AttentionDrop(self.keep_ratio**stage, self.fuse, self.score, protected)
        return reducers

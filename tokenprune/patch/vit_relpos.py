"""Patch for timm's ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``): a
relative position bias from a table or a small MLP, per block or shared, which follows merged
tokens as BEiT's does (:func:`tokenprune.merge.mean_over_source_pairs`).

Importing this module registers the classes in :mod:`tokenprune.patch.vit`'s registries
(``tokenprune.api`` imports it, so ``tokenprune.patch(model, ...)`` just works).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)
from torch import Tensor

from ..merge import TokenState, mean_over_source_pairs, source_pairs_flops
from . import vit
from .vit import PostNormSteps, PreNormSteps, ReducingBlockMixin, ReducingViT, _timm_qkv


class _RelPosBias:
    """The block's own bias if it has one, else the model's shared one (as timm's attention
    chooses); between merged tokens, its mean over the pairs of input tokens they cover."""

    def _position_bias(self, state: TokenState, position: Tensor | None) -> tuple[Tensor, ...]:
        bias = self.attn.rel_pos.get_bias() if self.attn.rel_pos is not None else position
        return () if bias is None else (mean_over_source_pairs(bias, state),)

    def position_flops(self, tokens: int, num_inputs: int, shared_bias: bool) -> int:
        """FLOPs of the bias between ``tokens`` merged tokens; for :func:`tokenprune.flops`."""
        if self.attn.rel_pos is None and not shared_bias:
            return 0
        return source_pairs_flops(self.attn.num_heads, tokens, num_inputs)


class ReducingRelPosBlock(_RelPosBias, PreNormSteps, ReducingBlockMixin, RelPosBlock):
    """timm ``RelPosBlock`` (pre-norm, LayerScale ``ls1``/``ls2``) with token reduction."""


class ReducingResPostRelPosBlock(_RelPosBias, PostNormSteps, ReducingBlockMixin, ResPostRelPosBlock):
    """timm ``ResPostRelPosBlock`` (norm after attention and MLP) with token reduction."""


class ReducingVisionTransformerRelPos(ReducingViT, VisionTransformerRelPos):
    """timm ``VisionTransformerRelPos`` with token reduction; its relative position bias follows
    the merged tokens."""

    @property
    def _positions_follow_sources(self) -> bool:  # type: ignore[override]
        return self.shared_rel_pos is not None or any(block.attn.rel_pos is not None for block in self.blocks)

    @property
    def _shared_position_bias(self) -> bool:
        return self.shared_rel_pos is not None

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x, self.shared_rel_pos.get_bias() if self.shared_rel_pos is not None else None


vit.QKV_PROJECTIONS[RelPosAttention] = _timm_qkv  # timm Attention's fused qkv
vit.PATCHED_BLOCKS[RelPosBlock] = ReducingRelPosBlock
vit.PATCHED_BLOCKS[ResPostRelPosBlock] = ReducingResPostRelPosBlock
vit.register_model_class(VisionTransformerRelPos, ReducingVisionTransformerRelPos)

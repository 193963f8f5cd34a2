"""Patch for timm's ``Beit`` (BEiT, BEiT v2): relative position bias, per block or shared.

The bias is a table over pairs of input tokens, added to the attention logits; between merged
tokens it is the mean over the pairs of input tokens they cover
(:func:`tokenprune.merge.mean_over_source_pairs`), just as merging averages the tokens.

Importing this module registers the classes in :mod:`tokenprune.patch.vit`'s registries
(``tokenprune.api`` imports it, so ``tokenprune.patch(beit_model, ...)`` just works).
"""

from __future__ import annotations

import torch
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from torch import Tensor

from ..merge import TokenState, mean_over_source_pairs, source_pairs_flops
from . import vit
from .eva import GammaPreNormSteps, _eva_qkv
from .vit import ReducingBlockMixin, ReducingViT


class ReducingBeitBlock(GammaPreNormSteps, ReducingBlockMixin, BeitBlock):
    """timm BEiT ``Block`` (pre-norm, ``gamma_1``/``gamma_2`` LayerScale, relative position
    bias) with token reduction."""

    def _position_bias(self, state: TokenState, position: Tensor | None) -> tuple[Tensor, ...]:
        # timm's terms (the block's own table, then the model's shared bias); between merged
        # tokens, their sum over merged pairs
        terms = () if self.attn.relative_position_bias_table is None else (self.attn._get_rel_pos_bias(),)
        if position is not None:
            terms = (*terms, position)
        num_inputs = terms[0].shape[-1] if terms else 0
        if not terms or (state.size is None and state.num_tokens == num_inputs):
            return terms
        return (mean_over_source_pairs(sum(terms[1:], terms[0]), state),)

    def position_flops(self, tokens: int, num_inputs: int, shared_bias: bool) -> int:
        """FLOPs of the bias between ``tokens`` merged tokens; for :func:`tokenprune.flops`."""
        if self.attn.relative_position_bias_table is None and not shared_bias:
            return 0
        return source_pairs_flops(self.attn.num_heads, tokens, num_inputs)


class ReducingBeit(ReducingViT, Beit):
    """timm ``Beit`` with token reduction; its relative position bias follows the merged tokens."""

    @property
    def _positions_follow_sources(self) -> bool:  # type: ignore[override]
        tables = any(block.attn.relative_position_bias_table is not None for block in self.blocks)
        return tables or self.rel_pos_bias is not None

    @property
    def _shared_position_bias(self) -> bool:
        return self.rel_pos_bias is not None

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        return x, self.rel_pos_bias() if self.rel_pos_bias is not None else None


vit.QKV_PROJECTIONS[BeitAttention] = _eva_qkv  # the same fused qkv with a q/v bias as EVA's
vit.PATCHED_BLOCKS[BeitBlock] = ReducingBeitBlock
vit.register_model_class(Beit, ReducingBeit)

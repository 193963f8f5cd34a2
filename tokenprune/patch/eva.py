"""Patch for timm's ``Eva`` family: EVA, EVA-02, DINOv3, Perception Encoder, RoPE-ViT, Sapiens2
(``timm.list_models(module="eva")``). The same reducing blocks and token state as the ViT;
what differs is the attention's projections, the blocks' residual steps (``gamma_1``/``gamma_2``
LayerScale; a post-norm variant) and rotary position embeddings (RoPE), which follow merged
tokens: a merged token rotates by the mean of its patches' rotations
(:func:`tokenprune.merge.mean_over_sources`).

Importing this module registers the classes in :mod:`tokenprune.patch.vit`'s registries
(``tokenprune.api`` imports it, so ``tokenprune.patch(eva_model, ...)`` just works).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import Tensor

from ..merge import TokenState, mean_over_sources
from . import vit
from .vit import PostNormSteps, ReducingBlockMixin, ReducingViT


def _eva_qkv(attn: EvaAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """EvaAttention's projections: fused with a q/v bias (k has none), or three linears."""
    batch, num_tokens, _ = x.shape
    if attn.qkv is None:
        return tuple(
            proj(x).reshape(batch, num_tokens, attn.num_heads, -1).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if attn.qkv_bias_separate:
            qkv = attn.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
    return qkv.reshape(batch, num_tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _rope_attention_qkv(attn: AttentionRope, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AttentionRope's projections; k and v may have fewer heads (grouped-query attention)."""
    batch, num_tokens, _ = x.shape
    if attn.qkv is not None:
        qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)
    q = attn.q_proj(x).reshape(batch, num_tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).reshape(batch, num_tokens, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).reshape(batch, num_tokens, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    return q, k, v


class _EvaRope:
    """Eva blocks get the rotary embedding of the input patches as ``position``; a merged
    token rotates by the mean of its patches' rotations."""

    def _rope(self, state: TokenState, position: Tensor | None) -> Tensor | None:
        if position is None:
            return None
        return mean_over_sources(position, state, self.attn.num_prefix_tokens, self.backend)


class GammaPreNormSteps:
    """Residual steps of a pre-norm block with optional ``gamma_1``/``gamma_2`` LayerScale
    parameters: Eva's and BEiT's blocks."""

    def _attention_input(self, x: Tensor) -> Tensor:
        return self.norm1(x)

    def _add_attention(self, x: Tensor, attn_out: Tensor) -> Tensor:
        return x + self.drop_path1(attn_out if self.gamma_1 is None else self.gamma_1 * attn_out)

    def _add_mlp(self, x: Tensor, mlp: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        out = (self.mlp if mlp is None else mlp)(self.norm2(x))
        return x + self.drop_path2(out if self.gamma_2 is None else self.gamma_2 * out)


class ReducingEvaBlock(_EvaRope, GammaPreNormSteps, ReducingBlockMixin, EvaBlock):
    """timm ``EvaBlock`` (pre-norm, optional ``gamma_1``/``gamma_2`` LayerScale) with token reduction."""


class ReducingEvaBlockPostNorm(_EvaRope, PostNormSteps, ReducingBlockMixin, EvaBlockPostNorm):
    """timm ``EvaBlockPostNorm`` (norm after attention and MLP, EVA-02 enormous) with token reduction."""


class ReducingEva(ReducingViT, Eva):
    """timm ``Eva`` with token reduction; its rotary embedding follows the merged tokens."""

    @property
    def _position_per_block(self) -> bool:  # type: ignore[override]
        return bool(getattr(self, "rope_mixed", False))

    @property
    def _positions_follow_sources(self) -> bool:  # type: ignore[override]
        return self.rope is not None

    def forward_intermediates(  # type: ignore[override]
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        output_dict: bool = False,
    ) -> Any:
        """timm Eva's argument order (``attn_mask`` where ViT has ``output_dict``)."""
        return super().forward_intermediates(
            x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
            output_dict=output_dict, attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.patch_drop is not None and self.training and any(b.reducer is not None for b in self.blocks):
            # Patch dropout removes tokens at random before the first block, under the patch grid
            # that plans, windows and keep counts are computed on.
            raise ValueError(
                "patch dropout (patch_drop_rate > 0) is not supported while training an Eva that reduces "
                "tokens; create the model with patch_drop_rate=0"
            )
        x = self.patch_embed(x)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), rope


vit.QKV_PROJECTIONS[EvaAttention] = _eva_qkv
vit.QKV_PROJECTIONS[AttentionRope] = _rope_attention_qkv
vit.PATCHED_BLOCKS[EvaBlock] = ReducingEvaBlock
vit.PATCHED_BLOCKS[EvaBlockPostNorm] = ReducingEvaBlockPostNorm
vit.register_model_class(Eva, ReducingEva)

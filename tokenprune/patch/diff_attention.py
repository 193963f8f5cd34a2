"""Patch for timm's ``DiffAttention`` (Differential Transformer, Ye et al. 2024) in ViT blocks:
``vit_dlittle_*``/``vit_dwee_*``.

Differential attention takes the difference of two softmax maps, softmax(q₁k₁ᵀ) − λ·softmax(q₂k₂ᵀ),
each over half of every head's q/k channels, applied to one v of twice the head width. Merged
tokens enter both maps alike: proportional attention adds log s to both sets of logits, so a
token merged from s identical tokens gets exactly their attention in each map, and so in their
difference. The merge metric is ToMe's, the keys averaged over heads (here over the 2H half-heads).

Importing this module registers the class in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import maybe_add_mask, resolve_self_attn_mask
from timm.layers.diff_attention import DiffAttention
from torch import Tensor, nn

from . import vit
from .vit import AttentionForward, refuse_float16_keep_mask, sdpa_mask


def split_differential_heads(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, T, C] projections into timm's differential heads: q, k [B, 2H, T, d] (q/k-normed),
    v [B, H, T, 2d]. ``module`` is timm's DiffAttention or DiffParallelScalingBlock."""
    batch, num_tokens, _ = q.shape
    heads, dim = module.num_heads, module.head_dim
    q = q.reshape(batch, num_tokens, 2 * heads, dim).transpose(1, 2)
    k = k.reshape(batch, num_tokens, 2 * heads, dim).transpose(1, 2)
    v = v.reshape(batch, num_tokens, heads, 2 * dim).transpose(1, 2)
    return module.q_norm(q), module.k_norm(k), v


def differential_maps(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> Tensor:
    """softmax(q₁k₁ᵀ) v − λ softmax(q₂k₂ᵀ) v, then the sub-norm and (1 − λ_init), in timm's op
    order on its fused or manual path. q, k: [B, 2H, T, d]; v: [B, H, T, 2d]; ``module`` is
    timm's DiffAttention or DiffParallelScalingBlock (they keep the same attributes)."""
    batch, heads, num_tokens, dim = v.shape[0], v.shape[1], v.shape[2], q.shape[-1]
    lambda_full = module._compute_lambda().type_as(q)
    if module.fused_attn:
        q1, q2 = q.reshape(batch, heads, 2, num_tokens, dim).unbind(2)
        k1, k2 = k.reshape(batch, heads, 2, num_tokens, dim).unbind(2)
        dropout = module.attn_drop_p if module.training else 0.0
        out1 = F.scaled_dot_product_attention(q1, k1, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        out2 = F.scaled_dot_product_attention(q2, k2, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        out = out1 - lambda_full * out2
    else:
        weights = (q * module.scale) @ k.transpose(-2, -1)
        weights = maybe_add_mask(weights, resolve_self_attn_mask(num_tokens, weights, attn_mask, is_causal=is_causal))
        weights = module.attn_drop(weights.softmax(dim=-1)).view(batch, heads, 2, num_tokens, num_tokens)
        out = (weights[:, :, 0] - lambda_full * weights[:, :, 1]) @ v
    return module.sub_norm(out) * (1 - module.lambda_init)


def attend_differential(
    attn: DiffAttention,
    x: Tensor,
    bias: Tensor | None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    metric: str | None = None,
    *,
    key_bias: Tensor | None = None,
    backend: str | None = None,
    rope: Tensor | None = None,
    position_bias: tuple[Tensor, ...] = (),
    key_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """timm's ``DiffAttention.forward`` (same ops in the same order: r=0 is bit-identical) with
    the additive ``bias`` (a training keep mask) and ``key_bias`` (log sizes) as an SDPA mask
    on both maps, returning the keys averaged over half-heads when ``metric`` is "keys" (``patch``
    refuses methods that read an attention map here: :func:`~tokenprune.patch.vit.check_reducers`). (The
    Triton attention kernel takes one head width for q, k and v: v is twice as wide here, so
    ``backend`` goes unused.)"""
    if rope is not None or position_bias:
        raise ValueError("differential attention has no rotary or relative position terms to take")
    batch, num_tokens, channels = x.shape
    q, k, v = split_differential_heads(attn, *attn.qkv(x).chunk(3, dim=2))
    refuse_float16_keep_mask(bias, q)
    out = differential_maps(attn, q, k, v, sdpa_mask(bias, key_bias, attn_mask, q.dtype), is_causal)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, num_tokens, channels))))
    return out, k.mean(dim=1) if metric == "keys" else None


def _differential_matmul_flops(attn: DiffAttention, tokens: int) -> int:
    """As timm's manual path computes it (what tokenprune's FLOPs count for every attention):
    q·kᵀ over d channels for each of the 2H half-heads (2·T²·d each), then the difference of
    the two maps times a 2d-wide v per head (4·T²·d): 8·T²·H·d, with d = ``attn.head_dim``. The
    fused path multiplies each map by v (12·T²·H·d)."""
    return 8 * tokens * tokens * attn.num_heads * attn.head_dim


vit.ATTENTION_FORWARDS[DiffAttention] = AttentionForward(attend_differential, _differential_matmul_flops)
"""Patch for timm's parallel ViT blocks (ViT-22B's layout, Dehghani et al. 2023: attention and
MLP read the same normalised input and their outputs are summed): ``ParallelScalingBlock``
(``vit_pwee_*``) and ``DiffParallelScalingBlock`` (``vit_dpwee_*``, with differential attention).

There is no point between attention and MLP to merge at, so these blocks reduce after the whole
block: ToMe's size-weighted merge of the block's output, matched on this block's keys (averaged
over heads). Proportional attention and training keep masks enter the attention as in the other
blocks (merged tokens of a ParallelScalingBlock take :func:`kernels.attention`, as a Block's do);
each block's FLOPs are all on the tokens entering it.

Importing this module registers the classes in :mod:`tokenprune.patch.vit`'s registries.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock
from torch import Tensor, nn

from kernels import attention

from ..merge import TokenState
from . import vit
from .diff_attention import differential_maps, split_differential_heads
from .vit import (
    ReducingBlockMixin,
    linear_flops,
    refuse_float16_keep_mask,
    sdpa_mask,
    takes_attention_kernel,
)


class _ReducingParallel(ReducingBlockMixin):
    """The block's forward on a token state: the block, then its reducer on the output (of
    :class:`ReducingBlockMixin` it keeps the attributes and the attention biases; its residual
    steps do not apply)."""

    gives_only_keys = True  # (no attention map for methods that read one: patch refuses them)

    def forward(  # type: ignore[override]
        self, state: TokenState, attn_mask: Tensor | None = None, is_causal: bool = False, position: Tensor | None = None
    ) -> TokenState:
        vit.check_block_input(state)
        reducer = self.reducer
        if reducer is not None and reducer.before_attention:
            state = reducer(state, None)
            reducer = None
        bias, key_bias = self._biases(state)
        backend = self.backend if state.size is not None else None  # (set for merged tokens only)
        x, keys = self._parallel(state.x, bias, key_bias, backend, attn_mask, is_causal)
        state = state._replace(x=x)
        return reducer(state, keys.mean(dim=1)) if reducer is not None else state

    def _mlp_and_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fused input projection, split as timm splits it (MLP hidden, q, k, v)."""
        x_mlp, q, k, v = torch.split(self.in_proj(self.in_norm(x)), self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        return x_mlp, q, k, v

    def _parallel(
        self,
        x: Tensor,
        bias: Tensor | None,
        key_bias: Tensor | None,
        backend: str | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        """The block's output and its keys [B, heads, T, d], with a training keep mask ``bias``
        and the size bias ``key_bias`` in its attention."""
        raise NotImplementedError


class ReducingParallelScalingBlock(_ReducingParallel, ParallelScalingBlock):
    """timm ``ParallelScalingBlock`` with token reduction after the block."""

    def _parallel(
        self,
        x: Tensor,
        bias: Tensor | None,
        key_bias: Tensor | None,
        backend: str | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        # timm's ParallelScalingBlock.forward, op for op, with the masks.
        batch, num_tokens, channels = x.shape
        x_mlp, q, k, v = self._mlp_and_qkv(x)
        q = self.q_norm(q.view(batch, num_tokens, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(batch, num_tokens, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        refuse_float16_keep_mask(bias, q)
        dropout = self.attn_drop.p if self.training else 0.0
        if takes_attention_kernel(self.fused_attn, backend, bias, attn_mask, is_causal):
            x_attn = attention(q, k, v, key_bias, self.scale, backend, dropout)  # as a merged Block's
        elif self.fused_attn:
            attn_mask = sdpa_mask(bias, key_bias, attn_mask, q.dtype)
            x_attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
        else:
            attn_mask = sdpa_mask(bias, key_bias, attn_mask, q.dtype)
            weights = (q * self.scale) @ k.transpose(-2, -1)
            weights = maybe_add_mask(weights, resolve_self_attn_mask(num_tokens, weights, attn_mask, is_causal=is_causal))
            x_attn = self.attn_drop(weights.softmax(dim=-1)) @ v
        x_attn = x_attn.transpose(1, 2).reshape(batch, num_tokens, channels)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y)), k


class ReducingDiffParallelScalingBlock(_ReducingParallel, DiffParallelScalingBlock):
    """timm ``DiffParallelScalingBlock`` (differential attention) with token reduction after the block."""

    def _parallel(
        self,
        x: Tensor,
        bias: Tensor | None,
        key_bias: Tensor | None,
        backend: str | None,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor]:
        # timm's DiffParallelScalingBlock.forward, op for op, with the masks (the kernel takes one
        # head width for q, k and v: v is twice as wide here, so ``backend`` goes unused).
        batch, num_tokens, channels = x.shape
        x_mlp, q, k, v = self._mlp_and_qkv(x)
        q, k, v = split_differential_heads(self, q, k, v)
        refuse_float16_keep_mask(bias, q)
        attn_mask = sdpa_mask(bias, key_bias, attn_mask, q.dtype)
        x_attn = differential_maps(self, q, k, v, attn_mask, is_causal).transpose(1, 2).reshape(batch, num_tokens, channels)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        return x + self.drop_path(self.ls(y)), k


def _parallel_flops(block: nn.Module, tokens: int, removed: int, matmuls: int) -> int:
    """The projections and the products between tokens, ``matmuls``·T²·H·d (as timm's manual
    path computes them: 4, or 8 for differential attention, which subtracts its two maps before
    multiplying by its twice-as-wide v), on the tokens the block runs on (all that enter it, but
    after a pruning step that runs first), and the reducer's matching."""
    reducer = getattr(block, "reducer", None)
    attended = tokens - removed if reducer is not None and reducer.before_attention else tokens
    flops = sum(
        linear_flops(attended, layer)
        for name, layer in block.named_modules()
        if isinstance(layer, nn.Linear) and not name.startswith("reducer")  # (a predictor counts its own)
    )
    flops += matmuls * attended * attended * block.num_heads * block.head_dim
    if reducer is not None:
        flops += reducer.matching_flops(tokens, removed, block)
    return flops


vit.PATCHED_BLOCKS[ParallelScalingBlock] = ReducingParallelScalingBlock
vit.PATCHED_BLOCKS[DiffParallelScalingBlock] = ReducingDiffParallelScalingBlock
vit.BLOCK_FLOPS[ParallelScalingBlock] = partial(_parallel_flops, matmuls=4)
vit.BLOCK_FLOPS[DiffParallelScalingBlock] = partial(_parallel_flops, matmuls=8)

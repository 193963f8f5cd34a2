"""Patch for timm's SAM image encoder (``VisionTransformerSAM``: Segment Anything's ViT-B/L/H):
merge, attend and unmerge inside every block (:mod:`tokenprune.methods.merge_unmerge`).

SAM's blocks attend inside 14×14 windows, with a global-attention block every few, and its neck
reads every patch, so tokens cannot leave the stream between blocks as in the other families.
Each patched block merges the tokens of every group it attends over (a window, zero-padded as
timm pads it, or the whole grid), runs attention and MLP on the merged tokens and unmerges their
updates. The model's own forward, ``forward_intermediates`` and neck run unchanged, on the grid.

Positions follow the merge as in the other families, by an average over what a token covers.
SAM adds a decomposed relative position bias (MViTv2) between query i and key j,
B_ij = q_i·R^h[row_i, row_j] + q_i·R^w[col_i, col_j]. Between merged tokens the patched block
adds its mean over the pairs of patches they cover (query side with the merged query, which is
the mean of its patches' queries), which the decomposition makes cheap: with f_i the fraction of
token i's patches in each row (g_i: in each column),
    B̄_ij = Σ_k (q_i·Σ_r f_i[r] R^h[r, k]) f_j[k] + (the same over columns),
two small matmuls instead of the [T, T] average. For unmerged tokens f is one-hot and B̄ is
timm's bias exactly.

Padding: timm pads the grid to whole windows with zeros after the norm, and the padding joins
attention as keys. Here an extra metric channel makes padding alike (cosine 1) and orthogonal to
every patch, so padding merges with padding first, and a token's features are the mean of its
*patches* (padding, zeros, counts in its size but not in its mean): no patch is diluted by
padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import Block as SamBlock
from timm.models.vision_transformer_sam import VisionTransformerSAM, get_rel_pos, window_partition, window_unpartition
from torch import Tensor, nn

from kernels import merge_wavg

from ..merge import bipartite_matching_flops, bipartite_soft_matching, unmerge
from . import vit
from .vit import QKV_PROJECTIONS, ReducingViT, linear_flops


def _sam_qkv(attn: SamAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of [G, T, C] tokens, [G, heads, T, head_dim] each, q/k-normed as timm does."""
    groups, tokens, _ = x.shape
    q, k, v = attn.qkv(x).view(groups, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


QKV_PROJECTIONS[SamAttention] = _sam_qkv


def merged_rel_pos_bias(attn: SamAttention, q: Tensor, row_share: Tensor, col_share: Tensor) -> Tensor:
    """SAM's decomposed relative position bias between merged tokens, averaged over the pairs of
    patches they cover (module docstring).

    Args:
        attn: the block's attention (its ``rel_pos_h``/``rel_pos_w`` tables). q: [G, heads, T, D]
            merged queries. row_share, col_share: [G, T, rows] and [G, T, cols], the fraction of each
            token's patches in each row and column of the group's grid (one-hot for a single patch).
    Returns:
        [G, heads, T, T] bias in q's dtype.
    """
    rows, cols = row_share.shape[-1], col_share.shape[-1]
    table_h = get_rel_pos(rows, rows, attn.rel_pos_h)  # [query row, key row, D]
    table_w = get_rel_pos(cols, cols, attn.rel_pos_w)
    row_share, col_share = row_share.to(q.dtype), col_share.to(q.dtype)
    # Each token's mean row table over its patches, then its query against it: [G, heads, T, rows].
    rel_h = torch.einsum("gnhd,ghkd->gnhk", q, torch.einsum("ghr,rkd->ghkd", row_share, table_h))
    rel_w = torch.einsum("gnhd,ghkd->gnhk", q, torch.einsum("ghc,ckd->ghkd", col_share, table_w))
    return rel_h @ row_share.transpose(-1, -2).unsqueeze(1) + rel_w @ col_share.transpose(-1, -2).unsqueeze(1)


class _Groups:
    """The tokens of one block's attention groups, [G, T, C], with their merge: ``dest`` (each
    token's merged token), ``size`` (tokens per merged token, padding included) and ``share``
    (the fraction of each merged token that is patches, not padding: None without padding)."""

    def __init__(self, tokens: Tensor, padding: Tensor | None, merged: int, backend: str) -> None:
        metric = tokens if padding is None else torch.cat([tokens, padding.to(tokens.dtype)], dim=-1)
        self.num_out = tokens.shape[1] - merged
        self.dest = bipartite_soft_matching(metric, merged, 0, backend)
        self.backend = backend
        patches = 1.0 - padding.float() if padding is not None else tokens.new_ones(*tokens.shape[:2], 1, dtype=torch.float32)
        share, self.size = self.mean(patches)
        self.share = share if padding is not None else None

    def mean(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Mean of ``values`` over every member of each merged token (padding included)."""
        ones = values.new_ones(values.shape[0], values.shape[1], 1, dtype=torch.float32)
        return merge_wavg(values, ones, self.dest, self.num_out, self.backend)

    def merge(self, tokens: Tensor) -> Tensor:
        """Each merged token: the mean of its patches' ``tokens`` (padding, zeros, left out)."""
        mean, _ = self.mean(tokens)
        if self.share is None:
            return mean
        # Padding is zeros, so the mean over all members is share × the mean over patches. All-padding
        # tokens (share 0, mean 0) stay 0: the clamp only avoids 0/0.
        return (mean.float() / self.share.clamp(min=1e-6)).to(tokens.dtype)

    def unmerge(self, merged: Tensor) -> Tensor:
        return unmerge(merged, self.dest)


class ReducingSamBlock(SamBlock):
    """timm SAM ``Block`` that merges the tokens of each attention group for its attention and
    MLP and unmerges their updates (``reducer``: a :class:`~tokenprune.methods.merge_unmerge.GroupMerge`
    or None). LayerScale, drop-path, q/k-norm and the relative position bias are kept."""

    reducer: Any
    prop_attn: bool
    backend: str

    def forward(self, x: Tensor) -> Tensor:
        step = self.reducer
        batch, height, width, channels = x.shape
        size = self.window_size
        rows, cols = (size, size) if size > 0 else (height, width)
        if step is None or step.merged_count(rows * cols) == 0:
            return super().forward(x)
        padding = None
        if size > 0 and (height % size or width % size):  # 1 where timm pads the grid to whole windows
            padding = 1.0 - self._grouped(x.new_ones(batch, height, width, 1))
        tokens = self._grouped(self.norm1(x))
        groups = _Groups(tokens, padding, step.merged_count(rows * cols), self.backend)
        update = groups.unmerge(self._attend(groups.merge(tokens), groups, rows, cols))
        x = x + self.drop_path1(self.ls1(self._on_grid(update, height, width)))
        groups_per_image = -(-height // rows) * -(-width // cols)
        if runs_merged_mlp(step, groups_per_image, rows * cols, height * width):
            update = groups.unmerge(self.mlp(groups.merge(self._grouped(self.norm2(x)))))
            return x + self.drop_path2(self.ls2(self._on_grid(update, height, width)))
        flat = x.reshape(batch, height * width, channels)  # timm's MLP step
        return (flat + self.drop_path2(self.ls2(self.mlp(self.norm2(flat))))).reshape(batch, height, width, channels)

    def _grouped(self, grid: Tensor) -> Tensor:
        """[B, H, W, C] → the block's attention groups [G, T, C]: zero-padded windows as timm
        makes them, or the whole grid."""
        if self.window_size > 0:
            grid, _ = window_partition(grid, self.window_size)
        return grid.flatten(1, 2)

    def _on_grid(self, groups: Tensor, height: int, width: int) -> Tensor:
        """The inverse of :meth:`_grouped`, dropping the padding."""
        size, channels = self.window_size, groups.shape[-1]
        if size == 0:
            return groups.view(-1, height, width, channels)
        padded = (height + -height % size, width + -width % size)
        return window_unpartition(groups.view(-1, size, size, channels), size, (height, width), padded)

    def _attend(self, tokens: Tensor, groups: _Groups, rows: int, cols: int) -> Tensor:
        """SAM's attention over merged tokens [G, T', C]: proportional attention (log size on
        every key) and the relative position bias averaged over the merged patches."""
        attn = self.attn
        num_groups, num_tokens, channels = tokens.shape
        q, k, v = _sam_qkv(attn, tokens)
        bias = None
        if attn.use_rel_pos:
            position = torch.arange(rows * cols, device=tokens.device)
            row_onehot = F.one_hot(position // cols, rows).float().expand(num_groups, -1, -1)
            col_onehot = F.one_hot(position % cols, cols).float().expand(num_groups, -1, -1)
            row_share, _ = groups.mean(row_onehot)
            col_share, _ = groups.mean(col_onehot)
            bias = merged_rel_pos_bias(attn, q, row_share, col_share)
        if self.prop_attn:
            key_bias = groups.size.log().to(q.dtype).view(num_groups, 1, 1, num_tokens)
            bias = key_bias if bias is None else bias + key_bias
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if self.training else 0.0)
        else:  # timm's manual path
            weights = (q * attn.scale) @ k.transpose(-2, -1)
            out = attn.attn_drop((weights if bias is None else weights + bias).softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(num_groups, num_tokens, channels)
        return attn.proj_drop(attn.proj(out))


class ReducingSam(VisionTransformerSAM):
    """timm ``VisionTransformerSAM`` whose blocks merge and unmerge inside themselves: its own
    forward, ``forward_intermediates`` and neck run unchanged. Holds the family's hooks."""

    unmerges_in_blocks = True  # takes only methods that unmerge before a block ends

    @staticmethod
    def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
        """timm's SAM takes any image of whole patches (its absolute position embedding is
        resampled to the grid; windows pad it)."""
        patch = model.patch_embed.patch_size
        if height % patch[0] or width % patch[1]:
            raise ValueError(f"the model takes image sides that are multiples of {patch[0]}x{patch[1]} (its patch size), got {height}x{width}")
        return (height // patch[0], width // patch[1])

    @staticmethod
    def check_modules(model: nn.Module) -> None:
        if any(block.attn.rope is not None for block in model.blocks):
            raise TypeError("tokenprune cannot patch SAM blocks with rotary embeddings (use_rope=True); timm's SAM models use relative position bias")

    @staticmethod
    def check_method(model: nn.Module, config: Any) -> None:
        pass

    @staticmethod
    def blocks_flops(model: nn.Module, grid: tuple[int, int]) -> list[int]:
        """FLOPs per image of each block on a grid of patches (:func:`block_flops`)."""
        return [block_flops(block, grid) for block in model.blocks]

    @staticmethod
    def after_blocks_flops(model: nn.Module, tokens: int, grid: tuple[int, ...]) -> int:
        """The neck and the head, on the full grid, as FlopCounterMode counts them."""
        from torch.utils.flop_counter import FlopCounterMode

        weight = next(model.parameters())
        features = torch.zeros(1, model.embed_dim, *grid, device=weight.device, dtype=weight.dtype)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.forward_head(model.neck(features))
        return counter.get_total_flops()

    patch_embedding = ReducingViT.patch_embedding
    _prefix_in_blocks = True  # (there are no prefix tokens)


def runs_merged_mlp(step: Any, groups: int, group_tokens: int, patches: int) -> bool:
    """Whether the MLP runs on the merged tokens of an image's ``groups`` attention groups: when
    asked (``mlp``) and they are fewer than its ``patches``, which timm's MLP runs on (merged windows still hold timm's padding: at ratio 0.25,
    75 % of SAM-B's 4,900 padded window positions at 1024² is 3,675 tokens, against 4,096 patches)."""
    return step.mlp and groups * (group_tokens - step.merged_count(group_tokens)) < patches


def block_flops(block: nn.Module, grid: tuple[int, int]) -> int:
    """Matmul FLOPs per image of a SAM block (patched or not) on a grid of patches, as
    FlopCounterMode counts them on the PyTorch path: linear layers, attention, the relative
    position bias, and the matching (merges and unmerges are gathers and sums, not counted)."""
    attn = block.attn
    height, width = grid
    if block.window_size > 0:
        rows = cols = block.window_size
        groups = -(-height // rows) * -(-width // cols)  # windows, the grid padded to whole ones
    else:
        (rows, cols), groups = grid, 1
    tokens = rows * cols
    step = getattr(block, "reducer", None)
    merged = step.merged_count(tokens) if step is not None else 0
    kept, heads, dim = tokens - merged, attn.num_heads, attn.head_dim
    padded = groups * tokens != height * width
    flops = linear_flops(groups * kept, attn.qkv) + linear_flops(groups * kept, attn.proj)
    flops += groups * 4 * kept * kept * heads * dim  # q·kᵀ and attention·v
    if attn.use_rel_pos:
        if merged:  # mean tables per token, the queries against them, then the [T', T'] bias
            flops += groups * 2 * kept * (rows * rows + cols * cols) * dim
            flops += groups * 2 * heads * kept * (rows + cols) * (dim + kept)
        else:  # timm: every query against its row's and column's tables
            flops += groups * 2 * heads * tokens * (rows + cols) * dim
    if merged:
        flops += groups * bipartite_matching_flops(tokens, 0, block.norm1.normalized_shape[0] + padded)
    mlp_tokens = groups * kept if merged and runs_merged_mlp(step, groups, tokens, height * width) else height * width
    return flops + sum(linear_flops(mlp_tokens, layer) for layer in block.mlp.modules() if isinstance(layer, nn.Linear))


vit.PATCHED_BLOCKS[SamBlock] = ReducingSamBlock
vit.PATCHED_CLASSES[VisionTransformerSAM] = ReducingSam
vit._ORIGINAL_CLASSES[ReducingSam] = VisionTransformerSAM

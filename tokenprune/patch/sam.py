"""Patch for timm's SAM image encoder (``VisionTransformerSAM``: Segment Anything's ViT-B/L/H):
merge, attend and unmerge inside every block (:mod:`tokenprune.methods.merge_unmerge`).

SAM's blocks attend inside 14×14 windows, with a global-attention block every few, and its neck
reads every patch, so tokens cannot leave the stream between blocks as in the other families.
Each patched block merges the tokens of every group it attends over (a window, zero-padded as
timm pads it, or the whole grid), runs attention and MLP on the merged tokens and unmerges their
updates. The model's own forward, ``forward_intermediates`` and neck run unchanged, on the grid.

Positions follow the merge as in the other families, by an average over what a token covers.
SAM adds a decomposed relative position bias (MViTv2) between the query at position p and the
key at position p', B(q, p, p') = q·R^h[row_p, row_p'] + q·R^w[col_p, col_p']. Between merged
tokens i and j the patched block adds its mean over the pairs of positions they cover, each asking
with i's query (:func:`merged_rel_pos_bias`): timm's per-position terms (every position asking
with its token's query), averaged over each query token's positions, times the share of each key
token's positions in each row and column, one matmul of inner size rows + cols. For unmerged
tokens it is timm's bias exactly.

Padding: timm pads the grid to whole windows with zeros after the norm, and the padding joins
attention as keys. Here an extra metric channel makes padding alike (cosine 1) and orthogonal to
every patch, so padding prefers padding as a partner (bipartite matching alternates A and B:
where all the padding falls in B, as one padded column of an even-sized window does, it cannot
merge with itself, and a patch may merge into it). A token's features are the mean of its
*patches* (padding, zeros, counts in its size but not in its mean), so no patch is diluted by
padding; sizes and the position average count padding, as timm's attention does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import Block as SamBlock
from timm.models.vision_transformer_sam import VisionTransformerSAM, get_rel_pos, window_partition, window_unpartition
from torch import Tensor, nn

from . import vit
from ..merge import BlockMerge, bipartite_matching_flops
from .vit import QKV_PROJECTIONS, ReducingViT, SettingsThroughPatch, _timm_qkv, linear_flops, log_size


# SAM's attention projects q, k, v as timm's ViT attention does (q/k-norm after, in ReducingSamBlock._attend).
QKV_PROJECTIONS[SamAttention] = _timm_qkv


def merged_rel_pos_bias(attn: SamAttention, q: Tensor, merging: BlockMerge, rows: int, cols: int) -> Tensor:
    """SAM's decomposed relative position bias between merged tokens, averaged over the pairs of
    positions they cover, each pair asking with the query token's q (module docstring).

    Args:
        attn: the block's attention (its ``rel_pos_h``/``rel_pos_w`` tables). q: [G, heads, T', D]
            merged queries. merging: the group's merge of its rows × cols positions into T' tokens.
    Returns:
        [G, heads, T', T'] bias in q's dtype.
    """
    groups, heads, num_out, dim = q.shape
    num_positions = rows * cols
    # timm's terms at every position, asked with the query of the token holding it: [G, rows, cols, heads, k]
    q_at = merging.unmerge(q.transpose(1, 2).reshape(groups, num_out, heads * dim)).view(groups, rows, cols, heads, dim)
    rel_h = torch.einsum("grchd,rkd->grchk", q_at, get_rel_pos(rows, rows, attn.rel_pos_h))
    rel_w = torch.einsum("grchd,ckd->grchk", q_at, get_rel_pos(cols, cols, attn.rel_pos_w))
    # each query token: the mean over its positions, [G, T', heads, key row (col)]
    rel_h = merging.average(rel_h.reshape(groups, num_positions, heads * rows)).view(groups, num_out, heads, rows)
    rel_w = merging.average(rel_w.reshape(groups, num_positions, heads * cols)).view(groups, num_out, heads, cols)
    # Each key token: the mean of its positions' terms, the row's plus the column's, i.e. the query
    # token's terms against the share of the key token's positions in each row and column: one
    # matmul of inner size rows + cols, written once (timm writes its [T, T] bias once too).
    # One-hot rows and columns by comparison, not F.one_hot, which on CUDA checks its indices'
    # range on the host: two device synchronisations per block (24 per SAM-B forward).
    position = torch.arange(num_positions, device=q.device)
    row_onehot = (position // cols).unsqueeze(1) == torch.arange(rows, device=q.device)
    col_onehot = (position % cols).unsqueeze(1) == torch.arange(cols, device=q.device)
    grid_onehot = torch.cat([row_onehot, col_onehot], dim=-1)
    key_share = merging.average(grid_onehot.to(q.dtype).expand(groups, -1, -1))  # [G, T', rows + cols]
    return torch.cat([rel_h, rel_w], dim=-1).transpose(1, 2) @ key_share.transpose(1, 2).unsqueeze(1)


class ReducingSamBlock(SamBlock):
    """timm SAM ``Block`` that merges the tokens of each attention group for its attention and
    MLP and unmerges their updates (``reducer``: a
    :class:`~tokenprune.methods.merge_unmerge.MergeUnmergeStep`, or None). LayerScale, drop-path
    (per window on attention, as timm), q/k-norm and the relative position bias are kept."""

    reducer: Any
    prop_attn: bool
    backend: str

    def forward(self, x: Tensor) -> Tensor:
        step = self.reducer
        batch, height, width, channels = x.shape
        rows, cols, groups_per_image = attention_groups(self.window_size, height, width)
        merged = step.merged_count(rows * cols) if step is not None else 0
        if merged == 0:
            return super().forward(x)
        vit.refuse_hooks(self.attn, "this patched block's attn", vit.ATTENTION_HOOKS, patched=True)
        padding = None
        if groups_per_image * rows * cols != height * width:  # 1 where timm pads the grid to whole windows
            padding = 1.0 - self._grouped(x.new_ones(batch, height, width, 1))
        tokens = self._grouped(self.norm1(x))
        merging = BlockMerge(tokens, merged, padding=padding, backend=self.backend)
        update = self.drop_path1(self.ls1(merging.unmerge(self._attend(merging.merge(tokens), merging, rows, cols))))
        x = x + self._on_grid(update, height, width)
        if runs_merged_mlp(step, groups_per_image, rows * cols, height * width):
            update = self._on_grid(merging.unmerge(self.mlp(merging.merge(self._grouped(self.norm2(x))))), height, width)
            return x + self.drop_path2(self.ls2(update))
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
        window, channels = self.window_size, groups.shape[-1]
        if window == 0:
            return groups.view(-1, height, width, channels)
        padded = (height + -height % window, width + -width % window)
        return window_unpartition(groups.view(-1, window, window, channels), window, (height, width), padded)

    def _attend(self, tokens: Tensor, merging: BlockMerge, rows: int, cols: int) -> Tensor:
        """SAM's attention over merged tokens [G, T', C]: proportional attention (log size on
        every key) and the relative position bias averaged over the merged positions."""
        attn = self.attn
        num_groups, num_tokens, channels = tokens.shape
        q, k, v = _timm_qkv(attn, tokens)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = merged_rel_pos_bias(attn, q, merging, rows, cols) if attn.use_rel_pos else None
        if self.prop_attn:
            key_bias = log_size(merging.size, q.dtype).to(q.dtype).view(num_groups, 1, 1, num_tokens)
            bias = key_bias if bias is None else bias + key_bias
        if attn.fused_attn:
            dropout = attn.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:  # timm's manual path
            weights = (q * attn.scale) @ k.transpose(-2, -1)
            out = attn.attn_drop((weights if bias is None else weights + bias).softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(num_groups, num_tokens, channels)
        return attn.proj_drop(attn.proj(out))


class ReducingSam(SettingsThroughPatch, VisionTransformerSAM):
    """timm ``VisionTransformerSAM`` whose blocks merge and unmerge inside themselves: its own
    forward, ``forward_intermediates`` and neck run unchanged. Holds the family's hooks."""

    default_method = "merge_unmerge"
    takes_unmerging = True
    # On an H200 (SAM-B at 1024², batch 8, ratio 0.25-0.5; evals/results/bench_sam_cuda.md) the
    # Triton path ran 15-19 % slower than the PyTorch path, in two runs, and stayed so when its
    # match moved to cuBLAS: with six merges per block over 200 windows, the host launching
    # them is the likely bottleneck. So "auto" runs SAM's blocks on the PyTorch path (issue 3:
    # Triton never slower, else dispatch to torch); backend="triton" still runs the kernels.
    auto_backend = "torch"

    @staticmethod
    def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
        """timm's SAM takes any image of whole patches (its absolute position embedding is
        resampled to the grid; windows pad it), and any size where its patch embedding pads the
        image to whole patches (``dynamic_img_pad=True``)."""
        patch = model.patch_embed.patch_size
        if getattr(model.patch_embed, "dynamic_img_pad", False):
            return (-(-height // patch[0]), -(-width // patch[1]))
        if height % patch[0] or width % patch[1]:
            raise ValueError(
                f"the model takes image sides that are multiples of {patch[0]}x{patch[1]} (its patch size), "
                f"got {height}x{width}"
            )
        return (height // patch[0], width // patch[1])

    @staticmethod
    def check_modules(model: nn.Module) -> None:
        if any(block.attn.rope is not None for block in model.blocks):
            raise TypeError(
                "tokenprune cannot patch SAM blocks with rotary embeddings (use_rope=True); "
                "timm's SAM models use relative position bias"
            )

    @staticmethod
    def check_method(model: nn.Module, config: Any) -> None:
        """Only methods that unmerge inside every block: the blocks need every patch."""
        if not getattr(config, "unmerges_in_blocks", False):
            raise TypeError(
                "SAM's blocks need every patch (windowed attention, a neck on the grid), so tokens cannot leave "
                f"between blocks as {type(config).__name__} removes them; use method='merge_unmerge' "
                "(e.g. tokenprune.patch(model, 'merge_unmerge', ratio=0.5))"
            )

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
    _prefix_in_blocks = True  # (SAM has no prefix tokens: block_prefix_tokens counts 0)


def attention_groups(window: int, height: int, width: int) -> tuple[int, int, int]:
    """The rows and columns of each group a SAM block attends over on a height × width grid (a
    window, or the whole grid when ``window`` is 0), and how many groups an image has (the grid
    padded to whole windows)."""
    if window == 0:
        return height, width, 1
    return window, window, -(-height // window) * -(-width // window)


def runs_merged_mlp(step: Any, groups: int, group_tokens: int, patches: int) -> bool:
    """Whether the MLP runs on the merged tokens of an image's ``groups`` attention groups: when
    asked (``merge_mlp``) and they are fewer than its ``patches``, which timm's MLP runs on. Merged
    windows still hold timm's padding: at ratio 0.25, 75 % of SAM-B's 4,900 padded window
    positions at 1024² is 3,675 tokens, against 4,096 patches; at 0.15, more than the patches."""
    return step.merge_mlp and groups * (group_tokens - step.merged_count(group_tokens)) < patches


def block_flops(block: nn.Module, grid: tuple[int, int]) -> int:
    """Matmul FLOPs per image of a SAM block (patched or not) on a grid of patches, as
    FlopCounterMode counts them on the PyTorch path: linear layers, attention, the relative
    position bias, and the matching (merges and unmerges are gathers and sums, not counted)."""
    attn = block.attn
    height, width = grid
    rows, cols, groups = attention_groups(block.window_size, height, width)
    tokens = rows * cols
    step = getattr(block, "reducer", None)
    merged = step.merged_count(tokens) if step is not None else 0
    kept, heads, dim = tokens - merged, attn.num_heads, attn.head_dim
    padded = groups * tokens != height * width
    flops = linear_flops(groups * kept, attn.qkv) + linear_flops(groups * kept, attn.proj)
    flops += groups * 4 * kept * kept * heads * dim  # q·kᵀ and attention·v
    if attn.use_rel_pos:  # every position's query against its row's and column's tables (timm's, merged or not)
        flops += groups * 2 * heads * tokens * (rows + cols) * dim
        if merged:  # the [T', T'] bias from the query tokens' terms and the key tokens' shares (timm: an add)
            flops += groups * 2 * heads * kept * kept * (rows + cols)
    if merged:
        flops += groups * bipartite_matching_flops(tokens, 0, block.norm1.normalized_shape[0] + padded)
    mlp_tokens = groups * kept if merged and runs_merged_mlp(step, groups, tokens, height * width) else height * width
    return flops + sum(linear_flops(mlp_tokens, layer) for layer in block.mlp.modules() if isinstance(layer, nn.Linear))


vit.PATCHED_BLOCKS[SamBlock] = ReducingSamBlock
vit.register_model_class(VisionTransformerSAM, ReducingSam)

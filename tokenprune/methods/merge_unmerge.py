"""Merge, attend, unmerge: token merging inside each block, for models whose blocks need every
patch in place (ToMe for Stable Diffusion: Bolya & Hoffman, "Token Merging for Fast Stable
Diffusion", CVPRW 2023, Sec. 3).

ToMe removes tokens for good, so every later block runs on fewer. Where a block needs the whole
grid again (SAM's windowed attention partitions it; its neck reads every patch), each block
instead merges its attention input, runs attention (and its MLP) on the merged tokens, and
copies each merged token's output back to every patch it covers, adding it to that patch's own
residual stream. The residual stream keeps every patch's identity: a patch that merged differs
from its partners by what it carried into the block; only the block's update is shared. Plain
timm ViTs take it too (prefix tokens protected), for dense outputs from every block's full grid.

Matching is ToMe's bipartite soft matching (alternate tokens, cosine of each A token to its best B
token, merge the best ``r``) on the attention's input (the normed tokens, which merging averages;
ToMe for SD matches on the block's input before the norm, with a random 2-D partition). The keys,
ToMe's metric, would need the qkv projection of every token, which is what merging saves. Unlike
ToMe for SD, whose own ``merge_mlp`` is off by default (it found merging for the MLP hurt Stable
Diffusion's images), ``merge_mlp`` is on by default: the MLP holds two thirds of a ViT block's
FLOPs (without it ratio 0.5 saves 1.26× instead of 1.80× in SAM-B's windowed blocks), and on
DINOv2 with real weights merging it too kept dense outputs closer to the unreduced model than
merging for attention alone at equal GFLOPs (``evals/results/dense_fidelity_merge_unmerge.md``),
though further than ToMe at every budget: on plain ViTs, ToMe is the better method. What it
costs SAM's masks is not measured (no SAM weights ship offline).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import nn

from ..merge import bipartite_matching_flops, max_bipartite_r
from ..patch.vit import block_prefix_tokens
from ._options import check_common_options


@dataclass(frozen=True)
class MergeUnmergeStep:
    """One block's merge-attend-unmerge step: in every group of tokens the block attends over
    (a window, or the whole grid), merge ``ratio`` of them for the attention and, with
    ``merge_mlp``, for the MLP. The block's tokens leave it unmerged, so it removes none from the
    stream. (Where matching and merging run is the block's ``backend``, as for every method.)"""

    ratio: float
    merge_mlp: bool
    num_protected: int = 0  # prefix tokens (class, registers) that never merge
    unmerges_in_blocks = True  # the block runs it around its attention and MLP (patch/vit.py, patch/sam.py)
    # (for the checks every reducer goes through: it acts before attention and reads no attention map)
    before_attention = True
    metric = None

    def merged_count(self, num_tokens: int) -> int:
        """How many of an attention group's ``num_tokens`` merge away (ToMe's r): ``ratio`` of
        the mergeable ones (prefix tokens aside), floored, at most half of them (bipartite
        matching merges each A token into a B token)."""
        mergeable = num_tokens - self.num_protected
        return min(math.floor(self.ratio * mergeable + 1e-9), max_bipartite_r(num_tokens, self.num_protected))

    def num_removed(self, num_tokens: int, grid: tuple[int, ...] | None = None) -> int:
        return 0  # unmerged before the block ends

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        """The matching on the attention input (its channels: the attention's output width)."""
        if self.merged_count(num_tokens) == 0:
            return 0
        return bipartite_matching_flops(num_tokens, self.num_protected, attn.proj.out_features)


@dataclass(frozen=True)
class MergeUnmergeConfig:
    """Merge ``ratio`` of every attention group's tokens inside each block and unmerge them
    before the block ends (ToMe for SD); for models whose blocks need the whole patch grid
    (SAM's image encoder), where tokens cannot leave the stream, and plain timm ViTs.

    Args:
        ratio: fraction of the tokens of every attention group (a window, or the whole grid in
            a global-attention block; the patches of a ViT, its prefix tokens aside) merged
            away, 0 ≤ ratio ≤ 0.5 (bipartite matching merges at most half).
        merge_windows: merge in SAM's windowed-attention blocks too; False merges only in its
            global-attention blocks (no effect elsewhere).
        merge_mlp: run the MLP on the merged tokens too (its update is unmerged like
            attention's), where they are fewer than the patches (SAM's padded windows at a low
            ratio may not be); False runs it on every token.
        prop_attn: proportional attention (add log(size) to the attention logits, ToMe Eq. 1).
        backend: where matching and merging run: "auto" (Triton kernels for CUDA tensors when
            triton imports, PyTorch otherwise; in SAM the PyTorch path, which an H200 measured
            faster there), "triton" or "torch" to force one.
    """

    ratio: float
    merge_windows: bool = True
    merge_mlp: bool = True
    prop_attn: bool = True
    backend: str = "auto"

    trace_source = False  # every block unmerges: no merged token outlives its block
    track_positions = False
    supports_video = False
    drops_tokens = False
    unmerges_in_blocks = True  # taken by the families that say so (takes_unmerging: plain ViTs, SAM)

    def __post_init__(self) -> None:
        check_common_options(self)
        if not isinstance(self.ratio, numbers.Real) or isinstance(self.ratio, bool) or not 0 <= self.ratio <= 0.5:
            raise ValueError(
                f"ratio is the fraction of each attention group's tokens merged away, 0 ≤ ratio ≤ 0.5 "
                f"(bipartite matching merges at most half), got {self.ratio!r}"
            )

    def reducers(self, model: nn.Module) -> list[MergeUnmergeStep | None]:
        step = MergeUnmergeStep(float(self.ratio), self.merge_mlp, block_prefix_tokens(model)) if self.ratio > 0 else None
        return [step if self.merge_windows or getattr(block, "window_size", 0) == 0 else None for block in model.blocks]

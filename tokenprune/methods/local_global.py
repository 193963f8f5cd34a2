"""Two-stage locality-aware merging: windows first, then global with a positional penalty.

After ALGM (Norouzi et al., "ALGM: Adaptive Local-then-Global Token Merging for Efficient
Semantic Segmentation with Plain Vision Transformers", CVPR 2024): early on, tokens inside a
small window that are all alike (typically background) are merged whole, which is cheap and
keeps object boundaries; later, ToMe's global bipartite merging runs with similarity
penalised by the distance between token centroids, so that semantic and positional
information decide together what merges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels._triton import vmapped

from ..merge import (
    TokenState,
    bipartite_best_match,
    bipartite_matching_flops,
    bipartite_members,
    max_bipartite_r,
    merge_state,
    unit_vectors,
)
from ..schedule import RSchedule, check_count, resolve_r
from ..patch.vit import block_prefix_tokens, head_dim
from ._options import check_common_options, check_real


def window_scores(metric: Tensor, grid: tuple[int, int], window: int) -> Tensor:
    """Mean pairwise cosine similarity inside each non-overlapping window×window window.

    metric: [B, rows·cols, D] patch tokens in raster order (no prefix). Windows cover the
    top-left (rows // window)·window × (cols // window)·window part of the grid. With unit
    vectors u_i, Σ_{i≠j} u_i·u_j = ‖Σ u_i‖² − Σ ‖u_i‖², where ‖u_i‖² is 1, or 0 for a zero
    vector (cosine 0 to every token, :func:`~tokenprune.merge.unit_vectors`), so the mean over
    the n(n−1) ordered pairs needs no n×n Gram matrix. Returns [B, windows] float32 in raster
    order of windows.
    """
    rows, cols = grid
    n = window * window
    unit = unit_vectors(metric)
    # Every size spelled out, none as -1: a batch of 0 images (an uneven shard's last batch)
    # has 0 elements, which leave a -1 ambiguous.
    batch, dim = unit.shape[0], unit.shape[-1]
    unit = unit.reshape(batch, rows, cols, dim)[:, : rows // window * window, : cols // window * window]
    members = unit.reshape(batch, rows // window, window, cols // window, window, dim)
    sums = members.sum(dim=(2, 4))
    # Σ ‖u_i‖² by counting the non-zero vectors: exactly n where none is zero (subtracting n
    # would count a zero vector as 1 and score a window of zero keys −1/(n−1) instead of 0)
    nonzero = (members != 0).any(dim=-1).sum(dim=(2, 4))
    return ((sums.square().sum(-1) - nonzero) / (n * (n - 1))).flatten(1)


def window_dest(merged: Tensor, count: int, grid: tuple[int, int], window: int, num_protected: int) -> tuple[Tensor, int]:
    """``dest`` that collapses every window flagged in ``merged`` ([B, windows] bool, ``count``
    in every row) onto its top-left token; all other tokens keep their order.

    Returns (dest [B, P + rows·cols], number of output tokens).
    """
    rows, cols = grid
    batch, device = merged.shape[0], merged.device
    win_rows, win_cols = rows // window, cols // window
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    inside = (r < win_rows * window) & (c < win_cols * window)
    window_id = torch.where(inside, (r // window) * win_cols + c // window, 0)
    anchor = (r // window * window) * cols + c // window * window  # the window's top-left token
    in_merged = merged.gather(1, window_id.expand(batch, -1)) & inside
    token = torch.arange(rows * cols, device=device)
    keeps_own_slot = ~in_merged | (token == anchor)
    slot = keeps_own_slot.cumsum(dim=1) - 1 + num_protected
    dest_body = slot.gather(1, torch.where(in_merged, anchor, token))
    prefix = torch.arange(num_protected, device=device).expand(batch, -1)
    num_out = num_protected + rows * cols - count * (window * window - 1)
    return torch.cat([prefix, dest_body], dim=1), num_out


@dataclass(frozen=True)
class WindowMerge:
    """Stage 1: merge the most self-similar window×window windows of the patch grid, each into
    one token of size window². How many: ``ratio`` of the windows (a static count), or every
    window whose mean pairwise cosine reaches ``threshold`` with the count made equal across
    the batch (the smallest count; data-dependent, so it syncs with the host)."""

    window: int
    ratio: float | None
    threshold: float | None
    num_protected: int
    backend: str = "auto"
    before_attention = False
    metric = "keys"

    def windows(self, num_tokens: int, grid: tuple[int, int]) -> int:
        if num_tokens != self.num_protected + grid[0] * grid[1]:
            raise ValueError(
                f"window merging needs the full patch grid ({grid[0]}x{grid[1]} patches + {self.num_protected} "
                f"prefix), got {num_tokens} tokens: timm's patch dropout (patch_drop_rate) is not supported"
            )
        return (grid[0] // self.window) * (grid[1] // self.window)

    def num_removed(self, num_tokens: int, grid: tuple[int, int]) -> int | None:
        if self.ratio is None:
            return None  # decided by the data
        return round(self.ratio * self.windows(num_tokens, grid)) * (self.window**2 - 1)

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        return 0  # window scores are sums of unit vectors: no matmul

    def __call__(self, state: TokenState, metric: Tensor) -> TokenState:
        grid, p = state.grid, self.num_protected
        total = self.windows(state.num_tokens, grid)
        if total == 0:
            return state
        scores = window_scores(metric[:, p:], grid, self.window)
        if self.ratio is not None:
            count = round(self.ratio * total)
        else:
            refuse_data_counts_under_vmap(scores, "local_threshold", "local_ratio")
            counts = (scores >= self.threshold).sum(dim=1)
            count = int(counts.min()) if counts.numel() else 0  # (a batch of no images: no minimum to take)
        if count == 0:
            return state
        order = scores.argsort(dim=1, descending=True, stable=True)
        # (Scattered with 1, not True: torch.jit.trace cannot type a bool scalar.)
        merged = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :count], 1)
        dest, num_out = window_dest(merged, count, grid, self.window, p)
        return merge_state(state, dest, num_out, self.backend)


def refuse_data_counts_under_vmap(scores: Tensor, option: str, fixed: str) -> None:
    """Raise where a count read from the data (on the host) would run under torch.func.vmap,
    which cannot read a batched value (functorch's own error names no option): under vmap each
    image would need its own count, hence its own token count, which vmap cannot batch."""
    if vmapped(scores):
        raise RuntimeError(
            f"local_global's {option} reads its merge count from the data, which torch.func.vmap (e.g. "
            f"per-sample gradients) cannot do: each image would get its own token count. Use {fixed} under vmap"
        )


@dataclass(frozen=True)
class PositionalBipartiteMerge:
    """Stage 2: ToMe's bipartite merging with score cos − λ·(centroid distance / grid diagonal).
    ``adaptive`` merges, per block, the A tokens whose best score exceeds mean + std of all
    best scores (ALGM's rule), the smallest count in the batch, at most ``r``."""

    r: int
    pos_weight: float
    adaptive: bool
    num_protected: int
    backend: str = "auto"
    before_attention = False
    metric = "keys"

    def num_removed(self, num_tokens: int, grid: tuple[int, int]) -> int | None:
        if self.adaptive:
            return None
        return min(self.r, max_bipartite_r(num_tokens, self.num_protected))

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        return bipartite_matching_flops(num_tokens, self.num_protected, head_dim(attn)) if removed else 0

    def __call__(self, state: TokenState, metric: Tensor) -> TokenState:
        cap = min(self.r, max_bipartite_r(state.num_tokens, self.num_protected))
        if cap == 0:
            return state
        pos = None
        if self.pos_weight:
            diagonal = (state.grid[0] ** 2 + state.grid[1] ** 2) ** 0.5
            pos = state.pos / diagonal
        best_score, best_b = bipartite_best_match(metric, self.num_protected, pos, self.pos_weight, self.backend)
        r = cap
        if self.adaptive:
            refuse_data_counts_under_vmap(best_score, "adaptive=True", "a fixed r")
            if best_score.shape[0] == 0:  # a batch of no images: no counts (and std() warns on none)
                return state
            threshold = best_score.mean(dim=1, keepdim=True) + best_score.std(dim=1, keepdim=True)
            r = min(cap, int((best_score > threshold).sum(dim=1).min()))
            if r == 0:
                return state
        members = bipartite_members(best_score, best_b, r, state.num_tokens, self.num_protected, self.backend)
        return merge_state(state, members.dest, state.num_tokens - r, self.backend, members)


@dataclass(frozen=True)
class LocalGlobalConfig:
    """Two-stage locality-aware merging: local windows first, then global merging.

    Defaults are the best setting measured by ``python -m evals.dense_fidelity`` (DINOv2
    ViT-S/14, 140 views of real photos) at about 80 % of the GFLOPs: merging a few windows
    (1/16) after a few blocks of context (block 3) keeps the embedding and the dense saliency
    map measurably closer to the unreduced model than ToMe at the same GFLOPs, with either of
    ToMe's schedules (95 % t intervals over photos; ``evals/results/dense_fidelity.md``).

    The tighter the budget, the earlier the window stage belongs: blocks before it keep every
    token, so later blocks must merge more each. Measured: block 3 down to ~70 % of the
    GFLOPs, then blocks 2 and 1 with a gently decreasing ``r=(r, -0.5)``, block 0 from ~54 %
    and ``(r, -1)`` under 50 % (``evals.settings.LOCAL_GLOBAL_PLACEMENT`` places it so for
    budget searches; a budget just above a band's floor may get the next band's setting, a few
    points under the budget). Below ~73 % these tie with ToMe within what 20 photos can resolve: not
    because of the windows (at the same per-block counts, windows keep the embedding closer
    than ToMe's pairs), but because no block before the window stage merges.

    ``pos_weight`` is off by default: on DINOv2 it lowered the top-10 % saliency IoU at every
    λ tried (0.25 to 4; λ = 1 at the default setting: 0.866 against 0.886) and the embedding
    cosine from λ = 1 up, since a nearer partner is a less similar one. ``local_threshold``
    makes the count follow the images: on real photos it merged far more in some than in
    others and lost to a fixed ratio at equal mean GFLOPs. So did ``adaptive`` stage-2 counts
    (``evals.dense_fidelity``: a smaller win than the fixed count after block 3, a tie after
    block 1, a loss after block 0, against ToMe at the same mean GFLOPs).

    Args:
        local_block: the block after whose attention stage 1 merges windows (0-based; default
            3). Blocks before it keep all tokens.
        window: window side in patches (default 2: 2×2 windows of 4 patches).
        local_ratio: fraction of the windows merged in stage 1 (a static count; default 1/16).
        local_threshold: when set, replaces ``local_ratio``: merge the windows whose mean
            pairwise cosine is at least this, the count made equal across the batch (the
            smallest, so an image's result depends on its batch); data-dependent, so
            ``plan``/``flops`` cannot predict it and ``torch.compile(fullgraph=True)`` fails.
        r: stage-2 merges per block, over the blocks after ``local_block``: an int, ToMe's
            ``(r, inflection)`` ramp over those blocks, or a list with one entry per such block.
            With ``adaptive`` it is the per-block cap.
        adaptive: stage-2 count per block from the data (best scores above mean + std, the
            smallest count of the batch); like ``local_threshold``, batch-dependent and not
            ``fullgraph``-compilable.
        pos_weight: λ, the positional penalty per grid diagonal of centroid distance (0 = ToMe).
        prop_attn, trace_source, backend: as in :class:`~tokenprune.ToMeConfig`.
    """

    local_block: int = 3
    window: int = 2
    local_ratio: float | None = 1 / 16
    local_threshold: float | None = None
    r: RSchedule = 16
    adaptive: bool = False
    pos_weight: float = 0.0
    prop_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_common_options(self)
        check_count(self.local_block, "local_block")
        if check_count(self.window, "window") < 2:
            raise ValueError(f"window must be at least 2, got {self.window}")
        if self.local_threshold is not None:
            if not -1.0 <= check_real(self.local_threshold, "local_threshold", "(a cosine) in [-1, 1]") <= 1.0:
                raise ValueError(f"local_threshold is a cosine in [-1, 1], got {self.local_threshold}")
        elif self.local_ratio is None or not 0.0 <= check_real(self.local_ratio, "local_ratio", "in [0, 1]") <= 1.0:
            raise ValueError(f"local_ratio must be in [0, 1], got {self.local_ratio}")
        if not 0 <= check_real(self.pos_weight, "pos_weight", "≥ 0") < math.inf:  # (NaN too)
            raise ValueError(f"pos_weight must be ≥ 0 and finite, got {self.pos_weight}")

    @property
    def track_positions(self) -> bool:
        return self.pos_weight > 0

    def replaced_options(self) -> dict[str, str]:
        """The options that change nothing under these settings, each with the one that replaces
        it: ``local_ratio`` while ``local_threshold`` is set."""
        return {"local_ratio": "local_threshold"} if self.local_threshold is not None else {}

    def reducers(self, model: nn.Module) -> list[WindowMerge | PositionalBipartiteMerge | None]:
        depth = len(model.blocks)
        if not 0 <= self.local_block < depth:
            raise ValueError(f"local_block must be in [0, {depth - 1}] for a {depth}-block model, got {self.local_block}")
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)  # (NaFlexVit: none, sizes vary)
        if grid is not None and self.window > min(grid):
            # Windows are at least 2×2 (window ≥ 2), so a grid one patch high or wide has room
            # for none: naming a window of "at most 1" there would name an invalid option.
            fix = (
                f"give a window of at most {min(grid)} patches"
                if min(grid) >= 2
                else "no window of 2x2 or more fits a grid one patch across; use method 'tome' (global merging alone)"
            )
            raise ValueError(
                f"window={self.window} does not fit the model's {grid[0]}x{grid[1]} patch grid: no window would merge; {fix}"
            )
        later = resolve_r(self.r, depth - self.local_block - 1, f"after local_block={self.local_block} come")
        counts = (0,) * (self.local_block + 1) + later
        protected = block_prefix_tokens(model)
        reducers: list[WindowMerge | PositionalBipartiteMerge | None] = [None] * depth
        ratio = None if self.local_threshold is not None else self.local_ratio
        if ratio != 0.0:  # (a ratio of 0 merges no window: no reducer, as ToMe at r=0)
            reducers[self.local_block] = WindowMerge(self.window, ratio, self.local_threshold, protected, self.backend)
        for i in range(self.local_block + 1, depth):
            if counts[i] > 0:
                reducers[i] = PositionalBipartiteMerge(counts[i], self.pos_weight, self.adaptive, protected, self.backend)
        return reducers

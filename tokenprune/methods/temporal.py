"""Video token merging: across neighbouring frames (``"temporal"``) and early merging of the
unimportant tokens (``"background"``), for :class:`tokenprune.models.VideoVisionTransformer`.

Both express their matching as ``dest`` and use the size-weighted :func:`~tokenprune.merge.merge_state`
like every other method, so sizes, proportional attention, size-weighted pooling and source
maps work as for images. Both keep the surviving tokens in their order (a merged token takes
the place of the token it merged into), so tokens stay in (frame, row, col) order.

Joint space-time ToMe over all tokens (the ToMe paper's video setting) needs no new code: it is
``method="tome"`` on the video model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels import best_match
from kernels._triton import under_torch_func
from kernels.match import float32_matmul
from kernels.temporal_match import OUTSIDE_PENALTY, temporal_best_match

from ..merge import TokenState, max_bipartite_r, merge_state, unit_vectors
from ..schedule import RSchedule, check_count, resolve_r
from ..patch.vit import block_prefix_tokens, head_dim
from ._options import check_common_options, check_real
from .tome import BipartiteMerge


def default_early_blocks(depth: int) -> int:
    """How many leading blocks merge early by default: 6, or half the blocks of a model with
    fewer than 12 (at least 1)."""
    return max(1, min(6, depth // 2))


def ordered_dest(is_src: Tensor, partner: Tensor, num_protected: int, has_partner: Tensor | None = None) -> Tensor:
    """``dest`` that removes the tokens flagged in ``is_src`` ([B, N] bool over the tokens after
    the prefix) into their ``partner`` ([B, N] int64 body index, read where ``is_src``) and keeps
    every other token in its order.

    Without ``has_partner`` a partner must not itself be a source. With it ([B, N] bool), a
    source without a partner merges into the next kept token in order (the last kept token when
    none follows), and a partner may be such a source: its sources follow it there. Every
    ``dest`` is then a kept token of the same row, whatever the flags."""
    p = num_protected
    batch, num_body = is_src.shape
    slot = (~is_src).cumsum(dim=1) - 1 + p  # a kept token's place; a source's: the kept token before it
    if has_partner is None:
        body = torch.where(is_src, slot.gather(1, partner), slot)
    else:
        last = p + num_body - 1 - is_src.sum(dim=1, keepdim=True)  # the last kept token's place
        resting = torch.where(is_src, torch.minimum(slot + 1, last), slot)
        body = torch.where(is_src & has_partner, resting.gather(1, partner), resting)
    prefix = torch.arange(p, device=is_src.device).expand(batch, -1)
    return torch.cat([prefix, body], dim=1)


def joint_blocks(counts: tuple[int, ...], grid: tuple[int, int, int], num_protected: int) -> tuple[bool, ...]:
    """For each block of a ``joint_after`` schedule, whether it merges jointly on a clip of
    token grid ``grid``: from the first block whose count exceeds the even-frame tokens its
    temporal predecessors left (each removing what it can, at most half its tokens) on."""
    frames, rows, cols = grid
    left = (frames + 1) // 2 * rows * cols  # even-frame tokens: all that temporal steps can merge
    tokens = num_protected + frames * rows * cols
    joint, kinds = False, []
    for n in counts:
        joint = joint or n > left  # once joint, stay joint: a temporal step after a joint one finds its pairs gone
        kinds.append(joint)
        if n > 0 and not joint:
            removed = min(n, max_bipartite_r(tokens, num_protected))
            left -= removed
            tokens -= removed
    return tuple(kinds)


# Where a token without a partner ranks among the merge candidates: below every pair outside the
# window (cosine − OUTSIDE_PENALTY ≥ −5).
_NO_PARTNER = -2.0 * OUTSIDE_PENALTY


@dataclass(frozen=True)
class TemporalMerge:
    """One block's temporal step: every token whose centroid frame is even (set A) may merge into
    its most similar token of a neighbouring odd frame (set B) within ``window`` patches; the
    ``r`` best pairs merge (several A tokens may join one B token, as in ToMe). B tokens are only
    destinations, so every token has at most one merge partner.

    The count is static (compile-friendly, rectangular batches), and the plan's cap on it is an
    estimate (see :meth:`num_removed`): when a merged B token's centroid drifts to an even frame
    it turns A, and an A token whose only partners drifted has none left inside the window
    (with ``window=0`` or an odd number of tubelet frames this happens within a few blocks). A
    clip with fewer than ``r`` A tokens with a partner inside the frame gap and window merges
    the missing ones into their most similar B token outside it. A clip with fewer than ``r``
    A tokens with any partner (all its B tokens drifted: odd tubelet-frame counts, small grids)
    merges tokens without one into the next token it keeps in (frame, row, col) order, so
    every merge stays inside its clip and every size is kept. Both happen eager and compiled
    alike, and an eager forward on the CPU warns (``RuntimeWarning``, once per process and case;
    on a GPU the check would synchronise the host with every block, so run a few clips on the
    CPU to see it): lower ``r`` or widen ``window`` to keep every merge inside. A clip of a
    single tubelet frame (no B token at all) is refused.
    """

    r: int
    window: int
    num_protected: int
    backend: str = "auto"
    # With joint_after: every block's count and this block's index, so that whether this block
    # merges temporally or jointly (ToMe) is decided for the clip's own token grid, not once
    # for the model's default clip size (a dynamic_img_size model takes others).
    schedule: tuple[int, ...] | None = None
    index: int = 0
    before_attention = False
    metric = "keys"

    def step_for(self, grid: tuple[int, ...] | None) -> TemporalMerge | BipartiteMerge:
        """The step this block runs on a clip of token grid ``grid``: itself, or ToMe's joint
        step once the even-frame tokens of that grid are used up (``joint_after``)."""
        if self.schedule is None or grid is None or len(grid) != 3:
            return self
        if joint_blocks(self.schedule, tuple(int(n) for n in grid), self.num_protected)[self.index]:
            return BipartiteMerge(self.r, self.num_protected, self.backend)
        return self

    def num_removed(self, num_tokens: int, grid: tuple[int, ...] | None = None) -> int:
        step = self.step_for(grid)
        if step is not self:
            return step.num_removed(num_tokens, grid)
        cap = max_bipartite_r(num_tokens, self.num_protected)
        if grid is not None:
            if len(grid) != 3:
                raise ValueError(f"temporal merging needs a video token grid (frames, rows, cols), got {grid}")
            # Only A tokens (even frames) are ever removed, one per merge, so at most the
            # even-frame tokens of the input minus those already merged remain to merge (an
            # estimate: a merged token whose centroid drifts to an even frame joins A and can
            # merge on, which keeps static content collapsing across more frames, and the same
            # drift can leave an A token without a partner in the window: see the class
            # docstring). Capping here keeps plan/flops — and budgets searched on them — to what
            # the data allows.
            frames, rows, cols = grid
            if frames < 2 and self.r > 0:  # static: plan, flops and compiled models all see it
                raise ValueError(
                    "temporal merging needs at least two tubelet frames, and this clip has one (frames ≤ tubelet "
                    "size): give longer clips, or use method='tome'"
                )
            even_frame_tokens = (frames + 1) // 2 * rows * cols
            merged_so_far = frames * rows * cols + self.num_protected - num_tokens
            cap = min(cap, max(even_frame_tokens - merged_so_far, 0))
        return min(self.r, cap)

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        n = num_tokens - self.num_protected
        return 2 * n * n * head_dim(attn) if removed else 0

    def __call__(self, state: TokenState, metric: Tensor) -> TokenState:
        step = self.step_for(state.grid)
        if step is not self:
            return step(state, metric)
        r = self.num_removed(state.num_tokens, state.grid)
        if r == 0:
            return state
        if state.pos is None:
            raise ValueError("temporal merging needs token positions (track_positions)")
        p = self.num_protected
        best_score, best_b = temporal_best_match(metric[:, p:], state.pos[:, p:], self.window, backend=self.backend)
        # A B token, and every token of a clip whose B tokens all drifted to even frames, has no
        # partner (score −inf). The count is static, so a clip with fewer than r A tokens with a
        # partner still removes r tokens: then tokens without a partner, even positions first,
        # merge into the next token kept (see ordered_dest): neighbours in (frame, row, col) order.
        has_partner = best_score > float("-inf")
        even = torch.arange(best_score.shape[1], device=best_score.device) % 2 == 0
        rank = torch.where(has_partner, best_score, torch.where(even, _NO_PARTNER, _NO_PARTNER - 1.0))
        order = rank.argsort(dim=-1, descending=True, stable=True)[:, :r]
        # Checked where it is free: on a GPU, reading the answer would stall the host every block.
        # Not under torch.func transforms (per-sample gradients), whose wrapped values cannot be read.
        readable = not torch.compiler.is_compiling() and not under_torch_func()
        if best_score.device.type == "cpu" and readable:
            self._warn_about_drift(rank.gather(1, order))
        is_src = torch.zeros_like(best_score, dtype=torch.bool).scatter(1, order, 1)  # (vmap batches it)
        dest = ordered_dest(is_src, best_b, p, has_partner)
        return merge_state(state, dest, state.num_tokens - r, self.backend)

    def _warn_about_drift(self, chosen: Tensor) -> None:
        """Warn when some chosen merges ([B, r] ranks) had no partner at all or took one outside
        the window, by the lowest rank: one value read back per block. One text per case, so
        Python shows each once, not per block and forward."""
        if chosen.numel() == 0:  # a batch of no clips
            return
        lowest = float(chosen.detach().min())  # (a value read, no gradient: no warning while training)
        if lowest <= _NO_PARTNER:
            warnings.warn(
                "temporal merging: some clips had fewer than r tokens with an odd-frame partner (merged tokens' "
                "centroids drifted to even frames) and merged tokens into their next token in (frame, row, col) "
                "order instead; lower r to keep every merge temporal",
                RuntimeWarning,
                stacklevel=3,
            )
        # A pair inside scores its cosine (≥ −1), one outside its cosine − OUTSIDE_PENALTY (≤ −3).
        elif lowest < -1.0 - (OUTSIDE_PENALTY - 2.0) / 2:
            warnings.warn(
                f"temporal merging: some merges had no partner in a neighbouring frame within {self.window} "
                "patches and took their most similar odd-frame token outside the window (merged tokens' "
                "centroids drifted); lower r or widen the window to keep every merge inside",
                RuntimeWarning,
                stacklevel=3,
            )


# Where BackgroundMerge reads a token's importance: attention_received per patch (the attention
# a token receives from all tokens, averaged over heads and queries, divided by its size) or
# attention_sharpness (vid-TLDR, Choi et al., CVPR 2024, Eq. 5: the negative entropy
# Σ_j a_ij log a_ij of the token's own attention row, averaged over heads; background tokens
# attend broadly, foreground tokens sharply). "none" reads the keys alone: every even token is
# a candidate and the block keeps its fused attention.
IMPORTANCE_METRICS = {"received": "attention_received", "sharpness": "attention_sharpness", "none": "keys"}


@dataclass(frozen=True)
class BackgroundMerge:
    """One block's early step: of the ``pool · r`` least important tokens at even positions
    (at most all of them; importance read by ``metric``, see ``IMPORTANCE_METRICS``), the ``r``
    closest to a token outside that pool (cosine of the keys) merge into it.

    Sources come from the even positions, as in ToMe's alternate split, so that the odd
    positions, background tokens among them, stay available as destinations: background
    merges into similar background. (Taking the least important tokens of all positions as
    sources leaves only important tokens as destinations and pulls background into the
    foreground: on ``evals.video_fidelity``, 6 clips, ``early_r=392`` in both, that kept the
    clip embedding at a cosine of 0.9924, against 0.9989 with this split.)

    With ``pool`` 1 the ``r`` least important even tokens merge whatever their match; a larger
    pool lets similarity choose among the unimportant tokens, as ToMe's ranking does among all."""

    r: int
    num_protected: int
    backend: str = "auto"
    pool: float = 1.0
    metric: str = "attention_received"
    before_attention = False

    def num_removed(self, num_tokens: int, grid: tuple[int, ...] | None = None) -> int:
        n = num_tokens - self.num_protected
        return min(self.r, (n + 1) // 2, max(n - 1, 0))  # one source per even position, one destination left

    def pool_size(self, num_tokens: int) -> int:
        """With an importance: how many of the least important even tokens are candidates."""
        even = (num_tokens - self.num_protected + 1) // 2
        r = self.num_removed(num_tokens)
        return max(r, min(round(self.pool * r), even))

    def matching_flops(self, num_tokens: int, removed: int, attn: nn.Module) -> int:
        if removed == 0:
            return 0
        n = num_tokens - self.num_protected
        if self.metric == "keys":  # even tokens × odd tokens
            return 2 * ((n + 1) // 2) * (n // 2) * head_dim(attn)
        # candidates × all tokens; the importance comes with the block's own attention map
        return 2 * self.pool_size(num_tokens) * n * head_dim(attn)

    def __call__(self, state: TokenState, metric: Tensor | tuple[Tensor, Tensor]) -> TokenState:
        r = self.num_removed(state.num_tokens)
        if r == 0:
            return state
        p = self.num_protected
        batch, n = state.x.shape[0], state.num_tokens - p
        if self.metric == "keys":
            # No importance: every even token is a candidate and every odd one a destination,
            # which is ToMe's bipartite match (on its Triton kernel for CUDA tensors).
            body = metric[:, p:]
            best, best_odd = best_match(body[:, 0::2], body[:, 1::2], self.backend)
            candidates = torch.arange(0, n, 2, device=body.device).expand(batch, -1)
            best_partner = 2 * best_odd + 1
        else:
            keys, importance = metric
            importance = importance[:, p:].float()
            if self.metric == "attention_received" and state.size is not None:
                importance = importance / state.size[:, p:, 0]  # per patch: a merged token receives for all of them
            odd = torch.arange(n, device=keys.device) % 2 == 1
            candidates = importance.masked_fill(odd, float("inf")).argsort(dim=-1, stable=True)
            candidates = candidates[:, : self.pool_size(state.num_tokens)]
            in_pool = torch.zeros(batch, n, dtype=torch.bool, device=keys.device).scatter(1, candidates, 1)
            unit = unit_vectors(keys[:, p:])
            a = unit.gather(1, candidates.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
            # float32 under autocast too, as best_match scores: bf16 would round them into ties
            scores = float32_matmul(a, unit.transpose(-1, -2)).masked_fill(in_pool[:, None, :], float("-inf"))
            best, best_partner = scores.max(dim=-1)
        chosen = best.argsort(dim=-1, descending=True, stable=True)[:, :r]  # the r best-matched candidates
        src = candidates.gather(1, chosen)
        # Scatters out of place (in_pool too): torch.func.vmap (per-sample gradients) cannot scatter
        # a batched index into a tensor made here in place. Masks are scattered
        # with 1, not True, which torch.jit.trace cannot type.
        is_src = torch.zeros(batch, n, dtype=torch.bool, device=src.device).scatter(1, src, 1)
        partner = src.new_zeros(batch, n).scatter(1, src, best_partner.gather(1, chosen))
        dest = ordered_dest(is_src, partner, p)
        return merge_state(state, dest, state.num_tokens - r, self.backend)


@dataclass(frozen=True)
class TemporalMergeConfig:
    """Merge static content across neighbouring frames of a video ViT.

    In each block with a non-zero count, tokens are matched only against tokens of the
    neighbouring frame (centroid frames of opposite parity, at most 1.5 frames apart) within
    ``window`` patches in row and column, by cosine similarity of the attention keys, and the
    ``r`` most similar pairs merge (size-weighted). Static background collapses across time
    while moving content, which changes between frames, is kept. Every token carries its
    (frame, row, col) centroid; ``tokenprune.source(model)`` shows which frames a token spans.

    The defaults rest on ``evals.video_fidelity`` (DINOv2 ViT-S/14 inflated to video, 24 clips
    of six real videos, 50 % GFLOPs; ``evals/results/video_fidelity.md``). Without
    ``joint_after`` all merging happens in the first blocks, capped at the even-frame tokens,
    and the 3×3 window of ``window=1`` forces merges between different things where the camera
    moves or cuts (clip embedding −0.0009 against joint ToMe, −0.0052 on the video with cuts).
    With ``window=2`` and ``joint_after`` the embedding is a little closer to the unreduced
    model's than joint ToMe's on every video (+0.0001, 95 % interval [+0.0001, +0.0002]), and
    the unmerged token features tie with it. What moves the token features is the schedule:
    front-loaded like background merging's (``r=[182] * 6 + [48] * 6``, what budget searches
    in ``evals`` now choose at 50 %), they are closer than joint ToMe's at a constant r
    (+0.0024 [+0.0014, +0.0034]; +0.0067 at 45 %).

    Args:
        r: temporal merges per block: an int, ``(r, inflection)`` or a per-block list (0 or
            missing entries: the block keeps its tokens). Capped like ToMe at half the tokens,
            and since only even-frame tokens merge (into odd-frame ones), the total over all
            blocks is capped at the even-frame tokens (ViT-B, 16×224²: 784); ``plan`` shows
            the effective counts. A block that finds fewer valid pairs than its count (a
            partner drifted out of the window) merges the rest outside the window, and an
            eager CPU forward warns (see :class:`TemporalMerge`).
        window: spatial search radius in patches (default 2: the 5×5 neighbourhood; see above).
        joint_after: once a block's count exceeds the even-frame tokens left to merge, merge
            jointly over all tokens like ToMe from that block on (default), instead of stopping
            at the cap: static content collapses across time first, and the budget is not
            limited to half the tokens. Decided for each clip's own size (a
            ``dynamic_img_size`` model takes clips other than its default).
        prop_attn, trace_source, backend: as in :class:`~tokenprune.ToMeConfig`.
    """

    r: RSchedule = 32
    window: int = 2
    joint_after: bool = True
    prop_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"

    track_positions = True
    supports_video = True

    def __post_init__(self) -> None:
        check_common_options(self)
        check_count(self.window, "window (patches)")

    def reducers(self, model: nn.Module) -> list[TemporalMerge | BipartiteMerge | None]:
        # (NaFlexVit has no patch_embed: refuse it here too, by name, not with an AttributeError)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", ())
        if len(grid) != 3:
            raise TypeError(
                f"method 'temporal' needs a video model with a (frames, rows, cols) token grid, and "
                f"{type(model).__name__} has none: use tome"
            )
        counts = resolve_r(self.r, len(model.blocks))
        p = block_prefix_tokens(model)
        # Temporal or joint is decided per clip (TemporalMerge.step_for), on the clip's own grid.
        schedule = tuple(counts) if self.joint_after else None
        return [
            TemporalMerge(n, self.window, p, self.backend, schedule, i) if n > 0 else None for i, n in enumerate(counts)
        ]


@dataclass(frozen=True)
class BackgroundMergeConfig:
    """Merge the redundant (background) tokens aggressively in the early blocks, then merge
    like ToMe.

    In each of the first ``early_blocks`` blocks, ``early_r`` tokens from the even positions
    (see :class:`BackgroundMerge`) merge into their most similar token among those that may not
    merge in that block (the odd positions; with ``importance``, the more important even ones
    too), keeping the token order; every later block runs ToMe's bipartite merging with ``r``. Which even tokens
    may merge is decided by ``importance``: by default ("none") similarity alone chooses among
    all of them, so what merges is what repeats (static background, across space and time).

    Measured on real footage with DINOv2 inflated to video (``evals.video_fidelity``, 24 clips
    of six videos; ``evals/results/video_fidelity.md``), the defaults keep the unmerged token
    features closer to the unreduced model than joint ToMe at the same GFLOPs: at 50 % the
    token cosine loses 0.0017 where ToMe's loses 0.0038 (+0.0021, 95 % interval [+0.0005,
    +0.0037]), at 45 % 0.0026 against 0.0090, with the clip embedding tied or ahead. Against
    ToMe's decreasing schedule, which also front-loads its merging, the margin is smaller but
    holds on every video (+0.0005 at 50 %; ``video_fidelity_decreasing.md``). Spreading the
    early merging over six blocks is what earns it: two blocks at the same GFLOPs tied with
    ToMe. Attention importance does not help on this model: the more it restricts the
    sources, the further the clip embedding moves (6 clips, 50 %: cosine 0.9908 with pool 1,
    0.9976 with 1.5, 0.9988 with 4, where similarity chooses among all even tokens), and
    reading it costs the early blocks their fused attention.

    Args:
        early_blocks: how many leading blocks merge early (default ``None``: 6, or half the
            blocks of a model with fewer than 12).
        early_r: tokens merged per early block (default 128: with the default ``r``, about
            half the GFLOPs of a 16-frame 224² clip on ViT-B).
        pool: with an importance, the early merges choose among the ``pool · early_r`` least
            important even-position tokens (at most all of them) those closest to a token
            outside the pool; 1 merges exactly the ``early_r`` least important. Default 4.
        importance: "none" (default), similarity alone among all even tokens (``pool`` is
            unused), which keeps the fused attention; "received", the attention a token
            receives from all tokens per patch it covers; or "sharpness", vid-TLDR's negative
            entropy of the token's own attention (a token that attends to everything alike is
            background). The last two read the attention map, computed explicitly in the early
            blocks.
        r: ToMe merges per later block: an int, ``(r, inflection)`` over the later blocks or a
            per-later-block list.
        prop_attn, trace_source, backend: as in :class:`~tokenprune.ToMeConfig`.
    """

    early_blocks: int | None = None
    early_r: int = 128
    pool: float = 4.0
    importance: str = "none"
    r: RSchedule = 48
    prop_attn: bool = True
    trace_source: bool = False
    backend: str = "auto"

    track_positions = False
    supports_video = True

    def __post_init__(self) -> None:
        check_common_options(self)
        if self.early_blocks is not None:
            check_count(self.early_blocks, "early_blocks")
        check_count(self.early_r, "early_r")
        if not 1.0 <= check_real(self.pool, "pool", "(a multiple of early_r) ≥ 1") < math.inf:  # (NaN too)
            raise ValueError(f"pool is a multiple of early_r, at least 1 and finite, got {self.pool}")
        if not isinstance(self.importance, str) or self.importance not in IMPORTANCE_METRICS:
            raise ValueError(f"importance must be one of {sorted(IMPORTANCE_METRICS)}, got {self.importance!r}")

    def reducers(self, model: nn.Module) -> list[BackgroundMerge | BipartiteMerge | None]:
        depth = len(model.blocks)
        early_blocks = self.early_blocks if self.early_blocks is not None else default_early_blocks(depth)
        if early_blocks > depth:
            raise ValueError(f"early_blocks={early_blocks} exceeds the model's {depth} blocks")
        p = block_prefix_tokens(model)
        metric = IMPORTANCE_METRICS[self.importance]
        early = [BackgroundMerge(self.early_r, p, self.backend, self.pool, metric) if self.early_r > 0 else None] * early_blocks
        later_counts = resolve_r(self.r, depth - early_blocks, f"after early_blocks={early_blocks} come")
        later = [BipartiteMerge(n, p, self.backend) if n > 0 else None for n in later_counts]
        return early + later


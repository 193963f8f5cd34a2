"""Token bookkeeping shared by every reduction method, and ToMe's bipartite matching.

Every merging method in tokenprune is expressed the same way: a *matching* step produces
``dest`` ([B, T] int64), the index that each of the T current tokens moves to among the
``T_out`` tokens of the next layer; one *merge* step then averages the tokens that share a
destination, weighted by their sizes (ToMe, Bolya et al. 2023, Sec. 3: x* = Σ s·x / Σ s).
The two hot steps (best match, weighted merge) are in ``kernels/``, Triton + PyTorch reference.
Source tracing, unmerging for dense outputs and FLOP accounting all follow from ``dest``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import MemberLists, best_match, bipartite_dest, bipartite_members, merge_wavg
from kernels.bipartite import bipartite_split, max_bipartite_r  # noqa: F401 (max_bipartite_r: part of this module's API)
from kernels.match import float32_matmul


class TokenState(NamedTuple):
    """What flows from block to block in a reduced model.

    x: [B, T, C] tokens; the first ``num_prefix_tokens`` are class/distillation/register tokens
        (in CaiT's blocks there are none: it adds its class token after them).
    size: [B, T, 1] float32, how many input tokens each token stands for; ``None`` until the
        first merge (all ones), so an unreduced model runs the exact ops of the unpatched one
        (set from the start where there is padding, which has size 0: ``padded``).
    source_index: [B, T_in] int64, for every input token the index of the current token that
        holds it; ``None`` unless source tracing is on.
        Dropped input tokens (pruning methods) have -1.
    pos: [B, T, len(grid)] float32 centroid of the patches each token covers, in patch units:
        (row, col) for images, (frame, row, col) for video (prefix tokens: 0); ``None`` unless a
        method uses positions.
    grid: the input patch grid, a static shape: (rows, cols) for images, (frames, rows, cols)
        for video (frames = clip frames / tubelet).
    keep: [B, T, 1] 0/1 mask of the tokens still in play while *training* a pruning method
        (DynamicViT keeps every token in place and masks attention); ``None`` otherwise.
    decisions: the keep masks of every pruning stage so far ([B, T, 1] each), for the losses.
    input_valid: [B, T_in] bool, which input tokens are patches rather than padding (NaFlex's
        packed sequences: patches of images of different sizes padded to one length); None
        when there is no padding. Padding has size 0: attention masks it out (with or without
        proportional attention), matching spends merges on it first
        (:func:`padding_first_matching`), merging it changes no real token, and per-input values
        averaged over a token's sources (RoPE) leave it out.
    """

    x: Tensor
    size: Tensor | None = None
    source_index: Tensor | None = None
    pos: Tensor | None = None
    grid: tuple[int, ...] | None = None
    keep: Tensor | None = None
    decisions: tuple[Tensor, ...] = ()
    input_valid: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    @property
    def padded(self) -> bool:
        """Whether some tokens may be padding (size 0): see ``input_valid``."""
        return self.input_valid is not None

    @property
    def pool_weights(self) -> Tensor | None:
        """How much each token counts when the head pools: its keep mask while a pruning method
        trains (dropped tokens are still present), else its size (None: all count once)."""
        return self.keep if self.keep is not None else self.size

    def sizes(self) -> Tensor:
        """Token sizes, materialising the implicit all-ones size."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[0], self.x.shape[1], 1, dtype=torch.float32)


def grid_positions(grid: tuple[int, ...], num_prefix: int, device: torch.device) -> Tensor:
    """[P + prod(grid), len(grid)] grid coordinates of every input token in raster order ((row,
    col) for an image grid, (frame, row, col) for a video grid); prefix tokens at 0."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
    return torch.cat([torch.zeros(num_prefix, len(grid), device=device), coords])


def start_state(
    x: Tensor,
    trace_source: bool,
    grid: tuple[int, ...] | None = None,
    track_positions: bool = False,
    valid: Tensor | None = None,
) -> TokenState:
    """The state entering the first block: every token has size 1 and is its own source, except
    padding (``valid``, [B, T] bool, False for padding), which has size 0."""
    batch, num_tokens, _ = x.shape
    size = None if valid is None else valid.unsqueeze(-1).float()
    source_index = torch.arange(num_tokens, device=x.device).expand(batch, -1) if trace_source else None
    pos = None
    if track_positions:
        if grid is None:
            raise ValueError("positions need the patch grid")
        pos = grid_positions(grid, num_tokens - math.prod(grid), x.device).expand(batch, -1, -1)
    return TokenState(x, size, source_index, pos, grid, input_valid=valid)


def _follow(source_index: Tensor, dest: Tensor) -> Tensor:
    """Each input token's current token once ``dest`` has moved the tokens: input tokens dropped
    earlier (-1) stay dropped."""
    return torch.where(source_index >= 0, dest.gather(1, source_index.clamp(min=0)), -1)


def merge_state(
    state: TokenState, dest: Tensor, num_out: int, backend: str = "auto", members: MemberLists | None = None
) -> TokenState:
    """Apply one matching (``dest``) to every field of the state: tokens become size-weighted
    averages (ToMe: x ← Σ s·x / Σ s, :func:`kernels.merge_wavg`), sizes add up, sources follow,
    positions become size-weighted centroids. ``members``: ``dest``'s member lists, where the
    matching made them (:func:`bipartite_soft_matching_members`)."""
    sizes = state.sizes()
    members = members or MemberLists(dest)  # the tokens and their positions: one sort of dest between them
    x, size = merge_wavg(state.x, sizes, dest, num_out, backend, members)
    source_index = state.source_index
    if source_index is not None:
        source_index = _follow(source_index, dest)
    pos = state.pos
    if pos is not None:
        pos, _ = merge_wavg(pos, sizes, dest, num_out, backend, members)
    return state._replace(x=x, size=size, source_index=source_index, pos=pos)


def mean_over_sources(values: Tensor, state: TokenState, num_prefix: int, backend: str = "auto") -> Tensor:
    """Per-patch values averaged over the patches each current token covers: how a rotary
    position embedding (RoPE) follows merged tokens.

    A merged token is the size-weighted average of its patches (ToMe), which in a ViT with
    absolute position embeddings averages their position embeddings too. With RoPE, the
    position is a rotation of q and k instead; averaging the patches' rotations (their sin/cos
    rows) makes the merged token's attention logit q·R̄k the mean of its patches' logits q·R_ik,
    since the logit is linear in the rotation. (The mean rotation is not a rotation: spread-out
    patches damp the high frequencies, i.e. the fine position of a large token.)

    Args:
        values: [N, D], [H, N, D] or [B, H, N, D] rows of the N input patches (no prefix tokens).
        state: the current tokens; needs ``source_index``. num_prefix: P prefix tokens.
    Returns:
        ``values`` itself while no token has been merged or dropped; else [B, 1 | H, T - P, D].
    """
    num_patches = values.shape[-2]
    if state.size is None and state.num_tokens == num_prefix + num_patches:
        return values  # nothing merged or dropped: every token still sits at its patch
    if state.source_index is None:
        raise ValueError("averaging over sources needs source tracing (start_state(trace_source=True))")
    batch, num_out = state.x.shape[0], state.num_tokens - num_prefix
    sources = state.source_index[:, num_prefix:] - num_prefix  # patch → current token - P; < 0: dropped
    # A dropped patch joins any token with weight 0: it counts nowhere (every token keeps ≥ 1
    # patch). So does padding, whose values are not a patch's (a token of padding alone gets 0).
    weights = (sources >= 0).float().unsqueeze(-1)
    if state.input_valid is not None:
        weights = weights * state.input_valid[:, num_prefix:].unsqueeze(-1)
    heads, dim = (values.shape[-3] if values.ndim > 2 else 1), values.shape[-1]
    if values.ndim == 4:
        rows = values.movedim(-2, 1).reshape(batch, num_patches, heads * dim)
    else:
        rows = values.movedim(-2, 0).reshape(num_patches, heads * dim).expand(batch, -1, -1)
    mean, _ = merge_wavg(rows, weights, sources.clamp(min=0), num_out, backend)
    return mean.reshape(batch, num_out, heads, dim).transpose(1, 2)


def mean_over_source_pairs(bias: Tensor, state: TokenState) -> Tensor:
    """An attention bias between input tokens averaged over the pairs of input tokens that two
    current tokens cover: how a relative position bias (BEiT) follows merged tokens.

    The bias is added to the logits, so the merged pair's logit gets the mean of its members'
    biases, bias(a, b) = mean over i in a, j in b of bias(i, j), as the logit of averaged tokens
    averages their position terms (:func:`mean_over_sources` does the same for RoPE).

    Args:
        bias: [H, N, N] or [1 | B, H, N, N] over the N input tokens (prefix tokens included).
        state: the current tokens; needs ``source_index``.
    Returns:
        ``bias`` itself while no token has been merged or dropped; else [B, H, T, T].
    """
    num_inputs = bias.shape[-1]
    if state.size is None and state.num_tokens == num_inputs:
        return bias
    if state.source_index is None:
        raise ValueError("averaging over sources needs source tracing (start_state(trace_source=True))")
    # W [B, T, N]: row t spreads token t's weight evenly over the input tokens it covers. The
    # result is W · bias_h · Wᵀ for every head h, as two matmuls (BLAS / tensor cores,
    # deterministic) rather than two scatter merges over the [H, N, N] table. Written as
    # W @ bias with each head broadcast over the batch, torch copies the table B times and
    # W H times; laid out as below, the first product is one GEMM against the table's rows
    # (every head side by side) and the second one batched matmul per sample, with no
    # broadcast copy: on a 2-core CPU, ViT-B's 197 inputs to 101 tokens, 1.5x faster at batch 8
    # and 2.6x at batch 32.
    batch, num_tokens = state.source_index.shape[0], state.num_tokens
    heads = bias.shape[-3]
    member = source_matrix(state.source_index, num_tokens, bias.dtype)
    w = member / member.sum(-1, keepdim=True)
    # rows[i, h·N + j] = bias[h, i, j]: [N, H·N] for a shared table, [B, N, H·N] per sample
    rows = bias.reshape(-1, heads, num_inputs, num_inputs).transpose(1, 2).reshape(-1, num_inputs, heads * num_inputs)
    left = w @ (rows[0] if rows.shape[0] == 1 else rows)  # [B, T, H·N]: (W · bias_h)[t] for every h
    both = left.view(batch, num_tokens * heads, num_inputs) @ w.transpose(1, 2)  # [B, T·H, T]
    return both.view(batch, num_tokens, heads, num_tokens).transpose(1, 2)


def source_pairs_flops(num_heads: int, num_tokens: int, num_inputs: int) -> int:
    """Matmul FLOPs of :func:`mean_over_source_pairs` for ``num_tokens`` merged tokens of
    ``num_inputs`` input tokens (W·bias·Wᵀ over ``num_heads`` heads; 0 while nothing merged)."""
    if num_tokens == num_inputs:
        return 0
    return 2 * num_heads * num_tokens * num_inputs * (num_inputs + num_tokens)


def drop_tokens(state: TokenState, keep_index: Tensor) -> TokenState:
    """Keep only the tokens at ``keep_index`` ([B, K] int64, ascending), in that order: the
    inference path of pruning methods. Sizes, positions and sources follow; the sources of
    dropped tokens become -1."""
    def take(t: Tensor) -> Tensor:
        return t.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    source_index = state.source_index
    if source_index is not None:
        dest = torch.full(state.x.shape[:2], -1, dtype=torch.long, device=keep_index.device)
        # (out of place: torch.func.vmap cannot scatter a batched index into it in place)
        dest = dest.scatter(1, keep_index, torch.arange(keep_index.shape[1], device=keep_index.device).expand_as(keep_index))
        source_index = _follow(source_index, dest)
    return state._replace(
        x=take(state.x),
        size=None if state.size is None else take(state.size),
        source_index=source_index,
        pos=None if state.pos is None else take(state.pos),
    )


def keep_top_tokens(
    state: TokenState, scores: Tensor, num_keep: int, num_protected: int, fuse_weights: Tensor | None = None
) -> TokenState:
    """Keep the prefix tokens and the ``num_keep`` highest-scoring other tokens, in their original
    order (the inference path of DynamicViT and EViT).

    scores: [B, T - P] for the non-prefix tokens. With ``fuse_weights`` ([B, T - P]), the dropped
    tokens are not lost but fused into one extra last token, whose size is their total size
    (EViT's inattentive-token fusion). EViT's token is the attention-weighted *sum*, whose
    scale a model learns while fine-tuning with it; with no training, this one is the
    normalised weighted *average*, on the scale of the tokens it replaces.
    """
    p = num_protected
    batch, num_tokens = state.x.shape[:2]
    if fuse_weights is not None and num_keep >= num_tokens - p - 1:
        return state  # at most one token left out: fusing it alone would only move it to the end
    top = scores.topk(num_keep, dim=1, sorted=False).indices.sort(dim=1).values + p
    prefix = torch.arange(p, device=top.device).expand(batch, -1)
    keep_index = torch.cat([prefix, top], dim=1)
    if fuse_weights is None or num_keep == num_tokens - p:
        return drop_tokens(state, keep_index)
    # Kept tokens go to their slots, every dropped token to one extra slot at the end.
    num_out = p + num_keep + 1
    dest = torch.full((batch, num_tokens), num_out - 1, dtype=torch.long, device=top.device)
    # Out of place: torch.func.vmap (per-sample gradients) cannot scatter a batched index into a
    # tensor made here in place.
    dest = dest.scatter(1, keep_index, torch.arange(p + num_keep, device=top.device).expand(batch, -1))
    # merge_state carries sizes, sources and positions (its size-weighted x for the fused slot
    # is replaced below); "torch": this gather/scatter is not the hot path the kernel is for.
    merged = merge_state(state, dest, num_out, backend="torch")
    dropped = (dest[:, p:] == num_out - 1).unsqueeze(-1)
    accumulate = torch.promote_types(state.x.dtype, torch.float32)  # (float64 stays float64)
    weights = fuse_weights.unsqueeze(-1).to(accumulate) * dropped
    total = weights.sum(1)
    fused = (state.x[:, p:].to(accumulate) * weights).sum(1) / total.clamp(min=1e-12)
    # Weights that all underflowed to 0 (e.g. a half-precision softmax): the size-weighted average.
    fused = torch.where(total > 0, fused, merged.x[:, -1].to(accumulate))
    return merged._replace(x=torch.cat([merged.x[:, :-1], fused.unsqueeze(1).to(state.x.dtype)], dim=1))


def prepend_tokens(state: TokenState, tokens: Tensor) -> TokenState:
    """Put ``tokens`` ([B, P, C]) in front of the state as new prefix tokens that no block has
    reduced (CaiT's class token, added after the blocks): size 1, kept, at position 0, each its
    own input token ahead of the others."""
    batch, num_new = tokens.shape[:2]

    def ahead(t: Tensor | None, value: float) -> Tensor | None:
        return None if t is None else torch.cat([t.new_full((batch, num_new, t.shape[-1]), value), t], dim=1)

    source_index = state.source_index
    if source_index is not None:
        shifted = torch.where(source_index >= 0, source_index + num_new, -1)
        own = torch.arange(num_new, device=source_index.device).expand(batch, -1)
        source_index = torch.cat([own, shifted], dim=1)
    return state._replace(
        x=torch.cat([tokens, state.x], dim=1),
        size=ahead(state.size, 1.0),
        source_index=source_index,
        pos=ahead(state.pos, 0.0),
        keep=ahead(state.keep, 1.0),
    )


def unmerge(x: Tensor, source_index: Tensor) -> Tensor:
    """Restore one token per input token: input token i receives the feature of the token that
    absorbed it (zeros for tokens a pruning method dropped). [B, T, C] × [B, T_in] → [B, T_in, C]."""
    full = x.gather(1, source_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return full.masked_fill(source_index.unsqueeze(-1) < 0, 0.0)


def source_matrix(source_index: Tensor, num_tokens: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """Dense [B, T, T_in] 0/1 map from current tokens to the input tokens they cover (ToMe's
    ``source``), in ``dtype``; dropped input tokens have an all-zero column."""
    # By comparison, not F.one_hot, which checks its indices' range on the host: a device
    # synchronisation per call, and BEiT's merged position bias calls this in every block.
    tokens = torch.arange(num_tokens, device=source_index.device).view(1, num_tokens, 1)
    return (source_index.unsqueeze(1) == tokens).to(dtype)


def bipartite_matching_flops(num_tokens: int, num_protected: int, dim: int) -> int:
    """FLOPs of scoring every A token against every B token (the a @ bᵀ of the matching)."""
    mergeable = num_tokens - num_protected
    return 2 * (mergeable // 2) * (mergeable - mergeable // 2) * dim


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int, backend: str = "auto") -> Tensor:
    """ToMe's bipartite soft matching (Bolya et al. 2023, Sec. 3.2), returned as ``dest``.

    1. Alternate the tokens into sets A (even positions) and B (odd positions).
    2. Score every A–B pair by cosine similarity of ``metric`` (keys averaged over heads).
    3. Keep each A token's most similar B token (ties: the lowest B index).
    4. Merge the r A tokens with the highest best-match score into their B partner
       (ties: the lowest A index).

    The ``num_protected`` prefix tokens are never merged, into or from (ToMe gives their rows
    and columns a score of −inf; excluding them is the same matching). The output order is:
    prefix tokens, unmerged A tokens, then B tokens, each in their original order. With one
    prefix token (a class token) this is exactly ToMe's order.

    Args:
        metric: [B, T, D] matching features. r: tokens to remove, ≤ max_bipartite_r(T, P).
        num_protected: P, the count of leading tokens that must survive unchanged.
        backend: where steps 2-4 run, see :func:`kernels.best_match` and :func:`kernels.bipartite_dest`.
    Returns:
        dest: [B, T] int64, the index of each token in the merged sequence of T - r tokens.
    """
    return bipartite_soft_matching_members(metric, r, num_protected, backend).dest


def bipartite_soft_matching_members(metric: Tensor, r: int, num_protected: int, backend: str = "auto") -> MemberLists:
    """:func:`bipartite_soft_matching`'s ``dest`` with its member lists (``.dest``, and the
    stable sort that the merge kernel reads): on the Triton path the assignment kernel lays
    them out as it goes (:func:`kernels.bipartite_members`), so the merges by ``dest`` sort
    nothing."""
    best_score, best_b = bipartite_best_match(metric, num_protected, backend=backend)
    return bipartite_members(best_score, best_b, r, metric.shape[1], num_protected, backend)


def padding_first_matching(metric: Tensor, padding: Tensor, r: int, num_protected: int, backend: str = "auto") -> Tensor:
    """:func:`bipartite_soft_matching` for sequences with padding (``padding``, [B, T] bool: the
    size-0 tokens of NaFlex's packed sequences): each sequence spends its r merges on padding
    first, then on ToMe's best pairs of real tokens.

    A padding token can leave only from set A (B tokens receive merges), so each sequence's
    padding is moved to the last A positions (to the last B positions too where it outnumbers
    A), and its real tokens fill the other positions in their order; padding rows then rank
    first, into the first B token, since merging a size-0 token changes no token. Where
    padding outnumbers A, all r ≤ |A| merges remove padding. A sequence without padding is
    matched exactly as by :func:`bipartite_soft_matching`.
    """
    p = num_protected
    batch, num_tokens = padding.shape
    body = padding[:, p:]
    n = num_tokens - p
    a_part, _ = bipartite_split(p)
    position = torch.arange(n, device=padding.device)
    in_a = position % 2 == a_part.start
    num_a = len(range(n)[a_part])
    count = body.sum(dim=1, keepdim=True)
    pad_in_a = count.clamp(max=num_a)
    # Position k of a set holds padding when it is among the set's last pad_in_a (A) or
    # count - pad_in_a (B) positions; the k-th position of either set is body position 2k(+1).
    rank = position // 2
    slot_is_pad = torch.where(in_a, rank >= num_a - pad_in_a, rank >= (n - num_a) - (count - pad_in_a))
    # Real tokens then padding, each in order, go to the real slots then the padding slots.
    token_order = body.to(torch.uint8).sort(dim=1, stable=True).indices
    slot_order = slot_is_pad.to(torch.uint8).sort(dim=1, stable=True).indices
    perm = torch.empty_like(token_order).scatter_(1, slot_order, token_order)  # slot → token
    moved = metric[:, p:].gather(1, perm.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
    best_score, best_b = bipartite_best_match(torch.cat([metric[:, :p], moved], dim=1), p, backend=backend)
    # Padding rows first, each into the first B token: any partner would do, and a fixed one
    # keeps the backends from choosing differently among near-equal scores.
    pad_rows = slot_is_pad[:, a_part]
    best_score, best_b = best_score.masked_fill(pad_rows, math.inf), best_b.masked_fill(pad_rows, 0)
    dest_moved = bipartite_dest(best_score, best_b, r, num_tokens, p, backend)
    slot_of = torch.empty_like(perm).scatter_(1, perm, position.expand(batch, -1))  # token → slot
    return torch.cat([dest_moved[:, :p], dest_moved[:, p:].gather(1, slot_of)], dim=1)


class BlockMerge:
    """The merge inside one block of ToMe for Stable Diffusion's scheme (Bolya & Hoffman 2023;
    method ``merge_unmerge``): the block's attention input [B, T, C] (per attention group) is
    matched by :func:`bipartite_soft_matching`, the block runs on the merged tokens
    (:meth:`merge`), and their updates go back to every token they cover (:meth:`unmerge`).

    ``padding`` ([B, T, 1], 1 where the group is padded with zeros, as SAM's windows are): an
    extra metric channel makes padding alike (cosine 1) and orthogonal to every real token, and a
    merged token's features are the mean of its real tokens, so padding never dilutes them.

    Attributes: ``dest`` [B, T] (each token's merged token), ``size`` [B, T', 1] (tokens per
    merged token, padding included: the keys it stands for), ``real_share`` [B, T', 1] (the
    fraction of them that is not padding; None without padding).
    """

    def __init__(
        self, tokens: Tensor, merged: int, num_protected: int = 0, padding: Tensor | None = None, backend: str = "auto"
    ) -> None:
        metric = tokens if padding is None else torch.cat([tokens, padding.to(tokens.dtype)], dim=-1)
        self.num_out = tokens.shape[1] - merged
        self.members = bipartite_soft_matching_members(metric, merged, num_protected, backend)
        self.dest = self.members.dest
        self.backend = backend
        # The real share in float32, or float64 for float64 tokens, like merge_wavg's sums (a
        # float64 model keeps its precision: merge below divides by it).
        real = tokens.new_ones(*tokens.shape[:2], 1, dtype=torch.promote_types(tokens.dtype, torch.float32))
        if padding is not None:
            real = real - padding.to(real.dtype)
        ones = torch.ones_like(real, dtype=torch.float32)
        share, self.size = merge_wavg(real, ones, self.dest, self.num_out, backend, self.members)
        self.real_share = share if padding is not None else None

    def average(self, values: Tensor) -> Tensor:
        """Each merged token's mean of ``values`` [B, T, C] over its tokens (padding included)."""
        ones = values.new_ones(values.shape[0], values.shape[1], 1, dtype=torch.float32)
        return merge_wavg(values, ones, self.dest, self.num_out, self.backend, self.members)[0]

    def merge(self, tokens: Tensor) -> Tensor:
        """Each merged token's features: the mean of its real tokens' ``tokens`` (padding, zeros,
        left out)."""
        mean = self.average(tokens)
        if self.real_share is None:
            return mean
        # Padding is zeros, so the mean over all tokens is real_share × the mean over real ones.
        # All-padding tokens (share 0, mean 0) stay 0: the clamp only avoids 0/0.
        # In float32, float64 for float64 tokens: a float32 division would round a float64 model's
        # features to float32 (1e-8 off, enough to fail gradcheck), silently.
        accumulate = torch.promote_types(tokens.dtype, torch.float32)
        return (mean.to(accumulate) / self.real_share.to(accumulate).clamp(min=1e-6)).to(tokens.dtype)

    def unmerge(self, merged: Tensor) -> Tensor:
        """Every token gets its merged token's row of ``merged`` [B, T', C]."""
        return unmerge(merged, self.dest)


def unit_vectors(metric: Tensor) -> Tensor:
    """``metric`` in float32, each vector scaled to length 1, for cosine similarities. Float32
    whatever the model's dtype: bf16 would round distinct similarities into ties and change
    which tokens merge. A zero vector stays zero (cosine 0 to all) where x / ‖x‖ would give
    NaN, which torch.max and the match kernel would order differently."""
    return F.normalize(metric.float(), dim=-1)


def bipartite_best_match(
    metric: Tensor,
    num_protected: int,
    pos: Tensor | None = None,
    pos_weight: float = 0.0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Steps 1-3 of :func:`bipartite_soft_matching`: each A token's best B partner and score.

    With ``pos`` ([B, T, 2] centroids, scaled so the grid diagonal is 1) and ``pos_weight`` λ,
    a pair's score is cos(a, b) − λ·‖pos_a − pos_b‖: far-apart tokens need to be more similar
    to merge (λ = 0 is ToMe). Returns ([B, Na] float32 scores, [B, Na] int64 B indices).
    """
    p = num_protected
    a_part, b_part = bipartite_split(p)
    body = metric[:, p:]
    if pos is None or pos_weight == 0.0:  # cosine similarity, normalised inside best_match
        return best_match(body[:, a_part], body[:, b_part], backend)
    body = unit_vectors(body)
    a, b = body[:, a_part], body[:, b_part]
    body_pos = pos[:, p:]
    # Exact elementwise distances: torch.cdist would take a matmul shortcut that loses precision.
    distance = (body_pos[:, a_part, None] - body_pos[:, None, b_part]).norm(dim=-1)
    # float32 under autocast too, like best_match: bf16 scores would pick other pairs than the kernel's
    return (float32_matmul(a, b.transpose(-1, -2)) - pos_weight * distance).max(dim=-1)

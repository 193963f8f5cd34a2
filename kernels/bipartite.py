"""ToMe's merge assignment (step 4 of bipartite soft matching) as one kernel launch.

Given every A token's best score and best B partner, ToMe merges the r best-scoring A tokens
into their partners and keeps the rest. In PyTorch that is about fifteen small kernels per
block (a stable argsort, a scatter into a mask, a cumsum for the kept tokens' new positions,
several ``where``/``arange``/strided copies to lay out ``dest``). Each does almost nothing:
on a fast GPU, with the late blocks of a merged ViT holding a few dozen tokens, the step
costs the host's launch time, not the device's. The kernel here computes the whole ``dest``
row of a batch item in one program: each A token's rank in the stable descending order by
counting the tokens ahead of it (no sort), the kept tokens' positions by a prefix sum, and
the stores of prefix, A and B destinations.

:func:`bipartite_members` also lays out, in the same program, the member lists the merge
kernel reads (``dest``'s stable sort, :class:`kernels.MemberLists`). ToMe's outputs have a
known shape: the prefix and the kept A tokens are outputs of one member each, in order, and
B token j's output holds j and the A tokens merged into it. So a token's place in the sort is
a count (of the merged A tokens bound for an earlier B token, or for the same one from an
earlier position), not a sort: the merges after the matching then sort nothing.

Semantics are exactly those of :func:`bipartite_dest_reference` (``argsort(descending=True,
stable=True)``): ties go to the lower A index, NaN scores rank above every number.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import HAS_TRITON, check_backend, check_device, int32_offsets, next_power_of_2, on_device, tl, triton, use_triton
from kernels.merge import MemberLists

__all__ = [
    "bipartite_dest",
    "bipartite_dest_reference",
    "bipartite_dest_triton",
    "bipartite_members",
    "max_bipartite_r",
]

# One program holds a batch item's A scores in registers; beyond this many A tokens (a
# 16,385-token sequence) the reference sorts instead.
MAX_A_TOKENS = 8192
# The most A tokens "auto" gives the kernel. Its one program per batch item counts the
# tokens ahead of each in O(Na²) steps; the reference's sort scales better. On an H200
# (evals/results/bench_kernels_cuda.md) the kernel won up to 1,024 A tokens (1.58× there)
# and lost at SAM-B's 2,048 (0.59 against 0.28 ms, batch 8).
AUTO_MAX_A_TOKENS = 1024
# The most A tokens for which "auto" has the kernel lay out the member lists too; beyond it the
# kernel writes dest alone and the merge sorts it (the path measured above). The lists take
# two more O(Na²) counts in the same single program per batch item, which at ViT-B's 98 A
# tokens are a few steps but at the video ViT's 784 may cost more than the sort they replace.
# 256 covers the image models at 224² (98-128 A tokens) and SAM's windows; not yet timed on a
# GPU: bench_kernels' "member lists" rows compare the two paths at 98 to 1,024 A tokens.
AUTO_MEMBERS_MAX_A_TOKENS = 256


def max_bipartite_r(num_tokens: int, num_protected: int) -> int:
    """ToMe merges at most half of the mergeable tokens per layer (one side of the bipartition)."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_split(num_protected: int) -> tuple[slice, slice]:
    """Positions of sets A and B among the tokens after the prefix. A/B parity follows the
    absolute position, as in ToMe, so the prefix does not shift it."""
    a_start = num_protected % 2
    return slice(a_start, None, 2), slice(1 - a_start, None, 2)


def bipartite_dest_reference(best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int) -> Tensor:
    """Pure-PyTorch merge assignment: the definition the kernel is tested against.

    Args:
        best_score: [B, Na] each A token's best similarity. best_b: [B, Na] int64, the index of
            its best B token. r: A tokens to merge. num_tokens: T = P + Na + Nb.
        num_protected: P, the prefix tokens that keep their place.
    Returns:
        dest: [B, T] int64, each token's index among the T - r merged tokens, in ToMe's order:
        prefix, unmerged A tokens, then B tokens, each in their original order. The r A tokens
        with the highest scores (ties: the lowest A index) go to their best B token.
    """
    p, device = num_protected, best_score.device
    batch, num_a = best_score.shape
    _, b_part = bipartite_split(p)
    num_b = num_tokens - p - num_a

    # Out of place throughout: torch.func.vmap (per-sample gradients) cannot write a batched
    # value into a tensor made here, which it does not batch ("auto" takes this path under it).
    order = best_score.argsort(dim=-1, descending=True, stable=True)
    # (Scattered with 1, not True: torch.jit.trace cannot type a bool scalar.)
    is_src = torch.zeros(batch, num_a, dtype=torch.bool, device=device).scatter(1, order[:, :r], 1)

    b_base = p + num_a - r
    unmerged_rank = (~is_src).cumsum(dim=1) - 1
    dest_a = torch.where(is_src, b_base + best_b, p + unmerged_rank)
    dest_b = (b_base + torch.arange(num_b, device=device)).expand(batch, -1)

    # Body position j holds the (j // 2)-th token of its set: of [dest_a, dest_b] side by side,
    # entry j // 2 for A positions and num_a + j // 2 for B positions.
    position = torch.arange(num_tokens - p, device=device)
    in_b = torch.zeros_like(position, dtype=torch.bool)
    in_b[b_part] = True
    body = torch.cat([dest_a, dest_b], dim=1).gather(1, (position // 2 + num_a * in_b).expand(batch, -1))
    prefix = torch.arange(p, device=device).expand(batch, -1)
    return torch.cat([prefix, body], dim=1)


if HAS_TRITON:

    @triton.jit
    def _comes_first(score, index, than_score, than_index):
        # Whether (score, index) precedes (than_score, than_index) in the stable descending
        # order: a higher score (NaN above every number and equal to NaN), or the same score at
        # a lower index.
        nan, than_nan = score != score, than_score != than_score
        higher = (score > than_score) | (nan & ~than_nan)
        same = (score == than_score) | (nan & than_nan)
        return higher | (same & (index < than_index))

    @triton.jit
    def _merged_before(
        score_base,
        best_b_base,
        stride_score_token,
        stride_best_b_token,
        num_a,
        a_start,
        cut_score,
        cut_index,
        target_b,
        target_pos,
        BLOCK_TARGET: tl.constexpr,
        BLOCK_OTHER: tl.constexpr,
    ):
        # For each target (B token target_b, body position target_pos): how many merged A
        # tokens go to an earlier B token, or to the same one from an earlier body position.
        # A token o is merged when it comes first against the cut (rank r - 1) or is the cut.
        count = tl.zeros([BLOCK_TARGET], tl.int32)
        for start in range(0, num_a, BLOCK_OTHER):
            others = start + tl.arange(0, BLOCK_OTHER)
            valid = others < num_a
            score = tl.load(score_base + others * stride_score_token, mask=valid, other=0.0)
            best_b = tl.load(best_b_base + others * stride_best_b_token, mask=valid, other=0)
            merged = _comes_first(score, others, cut_score, cut_index) | (others == cut_index)
            merged = merged & valid & (cut_index >= 0)
            before = (best_b[None, :] < target_b[:, None]) | (
                (best_b[None, :] == target_b[:, None]) & (a_start + 2 * others[None, :] < target_pos[:, None])
            )
            count += tl.sum((before & merged[None, :]).to(tl.int32), axis=1)
        return count

    @triton.jit
    def _bipartite_dest_kernel(
        score_ptr,
        best_b_ptr,
        dest_ptr,
        sorted_dest_ptr,
        order_ptr,
        num_a,
        num_b,
        r,
        num_protected,
        a_start,
        stride_score_batch,
        stride_score_token,
        stride_best_b_batch,
        stride_best_b_token,
        stride_dest_batch,
        stride_sorted_batch,
        stride_order_batch,
        BLOCK_A: tl.constexpr,
        BLOCK_OTHER: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
        EMIT_MEMBERS: tl.constexpr,
    ):
        # Grid: (batch,). One program lays out one batch item's whole dest row (and, with
        # EMIT_MEMBERS, its stable sort: sorted_dest and order).
        batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride may exceed 2**31
        rows = tl.arange(0, BLOCK_A)
        valid = rows < num_a
        score_base = score_ptr + batch * stride_score_batch
        best_b_base = best_b_ptr + batch * stride_best_b_batch
        score = tl.load(score_base + rows * stride_score_token, mask=valid, other=0.0)

        # Rank in the stable descending order = how many A tokens come before this one,
        # counted against BLOCK_OTHER tokens at a time.
        rank = tl.zeros([BLOCK_A], tl.int32)
        for start in range(0, num_a, BLOCK_OTHER):
            others = start + tl.arange(0, BLOCK_OTHER)
            valid_other = others < num_a
            other = tl.load(score_base + others * stride_score_token, mask=valid_other, other=0.0)
            ahead = _comes_first(other[None, :], others[None, :], score[:, None], rows[:, None]) & valid_other[None, :]
            rank += tl.sum(ahead.to(tl.int32), axis=1)

        is_src = (rank < r) & valid
        kept = valid & ~is_src
        kept_rank = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # new position among the kept A tokens
        best_b = tl.load(best_b_base + rows * stride_best_b_token, mask=valid, other=0)
        b_base = num_protected + num_a - r
        dest_a = tl.where(is_src, b_base + best_b, num_protected + kept_rank.to(tl.int64))
        b_start = 1 - a_start

        dest_base = dest_ptr + batch * stride_dest_batch
        tl.store(dest_base + num_protected + a_start + 2 * rows, dest_a, mask=valid)
        for start in range(0, num_b, BLOCK_B):
            cols = start + tl.arange(0, BLOCK_B)
            tl.store(dest_base + num_protected + b_start + 2 * cols, (b_base + cols).to(tl.int64), mask=cols < num_b)
        for start in range(0, num_protected, BLOCK_P):
            cols = start + tl.arange(0, BLOCK_P)
            tl.store(dest_base + cols, cols.to(tl.int64), mask=cols < num_protected)

        if EMIT_MEMBERS:
            # A token's place in dest's stable sort (its "slot"). Outputs before b_base have one
            # member each, so a prefix or kept A token's slot is its dest. The output of B token
            # j holds j and the A tokens merged into it, in input order, after the b_base single
            # outputs, the j earlier B tokens and the A tokens merged into them.
            sorted_base = sorted_dest_ptr + batch * stride_sorted_batch
            order_base = order_ptr + batch * stride_order_batch
            for start in range(0, num_protected, BLOCK_P):
                cols = start + tl.arange(0, BLOCK_P)
                tl.store(sorted_base + cols, cols.to(tl.int64), mask=cols < num_protected)
                tl.store(order_base + cols, cols.to(tl.int64), mask=cols < num_protected)

            # The merged A tokens are those up to the one of rank r - 1 (the cut) in the stable
            # order, so another chunk's tokens can be tested against it without their ranks.
            # The sums have one term (the cut index is -1 when r = 0: nothing is merged). As
            # vectors: the interpreter cannot combine a reduction's scalar bool with a block.
            at_cut = valid & (rank == r - 1)
            cut_score = tl.full([BLOCK_OTHER], 0.0, tl.float32) + tl.sum(tl.where(at_cut, score, 0.0), axis=0)
            cut_index = tl.full([BLOCK_OTHER], -1, tl.int32) + tl.sum(tl.where(at_cut, rows + 1, 0), axis=0)

            # Body positions: A token i at a_start + 2i, B token j at b_start + 2j.
            a_pos = a_start + 2 * rows
            earlier = _merged_before(
                score_base, best_b_base, stride_score_token, stride_best_b_token, num_a, a_start,
                cut_score, cut_index, best_b, a_pos, BLOCK_A, BLOCK_OTHER,
            )  # fmt: skip
            b_first = (b_start + 2 * best_b < a_pos).to(tl.int64)
            slot = tl.where(is_src, b_base + best_b + earlier.to(tl.int64) + b_first, dest_a)
            tl.store(sorted_base + slot, dest_a, mask=valid)
            tl.store(order_base + slot, (num_protected + a_pos).to(tl.int64), mask=valid)

            for start in range(0, num_b, BLOCK_A):  # B tokens, BLOCK_A at a time (Nb ≤ Na + 1)
                cols = start + tl.arange(0, BLOCK_A)
                b_pos = b_start + 2 * cols
                ahead = _merged_before(
                    score_base, best_b_base, stride_score_token, stride_best_b_token, num_a, a_start,
                    cut_score, cut_index, cols, b_pos, BLOCK_A, BLOCK_OTHER,
                )  # fmt: skip
                b_slot = b_base + cols + ahead  # int32: not `slot` (int64), whose type Triton fixes in a loop
                tl.store(sorted_base + b_slot, (b_base + cols).to(tl.int64), mask=cols < num_b)
                tl.store(order_base + b_slot, (num_protected + b_pos).to(tl.int64), mask=cols < num_b)


def _check_inputs(best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int) -> None:
    if best_score.ndim != 2 or best_b.shape != best_score.shape:
        raise ValueError(
            f"best_score and best_b must be [B, Na] of one shape, got {tuple(best_score.shape)} and {tuple(best_b.shape)}"
        )
    if best_b.dtype != torch.int64:
        raise TypeError(f"best_b must be int64, got {best_b.dtype}")
    if best_score.device != best_b.device:
        raise ValueError(f"best_score is on {best_score.device} but best_b is on {best_b.device}")
    num_a = best_score.shape[1]
    a_part, _ = bipartite_split(num_protected)
    expected_a = len(range(num_tokens)[num_protected:][a_part]) if num_tokens > num_protected else 0
    if not 0 <= num_protected <= num_tokens:
        raise ValueError(f"num_protected={num_protected} must be in [0, num_tokens={num_tokens}]")
    if num_a != expected_a:
        raise ValueError(
            f"{num_a} A tokens do not fit {num_tokens} tokens with {num_protected} protected "
            f"(expected {expected_a}: every other token after the prefix)"
        )
    if not 0 <= r <= max_bipartite_r(num_tokens, num_protected):
        raise ValueError(f"r={r} is outside [0, {max_bipartite_r(num_tokens, num_protected)}] for {num_tokens} tokens")


def bipartite_dest_triton(best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int) -> Tensor:
    """Triton merge assignment; same contract as :func:`bipartite_dest_reference`.

    ``best_score`` in float32 (what the match step returns), ``best_b`` int64, any strides.
    At most :data:`MAX_A_TOKENS` A tokens.
    """
    _check_inputs(best_score, best_b, r, num_tokens, num_protected)
    check_device(best_score, best_b)
    if best_score.dtype != torch.float32:
        raise TypeError(f"best_score must be float32 (the match step's scores), got {best_score.dtype}")
    if best_score.shape[1] > MAX_A_TOKENS:
        raise ValueError(f"{best_score.shape[1]} A tokens exceed the kernel's {MAX_A_TOKENS}; use bipartite_dest_reference")
    return _launch(best_score, best_b, r, num_tokens, num_protected, emit_members=False).dest


def _launch(
    best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int, emit_members: bool
) -> MemberLists:
    """The kernel on inputs already checked (the per-block path checks them once): ``dest``,
    with its stable sort laid out too if ``emit_members``."""
    batch, num_a = best_score.shape
    device = best_score.device
    dest = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)
    sort = None
    if emit_members:
        sort = (torch.empty_like(dest), torch.empty_like(dest))  # (sorted_dest, order)
    if batch == 0 or num_tokens == 0:
        return MemberLists(dest, sort)
    best_score, best_b = int32_offsets(best_score), int32_offsets(best_b)  # (token offsets are int32 in the kernel)
    block_a = max(16, next_power_of_2(num_a))
    # The rank count compares BLOCK_A × BLOCK_OTHER pairs at a time: ~4k, what 4-8 warps hold.
    block_other = max(1, min(block_a, 4096 // block_a))
    sorted_dest, order = sort or (dest, dest)  # (not written without EMIT_MEMBERS)
    with on_device(best_score):
        _bipartite_dest_kernel[(batch,)](
            best_score,
            best_b,
            dest,
            sorted_dest,
            order,
            num_a,
            num_tokens - num_protected - num_a,
            r,
            num_protected,
            num_protected % 2,
            *best_score.stride(),
            *best_b.stride(),
            dest.stride(0),
            sorted_dest.stride(0),
            order.stride(0),
            BLOCK_A=block_a,
            BLOCK_OTHER=block_other,
            BLOCK_B=min(block_a, 1024),
            BLOCK_P=16,
            EMIT_MEMBERS=emit_members,
            num_warps=4 if block_a <= 512 else 8,
        )
    return MemberLists(dest, sort)


def _kernel_runs(best_score: Tensor, best_b: Tensor, backend: str) -> bool:
    """Float32 scores and up to :data:`AUTO_MAX_A_TOKENS` A tokens (:data:`MAX_A_TOKENS` with
    "triton") on a backend that runs Triton (see ``use_triton``)."""
    check_backend(backend)  # (before the dtype test can skip use_triton, which checks it too)
    return (
        best_score.dtype == torch.float32
        and best_score.shape[1] <= (MAX_A_TOKENS if backend == "triton" else AUTO_MAX_A_TOKENS)
        and use_triton(backend, best_score, best_b)  # ("triton": raises unless the device can run it)
    )


def bipartite_dest(
    best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int, backend: str = "auto"
) -> Tensor:
    """ToMe's merge assignment (see :func:`bipartite_dest_reference`) on the backend chosen by
    ``use_triton`` ("auto": Triton for CUDA tensors when triton imports). Float32 scores and
    up to :data:`AUTO_MAX_A_TOKENS` A tokens (:data:`MAX_A_TOKENS` with "triton") take the
    kernel; anything else, the reference."""
    _check_inputs(best_score, best_b, r, num_tokens, num_protected)
    if _kernel_runs(best_score, best_b, backend):
        return _launch(best_score, best_b, r, num_tokens, num_protected, emit_members=False).dest
    return bipartite_dest_reference(best_score, best_b, r, num_tokens, num_protected)


def bipartite_members(
    best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int, backend: str = "auto"
) -> MemberLists:
    """:func:`bipartite_dest` with the member lists that the merges by ``dest`` read
    (:class:`kernels.MemberLists`). Where the kernel runs with up to
    :data:`AUTO_MEMBERS_MAX_A_TOKENS` A tokens (any count with "triton"), it lays them out as it
    writes ``dest``, so no merge sorts; elsewhere they are sorted when a merge first needs them."""
    _check_inputs(best_score, best_b, r, num_tokens, num_protected)
    if _kernel_runs(best_score, best_b, backend):
        emit = backend == "triton" or best_score.shape[1] <= AUTO_MEMBERS_MAX_A_TOKENS
        return _launch(best_score, best_b, r, num_tokens, num_protected, emit_members=emit)
    return MemberLists(bipartite_dest_reference(best_score, best_b, r, num_tokens, num_protected))

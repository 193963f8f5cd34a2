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

Semantics are exactly those of :func:`bipartite_dest_reference` (``argsort(descending=True,
stable=True)``): ties go to the lower A index, NaN scores rank above every number.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import HAS_TRITON, check_device, next_power_of_2, tl, triton, use_triton

__all__ = ["bipartite_dest", "bipartite_dest_reference", "bipartite_dest_triton", "max_bipartite_r"]

# One program holds a batch item's A scores in registers; beyond this many A tokens (a
# 16,385-token sequence) the reference sorts instead.
MAX_A_TOKENS = 8192
# The most A tokens "auto" gives the kernel. Its one program per batch item counts the
# tokens ahead of each in O(Na²) steps; the reference's sort scales better. On an H200
# (evals/results/bench_kernels_cuda.md) the kernel won up to 1,024 A tokens (1.58× there)
# and lost at SAM-B's 2,048 (0.59 against 0.28 ms, batch 8).
AUTO_MAX_A_TOKENS = 1024


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
    a_part, b_part = bipartite_split(p)
    num_b = num_tokens - p - num_a

    order = best_score.argsort(dim=-1, descending=True, stable=True)
    is_src = torch.zeros(batch, num_a, dtype=torch.bool, device=device)
    is_src.scatter_(1, order[:, :r], True)

    b_base = p + num_a - r
    unmerged_rank = (~is_src).cumsum(dim=1) - 1
    dest_a = torch.where(is_src, b_base + best_b, p + unmerged_rank)
    dest_b = (b_base + torch.arange(num_b, device=device)).expand(batch, -1)

    dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    dest[:, :p] = torch.arange(p, device=device)
    body = dest[:, p:]
    body[:, a_part] = dest_a
    body[:, b_part] = dest_b
    return dest


if HAS_TRITON:

    @triton.jit
    def _bipartite_dest_kernel(
        score_ptr,
        best_b_ptr,
        dest_ptr,
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
        BLOCK_A: tl.constexpr,
        BLOCK_OTHER: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        # Grid: (batch,). One program lays out one batch item's whole dest row.
        batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride may exceed 2**31
        rows = tl.arange(0, BLOCK_A)
        valid = rows < num_a
        score_base = score_ptr + batch * stride_score_batch
        score = tl.load(score_base + rows * stride_score_token, mask=valid, other=0.0)
        score_nan = score != score

        # Rank in the stable descending order = how many A tokens come before this one: a
        # higher score, or the same score (NaN counting as above every number and equal to
        # NaN) at a lower index. Counted against BLOCK_OTHER tokens at a time.
        rank = tl.zeros([BLOCK_A], tl.int32)
        for start in range(0, num_a, BLOCK_OTHER):
            others = start + tl.arange(0, BLOCK_OTHER)
            valid_other = others < num_a
            other = tl.load(score_base + others * stride_score_token, mask=valid_other, other=0.0)
            other_nan = other != other
            higher = (other[None, :] > score[:, None]) | (other_nan[None, :] & ~score_nan[:, None])
            same = (other[None, :] == score[:, None]) | (other_nan[None, :] & score_nan[:, None])
            ahead = (higher | (same & (others[None, :] < rows[:, None]))) & valid_other[None, :]
            rank += tl.sum(ahead.to(tl.int32), axis=1)

        is_src = (rank < r) & valid
        kept = valid & ~is_src
        kept_rank = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # new position among the kept A tokens
        best_b = tl.load(best_b_ptr + batch * stride_best_b_batch + rows * stride_best_b_token, mask=valid, other=0)
        b_base = num_protected + num_a - r
        dest_a = tl.where(is_src, b_base + best_b, num_protected + kept_rank.to(tl.int64))

        dest_base = dest_ptr + batch * stride_dest_batch
        tl.store(dest_base + num_protected + a_start + 2 * rows, dest_a, mask=valid)
        b_start = 1 - a_start
        for start in range(0, num_b, BLOCK_B):
            cols = start + tl.arange(0, BLOCK_B)
            tl.store(dest_base + num_protected + b_start + 2 * cols, (b_base + cols).to(tl.int64), mask=cols < num_b)
        for start in range(0, num_protected, BLOCK_P):
            cols = start + tl.arange(0, BLOCK_P)
            tl.store(dest_base + cols, cols.to(tl.int64), mask=cols < num_protected)


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
    if num_protected < 0 or num_a != expected_a:
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
    return _launch(best_score, best_b, r, num_tokens, num_protected)


def _launch(best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int) -> Tensor:
    """The kernel on inputs already checked (the per-block path checks them once)."""
    batch, num_a = best_score.shape
    dest = torch.empty(batch, num_tokens, dtype=torch.int64, device=best_score.device)
    if batch == 0 or num_tokens == 0:
        return dest
    block_a = max(16, next_power_of_2(num_a))
    # The rank count compares BLOCK_A × BLOCK_OTHER pairs at a time: ~4k, what 4-8 warps hold.
    block_other = max(1, min(block_a, 4096 // block_a))
    _bipartite_dest_kernel[(batch,)](
        best_score,
        best_b,
        dest,
        num_a,
        num_tokens - num_protected - num_a,
        r,
        num_protected,
        num_protected % 2,
        *best_score.stride(),
        *best_b.stride(),
        dest.stride(0),
        BLOCK_A=block_a,
        BLOCK_OTHER=block_other,
        BLOCK_B=min(block_a, 1024),
        BLOCK_P=16,
        num_warps=4 if block_a <= 512 else 8,
    )
    return dest


def bipartite_dest(
    best_score: Tensor, best_b: Tensor, r: int, num_tokens: int, num_protected: int, backend: str = "auto"
) -> Tensor:
    """ToMe's merge assignment (see :func:`bipartite_dest_reference`) on the backend chosen by
    ``use_triton`` ("auto": Triton for CUDA tensors when triton imports). Float32 scores and
    up to :data:`AUTO_MAX_A_TOKENS` A tokens (:data:`MAX_A_TOKENS` with "triton") take the
    kernel; anything else, the reference."""
    _check_inputs(best_score, best_b, r, num_tokens, num_protected)
    if (
        best_score.dtype == torch.float32
        and best_score.shape[1] <= (MAX_A_TOKENS if backend == "triton" else AUTO_MAX_A_TOKENS)
        and use_triton(backend, best_score, best_b)  # ("triton": raises unless the device can run it)
    ):
        return _launch(best_score, best_b, r, num_tokens, num_protected)
    return bipartite_dest_reference(best_score, best_b, r, num_tokens, num_protected)

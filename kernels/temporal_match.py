"""Best match under the temporal rule: for every token of an even frame, its most similar token
of a neighbouring odd frame within a spatial window (the matching of temporal merging,
:class:`tokenprune.methods.temporal.TemporalMerge`).

The PyTorch reference builds the full ``[B, N, N]`` cosine matrix of the clip's tokens, applies
the rule to it in place and reduces it with ``max``. For 16 clips of 1,568 tokens that is 39 M
scores per block, written once and then read and rewritten by every step of the rule (on CUDA
the rule alone is a dozen elementwise passes: three broadcast differences, their comparisons
and disjunctions). The kernel streams the tokens through ``tl.dot`` tile by tile like
:mod:`kernels.match`, evaluates the rule from the row and column tiles' centroids in
registers, and keeps a running (max, argmax), so no score matrix exists; it also skips the row
tiles without an A token and the column tiles without a B token, since tokens stay in frame
order (about half of each).

Semantics are exactly those of :func:`temporal_best_match_reference` up to the last bits of
the cosines (the kernel divides the dot product by the norms instead of normalising first, as
in :mod:`kernels.match`, whose dot precision it shares): near-ties may resolve differently,
exact ties do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import HAS_TRITON, block_size, cdiv, check_backend, check_device, int32_offsets, on_device, tl, triton, use_triton

if HAS_TRITON:
    from kernels.match import cosine_tile, inverse_row_norms, keep_best
from kernels.match import float32_matmul, native_dot

__all__ = [
    "CENTROID_TOLERANCE",
    "OUTSIDE_PENALTY",
    "far_pairs",
    "temporal_best_match",
    "temporal_best_match_reference",
    "temporal_best_match_triton",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Merged centroids are size-weighted means computed in float32: distances are compared with
# this much slack.
CENTROID_TOLERANCE = 1e-4
# What an A → B pair outside the frame gap or window loses from its cosine: enough to rank it
# below every pair inside (cosines are at least −1), so it is picked only when no pair inside
# remains.
OUTSIDE_PENALTY = 4.0


def _is_a(frame: Tensor) -> Tensor:
    """Set A: the tokens whose centroid frame rounds to an even frame."""
    return torch.remainder(torch.floor(frame + 0.5), 2) == 0


def far_pairs(pos: Tensor, window: float, max_frame_gap: float = 1.5, use_cdist: bool | None = None) -> Tensor:
    """[B, N, N] in ``pos``'s dtype: 1 for the token pairs whose (frame, row, col) centroids
    ``pos`` [B, N, 3] are more than ``max_frame_gap`` frames or more than ``window`` patches in
    row or column apart, 0 for the others; by ``torch.cdist`` (``use_cdist``; by default on
    the CPU) or by broadcasting. Floating point, so that it scales a penalty without a cast."""
    limits = pos.new_tensor([max_frame_gap, window, window]) + CENTROID_TOLERANCE
    if use_cdist if use_cdist is not None else pos.device.type == "cpu":
        # One Chebyshev distance over coordinates scaled by their limits is one pass over the
        # pairs, where an absolute difference, a comparison and a disjunction per axis are
        # nine: at 1,568 tokens those passes cost a CPU more than the similarity matmul.
        scaled = pos / limits
        return torch.cdist(scaled, scaled, p=float("inf")).gt_(1.0)  # in place: stays floating point
    # PyTorch's CUDA cdist for p ≠ 2 runs one thread block per output cell (ATen's
    # DistanceKernel.cu), 39 M blocks for 16 clips of 1,568 tokens. Broadcasting is elementwise.
    far = None
    for axis in range(3):
        beyond = (pos[..., None, :, axis] - pos[..., :, None, axis]).abs() > limits[axis]
        far = beyond if far is None else far | beyond
    return far.to(pos.dtype)


def temporal_best_match_reference(
    metric: Tensor, pos: Tensor, window: float, max_frame_gap: float = 1.5
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch temporal match: the definition the kernel is tested against.

    Args:
        metric: [B, N, D] the tokens' matching features (any scale; compared by cosine).
        pos: [B, N, 3] float (frame, row, col) centroids of the same tokens.
        window: spatial radius in patches. max_frame_gap: temporal radius in frames.
    Returns:
        (best_score [B, N] float32, best_index [B, N] int64). An A token (centroid frame
        rounding to an even frame) scores the cosine with each B token (odd frame) at most
        ``max_frame_gap`` frames and ``window`` patches in row and column away, and that cosine
        minus :data:`OUTSIDE_PENALTY` with the other B tokens; it gets the best of these and
        its index (the lowest on a tie). A B token is only a destination: score −inf, index 0.
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens == 0:  # (max over no B token would fail; the kernel returns empty rows too)
        return metric.new_empty(batch, 0, dtype=torch.float32), metric.new_empty(batch, 0, dtype=torch.int64)
    unit = F.normalize(metric.float(), dim=-1)
    # float32 under autocast too (the kernel's scores); fresh: the rule is applied in place
    scores = float32_matmul(unit, unit.transpose(-1, -2))
    pos = pos.float()
    is_a = _is_a(pos[..., 0])
    scores.add_(far_pairs(pos, window, max_frame_gap), alpha=-OUTSIDE_PENALTY)  # inside pairs add 0: exact
    best_score, best_index = scores.masked_fill_(is_a[:, None, :], float("-inf")).max(dim=-1)
    return best_score.masked_fill(~is_a, float("-inf")), best_index.masked_fill(~is_a, 0)


if HAS_TRITON:

    @triton.jit
    def _frame_parity(frame):
        # floor(frame + 0.5) mod 2, as torch.remainder (non-negative for negative frames too)
        rounded = tl.floor(frame + 0.5)
        return rounded - 2.0 * tl.floor(rounded * 0.5)

    @triton.jit
    def _temporal_match_kernel(
        x_ptr,
        pos_ptr,
        score_ptr,
        index_ptr,
        num_tokens,
        dim,
        stride_x_batch,
        stride_x_row,
        stride_x_dim,
        stride_pos_batch,
        stride_pos_row,
        stride_pos_axis,
        stride_out_batch,
        limit_frame,
        limit_space,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NATIVE_DOT: tl.constexpr,
        PENALTY: tl.constexpr,
    ):
        # Grid: (batch, row tiles). Each program owns BLOCK_A tokens as rows and scans all
        # tokens as columns.
        batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride may exceed 2**31
        rows = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
        valid_rows = rows < num_tokens
        x_base = x_ptr + batch * stride_x_batch
        pos_base = pos_ptr + batch * stride_pos_batch

        row_pos = pos_base + rows * stride_pos_row
        frame_a = tl.load(row_pos, mask=valid_rows, other=0.0)
        row_a = tl.load(row_pos + stride_pos_axis, mask=valid_rows, other=0.0)
        col_a = tl.load(row_pos + 2 * stride_pos_axis, mask=valid_rows, other=0.0)
        is_a = valid_rows & (_frame_parity(frame_a) == 0.0)

        best_score = tl.full([BLOCK_A], float("-inf"), tl.float32)
        best_index = tl.zeros([BLOCK_A], tl.int32)
        if tl.max(is_a.to(tl.int32), axis=0) > 0:  # a tile of B tokens only matches nothing
            inv_norm_a = inverse_row_norms(x_base, rows, valid_rows, dim, stride_x_row, stride_x_dim, BLOCK_D)

            for b_start in range(0, num_tokens, BLOCK_B):
                cols = b_start + tl.arange(0, BLOCK_B)
                valid_cols = cols < num_tokens
                col_pos = pos_base + cols * stride_pos_row
                frame_b = tl.load(col_pos, mask=valid_cols, other=0.0)
                is_b = valid_cols & (_frame_parity(frame_b) == 1.0)
                if tl.max(is_b.to(tl.int32), axis=0) > 0:  # a tile of A tokens offers no partner
                    row_b = tl.load(col_pos + stride_pos_axis, mask=valid_cols, other=0.0)
                    col_b = tl.load(col_pos + 2 * stride_pos_axis, mask=valid_cols, other=0.0)
                    scores = cosine_tile(
                        x_base, rows, valid_rows, stride_x_row, stride_x_dim, inv_norm_a,
                        x_base, cols, valid_cols, stride_x_row, stride_x_dim, dim,
                        BLOCK_A, BLOCK_B, BLOCK_D, NATIVE_DOT,
                    )  # fmt: skip
                    far = (tl.abs(frame_a[:, None] - frame_b[None, :]) > limit_frame) | (
                        (tl.abs(row_a[:, None] - row_b[None, :]) > limit_space)
                        | (tl.abs(col_a[:, None] - col_b[None, :]) > limit_space)
                    )
                    scores = tl.where(far, scores - PENALTY, scores)
                    scores = tl.where(is_b[None, :], scores, float("-inf"))  # A tokens and padding never win
                    best_score, best_index = keep_best(scores, cols, num_tokens, best_score, best_index)

        best_score = tl.where(is_a, best_score, float("-inf"))
        best_index = tl.where(is_a, best_index, 0)
        out_offsets = batch * stride_out_batch + rows
        tl.store(score_ptr + out_offsets, best_score, mask=valid_rows)
        tl.store(index_ptr + out_offsets, best_index.to(tl.int64), mask=valid_rows)


def _check_inputs(metric: Tensor, pos: Tensor, window: float, max_frame_gap: float) -> None:
    _check_arguments(metric, pos, window, max_frame_gap)
    if metric.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported metric dtype {metric.dtype}; expected float32/float16/bfloat16")


def _check_arguments(metric: Tensor, pos: Tensor, window: float, max_frame_gap: float) -> None:
    """Everything but the kernel's dtypes: checked on both backends (the reference alone would
    broadcast a ``pos`` of batch 1, or take a negative window, where the kernel refuses them)."""
    if metric.ndim != 3 or pos.ndim != 3 or pos.shape[-1] != 3:
        raise ValueError(f"expected metric [B, N, D] and pos [B, N, 3], got {tuple(metric.shape)} and {tuple(pos.shape)}")
    if metric.shape[:2] != pos.shape[:2]:
        raise ValueError(f"metric and pos describe different tokens: {tuple(metric.shape)} vs {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise TypeError(f"pos must be floating point centroids, got {pos.dtype}")
    if metric.device != pos.device:
        raise ValueError(f"metric is on {metric.device} but pos is on {pos.device}")
    if not (window >= 0 and max_frame_gap >= 0):
        raise ValueError(f"window and max_frame_gap must be non-negative, got {window} and {max_frame_gap}")


def temporal_best_match_triton(
    metric: Tensor, pos: Tensor, window: float, max_frame_gap: float = 1.5
) -> tuple[Tensor, Tensor]:
    """Triton temporal match; same contract as :func:`temporal_best_match_reference`.

    ``metric`` may be a strided view (e.g. the tokens after the prefix): its strides go to the
    kernel, nothing is copied or normalised beforehand. The outputs carry no gradient: they
    only rank and pair tokens."""
    _check_inputs(metric, pos, window, max_frame_gap)
    check_device(metric, pos)
    batch, num_tokens, dim = metric.shape
    pos = pos.float()
    best_score = torch.empty(batch, num_tokens, device=metric.device, dtype=torch.float32)
    best_index = torch.empty(batch, num_tokens, device=metric.device, dtype=torch.int64)
    if batch == 0 or num_tokens == 0:
        return best_score, best_index
    metric, pos = int32_offsets(metric), int32_offsets(pos)  # (row offsets are int32 in the kernel)
    # The same tiles as kernels.match: 64×64 fp32 scores with 64-wide D chunks.
    block_a = block_size(num_tokens, 16, 64)
    block_d = block_size(dim, 16, 64)
    grid = (batch, cdiv(num_tokens, block_a))
    with on_device(metric):
        _temporal_match_kernel[grid](
            metric,
            pos,
            best_score,
            best_index,
            num_tokens,
            dim,
            *metric.stride(),
            *pos.stride(),
            best_score.stride(0),
            max_frame_gap + CENTROID_TOLERANCE,
            window + CENTROID_TOLERANCE,
            BLOCK_A=block_a,
            BLOCK_B=block_a,
            BLOCK_D=block_d,
            NATIVE_DOT=native_dot(metric, metric),
            PENALTY=OUTSIDE_PENALTY,
            num_warps=4,
        )
    return best_score, best_index


def temporal_best_match(
    metric: Tensor, pos: Tensor, window: float, max_frame_gap: float = 1.5, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Each token's best partner under the temporal rule (see
    :func:`temporal_best_match_reference`), on the backend chosen by ``use_triton`` ("auto":
    Triton for CUDA tensors when triton imports)."""
    check_backend(backend)
    _check_arguments(metric, pos, window, max_frame_gap)  # on every backend, not only before the kernel
    if metric.dtype in _SUPPORTED_DTYPES and use_triton(backend, metric, pos):
        return temporal_best_match_triton(metric, pos, window, max_frame_gap)
    return temporal_best_match_reference(metric, pos, window, max_frame_gap)

"""Best bipartite match: for every A token, its most similar B token by cosine (ToMe's matching).

``bipartite_soft_matching`` normalises the metric, builds the full ``[B, Na, Nb]`` cosine
matrix ``a @ b.T`` and reduces it with ``max(dim=-1)``: four or five kernels, and for video
ViTs (T = 1569 tokens, Na ≈ Nb ≈ 784) a score matrix written to and read back from global
memory once per layer. The kernel here fuses all of it: each program keeps a tile of A rows,
streams the B rows through ``tl.dot`` tile by tile, divides by the row norms it accumulates
on the way and keeps a running (max, argmax) in registers, so neither the normalised metric
nor the score matrix is materialised; global traffic is the raw inputs plus ``[B, Na]``
outputs, and a block's match is one launch.

Semantics are those of ``torch.max(normalize(a.float()) @ normalize(b.float()).T, dim=-1)``
(``F.normalize``: x / max(‖x‖, 1e-12), so a zero vector scores 0 against everything): scores
in float32, ties resolved to the lowest B index. The kernel divides the dot product by the
norms instead of normalising first, which rounds differently in the last bits: near-ties
(gaps of ~1e-7) may resolve differently than in the reference, exact ties (duplicate tokens)
do not.

The dot's precision follows the inputs. bf16 and fp16 rows go to the tensor cores as they
are: the product of two such values is exact in float32, and the products are summed in
float32, so this is the reference's arithmetic up to summation order. float32 rows are
multiplied in IEEE float32 (TF32 would round them to 10 mantissa bits), on the CUDA cores,
which is slow once the dot is large: there ``best_match`` (backend "auto") takes the
reference, whose cuBLAS matmul is faster (:data:`FP32_KERNEL_MAX_FLOPS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import HAS_TRITON, INTERPRET, block_size, cdiv, check_backend, check_device, int32_offsets, on_device, tl, triton, use_triton

__all__ = ["best_match", "best_match_reference", "best_match_triton", "float32_matmul"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The largest float32 match (2·B·Na·Nb·D FLOPs) that "auto" gives the kernel. Its IEEE float32
# dot runs on the CUDA cores; the reference's cuBLAS matmul wins once the dot outweighs its
# few extra launches. On an H200 (evals/results/bench_kernels_cuda.md) the kernel won at
# 0.31 and 0.63 GFLOPs (1.95× and 1.20×: ViT-B's 98 × 98 rows of width 64 and 128, batch
# 256) and lost at 1.26 GFLOPs and above (0.19–0.74×: width 256 and up; 2048 × 2048 rows of
# any width; SAM-B's windows and global blocks, whose float32 LayerNorm outputs of width 769
# took 23.7 ms per forward in this kernel: profile_sam_merge_unmerge_cuda.md). bf16 rows, on
# the tensor cores, won or tied at every measured shape (fp16 takes the same path, unmeasured)
# and always take the kernel.
FP32_KERNEL_MAX_FLOPS = 10**9


def float32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float32 (float64 stays float64) even inside ``torch.autocast``: for the
    similarity scores that choose which tokens merge.

    Autocast runs matmuls in its lower precision (bf16/fp16) whatever the inputs' dtype, so
    the PyTorch paths would score in bf16, round distinct similarities into ties and pick
    other pairs than the Triton kernels, which score in float32 (and than the same inputs
    without autocast). Outside autocast, float32 inputs give exactly ``a @ b``.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    device = a.device.type
    # Only where autocast is on: entering the context costs a few µs per call, and devices
    # without autocast (meta, for shape inference) refuse it.
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return a.to(dtype) @ b.to(dtype)
    with torch.autocast(device_type=device, enabled=False):
        return a.to(dtype) @ b.to(dtype)


def best_match_reference(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch best match: the definition the kernel is tested against.

    Args:
        a: [B, Na, D] rows (any strides, any scale). b: [B, Nb, D] likewise, Nb ≥ 1.
    Returns:
        (best_score [B, Na] float32, best_index [B, Na] int64): the max over j of the cosine
        similarity of ``a[i]`` and ``b[j]`` and its argmax, ties → the lowest j (``torch.max``
        semantics). A zero row has cosine 0 to every row (``F.normalize``'s convention).

    Scores are computed in float32 whatever the input dtype, and under autocast too
    (:func:`float32_matmul`): a bf16 score matrix would round distinct similarities to equal
    values and turn them into artificial ties.
    """
    scores = float32_matmul(F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1).transpose(-1, -2))
    best_score, best_index = scores.max(dim=-1)
    return best_score, best_index


if HAS_TRITON:

    @triton.jit
    def inverse_row_norms(base, rows, valid_rows, dim, stride_row, stride_dim, BLOCK_D: tl.constexpr):
        """1 / max(‖x‖, 1e-12) (F.normalize's denominator) of a tile of rows, one pass over D."""
        offs_d = tl.arange(0, BLOCK_D)
        sum_sq = tl.zeros_like(rows).to(tl.float32)
        for d_start in range(0, dim, BLOCK_D):
            cols = d_start + offs_d
            tile = tl.load(
                base + rows[:, None] * stride_row + cols[None, :] * stride_dim,
                mask=valid_rows[:, None] & (cols < dim)[None, :],
                other=0.0,
            ).to(tl.float32)
            sum_sq += tl.sum(tile * tile, axis=1)
        return 1.0 / tl.maximum(tl.sqrt(sum_sq), 1e-12)

    @triton.jit
    def cosine_tile(
        a_base, rows_a, valid_a, stride_a_row, stride_a_dim, inv_norm_a,
        b_base, rows_b, valid_b, stride_b_row, stride_b_dim, dim,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NATIVE_DOT: tl.constexpr,
    ):  # fmt: skip
        """[BLOCK_A, BLOCK_B] fp32 cosines of a tile of A rows (their inverse norms given) with
        a tile of B rows, whose norms are accumulated beside the dot. ``NATIVE_DOT``: the
        inputs are bf16 or fp16 (one dtype) and go to the dot as they are."""
        offs_d = tl.arange(0, BLOCK_D)
        scores = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        sum_sq_b = tl.zeros([BLOCK_B], tl.float32)
        # D is looped rather than held whole so any width fits in registers; the A tile is
        # re-read per B tile, but from L1/L2, and the dot dominates.
        for d_start in range(0, dim, BLOCK_D):
            cols = d_start + offs_d
            valid_d = cols < dim
            a_tile = tl.load(
                a_base + rows_a[:, None] * stride_a_row + cols[None, :] * stride_a_dim,
                mask=valid_a[:, None] & valid_d[None, :],
                other=0.0,
            )
            # B is loaded already transposed ([D, B]) through its strides: no copy of b.T.
            b_tile = tl.load(
                b_base + cols[:, None] * stride_b_dim + rows_b[None, :] * stride_b_row,
                mask=valid_d[:, None] & valid_b[None, :],
                other=0.0,
            )
            if NATIVE_DOT:
                # bf16/fp16 products are exact in fp32 and the tensor cores sum in fp32: the
                # float32 reference's arithmetic, up to summation order.
                scores = tl.dot(a_tile, b_tile, scores)
                b_tile = b_tile.to(tl.float32)
            else:
                # float32 (or mixed) rows: "ieee" forbids TF32, whose 10-bit mantissa would
                # reorder near-equal similarities. (Upcasting also sidesteps the interpreter,
                # whose dot would misread bf16 storage as uint16.)
                b_tile = b_tile.to(tl.float32)
                scores = tl.dot(a_tile.to(tl.float32), b_tile, scores, input_precision="ieee")
            sum_sq_b += tl.sum(b_tile * b_tile, axis=0)
        inv_norm_b = 1.0 / tl.maximum(tl.sqrt(sum_sq_b), 1e-12)
        return scores * inv_norm_a[:, None] * inv_norm_b[None, :]

    @triton.jit
    def keep_best(scores, cols, num_cols, best_score, best_index):
        """The running (max, argmax) over column tiles visited in increasing order, ties to the
        lowest column (torch.max's rule): within the tile the lowest column attaining its max,
        across tiles a strict ">", which keeps the earliest tile."""
        tile_score = tl.max(scores, axis=1)
        tile_index = tl.min(tl.where(scores == tile_score[:, None], cols[None, :], num_cols), axis=1)
        better = tile_score > best_score
        return tl.where(better, tile_score, best_score), tl.where(better, tile_index, best_index)

    @triton.jit
    def _best_match_kernel(
        a_ptr,
        b_ptr,
        score_ptr,
        index_ptr,
        num_a,
        num_b,
        dim,
        stride_a_batch,
        stride_a_row,
        stride_a_dim,
        stride_b_batch,
        stride_b_row,
        stride_b_dim,
        stride_out_batch,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NATIVE_DOT: tl.constexpr,
    ):
        # Grid: (batch, A tiles). Each program owns BLOCK_A rows of A and scans all of B.
        batch = tl.program_id(0).to(tl.int64)  # int64: batch * stride may exceed 2**31
        rows_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
        valid_a = rows_a < num_a
        a_base = a_ptr + batch * stride_a_batch
        b_base = b_ptr + batch * stride_b_batch
        inv_norm_a = inverse_row_norms(a_base, rows_a, valid_a, dim, stride_a_row, stride_a_dim, BLOCK_D)

        best_score = tl.full([BLOCK_A], float("-inf"), tl.float32)
        best_index = tl.zeros([BLOCK_A], tl.int32)
        for b_start in range(0, num_b, BLOCK_B):
            rows_b = b_start + tl.arange(0, BLOCK_B)
            valid_b = rows_b < num_b
            scores = cosine_tile(
                a_base, rows_a, valid_a, stride_a_row, stride_a_dim, inv_norm_a,
                b_base, rows_b, valid_b, stride_b_row, stride_b_dim, dim,
                BLOCK_A, BLOCK_B, BLOCK_D, NATIVE_DOT,
            )  # fmt: skip
            scores = tl.where(valid_b[None, :], scores, float("-inf"))  # padding never wins
            best_score, best_index = keep_best(scores, rows_b, num_b, best_score, best_index)

        out_offsets = batch * stride_out_batch + rows_a
        tl.store(score_ptr + out_offsets, best_score, mask=valid_a)
        tl.store(index_ptr + out_offsets, best_index.to(tl.int64), mask=valid_a)


def _check_inputs(a: Tensor, b: Tensor) -> None:
    _check_arguments(a, b)
    if a.dtype not in _SUPPORTED_DTYPES or b.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtypes {a.dtype}, {b.dtype}; expected float32/float16/bfloat16")


def _check_arguments(a: Tensor, b: Tensor) -> None:
    """Everything but the kernel's dtypes: checked on both backends (the reference alone would
    broadcast a batch of 1 against B, or take [N, D] rows, where the kernel refuses them)."""
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"expected [B, N, D] inputs, got a{tuple(a.shape)} and b{tuple(b.shape)}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"batch/feature sizes differ: a{tuple(a.shape)} vs b{tuple(b.shape)}")
    if b.shape[1] == 0:
        raise ValueError("b has no rows: there is no best match (torch.max fails likewise)")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")


def best_match_triton(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Triton best match; same contract as :func:`best_match_reference`.

    ``a`` and ``b`` may be strided views (e.g. ``body[:, 1::2]``): their strides are passed to
    the kernel, nothing is copied or normalised beforehand. fp32/fp16/bf16 inputs, accumulated
    in fp32. The outputs carry no gradient: ToMe uses them only to rank and pair tokens.

    NaN inputs are not handled like ``torch.max``, which propagates the NaN; here NaN scores
    are simply never selected as a new maximum.
    """
    _check_inputs(a, b)
    check_device(a, b)
    batch, num_a, dim = a.shape
    num_b = b.shape[1]
    best_score = torch.empty(batch, num_a, device=a.device, dtype=torch.float32)
    best_index = torch.empty(batch, num_a, device=a.device, dtype=torch.int64)
    if batch == 0 or num_a == 0:
        return best_score, best_index
    if dim == 0:  # an empty dot product: every score is 0, the first B row wins
        return best_score.zero_(), best_index.zero_()
    a, b = int32_offsets(a), int32_offsets(b)  # (row offsets are int32 in the kernel)

    # 64×64 score tiles with 64-wide D chunks: 16 KiB of fp32 accumulator per program, which
    # fits in registers with 4 warps; smaller problems shrink the tiles (≥ 16 for tl.dot).
    block_a = block_size(num_a, 16, 64)
    block_b = block_size(num_b, 16, 64)
    block_d = block_size(dim, 16, 64)
    grid = (batch, cdiv(num_a, block_a))
    with on_device(a):
        _best_match_kernel[grid](
            a,
            b,
            best_score,
            best_index,
            num_a,
            num_b,
            dim,
            *a.stride(),
            *b.stride(),
            best_score.stride(0),
            BLOCK_A=block_a,
            BLOCK_B=block_b,
            BLOCK_D=block_d,
            NATIVE_DOT=native_dot(a, b),
            num_warps=4,
        )
    return best_score, best_index


def native_dot(a: Tensor, b: Tensor) -> bool:
    """Whether the kernel's dot takes the rows as they are: bf16 or fp16 (one dtype), compiled
    for a GPU (the interpreter's dot misreads bf16; it upcasts, which computes the same)."""
    return a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and not INTERPRET


def best_match(a: Tensor, b: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Most similar row of ``b`` (cosine) for every row of ``a`` (see
    :func:`best_match_reference`), on the backend chosen by ``use_triton`` ("auto": Triton for
    CUDA tensors when triton imports). Dtypes outside fp32/fp16/bf16 take the reference, and so
    does "auto" for a float32 match of more than :data:`FP32_KERNEL_MAX_FLOPS`."""
    check_backend(backend)
    _check_arguments(a, b)  # on every backend, not only before the kernel
    if a.dtype in _SUPPORTED_DTYPES and b.dtype in _SUPPORTED_DTYPES and use_triton(backend, a, b):
        (batch, num_a, dim), num_b = a.shape, b.shape[1]
        if backend == "triton" or native_dot(a, b) or 2 * batch * num_a * num_b * dim <= FP32_KERNEL_MAX_FLOPS:
            return best_match_triton(a, b)
    return best_match_reference(a, b)

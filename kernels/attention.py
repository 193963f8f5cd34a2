"""Attention over merged tokens: softmax(q·kᵀ·scale + log s) v, with the size bias built in.

Proportional attention (ToMe, Bolya et al. 2023, Eq. 1) adds ``log s_j`` — the log of how many
patches key token j stands for — to every attention logit. Library fused kernels take it only
as a generic ``attn_mask``: flash attention refuses one, and the kernels that accept one read a
mask tensor broadcast to [B, H, T, T]. On an H100 (bf16, ViT-B shapes, measured in
``evals/results/``) that makes attention about 3× slower than without the bias, more than
merging saves. Library kernels also tile the sequence in blocks of 128 rows, so a block with 21
merged tokens costs as much as one with 128.

The kernel here is flash attention (online softmax, nothing of size T×T in memory) with
the bias as one [B, T] vector read per key tile, and tiles sized to the sequence (16 to 64):
short merged sequences cost what they compute. It writes the output directly in the
[B, T, H, D] layout that the attention's output projection reads, so the usual
``transpose(1, 2).reshape`` after attention is free.

The kernel is for inference: it has no backward. When gradients are needed, :func:`attention`
takes PyTorch SDPA with the bias as a mask. Under ``torch.compile``, whose Dynamo cannot trace
the kernel's launch, it runs as one opaque op of the graph (``torch.ops.tokenprune.attention``,
which CUDA graphs capture) when ``backend="triton"`` asks for it; "auto" keeps SDPA there, the
path measured compiled on the H200 (``bench_compile_cuda.md``), until the op is measured too.
:func:`attention_folded` is the other way to give SDPA the bias, folded into two extra channels
of q and k so that flash attention runs it; on the H200 it was slower than the mask at every
length, forward and backward, so nothing dispatches to it (``bench_attention_cuda.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels._triton import HAS_TRITON, INTERPRET, block_size, cdiv, check_backend, check_device, int32_offsets, next_power_of_2, on_device, tl, triton, use_triton

__all__ = ["attention", "attention_folded", "attention_reference", "attention_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# "auto" takes the kernel for half precision only: fp32 would need IEEE dots (no TF32), where
# the library kernels are as good.
_AUTO_DTYPES = _HALF_DTYPES
# Without a bias, cuDNN's fused attention beats this kernel from about 100 tokens up (H100,
# bf16, B=256, 12 heads × 64: 63 vs 102 µs at 101 tokens, 58 vs 46 µs at 53, 57 vs 26 µs at
# 21); with the bias this kernel wins at every length (275 vs 489 µs at 197 tokens).
_AUTO_MAX_TOKENS_WITHOUT_BIAS = 64


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, scale: float, dropout: float = 0.0
) -> Tensor:
    """softmax(q kᵀ · scale + key_bias) v through PyTorch SDPA: the definition the kernel is
    tested against, and the path that supports autograd.

    Args:
        q, k, v: [B, H, T, D] (any strides). key_bias: [B, T] float32 added to the logits of
            every query for key j (proportional attention: log of the token sizes), or None.
        scale: logit scale, usually D ** -0.5. dropout: attention dropout probability (training).
    Returns:
        [B, H, T, D] in q's dtype.

    SDPA takes the mask in q's dtype, so in half precision the bias is rounded first (bf16:
    log 3 becomes 1.1016); the kernel adds it in float32. The two differ by that rounding as
    well as by their own.
    """
    mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def attention_folded(
    q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, scale: float, dropout: float = 0.0
) -> Tensor:
    """softmax(q kᵀ · scale + key_bias) v through SDPA with *no* mask: the bias rides in two
    extra head channels, so flash attention, which refuses any mask, runs it (with its backward,
    and under ``torch.compile``). Same contract as :func:`attention_reference`.

    With q'_i = [q_i, 1, 1, 0…] and k'_j = [k_j, hi_j, lo_j, 0…], where hi_j + lo_j = b_j / scale,
    scale · q'_i·k'_j = scale · q_i·k_j + b_j: the biased logits, exactly in real arithmetic.
    ``hi`` is b_j / scale rounded to q's dtype and ``lo`` the remainder, so half precision keeps
    ~16 bits of the bias, where the reference's mask in bf16 keeps 8; a bias of −inf masks its
    key, as in the reference; a finite bias must stay within q's dtype once divided by ``scale``
    (float16: |b| · √D < 65504; log sizes are far below). The head dimension grows to D + 2
    rounded up to a multiple of 8 (flash attention's alignment; v is padded with zeros to match,
    and the padding sliced off the output): 64 → 72, 12.5 % more attention FLOPs, or up to 1.5×
    the work where the flash kernel rounds head sizes up to 96; a broadcast mask costs SDPA's
    kernels ~3× their unbiased time on a GPU (``bench_attention_cuda.md``). Measured there (H200,
    bf16, batch 256, 12 heads × 64), folding lost to the mask at every length from 21 to 197
    tokens: 985 against 505 µs forward at 197 tokens, 2314 against 1751 µs forward + backward
    (both backward timings then included accumulating into ``.grad``).
    """
    if key_bias is None:
        return attention_reference(q, k, v, None, scale, dropout)
    _check_inputs(q, k, v, key_bias)
    batch, heads, tokens, dim = q.shape
    padding = -(dim + 2) % 8
    folded = (key_bias.float() / scale)[:, None, :, None].expand(batch, heads, tokens, 1)
    hi = folded.to(q.dtype)
    # (a key masked with −inf: hi is −inf and the remainder 0, not −inf − (−inf))
    lo = torch.where(torch.isfinite(hi), folded - hi.float(), 0.0).to(q.dtype)
    zeros = q.new_zeros(batch, heads, tokens, padding)
    q = torch.cat([q, q.new_ones(batch, heads, tokens, 2), zeros], dim=-1)
    k = torch.cat([k, hi, lo, zeros], dim=-1)
    v = F.pad(v, (0, 2 + padding))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)[..., :dim]


if HAS_TRITON:

    @triton.jit
    def _attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bias_ptr,
        out_ptr,
        num_heads,
        num_tokens,
        head_dim,
        qk_scale,
        stride_q_batch,
        stride_q_head,
        stride_q_token,
        stride_q_dim,
        stride_k_batch,
        stride_k_head,
        stride_k_token,
        stride_k_dim,
        stride_v_batch,
        stride_v_head,
        stride_v_token,
        stride_v_dim,
        stride_bias_batch,
        stride_out_batch,
        stride_out_head,
        stride_out_token,
        HAS_BIAS: tl.constexpr,
        EXACT_DOTS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Grid: (batch × heads, query tiles); batch × heads on axis 0, the only axis not capped
        # at 65,535 programs (ViT-B at batch 5,462 has more heads than that). Each program owns
        # BLOCK_M queries of one head and streams every key/value tile through an online softmax
        # (exp2 domain: logits are pre-multiplied by log2(e), so exp2 gives the same weights
        # with a cheaper instruction).
        LOG2E: tl.constexpr = 1.4426950408889634
        batch_head = tl.program_id(0)
        batch = (batch_head // num_heads).to(tl.int64)  # int64: batch * stride may exceed 2**31
        head = (batch_head % num_heads).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid_m = rows < num_tokens
        dims = tl.arange(0, BLOCK_D)
        valid_d = dims < head_dim

        q_base = q_ptr + batch * stride_q_batch + head * stride_q_head
        k_base = k_ptr + batch * stride_k_batch + head * stride_k_head
        v_base = v_ptr + batch * stride_v_batch + head * stride_v_head
        q = tl.load(
            q_base + rows[:, None] * stride_q_token + dims[None, :] * stride_q_dim,
            mask=valid_m[:, None] & valid_d[None, :],
            other=0.0,
        )

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, num_tokens, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            valid_n = keys < num_tokens
            # K is loaded already transposed ([D, N]) through its strides: no copy of kᵀ.
            k_t = tl.load(
                k_base + keys[None, :] * stride_k_token + dims[:, None] * stride_k_dim,
                mask=valid_d[:, None] & valid_n[None, :],
                other=0.0,
            )
            if EXACT_DOTS:  # fp32 inputs (and the CPU interpreter): IEEE fp32, never TF32
                logits = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision="ieee")
            else:  # fp16/bf16 operands on the tensor cores, fp32 accumulation
                logits = tl.dot(q, k_t)
            logits = logits * qk_scale
            if HAS_BIAS:
                bias = tl.load(bias_ptr + batch * stride_bias_batch + keys, mask=valid_n, other=0.0)
                logits += bias[None, :] * LOG2E
            logits = tl.where(valid_n[None, :], logits, float("-inf"))

            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            # A key bias of -inf masks its key (as in the reference). While every key seen so far
            # is masked the max is -inf, and -inf - (-inf) would make the weights NaN: subtract 0
            # instead, which gives those keys weight exp2(-inf) = 0.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.math.exp2(logits - shift[:, None])
            rescale = tl.math.exp2(row_max - shift)  # 0 while row_max = -inf (first tile)
            row_sum = row_sum * rescale + tl.sum(weights, axis=1)
            v = tl.load(
                v_base + keys[:, None] * stride_v_token + dims[None, :] * stride_v_dim,
                mask=valid_n[:, None] & valid_d[None, :],
                other=0.0,
            )
            acc = acc * rescale[:, None]
            if EXACT_DOTS:
                acc = tl.dot(weights, v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(weights.to(v.dtype), v, acc)
            row_max = new_max

        # A query whose every key is masked (-inf) gets 0, as SDPA gives it, not 0/0.
        out = acc / tl.where(row_sum > 0.0, row_sum, 1.0)[:, None]
        out_base = out_ptr + batch * stride_out_batch + head * stride_out_head
        tl.store(
            out_base + rows[:, None] * stride_out_token + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=valid_m[:, None] & valid_d[None, :],
        )


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, H, T, D] of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_bias is not None:
        batch, _, tokens, _ = q.shape
        if key_bias.shape != (batch, tokens):
            raise ValueError(f"key_bias must be [B, T] = {(batch, tokens)}, got {tuple(key_bias.shape)}")
        if key_bias.dtype != torch.float32:
            raise TypeError(f"key_bias must be float32 (log sizes), got {key_bias.dtype}")


def attention_triton(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, scale: float) -> Tensor:
    """Triton attention with a per-key bias; same contract as :func:`attention_reference`.

    q, k, v may be strided views (e.g. the unbound ``qkv`` projection): strides go to the
    kernel, nothing is copied. The result is a [B, H, T, D] view of a [B, T, H, D] tensor, so
    ``out.transpose(1, 2).reshape(B, T, H * D)`` needs no copy. No autograd.
    """
    _check_inputs(q, k, v, key_bias)
    check_device(q, k, v, *(() if key_bias is None else (key_bias,)))
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out.transpose(1, 2)
    if key_bias is not None and key_bias.stride(1) != 1:
        key_bias = key_bias.contiguous()
    # Token and channel offsets are int32 in the kernel (batch and head ones int64).
    q, k, v = (int32_offsets(t, batch_dims=2) for t in (q, k, v))

    # Tiles sized to the sequence: a 21-token block runs 32×32 tiles, not 128×128. And to the
    # head: the K and V tiles (two pipeline stages) sit in shared memory, so rows wider than a bf16
    # head of 128 get shorter tiles. At 64-token tiles a float32 head of 72-128 channels (SigLIP's
    # 72, ViT-H's 80: a 128-wide block) needs 115,200 bytes (sm_86) and cannot launch on GPUs with
    # 99 KiB per block (sm_86/sm_89: A10, L4, RTX 30 and 40 series) nor on a T4 (64 KiB).
    block_d = max(16, next_power_of_2(dim))
    row_bytes = block_d * q.element_size()
    block = block_size(tokens, 16, max(16, min(64, 64 * 256 // row_bytes)))  # queries and keys alike
    exact = q.dtype == torch.float32 or INTERPRET  # the interpreter mis-reads half dots (bf16: badly)
    grid = (batch * heads, cdiv(tokens, block))
    with on_device(q):
        _attention_kernel[grid](
            q,
            k,
            v,
            q if key_bias is None else key_bias,  # a placeholder pointer when there is no bias
            out,
            heads,
            tokens,
            dim,
            scale * math.log2(math.e),
            *q.stride(),
            *k.stride(),
            *v.stride(),
            0 if key_bias is None else key_bias.stride(0),
            out.stride(0),
            out.stride(2),
            out.stride(1),
            HAS_BIAS=key_bias is not None,
            EXACT_DOTS=exact,
            BLOCK_M=block,
            BLOCK_N=block,
            BLOCK_D=block_d,
            num_warps=4,
            num_stages=2,
        )
    return out.transpose(1, 2)


@torch.library.custom_op("tokenprune::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, scale: float) -> Tensor:
    """:func:`attention_triton` as a PyTorch op: what ``torch.compile`` puts in its graph."""
    return attention_triton(q, k, v, key_bias, scale)


@_attention_op.register_fake
def _attention_layout(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None, scale: float) -> Tensor:
    batch, heads, tokens, dim = q.shape
    return q.new_empty(batch, tokens, heads, dim).transpose(1, 2)  # the kernel's layout (attention_triton)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_bias: Tensor | None,
    scale: float,
    backend: str = "auto",
    dropout: float = 0.0,
) -> Tensor:
    """softmax(q kᵀ · scale + key_bias) v (see :func:`attention_reference`) on the backend
    chosen by ``use_triton``. "auto" takes the kernel for fp16/bf16 CUDA tensors that need no
    gradient, and SDPA otherwise (fp32, CPU, training, under ``torch.compile``, and sequences
    over 64 tokens without a bias, where the library kernels are faster). Whenever q, k, v or
    key_bias needs a gradient, or with attention dropout (training), it is always SDPA.
    Compiled, "triton" runs the kernel as one op. A key_bias of -inf masks its key.

    SDPA (the path of ``backend="torch"`` too) takes the bias as a mask: cheaper than folding
    it into q and k (:func:`attention_folded`) on the H200 at every length, forward and
    backward, and on the CPU (2-core Xeon, ViT-S shapes at batch 8, float32: 3.2 ms with the
    mask, 8.0 ms folded)."""
    check_backend(backend)  # (before gradients or dtypes can skip use_triton, which checks it too)
    # The bias counts too: the kernel has no backward, so a key_bias that needs a gradient (sizes
    # or a mask being trained) would otherwise get none, silently.
    inputs = (q, k, v) if key_bias is None else (q, k, v, key_bias)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    # torch.compile (2.11) fails to trace the kernel's launch (the match and merge kernels trace
    # fine), so compiled it runs as a custom op; "auto" leaves it to SDPA, which Inductor handles.
    compiling = torch.compiler.is_compiling()
    if not (needs_grad or dropout or (compiling and backend == "auto")):
        long_unbiased = key_bias is None and q.shape[2] > _AUTO_MAX_TOKENS_WITHOUT_BIAS
        dtypes = _AUTO_DTYPES if backend == "auto" else _SUPPORTED_DTYPES
        if not (backend == "auto" and long_unbiased) and q.dtype in dtypes and use_triton(backend, *inputs):
            return (_attention_op if compiling else attention_triton)(q, k, v, key_bias, scale)
    return attention_reference(q, k, v, key_bias, scale, dropout)

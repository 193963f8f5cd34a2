"""Size-weighted token merge (ToMe's x ← Σ s·x / Σ s) without atomics.

The reference (:func:`merge_wavg_reference`) uses ``index_add_``, which on CUDA adds with
atomics in whatever order threads arrive: the result can change in the last bits from run to
run. In the kernel
each output token is produced by exactly one program that sums its members itself, in input
order, in float32 (a program owns a tile of output tokens and walks their member lists
side by side); the inverse of ``dest`` (which inputs go to which output) is a stable sort,
made once per matching however many tensors it merges (:class:`MemberLists`), or laid out by
ToMe's assignment kernel beside ``dest`` (:func:`kernels.bipartite_members`). Same input →
same bits, on every run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels._triton import (
    HAS_TRITON,
    INTERPRET,
    cdiv,
    check_backend,
    check_device,
    int32_offsets,
    next_power_of_2,
    on_device,
    tl,
    triton,
    under_torch_func,
    use_triton,
)

__all__ = ["MemberLists", "merge_wavg", "merge_wavg_reference", "merge_wavg_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = torch.finfo(torch.float32).tiny


class MemberLists:
    """Which inputs go to which output, as the kernel reads them: a stable sort of ``dest``
    (sorted destinations, and the input order that sorts them), made on the first merge that
    needs it and shared by every merge with the same ``dest``. A matching whose ``dest`` merges
    several tensors (the tokens and their positions; SAM's tokens, position-bias terms and MLP
    input) then sorts once, not once per tensor: the H200 profile of SAM-B ran 72 sorts per
    forward for 12 matchings.

    ``sort``: the stable sort (sorted_dest, order), when whoever made ``dest`` laid it out too
    (ToMe's assignment kernel, :func:`kernels.bipartite_members`): then nothing is sorted.
    """

    def __init__(self, dest: Tensor, sort: tuple[Tensor, Tensor] | None = None) -> None:
        self.dest = dest
        self._sorted = sort

    def sorted(self) -> tuple[Tensor, Tensor]:
        """(sorted_dest, order), each [B, T]: output o's members are order[first:last], the run
        of o in sorted_dest, in input order."""
        if self._sorted is None:
            self._sorted = tuple(torch.sort(self.dest, dim=1, stable=True))
        return self._sorted


def merge_wavg_reference(x: Tensor, size: Tensor, dest: Tensor, num_out: int) -> tuple[Tensor, Tensor]:
    """Size-weighted average of the tokens sharing a destination (ToMe: x ← Σ s·x / Σ s).

    Args:
        x: [B, T, C] tokens. size: [B, T, 1] float32 sizes (bf16/fp16 ones are summed in float32,
            float64 ones in float64). dest: [B, T] int64 in [0, num_out).
    Returns:
        ([B, num_out, C] merged tokens in x's dtype, [B, num_out, 1] float32 summed sizes).

    Accumulates in float32 so that bf16/fp16 models lose no precision in the average (float64
    in float64: a float64 model, e.g. under ``gradcheck``, keeps its precision). An
    output of total size 0 (only size-0 members: NaFlex padding; or no members) is 0, not 0/0.
    """
    batch, tokens, channels = x.shape
    # Sizes summed in float32 at least, like the tokens: bf16 holds integers exactly only up to
    # 256 (fp16 to 2048), so a half-precision size would give a sum of 301 ones as 300 and
    # the average of 301 equal tokens as 301/300 of them. (A no-op for float32 sizes.)
    size = size.to(torch.promote_types(size.dtype, torch.float32))
    weighted = x.to(torch.promote_types(x.dtype, torch.float32)) * size
    # One index_add_ over the flattened batch: the same sums in the same order as a
    # scatter_add_ along dim 1 (bit-identical), about 3x faster on CPU.
    flat = (dest + num_out * torch.arange(batch, device=dest.device).unsqueeze(1)).reshape(-1)
    rows = weighted.reshape(batch * tokens, channels)  # (not -1, which a C of 0 leaves ambiguous)
    # Under torch.func.vmap, x and size may be the same for every sample while dest is not (SAM's
    # one-hot position rows): vmap cannot add a batched index's rows into a tensor made here in
    # place. Out of place there only: on the CPU, index_add is several times slower than index_add_.
    add = torch.Tensor.index_add if under_torch_func() else torch.Tensor.index_add_
    merged = add(weighted.new_zeros(batch * num_out, channels), 0, flat, rows)
    new_size = add(size.new_zeros(batch * num_out, 1), 0, flat, size.reshape(-1, 1))
    average = merged / new_size.clamp(min=_TINY)  # sizes are counts: the clamp only turns 0/0 into 0
    return average.to(x.dtype).view(batch, num_out, channels), new_size.view(batch, num_out, 1)


# Tile shapes (BLOCK_T output rows × BLOCK_C channels, warps) for the GPU to choose from, per
# (num_out, channels): one row of ≤ 1024 channels per program (many tiny programs, wide loads)
# up to 16 rows × 256 channels. Which wins depends on the GPU and the shape, so Triton times
# them on the first call of each shape. The tests run each of them against the reference.
GPU_TILES = ((1, 1024, 8), (4, 256, 4), (8, 256, 4), (16, 256, 4), (4, 1024, 8))
# The interpreter (CPU tests) autotunes over one small tile that still spans several tiles
# and channel blocks on the tests' shapes.
INTERPRETER_TILE = (4, 64, 4)


def _merge_configs() -> list:
    tiles = [INTERPRETER_TILE] if INTERPRET else GPU_TILES
    return [triton.Config({"BLOCK_T": t, "BLOCK_C": c}, num_warps=w) for t, c, w in tiles]


if HAS_TRITON:

    # Every output element is written, so re-running a config while tuning is harmless. Tuned
    # per power-of-two bucket of num_out, not per value: a ToMe schedule meets a new num_out in
    # every block (97 values in the DINOv2 budget sweep), and Triton's default timing of five
    # tiles takes ~0.6 s per key.
    @triton.autotune(configs=_merge_configs(), key=["num_out_bucket", "channels"])
    @triton.jit
    def _merge_wavg_kernel(
        x_ptr,
        size_ptr,
        order_ptr,
        sorted_dest_ptr,
        out_ptr,
        new_size_ptr,
        num_tokens,
        num_out,
        num_out_bucket,  # autotuning key only
        search_steps,
        channels,
        stride_x_batch,
        stride_x_token,
        stride_x_channel,
        stride_size_batch,
        stride_size_token,
        stride_order_batch,
        stride_sorted_batch,
        stride_out_batch,
        stride_out_token,
        stride_new_size_batch,
        BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # Grid: (batch × output-token tiles, channel blocks). One program owns a BLOCK_T × BLOCK_C
        # tile of the output, so no two programs ever write the same address (no atomics), and
        # every load is a [BLOCK_T, BLOCK_C] tile rather than one row. Batch and tiles share
        # axis 0, the only axis not capped at 65,535 programs: with one output row per program
        # (a GPU tile), 65,536 merged tokens on axis 1 would fail to launch on CUDA.
        num_tiles = (num_out + BLOCK_T - 1) // BLOCK_T
        batch_tile = tl.program_id(0)
        batch = (batch_tile // num_tiles).to(tl.int64)  # int64: batch * stride may exceed 2**31
        out_tokens = (batch_tile % num_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        valid_t = out_tokens < num_out
        channel_block = tl.program_id(1)
        cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
        valid_c = cols < channels

        # Members of output o are order[first:last], the run of o in the sorted destinations,
        # in input order (a stable sort). Both ends by binary search (lower bounds of o and
        # o + 1), so no [B, num_out + 1] table of run starts is built and read back.
        sorted_row = sorted_dest_ptr + batch * stride_sorted_batch
        first = tl.zeros([BLOCK_T], tl.int64)
        last = tl.zeros([BLOCK_T], tl.int64)
        first_hi = tl.full([BLOCK_T], num_tokens, tl.int64)
        last_hi = tl.full([BLOCK_T], num_tokens, tl.int64)
        for _ in range(search_steps):  # ceil(log2(T + 1)) halvings close every interval
            mid = (first + first_hi) // 2
            below = tl.load(sorted_row + mid, mask=mid < first_hi, other=num_out) < out_tokens
            first = tl.where(below, mid + 1, first)
            first_hi = tl.where(below, first_hi, mid)
            mid = (last + last_hi) // 2
            below = tl.load(sorted_row + mid, mask=mid < last_hi, other=num_out) <= out_tokens
            last = tl.where(below, mid + 1, last)
            last_hi = tl.where(below, last_hi, mid)
        count = tl.where(valid_t, last - first, 0)
        x_base = x_ptr + batch * stride_x_batch
        size_base = size_ptr + batch * stride_size_batch
        order_base = order_ptr + batch * stride_order_batch

        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        total = tl.zeros([BLOCK_T], tl.float32)
        # Member m of every output in the tile at once. Each output still sums its own members
        # sequentially in input order: a fixed order, hence bit-reproducible results.
        for member in range(0, tl.max(count, axis=0)):
            present = member < count
            token = tl.load(order_base + first + member, mask=present, other=0)
            weight = tl.load(size_base + token * stride_size_token, mask=present, other=0.0)
            rows = tl.load(
                x_base + token[:, None] * stride_x_token + cols[None, :] * stride_x_channel,
                mask=present[:, None] & valid_c[None, :],
                other=0.0,
            )
            acc += rows.to(tl.float32) * weight[:, None]
            total += weight

        # An output of total size 0 (no members, or size-0 padding only) gets 0, as in the
        # reference; the tile's padding rows (never stored) divide by 1 as well.
        merged = acc / tl.where(valid_t & (total > 0.0), total, 1.0)[:, None]
        out_offsets = batch * stride_out_batch + out_tokens[:, None] * stride_out_token + cols[None, :]
        tl.store(out_ptr + out_offsets, merged.to(out_ptr.dtype.element_ty), mask=valid_t[:, None] & valid_c[None, :])
        # Every channel block computes the same totals; only the first one writes them. A branch,
        # not `mask=valid_t & (channel_block == 0)`: Triton 3.9's interpreter makes a block mask
        # and a scalar condition int32, and refuses it as a mask.
        if channel_block == 0:
            tl.store(new_size_ptr + batch * stride_new_size_batch + out_tokens, total, mask=valid_t)


def _check_inputs(x: Tensor, size: Tensor, dest: Tensor, num_out: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, C], got {tuple(x.shape)}")
    batch, tokens, _ = x.shape
    if size.shape != (batch, tokens, 1):
        raise ValueError(f"size must be [B, T, 1] = {(batch, tokens, 1)}, got {tuple(size.shape)}")
    if dest.shape != (batch, tokens):
        raise ValueError(f"dest must be [B, T] = {(batch, tokens)}, got {tuple(dest.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported x dtype {x.dtype}; expected float32/float16/bfloat16")
    if size.dtype != torch.float32:
        raise TypeError(f"size must be float32 (token counts), got {size.dtype}")
    if dest.dtype != torch.int64:
        raise TypeError(f"dest must be int64, got {dest.dtype}")
    if num_out < 0:
        raise ValueError(f"num_out must be ≥ 0, got {num_out}")


def _merge_wavg_forward(
    x: Tensor, size: Tensor, dest: Tensor, num_out: int, tile: tuple[int, int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """The kernel's forward, without autograd; ``tile`` (BLOCK_T, BLOCK_C, warps) bypasses
    autotuning (tests)."""
    return _launch(x, size, *MemberLists(dest).sorted(), num_out, tile)


def _launch(
    x: Tensor, size: Tensor, sorted_dest: Tensor, order: Tensor, num_out: int, tile: tuple[int, int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """The kernel on ``dest``'s stable sort (see :class:`MemberLists`)."""
    batch, tokens, channels = x.shape
    merged = torch.empty(batch, num_out, channels, device=x.device, dtype=x.dtype)
    new_size = torch.empty(batch, num_out, 1, device=x.device, dtype=torch.float32)
    if batch == 0 or num_out == 0:
        return merged, new_size
    # The kernel walks each row of the lists with unit stride. A sort of a transposed dest keeps
    # its strides (1, B); the assignment kernel's lists are contiguous already (no copy).
    sorted_dest, order = sorted_dest.contiguous(), order.contiguous()
    x = int32_offsets(x)  # (channel offsets are int32 in the kernel)

    # The inverse map is a stable sort of dest (MemberLists): it groups the inputs by
    # destination and keeps them in input order inside each group; the kernel finds each
    # group's [first, last) by binary search on the sorted destinations. dest must lie in
    # [0, num_out) (the contract; not checked, as that would synchronise): values outside it
    # fall outside every group here, but the backward's gather and the reference index them.
    def grid(meta: dict) -> tuple[int, int]:
        # At least one channel block: its programs write new_size, also for tokens of no channels.
        return (batch * cdiv(num_out, meta["BLOCK_T"]), max(1, cdiv(channels, meta["BLOCK_C"])))

    kernel, meta = _merge_wavg_kernel, {}
    if tile is not None:
        kernel = _merge_wavg_kernel.fn  # the jitted function under the autotuner
        meta = {"BLOCK_T": tile[0], "BLOCK_C": tile[1], "num_warps": tile[2]}
    with on_device(x):
        kernel[grid](
            x,
            size,
            order,
            sorted_dest,
            merged,
            new_size,
            tokens,
            num_out,
            next_power_of_2(num_out),
            tokens.bit_length(),  # = ceil(log2(tokens + 1))
            channels,
            *x.stride(),
            size.stride(0),
            size.stride(1),
            order.stride(0),
            sorted_dest.stride(0),
            merged.stride(0),
            merged.stride(1),
            new_size.stride(0),
            **meta,
        )
    return merged, new_size


class _MergeWAvg(torch.autograd.Function):
    """Triton forward; the backward is a gather (see :meth:`backward`)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, size: Tensor, dest: Tensor, num_out: int, sorted_dest: Tensor, order: Tensor
    ) -> tuple[Tensor, Tensor]:
        merged, new_size = _launch(x, size, sorted_dest, order, num_out)
        ctx.save_for_backward(size, dest, new_size)
        # Sizes are token counts: nothing upstream is trained through them.
        ctx.mark_non_differentiable(new_size)
        return merged, new_size

    @staticmethod
    def backward(ctx, grad_merged: Tensor, _grad_new_size: Tensor | None):
        """∂merged[o]/∂x[t] = size[t] / new_size[o] for o = dest[t], and 0 for every other o:
        each input receives exactly one output row, scaled. So the backward is
        ``grad_x[t] = grad_merged[dest[t]] * size[t] / new_size[dest[t]]``: a ``gather`` — one
        memory-bound kernel that reads one grad row per input token and writes grad_x once —
        times a [B, T, 1] coefficient. Unlike the forward it has no reduction, hence no
        ordering or atomics question, and a Triton version would move the same bytes (it could
        only fold the final elementwise multiply into the gather, which torch.compile does)."""
        size, dest, new_size = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            channels = grad_merged.shape[-1]
            # [B, T, 1] float32; a group of total size 0 (padding alone) gives 0, not 0/0
            coef = size / new_size.gather(1, dest.unsqueeze(-1)).clamp(min=_TINY)
            rows = grad_merged.gather(1, dest.unsqueeze(-1).expand(-1, -1, channels))
            grad_x = (rows.float() * coef).to(grad_merged.dtype)
        return grad_x, None, None, None, None, None


def merge_wavg_triton(
    x: Tensor, size: Tensor, dest: Tensor, num_out: int, members: MemberLists | None = None
) -> tuple[Tensor, Tensor]:
    """Deterministic Triton version of :func:`merge_wavg_reference` (same contract).

    Args:
        x: [B, T, C] fp32/fp16/bf16 tokens (any strides). size: [B, T, 1] float32 sizes.
        dest: [B, T] int64 in [0, num_out). num_out: number of output tokens.
        members: ``MemberLists(dest)``, to share its sort with other merges by ``dest``.
    Returns:
        ([B, num_out, C] size-weighted averages in x's dtype, [B, num_out, 1] float32 sizes).

    Accumulates in float32, each output's members summed in input order (bitwise
    reproducible). Differentiable in ``x``; ``size`` gets no gradient and ``new_size`` is
    marked non-differentiable (sizes are counts).
    """
    _check_inputs(x, size, dest, num_out)
    check_device(x, size, dest)
    if members is not None and members.dest is not dest:
        raise ValueError("members must be MemberLists(dest) of this very dest")
    # Sorted outside the autograd Function, which then takes tensors alone: torch.compile
    # traces a Function's forward without side effects, such as filling MemberLists' cache.
    return _MergeWAvg.apply(x, size, dest, num_out, *(members or MemberLists(dest)).sorted())


def merge_wavg(
    x: Tensor, size: Tensor, dest: Tensor, num_out: int, backend: str = "auto", members: MemberLists | None = None
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge (see :func:`merge_wavg_reference`) on the backend chosen by
    ``use_triton`` ("auto": Triton for CUDA tensors when triton imports). Dtypes outside
    fp32/fp16/bf16 take the reference. ``members``: ``MemberLists(dest)``, shared by the merges
    of one matching so that the kernel sorts ``dest`` once, or never where the matching laid the
    lists out (the reference needs no sort)."""
    check_backend(backend)  # (before the dtype test can skip use_triton, which checks it too)
    if x.dtype in _SUPPORTED_DTYPES and size.dtype == torch.float32 and use_triton(backend, x, size, dest):
        return merge_wavg_triton(x, size, dest, num_out, members)
    return merge_wavg_reference(x, size, dest, num_out)

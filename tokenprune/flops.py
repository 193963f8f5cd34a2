"""FLOPs of a reduced ViT from its per-block token counts.

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls, convolutions and
attention, 2 FLOPs per multiply-add), so the two agree on the PyTorch path (``backend="torch"``;
the counter cannot see inside Triton kernels, and on a CPU it does not count fused SDPA
attention either: compare under ``sdpa_kernel(SDPBackend.MATH)``); norms, activations and the
merge's gathers/scatters are left out. Papers' "GFLOPs" for ViTs are usually multiply-adds: half of
these figures (ViT-B/16 at 224²: 35.1 GFLOPs here, "17.6 GFLOPs" in the DeiT/ToMe papers).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from timm.layers import AttentionPoolPrr
from torch import nn

from .api import InputSize, input_tokens, patch_grid, plan
from .patch.vit import (
    ATTENTION_FORWARDS,
    BLOCK_FLOPS,
    block_prefix_tokens,
    classifies_every_token,
    family,
    head_dim,
    linear_flops,
    original_block_class,
    pool_includes_prefix,
    reducing_model,
    unwrap_runtime,
    wrapper_of,
)


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass: ``per_block`` (attention, MLP and the matching step of each
    block, a relative position bias between merged tokens and a relative-bias MLP) plus
    ``embed_and_head`` (patch embedding or convolutional stem, pooling (CaiT: its
    class-attention blocks) and classifier, and a relative-bias MLP shared by all blocks)."""

    per_block: tuple[int, ...]
    embed_and_head: int

    @property
    def total(self) -> int:
        return sum(self.per_block) + self.embed_and_head

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def _block_flops(
    block: nn.Module, tokens: int, removed: int, num_inputs: int, shared_bias: bool, grid: tuple[int, ...] | None = None
) -> int:
    block_flops = BLOCK_FLOPS.get(original_block_class(block))  # (parallel blocks: attention and MLP in one)
    if block_flops is not None:
        return block_flops(block, tokens, removed)
    attn = block.attn
    reducer = getattr(block, "reducer", None)
    step_for = getattr(reducer, "step_for", None)  # a reducer whose step depends on the input grid (temporal)
    if step_for is not None:
        reducer = step_for(grid)
    kept = tokens - removed
    # Merging runs between attention and MLP; pruning predictors run before attention.
    attended = kept if reducer is not None and reducer.before_attention else tokens
    mlp_tokens = kept
    if getattr(reducer, "unmerges_in_blocks", False):  # merge_unmerge: attention (and MLP) on merged tokens
        attended = tokens - reducer.merged_count(tokens)
        mlp_tokens = attended if reducer.merge_mlp else tokens
    # Every linear layer of the attention on the tokens: qkv (or q/k/v), proj, and the gate if
    # it has one (not those of a relative-bias MLP, which runs on coordinates: _bias_mlp_flops).
    # Talking heads (CaiT's proj_l, proj_w) mix the heads for every pair of tokens.
    flops = sum(
        linear_flops(attended * attended if name in ("proj_l", "proj_w") else attended, layer)
        for name, layer in attn.named_modules()
        if isinstance(layer, nn.Linear) and not name.startswith("rel_pos.")
    )
    forward = ATTENTION_FORWARDS.get(type(attn))  # (differential attention: two maps)
    if forward is not None:
        flops += forward.matmul_flops(attn, attended)
    else:
        flops += 4 * attended * attended * attn.num_heads * head_dim(attn)  # q·kᵀ and attn·v
    # Every linear layer of the MLP: fc1/fc2, or SwiGLU's fc1_g/fc1_x/fc2.
    flops += sum(linear_flops(mlp_tokens, layer) for layer in block.mlp.modules() if isinstance(layer, nn.Linear))
    if reducer is not None:
        flops += reducer.matching_flops(tokens, removed, attn)
    position_flops = getattr(block, "position_flops", None)  # BEiT, relpos: the bias between merged tokens
    if position_flops is not None:
        flops += position_flops(attended, num_inputs, shared_bias)
    return flops


def _bias_mlp_flops(rel_pos: nn.Module | None) -> int:
    """timm's ``RelPosMlp`` computes its relative position bias with an MLP over the relative
    coordinates, once per forward whatever the batch or token count."""
    mlp = getattr(rel_pos, "mlp", None)
    if mlp is None:
        return 0
    rows = rel_pos.rel_coords_log.shape[:-1].numel()
    return sum(linear_flops(rows, layer) for layer in mlp.modules() if isinstance(layer, nn.Linear))


def _head_flops(model: nn.Module, tokens: int, full_tokens: int, grid: tuple[int, ...]) -> int:
    flops = family(model).after_blocks_flops(model, tokens, grid)
    pool = getattr(model, "attn_pool", None)  # (BEiT has none)
    if isinstance(pool, AttentionPoolPrr):  # parameter-free self-attention over the tokens: q·kᵀ and attn·v
        flops += 4 * tokens * tokens * pool.num_heads * pool.head_dim
    elif pool is not None:
        pooled = tokens if pool_includes_prefix(model) else tokens - model.num_prefix_tokens
        latent, dim = pool.latent_len, pool.q.in_features
        flops += linear_flops(latent, pool.q) + linear_flops(pooled, pool.kv) + linear_flops(latent, pool.proj)
        flops += 4 * latent * pooled * dim
        if pool.mlp is not None:
            flops += linear_flops(latent, pool.mlp.fc1) + linear_flops(latent, pool.mlp.fc2)
    # Without pooling (global_pool="") the classifier runs on every token of the full grid (a
    # patched model unmerges its tokens first, as timm's output has one row per input token).
    classified = full_tokens if classifies_every_token(model) else 1
    for head in (getattr(model, "head", None), getattr(model, "head_dist", None)):  # (Qwen3's encoder has none)
        if isinstance(head, nn.Linear):
            flops += linear_flops(classified, head)
    return flops


def flops(model: nn.Module, input_size: InputSize, batch_size: int | None = None) -> FlopReport:
    """FLOPs of ``model`` (patched or not) on ``batch_size`` images (or clips) of ``input_size``,
    default 1. NaFlexVit: ``input_size`` may be packed patches themselves (the dict), every
    position counted, padding too, as the model computes it; ``batch_size`` then defaults to
    the pack's sequences. Counted from :func:`tokenprune.plan`, hence for inference (DynamicViT
    training computes on every token)."""
    if batch_size is None:
        batch_size = int(input_size["patches"].shape[0]) if isinstance(input_size, dict) else 1
    # Any whole number, as input_size takes one (a NumPy integer from a sweep or a config too).
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return _flops(unwrap_runtime(model), input_size, int(batch_size), with_head=True)


def _flops(model: nn.Module, input_size: InputSize, batch_size: int, with_head: bool) -> FlopReport:
    wrapper = wrapper_of(model)
    if wrapper is not None:  # the inner model's FLOPs (its head if the wrapper runs it) and the wrapper's head
        inner = getattr(model, wrapper.attribute)
        report = _flops(inner, input_size, batch_size, with_head=with_head and wrapper.runs_inner_head)
        patches = input_tokens(inner, input_size) - block_prefix_tokens(reducing_model(inner))
        return FlopReport(report.per_block, report.embed_and_head + batch_size * wrapper.head_flops(model, patches))
    reduction = plan(model, input_size)
    protected = block_prefix_tokens(model)
    shared_bias = getattr(model, "_shared_position_bias", False)  # a relative bias all blocks share
    on_grid = getattr(family(model), "blocks_flops", None)  # blocks that run on the patch grid (SAM)
    grid = patch_grid(model, input_size)
    if on_grid is not None:
        per_block = tuple(batch_size * flops for flops in on_grid(model, grid))
    else:
        per_block = tuple(
            batch_size * _block_flops(block, tokens, removed, reduction.tokens[0], shared_bias, grid)
            + _bias_mlp_flops(getattr(getattr(block, "attn", None), "rel_pos", None))
            for block, tokens, removed in zip(model.blocks, reduction.tokens, reduction.removed)
        )
    patches = input_tokens(model, input_size) - protected
    # the grid a head without pooling classifies (CaiT's class token joins after the blocks; SAM has none)
    full_tokens = patches + getattr(model, "num_prefix_tokens", 0)
    head = _head_flops(model, reduction.head_tokens, full_tokens, grid) if with_head else 0
    fixed = batch_size * (_embed_flops(model, input_size, patches) + head)
    fixed += _bias_mlp_flops(getattr(model, "shared_rel_pos", None))
    return FlopReport(per_block, fixed)


def _embed_flops(model: nn.Module, input_size: InputSize, patches: int) -> int:
    embed = family(model).patch_embedding(model)
    if isinstance(embed.proj, nn.Linear):  # NaFlexVit's linear embedding of flattened patches
        return linear_flops(patches, embed.proj)
    if isinstance(embed.proj, (nn.Conv2d, nn.Conv3d)) and getattr(embed, "backbone", None) is None:
        # One patchifying convolution, Conv2d (images) or Conv3d (video tubelets): every kernel
        # dimension counts.
        proj = embed.proj
        return 2 * patches * proj.out_channels * proj.in_channels * math.prod(proj.kernel_size)
    # A convolutional stem (hybrid ViTs: a ResNet, ViTamin's MbConv stages): counted as
    # FlopCounterMode counts it, on one image of the input size.
    from torch.utils.flop_counter import FlopCounterMode

    size = (input_size, input_size) if isinstance(input_size, numbers.Integral) else tuple(input_size[-2:])
    weight = next(embed.parameters())
    channels = next(m.in_channels for m in embed.modules() if isinstance(m, nn.Conv2d))  # in_chans=1 stems too
    image = torch.zeros(1, channels, *size, device=weight.device, dtype=weight.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        embed(image)
    return counter.get_total_flops()

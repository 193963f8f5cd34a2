"""An independent reference of published ToMe (Bolya et al., ICLR 2023) for timm ViTs.

Written from the paper and ../shared/anchors.md in ToMe's own formulation, deliberately unlike
tokenprune's: manual softmax attention with log(size) added to the scaled logits, protected
tokens masked with −inf, merging by gather + scatter_reduce("sum") + concat, output order
[unmerged A, B] with the class token sorted first. Like the published code it ignores
LayerScale, so use it on models without LayerScale (ViT, DeiT).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _match(metric: Tensor, r: int, class_token: bool, distill_token: bool, sort_unmerged: bool | None = None):
    """ToMe's matching; ``sort_unmerged`` (default: with a class token, as published) keeps the
    unmerged A tokens in their original order. Published ToMe leaves them in score order without
    a class token; tokenprune keeps the original order always."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    if class_token if sort_unmerged is None else sort_unmerged:
        unm_idx = unm_idx.sort(dim=1).values

    def merge(x: Tensor, mode: str) -> Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(1, unm_idx.expand(n, t1 - r, c))
        src = src.gather(1, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def _attention(attn, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, num_tokens, channels = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, num_tokens, channels)
    return attn.proj(out), k.mean(1)


def tome_schedule(r, depth: int) -> list[int]:
    """Published ToMe's per-block r: a constant, or for (r, inflection) the ramp from
    int(r·(1 − inflection)) to 2r minus that, each block's value truncated toward zero."""
    if isinstance(r, int):
        return [r] * depth
    base, inflection = r
    start = int(base * (1.0 - inflection))
    end = 2 * base - start
    return [int(start + (end - start) / (depth - 1) * block) for block in range(depth)]


@torch.no_grad()
def tome_reference_forward(
    model, x: Tensor, r_per_block: list[int], prop_attn: bool = True, match=None, tokens: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Logits of an unpatched timm ViT run as published ToMe would run it. ``match(metric, r,
    block_index)`` replaces ToMe's matching with another that returns a ``merge(x, mode)`` over
    the whole sequence (PiToMe's released code runs this same block). ``tokens``: return the
    final tokens (after the norm) and their sizes instead, in the reference's order."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    size = None
    for index, (block, r) in enumerate(zip(model.blocks, r_per_block)):
        attn_out, metric = _attention(block.attn, block.norm1(x), size if prop_attn else None)
        x = x + attn_out
        if r > 0:
            merge = _match(metric, r, class_token, distill_token) if match is None else match(metric, r, index)
            size = torch.ones_like(x[..., :1]) if size is None else size
            x = merge(x * size, "sum")
            size = merge(size, "sum")
            x = x / size
        x = x + block.mlp(block.norm2(x))
    if tokens:
        return model.norm(x), torch.ones_like(x[..., :1]) if size is None else size
    return model.forward_head(model.norm(x))

"""timm VisionTransformerRelPos (``vit_relpos_*``): ToMe against an independent reference with
the relative position bias following merged tokens. (Exactness at r=0, merge invariants, FLOPs
and compilation run for the relpos families of tests/test_patch.py.)"""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer_relpos import ResPostRelPosBlock

import tokenprune
from tests.test_patch import image, make
from tests.tome_reference import _match
from tokenprune.schedule import resolve_r


@torch.no_grad()
def relpos_tome_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output tokens and sizes of an unpatched timm VisionTransformerRelPos run as published
    ToMe would run it, the bias following the merged tokens: a dense membership matrix W turns
    the bias B into W B Wᵀ, swapped into timm's own attention module (``get_bias`` of its
    ``rel_pos``, or its ``shared_rel_pos`` argument) together with proportional attention; the
    keys come from a hook on ``k_norm``; merging is ToMe's published matching."""
    x = model.patch_embed(x)
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
    batch, num_tokens, _ = x.shape
    size = torch.ones(batch, num_tokens, 1)
    member = torch.eye(num_tokens).expand(batch, -1, -1)
    post_norm = isinstance(model.blocks[0], ResPostRelPosBlock)
    for block, r in zip(model.blocks, r_per_block):
        attn = block.attn
        w = (member / member.sum(-1, keepdim=True)).unsqueeze(1)
        key_bias = size.log()[:, None, None, :, 0]
        keys: list[torch.Tensor] = []
        hook = attn.k_norm.register_forward_hook(lambda module, args, out: keys.append(out))
        h = x if post_norm else block.norm1(x)
        if attn.rel_pos is not None:
            own = attn.rel_pos.get_bias()
            attn.rel_pos.get_bias = lambda own=own, w=w, key_bias=key_bias: w @ own @ w.transpose(-1, -2) + key_bias
            attn_out = attn(h)
            del attn.rel_pos.get_bias
        else:
            attn_out = attn(h, shared_rel_pos=w @ shared @ w.transpose(-1, -2) + key_bias)
        hook.remove()
        x = x + (block.norm1(attn_out) if post_norm else block.ls1(attn_out))
        if r:
            # (unmerged tokens in their original order, class token or not: tokenprune's order)
            merge = _match(keys[0].mean(1), r, model.cls_token is not None, False, sort_unmerged=True)
            x, member, size = merge(x * size, "sum"), merge(member, "sum"), merge(size, "sum")
            x = x / size
        x = x + (block.norm2(block.mlp(x)) if post_norm else block.ls2(block.mlp(block.norm2(x))))
    return model.norm(x), size


@pytest.mark.parametrize("family", ["relpos_mlp_cls", "relpos_table", "relpos_shared_res_post"])
@pytest.mark.parametrize("r", [8, (16, -1)])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_the_reference_with_relative_position_bias(family: str, r, fused: bool) -> None:
    model = make(family)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    x = image()
    tokens, size = relpos_tome_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
    assert state.num_tokens == tokenprune.plan(model, 224).output_tokens < tokenprune.plan(model, 224).tokens[0]
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)

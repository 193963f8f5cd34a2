"""timm Cait (CaiT): talking-heads attention and class attention over merged tokens, against a
reference that attends over the *unmerged* token grid with timm's own modules."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tests.test_patch import counted_flops, image
from tests.tome_reference import _match
from tokenprune.merge import TokenState
from tokenprune.schedule import resolve_r

GRID = 14 * 14


def cait(**extra) -> torch.nn.Module:
    """A small random CaiT whose LayerScale and talking-heads mixing are far from their
    initialisation (γ ~ 1e-5 and head mixing ~ 0 would hide errors in either)."""
    torch.manual_seed(0)
    kwargs = {"depth": 4, "num_classes": 10, **extra}
    model = timm.create_model("cait_xxs24_224", **kwargs).eval()
    generator = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gamma_1", "gamma_2"):
            param.data.uniform_(0.5, 1.5, generator=generator)
        elif ".proj_l." in name or ".proj_w." in name:
            heads = param.shape[0]
            noise = torch.randn(param.shape, generator=generator)
            param.data = (torch.eye(heads) + 0.3 * noise) if leaf == "weight" else 0.5 * noise
    return model


@torch.no_grad()
def cait_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, sizes and logits of an unpatched timm Cait run with ToMe's published matching,
    proportional attention taken literally: every attention (talking heads, class attention)
    runs as timm's own module over the unmerged grid, each merged token repeated once per patch
    it covers, so a merged token is attended to as the s patches it stands for.

    Written unlike tokenprune: a dense membership matrix (merged token × patch) expands the
    tokens to the grid; no log s bias, no weighted head-mixing bias.
    """
    x = model.pos_drop(model.patch_embed(x) + model.pos_embed)
    batch, num_patches, _ = x.shape
    member = torch.eye(num_patches).expand(batch, -1, -1)  # [B, T, N]

    def on_grid(tokens: torch.Tensor) -> torch.Tensor:  # every patch carries its merged token
        return member.transpose(1, 2) @ tokens

    def per_token(full: torch.Tensor) -> torch.Tensor:  # back to one row per merged token
        return (member @ full) / member.sum(-1, keepdim=True)

    for block, r in zip(model.blocks, r_per_block):
        h = block.norm1(x)
        x = x + block.gamma_1 * per_token(block.attn(on_grid(h)))
        if r:
            keys = block.attn.qkv(h).reshape(batch, x.shape[1], 3, block.attn.num_heads, -1)[:, :, 1].mean(2)
            merge = _match(keys, r, class_token=False, distill_token=False, sort_unmerged=True)
            size = member.sum(-1, keepdim=True)
            x, member = merge(x * size, "sum"), merge(member, "sum")
            x = x / member.sum(-1, keepdim=True)
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    cls = model.cls_token.expand(batch, -1, -1)
    full = on_grid(x)
    for block in model.blocks_token_only:
        cls = block(full, cls)  # timm's class attention over the grid
    size = torch.cat([torch.ones(batch, 1, 1), member.sum(-1, keepdim=True)], dim=1)
    features = model.norm(torch.cat([cls, x], dim=1))
    if model.global_pool == "avg":
        pooled = model.norm(torch.cat([cls, full], dim=1))[:, 1:].mean(1)
    else:
        pooled = features[:, 0]
    return features, size, model.head(pooled)


@pytest.mark.parametrize("r", [8, (16, -1)])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_matches_the_reference(r, global_pool: str) -> None:
    model = cait(global_pool=global_pool)
    x = image()
    features, size, logits = cait_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        out = model(x)
    # the blocks merge patches only; the class token joins after them, unmerged
    assert state.num_tokens == 1 + tokenprune.plan(model, 224).output_tokens < 1 + GRID
    torch.testing.assert_close(state.x, features, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)
    torch.testing.assert_close(out, logits, atol=1e-4, rtol=1e-4)


def test_r0_is_bit_identical_and_unpatch_restores() -> None:
    model = cait()
    x = image()
    with torch.no_grad():
        expected, features = model(x), model.forward_features(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected) and torch.equal(model.forward_features(x), features)
        tokenprune.patch(model, r=8)
        assert not torch.allclose(model(x), expected)
        tokenprune.unpatch(model)
        assert torch.equal(model(x), expected)
        assert type(model) is timm.models.cait.Cait


@pytest.mark.parametrize("part", ["block", "attn"])
def test_hooks_on_class_attention_are_refused_rather_than_silently_skipped(part: str) -> None:
    """Over merged tokens the patch runs CaiT's class attention itself (to count each token by
    its size), never the block's or its attn's forward: a hook there (CaiT's class-attention
    maps) fired unpatched and at r=0, then stopped firing, silently, once tokens merged. patch
    refuses it and one put on after patching raises in a merging forward; the submodules the
    error names still run, and see what the unpatched model's do at r=0."""
    model = cait(depth=2, img_size=64)
    x = image(size=64)
    module = model.blocks_token_only[1] if part == "block" else model.blocks_token_only[1].attn
    handle = module.register_forward_hook(lambda module, args, out: None)
    name = "blocks_token_only\\[1\\]" + ("" if part == "block" else "\\.attn")
    with pytest.raises(TypeError, match=name + " has forward hooks, which would stop firing"):
        tokenprune.patch(model, r=4)
    assert type(model) is timm.models.cait.Cait
    handle.remove()

    captured = []
    model.blocks_token_only[1].attn.proj.register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=4)
        handle = module.register_forward_pre_hook(lambda module, args: None)
        with pytest.raises(RuntimeError, match=name + " has forward hooks, which would stop firing"):
            model(x)
        handle.remove()
        merged = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
    assert len(captured) == 3 and torch.equal(captured[2], captured[0])
    assert captured[1].shape == captured[0].shape and not torch.equal(captured[1], captured[0])
    assert not torch.allclose(merged, expected)


def test_hooks_on_talking_heads_weight_mixing_are_refused_rather_than_silently_skipped() -> None:
    """Over merged tokens talking heads mix the attention weights without calling attn.proj_w
    (its bias counts once per patch a key covers): a hook there fired unpatched, then stopped
    firing, silently. patch refuses it, and one put on after patching raises in a merging forward."""
    model = cait(depth=2, img_size=64)
    handle = model.blocks[1].attn.proj_w.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(TypeError, match=r"blocks\[1\]\.attn\.proj_w \(talking heads' mixing"):
        tokenprune.patch(model, r=4)
    assert type(model) is timm.models.cait.Cait
    handle.remove()
    tokenprune.patch(model, r=4)
    model.blocks[1].attn.proj_w.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(RuntimeError, match="attn.proj_w .* has forward hooks, which would stop firing"), torch.no_grad():
        model(image(size=64))


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_an_empty_batch_runs_as_in_timm(global_pool: str) -> None:
    """timm's Cait takes a batch of 0 images (an uneven shard's last batch): so does the patched
    one, whose class attention over merged tokens reshapes by the token count, not -1."""
    model = cait(global_pool=global_pool)
    x = image(batch=0)
    with torch.no_grad():
        expected, features = model(x), model.forward_features(x)
        tokenprune.patch(model, r=8)
        out = model(x)
        assert out.shape == expected.shape == (0, 10) and torch.equal(out, expected)
        assert model.forward_features(x).shape == (0, 1 + GRID - 4 * 8, features.shape[-1])


def test_source_map_puts_the_class_token_first() -> None:
    model = tokenprune.patch(cait(), r=(12, -1), trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        full = model.forward_features(image(), unmerge=True)
    source = tokenprune.source(model)
    assert source.shape == (2, state.num_tokens, 1 + GRID)
    assert torch.equal(source.sum(dim=-1).float(), state.size[..., 0])
    assert torch.equal(source.sum(dim=1), torch.ones(2, 1 + GRID, dtype=source.dtype))
    assert torch.equal(source[:, 0], torch.eye(1, 1 + GRID, dtype=source.dtype)[0].expand(2, -1))
    assert full.shape == (2, 1 + GRID, state.x.shape[-1])
    torch.testing.assert_close(full[:, 0], state.x[:, 0])


def test_intermediates_are_patch_grids() -> None:
    model = tokenprune.patch(cait(), r=8)
    with torch.no_grad():
        final, maps = model.forward_intermediates(image(), indices=[1, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 192, 14, 14)] * 2
    assert final.shape == (2, 1 + GRID, 192)


@pytest.mark.parametrize(("method", "options"), [
    ("tome", {"r": 8}),
    ("tome", {"r": (16, -1)}),
    ("pitome", {"r": 8}),
    ("local_global", {"r": 4, "local_block": 1}),
    ("dynamicvit", {"keep_ratio": 0.7, "stages": (1, 2)}),
])
def test_flops_agree_with_flop_counter(method: str, options: dict) -> None:
    model = cait(global_pool="avg").requires_grad_(False)
    tokenprune.patch(model, method, **options)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_unpatched_flops_agree_with_flop_counter() -> None:
    model = cait().requires_grad_(False)
    assert tokenprune.flops(model, 224).total == counted_flops(model, image(1))


def test_dynamicvit_trains_and_infers() -> None:
    model = cait()
    tokenprune.patch(model, "dynamicvit", keep_ratio=0.5, stages=(1, 2))
    with torch.no_grad():
        state = model.forward_tokens(image())
    kept = tokenprune.plan(model, 224).output_tokens
    assert kept == GRID // 4 and state.num_tokens == 1 + kept
    model.train()
    output = tokenprune.methods.dynamicvit.forward_train(model, image())
    assert output.tokens.shape == (2, GRID, 192) and output.decisions[-1].shape == (2, GRID, 1)
    output.logits.sum().backward()
    predictor = model.blocks[1].reducer
    assert predictor.out_conv[-1].weight.grad.abs().sum() > 0


def test_a_keep_mask_hides_dropped_tokens_from_talking_heads() -> None:
    """DynamicViT's training mask: kept tokens attend as if the dropped ones were gone, even
    through talking heads' post-softmax mixing, whose bias must skip dropped keys."""
    model = tokenprune.patch(cait(), "dynamicvit", keep_ratio=0.5, stages=(1,))
    block = model.blocks[0]
    x = torch.randn(2, 20, 192, generator=torch.Generator().manual_seed(3))
    keep = (torch.arange(20) % 3 != 0).float().expand(2, -1)[..., None]
    with torch.no_grad():
        masked = block(TokenState(x, keep=keep)).x
        alone = block(TokenState(x[:, keep[0, :, 0] > 0])).x
    torch.testing.assert_close(masked[:, keep[0, :, 0] > 0], alone, atol=1e-5, rtol=1e-5)


def test_class_attention_masks_dropped_tokens() -> None:
    """With a training keep mask the class token ignores dropped tokens: the logits equal
    those of a model that never had them."""
    from tokenprune.patch.cait import class_attention

    model = cait()
    block = model.blocks_token_only[0]
    x = torch.randn(2, 20, 192, generator=torch.Generator().manual_seed(4))
    cls = torch.randn(2, 1, 192, generator=torch.Generator().manual_seed(5))
    keep = (torch.arange(20) % 4 != 1).float().expand(2, -1)[..., None]
    with torch.no_grad():
        masked = class_attention(block, x, cls, keep)
        alone = block(x[:, keep[0, :, 0] > 0], cls)
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)


def test_fullgraph_capture() -> None:
    torch._dynamo.reset()
    model = tokenprune.patch(cait(global_pool="avg"), r=(8, -1))
    with torch.no_grad():
        expected = model(image())
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(image()), expected, atol=1e-5, rtol=1e-5)


def test_average_pooling_needs_the_sizes() -> None:
    model = tokenprune.patch(cait(global_pool="avg"), r=8)
    with torch.no_grad():
        state = model.forward_tokens(image())
        torch.testing.assert_close(model.forward_head(state.x, size=state.pool_weights), model(image()))
        with pytest.raises(ValueError, match="needs the token sizes"):
            model.forward_head(state.x)


def test_class_token_methods_refuse_clearly() -> None:
    with pytest.raises(ValueError, match=r"class token in the blocks, and Cait has none there \(it adds its class token after them\)"):
        tokenprune.patch(cait(), "evit")


def test_pruned_for_intermediates_runs_without_class_attention() -> None:
    model = cait()
    model.prune_intermediate_layers(indices=2)
    tokenprune.patch(model, r=8)
    with torch.no_grad():
        features = model.forward_features(image())
    assert features.shape == (2, tokenprune.plan(model, 224).output_tokens, 192)


def test_unknown_class_attention_is_refused() -> None:
    model = cait()
    model.blocks_token_only[0].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="blocks_token_only\\[0\\]"):
        tokenprune.patch(model, r=8)


def test_float16_class_attention_keeps_the_keep_mask_gradient() -> None:
    """A dropped token keeps ~1e-9 of its attention weight, below float16's range: the class
    attention takes its softmax in float32 there, so the gradient that trains DynamicViT's
    predictors reaches dropped tokens in float16 as in float32."""
    from tokenprune.patch.cait import class_attention

    block = cait().blocks_token_only[0]
    x = torch.randn(2, 20, 192, generator=torch.Generator().manual_seed(4))
    cls = torch.randn(2, 1, 192, generator=torch.Generator().manual_seed(5))
    dropped = torch.arange(20) % 4 == 1
    grads = {}
    for dtype in (torch.float32, torch.float16):
        keep = (~dropped).to(dtype).expand(2, -1)[..., None].clone().requires_grad_(True)
        class_attention(block.to(dtype), x.to(dtype), cls.to(dtype), keep).float().sum().backward()
        grads[dtype] = keep.grad[:, dropped].float()
    assert grads[torch.float32].abs().sum() > 0
    torch.testing.assert_close(grads[torch.float16], grads[torch.float32], atol=2e-2, rtol=2e-2)


def test_wrong_image_size_names_the_remedy() -> None:
    model = tokenprune.patch(cait(), r=8)
    with pytest.raises(ValueError, match=r"takes 224x224 images, got 256x256; create it with img_size=\(256, 256\)"):
        model(image(1, 256))
    with pytest.raises(ValueError, match="img_size="):
        tokenprune.plan(model, 256)


def test_intermediates_take_timms_positional_order() -> None:
    """timm's Cait takes (x, indices, norm, ...): a positional norm=True stays norm=True."""
    model = cait()
    x = image()
    with torch.no_grad():
        expected_final, expected = model.forward_intermediates(x, [0, 2], True)
        tokenprune.patch(model, r=0)
        final, maps = model.forward_intermediates(x, [0, 2], True)
    assert torch.equal(final, expected_final)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))

"""timm's Qwen3 ViT (the Qwen3-VL vision encoder, bare or in its classifier): ToMe against an
independent reference with its 2-D RoPE following merged tokens; timm's outputs (the patch
grid, the VLM projector, the mean over the grid) from the unmerged grid; exactness at r=0,
FLOPs, sizes, intermediates and clear errors."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tests.test_patch import counted_flops
from tests.tome_reference import _match
from tokenprune.schedule import resolve_r

SMALL = {"depth": 3, "embed_dim": 192, "num_heads": 3, "img_size": 256}
FAMILIES = {
    "encoder_projector": ("qwen3_vit_88m_enc", {}),  # the VLM's tokens: 2x2 patches -> one LLM token
    "encoder_avg": ("qwen3_vit_88m_enc", {"global_pool": "avg"}),
    "encoder_grid": ("qwen3_vit_88m_enc", {"global_pool": ""}),
    "classifier": ("qwen3_vit_88m", {"num_classes": 10}),
    "classifier_projector": ("qwen3_vit_88m_merge", {"num_classes": 10}),
}
SIZE = (256, 192)  # not square, not the position embedding's 48 x 48 grid


def qwen(family: str, **extra) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kwargs, **extra}).eval()


def images(batch: int = 2, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def qwen_tome_reference(encoder, x: torch.Tensor, r_per_block: list[int]):
    """Merged tokens, sizes and the unmerged [B, H, W, C] grid of an unpatched Qwen3 ViT
    encoder run as published ToMe would run it, RoPE following the merged tokens.

    Written unlike tokenprune: a dense membership matrix (token × patch) merged along with the
    tokens gives each token's RoPE as the mean of its patches' rows and puts the grid back
    together at the end; timm's own attention module runs with that RoPE and proportional
    attention as its float mask; the keys come from a hook on its ``k_norm`` (before RoPE);
    merging is ToMe's published matching (no protected token, unmerged tokens in order)."""
    x = encoder.patch_embed(x)
    batch, height, width, _ = x.shape
    x, rope = encoder._pos_embed(x)
    num_tokens = x.shape[1]
    size = torch.ones(batch, num_tokens, 1)
    member = torch.eye(num_tokens).expand(batch, -1, -1)
    for block, r in zip(encoder.blocks, r_per_block):
        block_rope = (member / member.sum(-1, keepdim=True)).unsqueeze(1) @ rope
        keys: list[torch.Tensor] = []
        hook = block.attn.k_norm.register_forward_hook(lambda module, args, out: keys.append(out))
        x = x + block.attn(block.norm1(x), rope=block_rope, attn_mask=size.log()[:, None, None, :, 0])
        hook.remove()
        if r:
            merge = _match(keys[0].mean(1), r, class_token=False, distill_token=False, sort_unmerged=True)
            x, member, size = merge(x * size, "sum"), merge(member, "sum"), merge(size, "sum")
            x = x / size
        x = x + block.mlp(block.norm2(x))
    grid = (member.transpose(1, 2) @ x).reshape(batch, height, width, -1)
    return x, size, grid


@pytest.mark.parametrize("r", [8, (16, -1)])
def test_matches_the_reference_with_rope(r) -> None:
    model = qwen("encoder_projector")
    x = images()
    tokens, size, grid = qwen_tome_reference(model, x, list(resolve_r(r, len(model.blocks))))
    with torch.no_grad():
        projected = model.merger(grid)
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        features, out = model.forward_features(x), model(x)
    assert state.num_tokens == tokenprune.plan(model, SIZE).output_tokens < 16 * 12
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)
    torch.testing.assert_close(features, grid, atol=1e-4, rtol=1e-4)  # timm's [B, H, W, C] grid
    torch.testing.assert_close(out, projected, atol=1e-4, rtol=1e-4)  # the LLM's 8 x 6 tokens
    assert out.shape == (2, 8 * 6, model.merger.out_features)


@pytest.mark.parametrize("family", ["encoder_avg", "classifier"])
def test_the_mean_over_the_grid_weighs_merged_tokens_by_size(family: str) -> None:
    model = qwen(family)
    encoder = getattr(model, "encoder", model)
    x = images()
    tokens, size, _ = qwen_tome_reference(encoder, x, list(resolve_r(8, len(encoder.blocks))))
    pooled = (tokens * size).sum(1) / size.sum(1)
    expected = pooled if model is encoder else model.head(model.norm(pooled))
    tokenprune.patch(model, r=8, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_r0_is_bit_identical_and_unpatch_restores(family: str) -> None:
    model = qwen(family)
    x = images()
    with torch.no_grad():
        expected = model(x)
        assert tokenprune.patch(model, r=0) is model
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        assert not torch.allclose(model(x), expected)
        tokenprune.unpatch(model)
        assert torch.equal(model(x), expected)
    encoder = getattr(model, "encoder", model)
    assert type(encoder) is timm.models.qwen3_vit.Qwen3VitEncoder
    assert not hasattr(encoder, "tokenprune_config") and not hasattr(encoder.blocks[0], "reducer")


@pytest.mark.parametrize("family", ["encoder_projector", "classifier"])
def test_sizes_and_source_map(family: str) -> None:
    model = tokenprune.patch(qwen(family), r=(12, -1), trace_source=True)
    encoder = getattr(model, "encoder", model)
    with torch.no_grad():
        state = encoder.forward_tokens(images())
        model(images())
    assert tokenprune.plan(model, SIZE).tokens[0] == 16 * 12
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), 16.0 * 12))
    source = tokenprune.source(model)
    assert source.shape == (2, state.num_tokens, 16 * 12)
    assert torch.equal(source.sum(dim=-1).float(), state.size[..., 0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["tome", "pitome", "local_global"])
def test_flops_agree_with_flop_counter(family: str, method: str) -> None:
    model = qwen(family).requires_grad_(False)
    options = {"r": 4, "local_block": 0} if method == "local_global" else {"r": (8, -1)}
    tokenprune.patch(model, method, **options)
    assert tokenprune.flops(model, SIZE, batch_size=2).total == counted_flops(model, images())


def test_image_sizes_are_the_ones_timm_takes() -> None:
    """Any size of whole patches (the position embedding is resampled to the grid); the VLM
    projector, where it runs, needs a grid its 2x2 blocks tile, as timm's does."""
    projector = tokenprune.patch(qwen("encoder_projector"), r=8)
    averaged = tokenprune.patch(qwen("encoder_avg"), r=8)
    odd = images(1, (208, 176))  # a 13 x 11 grid
    with torch.no_grad():
        assert projector(images(1, (160, 288))).shape == (1, 5 * 9, projector.merger.out_features)
        assert averaged(odd).shape == (1, 192)
        assert projector.forward_features(odd).shape == (1, 13, 11, 192)  # as timm's
        assert tokenprune.plan(projector, (208, 176)).tokens[0] == 13 * 11
        with pytest.raises(ValueError, match="projector joins 2x2 blocks .* multiples of 32x32; got a 13x11 patch grid"):
            projector(odd)
        with pytest.raises(ValueError, match="got a 13x11 patch grid"):
            tokenprune.flops(projector, (208, 176))
        with pytest.raises(ValueError, match="multiples of its 16x16 patches, got 200x176"):
            tokenprune.plan(averaged, (200, 176))


def test_forward_intermediates() -> None:
    """On the full grid, in timm's formats; at r=0 timm's own values."""
    model = qwen("classifier")
    x = images()
    with torch.no_grad():
        expected_final, expected = model.forward_intermediates(x, indices=[0, 2])
        tokenprune.patch(model, r=0)
        final, intermediates = model.forward_intermediates(x, indices=[0, 2])
        assert torch.equal(final, expected_final) and all(map(torch.equal, intermediates, expected))
        tokenprune.patch(model, r=16)
        final, intermediates = model.forward_intermediates(x, indices=[0, 2])
        out = model.encoder.forward_intermediates(x, indices=2, output_fmt="NLC", output_dict=True)
    assert final.shape == (2, 16, 12, 192) and [t.shape for t in intermediates] == [(2, 192, 16, 12)] * 2
    assert out["image_features"].shape == (2, 16, 12, 192)
    assert [t.shape for t in out["image_intermediates"]] == [(2, 16 * 12, 192)] * 2


@pytest.mark.parametrize("method,options", [("dynamicvit", {}), ("evit", {"fuse": False})])
def test_token_dropping_is_refused(method: str, options: dict) -> None:
    with pytest.raises(TypeError, match="drops tokens, but the Qwen3 ViT's outputs .* read every patch position"):
        tokenprune.patch(qwen("classifier"), method, **options)


def test_fullgraph_capture() -> None:
    model = tokenprune.patch(qwen("encoder_projector"), r=(8, -1))
    x = images()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected)


def test_projector_refuses_a_grid_whose_columns_do_not_tile() -> None:
    """Rows tile into 2x2 blocks but columns do not (12 x 11): refused as for 13 x 11."""
    projector = tokenprune.patch(qwen("encoder_projector"), r=8)
    with torch.no_grad(), pytest.raises(ValueError, match="got a 12x11 patch grid"):
        projector(images(1, (192, 176)))
    with pytest.raises(ValueError, match="got a 12x11 patch grid"):
        tokenprune.flops(projector, (192, 176))


def test_the_classifier_names_where_a_grid_the_projector_cannot_tile_runs() -> None:
    """The classifier's forward_features is the encoder's forward, projector included, so it
    refuses the grid too: the error names the encoder's forward_features, which takes it."""
    classifier = tokenprune.patch(qwen("classifier_projector"), r=8)
    odd = images(1, (208, 176))
    with torch.no_grad():
        for ask in (classifier, classifier.forward_features):
            with pytest.raises(ValueError, match=r"13x11 patch grid \(the encoder's forward_features and forward_tokens take it\)"):
                ask(odd)
        assert classifier.encoder.forward_features(odd).shape == (1, 13, 11, 192)
        assert classifier.encoder.forward_tokens(odd).num_tokens == 13 * 11 - 3 * 8

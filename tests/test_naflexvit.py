"""timm NaFlexVit (SigLIP 2 NaFlex, RADIO) on image batches of any size: merging against the
unpatched model's own modules run on the unmerged token grid."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import tokenprune
from tests.test_patch import counted_flops
from tokenprune.schedule import resolve_r

SMALL = {"depth": 3, "embed_dim": 192, "num_heads": 3, "num_classes": 10}
FAMILIES = {
    "gap_registers": ("naflexvit_base_patch16_gap", {}),  # 4 registers, average pooling
    "siglip_map": ("naflexvit_base_patch16_siglip", {}),  # no prefix, attention pooling
    "radio_token": ("naflexvit_base_patch16_radio_v3", {}),  # class token + 7 registers
    "factorized_pos": ("naflexvit_base_patch16_parfac_gap", {}),
    "conv_embed": ("naflexvit_base_patch16_gap", {"embed_proj_type": "conv"}),
    # RoPE: EvaBlocks, the rotary embedding follows merged tokens as in timm's Eva
    "rope_axial": ("naflexvit_base_patch16_gap", {"rope_type": "axial", "pos_embed": "none"}),
    "rope_mixed": ("naflexvit_base_patch16_gap", {"rope_type": "mixed", "pos_embed": "none"}),
    "pre_norm": ("naflexvit_base_patch16_gap", {"pre_norm": True}),
}
WITHOUT_ROPE = [family for family in FAMILIES if not family.startswith("rope")]
SIZE = (224, 160)  # not square, and not the position embedding's grid


def naflex(family: str, **extra) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **{**SMALL, **kwargs, **extra}).eval()
    for param_name, param in model.named_parameters():  # LayerScale away from its 1e-5 start
        if param_name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
            param.data.uniform_(0.5, 1.5)
    return model


def images(batch: int = 2, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def _protected_match(metric: torch.Tensor, r: int, protected: int):
    """ToMe's matching with ``protected`` leading tokens: A/B alternate over all positions,
    protected rows and columns score −inf; the merged sequence is the protected tokens, the
    unmerged A tokens, then the B tokens, each group in its original order."""
    batch, num_tokens, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    position = torch.arange(num_tokens)
    scores[:, position[::2] < protected, :] = -math.inf
    scores[:, :, position[1::2] < protected] = -math.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=-1).values

    def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

    def merge(x: torch.Tensor) -> torch.Tensor:  # sums; the caller divides by the summed sizes
        a, b = x[:, ::2], x[:, 1::2]
        into = partner.gather(1, merged_a)[..., None].expand(-1, -1, x.shape[-1])
        b = b.scatter_reduce(1, into, gather(a, merged_a), reduce="sum")
        sequence = torch.cat([gather(a, kept_a), b], dim=1)
        origin = torch.cat([position[::2][kept_a], position[1::2].expand(batch, -1)], dim=1)
        # protected tokens first, in their original order; the rest keep their order
        rank = torch.where(origin < protected, origin - protected, 0).argsort(dim=1, stable=True)
        return gather(sequence, rank)

    return merge


@torch.no_grad()
def grid_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and sizes of an unpatched NaFlexVit with ToMe's matching and proportional
    attention taken literally: timm's attention (and the pooling head) run on the unmerged
    token grid, each merged token repeated once per input token it covers. No log s anywhere."""
    x, _ = model.embeds(x)
    x = model.norm_pre(x)
    batch, num_tokens, _ = x.shape
    member = torch.eye(num_tokens).expand(batch, -1, -1)  # [B, T, N] merged token × input token

    def on_grid(tokens: torch.Tensor) -> torch.Tensor:
        return member.transpose(1, 2) @ tokens

    def per_token(full: torch.Tensor) -> torch.Tensor:
        return (member @ full) / member.sum(-1, keepdim=True)

    for block, r in zip(model.blocks, r_per_block):
        h = block.norm1(x)
        x = x + block.ls1(per_token(block.attn(on_grid(h))))
        if r:
            keys = block.attn.qkv(h).reshape(batch, x.shape[1], 3, block.attn.num_heads, -1)[:, :, 1].mean(2)
            merge = _protected_match(keys, r, model.num_prefix_tokens)
            total = merge(x * member.sum(-1, keepdim=True))
            member = merge(member)
            x = total / member.sum(-1, keepdim=True)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(on_grid(x))), member.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", WITHOUT_ROPE)
@pytest.mark.parametrize("r", [8, (16, -1)])
def test_matches_the_grid_reference(family: str, r) -> None:
    model = naflex(family)
    x = images()
    logits, size = grid_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        out = model(x)
    assert state.num_tokens == tokenprune.plan(model, SIZE).output_tokens < model.num_prefix_tokens + 14 * 10
    torch.testing.assert_close(state.size, size)
    torch.testing.assert_close(out, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_r0_is_bit_identical_and_unpatch_restores(family: str) -> None:
    model = naflex(family)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        assert not torch.allclose(model(x), expected)
        tokenprune.unpatch(model)
        assert torch.equal(model(x), expected)
        assert type(model) is timm.models.naflexvit.NaFlexVit


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_invariants(family: str) -> None:
    model = tokenprune.patch(naflex(family), r=(12, -1), trace_source=True)
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        state = model.forward_tokens(images())
    entering = tokenprune.plan(model, SIZE).tokens[0]
    assert entering == prefix + 14 * 10
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), float(entering)))
    source = tokenprune.source(model)
    assert torch.equal(source.sum(dim=-1).float(), state.size[..., 0])
    assert torch.equal(source[:, :prefix], torch.eye(prefix, entering, dtype=source.dtype).expand(2, -1, -1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["tome", "pitome", "local_global"])
def test_flops_agree_with_flop_counter(family: str, method: str) -> None:
    model = naflex(family).requires_grad_(False)
    options = {"r": 4, "local_block": 0} if method == "local_global" else {"r": (8, -1)}
    tokenprune.patch(model, method, **options)
    assert tokenprune.flops(model, SIZE, batch_size=2).total == counted_flops(model, images())


@pytest.mark.parametrize("size", [(224, 224), (160, 288), (96, 96)])
def test_any_image_size(size: tuple[int, int]) -> None:
    """NaFlexVit takes any image size (its position embedding is resized to the grid): so does
    the patched model, and its plan follows."""
    model = tokenprune.patch(naflex("gap_registers"), r=8)
    with torch.no_grad():
        state = model.forward_tokens(images(size=size))
    reduction = tokenprune.plan(model, size)
    assert reduction.tokens[0] == 4 + (size[0] // 16) * (size[1] // 16)
    assert state.num_tokens == reduction.output_tokens


def test_padded_sizes_plan_the_padded_grid() -> None:
    model = tokenprune.patch(naflex("gap_registers", dynamic_img_pad=True), r=8)
    with torch.no_grad():
        state = model.forward_tokens(images(size=(200, 150)))
    reduction = tokenprune.plan(model, (200, 150))
    assert reduction.tokens[0] == 4 + 13 * 10 and state.num_tokens == reduction.output_tokens


def test_intermediates_follow_the_image_shape() -> None:
    model = tokenprune.patch(naflex("radio_token"), r=8)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images(), indices=[0, 2])
    assert [tuple(m.shape) for m in maps] == [(2, 192, 14, 10)] * 2
    assert final.shape == (2, model.num_prefix_tokens + 140, 192)


def test_naflex_inputs_are_refused_clearly() -> None:
    model = tokenprune.patch(naflex("siglip_map"), r=8)
    patches = torch.randn(2, 140, 16 * 16 * 3)
    coord = torch.zeros(2, 140, 2, dtype=torch.long)
    valid = torch.ones(2, 140, dtype=torch.bool)
    packed = {"patches": patches, "patch_coord": coord, "patch_valid": valid}
    for call in (lambda: model(packed), lambda: model.forward_intermediates(packed), lambda: model.forward_features(packed)):
        with pytest.raises(ValueError, match=r"image batch \[B, C, H, W\].*got a dict"):
            call()
    for call in (lambda: model(patches, coord, valid), lambda: model.forward_features(patches, coord, valid),
                 lambda: model.forward_intermediates(images(), patch_coord=coord)):  # fmt: skip
        with pytest.raises(ValueError, match="patch_coord/patch_valid"):
            call()


def test_timm_signatures_keep_working() -> None:
    """Calls written for timm's NaFlexVit on image batches: patch_valid=None, attn_mask (which
    timm's forward ignores for images), unmerged features, a size-weighted head."""
    model = naflex("gap_registers")
    x = images()
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x, attn_mask=torch.zeros(1)), expected)
        assert torch.equal(model.forward_head(model.forward_features(x), patch_valid=None), expected)
        # timm's own forward calls forward_head(**{"patches": ..., "patch_valid": ...})
        features = {"patches": model.forward_features(patches=x), "patch_valid": None}
        assert torch.equal(model.forward_head(**features), expected)
        tokenprune.patch(model, r=8, trace_source=True)
        state = model.forward_tokens(x)
        full = model.forward_features(x, unmerge=True)
        assert full.shape == (2, 4 + 140, 192)
        # the size-weighted head over merged tokens = the plain head over the unmerged grid
        torch.testing.assert_close(
            model.forward_head(state.x, patch_valid=None, size=state.size),
            timm.models.naflexvit.NaFlexVit.forward_head(model, full),
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_patch_dropout_training_is_refused() -> None:
    model = tokenprune.patch(naflex("gap_registers", patch_drop_rate=0.25), r=8).train()
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        model(images())


def test_fullgraph_capture() -> None:
    torch._dynamo.reset()
    model = tokenprune.patch(naflex("siglip_map"), r=(8, -1))
    with torch.no_grad():
        expected = model(images())
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(images()), expected, atol=1e-5, rtol=1e-5)


def test_class_token_attention_needs_the_class_token() -> None:
    """EViT reads the class token's attention: RADIO has one (first of its prefix tokens), the
    register-only NaFlexVit has none."""
    model = tokenprune.patch(naflex("radio_token"), "evit", keep_ratio=0.5, stages=(1,))
    with torch.no_grad():
        state = model.forward_tokens(images())
    assert state.num_tokens == tokenprune.plan(model, SIZE).output_tokens == 8 + 70 + 1  # kept + fused
    with pytest.raises(ValueError, match="needs a class token"):
        tokenprune.patch(naflex("gap_registers"), "evit")

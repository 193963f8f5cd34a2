"""timm NaFlexVit (SigLIP 2 NaFlex, RADIO) on image batches of any size and on packed sequences
(padding as size-0 tokens): merging against the unpatched model's own modules run on the
unmerged token grid, and against timm on the unreduced model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import tokenprune
from evals.harness import pack_images
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
    # one prefix token: ToMe's A/B parity starts at the first patch
    "class_token_only": ("naflexvit_base_patch16_gap", {"class_token": True, "reg_tokens": 0, "global_pool": "token"}),
    # an Eva model built as a NaFlexVit (timm's use_naflex=True keeps its weights): DINOv3's RoPE
    "dinov3_naflex": ("vit_small_patch16_dinov3", {"use_naflex": True}),
}
WITHOUT_ROPE = [family for family in FAMILIES if not family.startswith("rope") and family != "dinov3_naflex"]
# timm's convolutional patch embedding takes image batches only
PACKABLE = [family for family in FAMILIES if family != "conv_embed"]
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


def _protected_match(metric: torch.Tensor, r: int, protected: int, first: torch.Tensor | None = None):
    """ToMe's matching with ``protected`` leading tokens: A/B alternate over all positions,
    protected rows and columns score −inf; the merged sequence is the protected tokens, the
    unmerged A tokens, then the B tokens, each group in its original order. ``first`` ([B, T]
    bool): A tokens that merge before any other, whatever their partner."""
    batch, num_tokens, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    position = torch.arange(num_tokens)
    scores[:, position[::2] < protected, :] = -math.inf
    scores[:, :, position[1::2] < protected] = -math.inf
    best, partner = scores.max(dim=-1)
    if first is not None:
        best = best.masked_fill(first[:, ::2], math.inf)
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



def test_partial_patches_are_refused_where_timm_cannot_embed_them() -> None:
    """timm's linear embedding without padding reshapes the image into whole patches and fails
    on a partial one (a bare RuntimeError, unpatched too): the patched model and its plan refuse
    that size naming the remedy, rather than crash or plan a grid nothing runs; the
    convolutional embedding, which drops a partial patch, runs and plans it as timm does."""
    unpatched = naflex("gap_registers")
    with pytest.raises(RuntimeError), torch.no_grad():
        unpatched(images(size=(200, 150)))
    model = tokenprune.patch(naflex("gap_registers"), r=8)
    for ask in (lambda: model(images(size=(200, 150))), lambda: tokenprune.plan(model, (200, 150)),
                lambda: tokenprune.flops(model, (200, 150))):  # fmt: skip
        with pytest.raises(ValueError, match=r"multiples of its 16x16 patches, got 200x150; .*dynamic_img_pad=True"):
            ask()
    conv = naflex("conv_embed")
    with torch.no_grad():
        expected = conv(images(size=(200, 150)))
        tokenprune.patch(conv, r=0)
        assert torch.equal(conv(images(size=(200, 150))), expected)
        tokenprune.patch(conv, r=8)
        state = conv.forward_tokens(images(size=(200, 150)))
    reduction = tokenprune.plan(conv, (200, 150))
    assert reduction.tokens[0] == 4 + 12 * 9 and state.num_tokens == reduction.output_tokens

def test_intermediates_follow_the_image_shape() -> None:
    model = tokenprune.patch(naflex("radio_token"), r=8)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images(), indices=[0, 2])
    assert [tuple(m.shape) for m in maps] == [(2, 192, 14, 10)] * 2
    assert final.shape == (2, model.num_prefix_tokens + 140, 192)


def pack(images_: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Images of different sizes as NaFlex packs them, 16-px patches padded to ``length``."""
    return pack_images(images_, (16, 16), length)


def mixed_images(middle: bool = False) -> list[torch.Tensor]:
    """A 224×160 image (140 patches: no padding in a pack of 140) and a 96×128 one (48
    patches); ``middle``: between them a 208×160 one (130 patches: its padding runs out in the
    middle of a block at r=8)."""
    gen = torch.Generator().manual_seed(2)
    long, short = torch.randn(3, *SIZE, generator=gen), torch.randn(3, 96, 128, generator=gen)
    return [long, torch.randn(3, 208, 160, generator=gen), short] if middle else [long, short]


def padding_first_order(padding: list[bool], prefix: int) -> list[int]:
    """The rule of padding-first matching, one sequence at a time: padding takes the last
    A positions (absolute even ones), then the last B positions; real tokens fill the others
    in their order. Returns, for each new position, the token placed there."""
    body = padding[prefix:]
    slots = range(len(body))
    a_slots = [k for k in slots if (prefix + k) % 2 == 0]
    b_slots = [k for k in slots if (prefix + k) % 2 == 1]
    count = sum(body)
    in_a = min(count, len(a_slots))
    padding_slots = set(a_slots[len(a_slots) - in_a :] + b_slots[len(b_slots) - (count - in_a) :])
    reals = iter(k for k in slots if not body[k])
    pads = iter(k for k in slots if body[k])
    return list(range(prefix)) + [prefix + next(pads if k in padding_slots else reals) for k in slots]


@torch.no_grad()
def packed_grid_reference(model, packed: dict, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and sizes of the unpatched NaFlexVit on packed patches with ToMe taken literally:
    timm's attention on the unmerged sequence with timm's padding mask, each merged token
    repeated once per position it covers; its pooling head with ``patch_valid``; ToMe's matching
    with padding spent first (:func:`padding_first_order`, padding rows ranked first); merged
    tokens the mean of their patches, padding left out."""
    x, _ = model.embeds(packed["patches"], patch_coord=packed["patch_coord"], patch_valid=packed["patch_valid"])
    x = model.norm_pre(x)
    batch, num_tokens, _ = x.shape
    prefix = model.num_prefix_tokens
    real = torch.cat([torch.ones(batch, prefix, dtype=torch.bool), packed["patch_valid"]], dim=1)
    key_mask = torch.zeros(batch, 1, 1, num_tokens).masked_fill(~real[:, None, None, :], -math.inf)
    member = torch.eye(num_tokens).expand(batch, -1, -1)  # [B, T, N] merged token × input position
    patches = real.float().unsqueeze(-1)  # [B, N, 1]: 1 for a patch, 0 for padding

    def on_grid(tokens: torch.Tensor) -> torch.Tensor:
        return member.transpose(1, 2) @ tokens

    def per_token(full: torch.Tensor) -> torch.Tensor:
        return (member @ full) / member.sum(-1, keepdim=True)

    def reorder(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        return t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]))

    for block, r in zip(model.blocks, r_per_block):
        h = block.norm1(x)
        x = x + block.ls1(per_token(block.attn(on_grid(h), attn_mask=key_mask)))
        if r:
            keys = block.attn.qkv(h).reshape(batch, x.shape[1], 3, block.attn.num_heads, -1)[:, :, 1].mean(2)
            padding = (member @ patches)[..., 0] == 0
            order = torch.tensor([padding_first_order(row.tolist(), prefix) for row in padding])
            x, member, keys = reorder(x, order), reorder(member, order), reorder(keys, order)
            merge = _protected_match(keys, r, prefix, first=padding.gather(1, order))
            size = member @ patches
            total, member = merge(x * size), merge(member)
            size = member @ patches
            x = torch.where(size > 0, total / size, 0.0)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    logits = model.forward_head(model.norm(on_grid(x)), patch_valid=packed["patch_valid"])
    return logits, member @ patches


@pytest.mark.parametrize("family", PACKABLE)
def test_packed_r0_matches_timm(family: str) -> None:
    """Padding as size-0 tokens masks what timm's mask from patch_valid masks: the same logits
    (not the same bits: a key bias instead of timm's [B, 1, T, T] mask)."""
    model = naflex(family)
    packed = pack(mixed_images(), 150)
    with torch.no_grad():
        expected = model(packed)
        tokenprune.patch(model, r=0)
        torch.testing.assert_close(model(packed), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(**{"x": packed["patches"], "patch_coord": packed["patch_coord"],
                                            "patch_valid": packed["patch_valid"]}), expected, atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("family", [family for family in PACKABLE if family in WITHOUT_ROPE])
@pytest.mark.parametrize("r", [8, (16, -1)])
def test_packed_matches_the_grid_reference(family: str, r) -> None:
    model = naflex(family)
    packed = pack(mixed_images(middle=True), 140)
    logits, size = packed_grid_reference(model, packed, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(packed)
        out = model(packed)
    assert state.padded and state.num_tokens == tokenprune.plan(model, SIZE).output_tokens
    torch.testing.assert_close(state.size, size)
    torch.testing.assert_close(out, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "lengths",
    [
        (140, 139),  # one padding token
        (141, 139, 20),  # odd pack length; padding outnumbers set A in the short sequence
        (140, 140),  # no padding anywhere
        (130, 1),  # a sequence of one patch
    ],
)
@pytest.mark.parametrize("family", ["radio_token", "class_token_only"])  # prefix 8, 1
def test_each_block_spends_its_merges_on_padding_first(family: str, lengths: tuple[int, ...]) -> None:
    """Per sequence and block, min(r, padding left) of the r merges remove padding and the
    rest merge patches: after the last block, a sequence with m₀ padding keeps
    m_L = max(0, m₀ − Σ r) padding tokens and T_L − m_L tokens that hold patches, every patch
    counted once."""
    model = naflex(family)
    prefix = model.num_prefix_tokens
    gen = torch.Generator().manual_seed(5)
    length = max(lengths)
    packed = pack([torch.randn(3, 16, 16 * n, generator=gen) for n in lengths], length)  # 1 × n patch grids
    r = (12, -1)
    tokenprune.patch(model, r=r)
    with torch.no_grad():
        state = model.forward_tokens(packed)
    removed = sum(tokenprune.plan(model, (16, 16 * length)).removed)
    assert state.num_tokens == prefix + length - removed
    for size, n in zip(state.size[..., 0], lengths):
        left = max(0, (length - n) - removed)
        assert int((size == 0).sum()) == left and size.sum() == prefix + n
        assert int((size > 0).sum()) == state.num_tokens - left


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("family", ["gap_registers", "siglip_map", "radio_token", "rope_axial", "rope_mixed", "dinov3_naflex"])
def test_padding_merges_first_and_changes_no_patch(family: str, prop_attn: bool) -> None:
    """The short image of a pack has padding enough for every merge (92 positions, r=8 for 3
    blocks), so no two of its patches merge and its logits are timm's on it alone; the long
    one, with no padding, gives up patches as it would alone in an image batch."""
    model = naflex(family)
    long, short = mixed_images()
    packed = pack([long, short], 140)
    with torch.no_grad():
        short_alone = model(short[None])
        tokenprune.patch(model, r=8, trace_source=True, prop_attn=prop_attn)
        long_alone = model(long[None])
        state = model.forward_tokens(packed)
        out = model(packed)
    torch.testing.assert_close(out[1], short_alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], long_alone[0], atol=1e-5, rtol=1e-5)
    prefix = model.num_prefix_tokens
    sizes = state.size[1, :, 0]
    assert set(sizes.tolist()) == {0.0, 1.0} and sizes.sum() == prefix + 48  # patches unmerged, padding gone into any token
    assert state.size[0, :, 0].sum() == prefix + 140 and state.size[0, :, 0].max() > 1
    # [B, T_out, T_in]: every patch in exactly one token, padding in none (it is no part of a
    # token's size either, though merged into one)
    source = tokenprune.source(model)
    valid = torch.cat([torch.ones(2, prefix, dtype=torch.bool), packed["patch_valid"].bool()], dim=1)
    assert source.shape == (2, state.num_tokens, prefix + 140) and torch.equal(source.sum(1), valid.long())
    torch.testing.assert_close(source.sum(-1).float(), state.size[..., 0], atol=0, rtol=0)
    assert valid[1].sum() < prefix + 140  # (the short image has padding to leave out)


@pytest.mark.parametrize("family", ["siglip_map", "radio_token"])
def test_plan_and_flops_of_packed_patches(family: str) -> None:
    """plan and flops take the pack itself: the token counts the forward uses, and FLOPs equal
    to FlopCounterMode's count of the forward (every position, padding too)."""
    model = tokenprune.patch(naflex(family), r=(16, -1))
    packed = pack(mixed_images(), 150)
    with torch.no_grad():
        state = model.forward_tokens(packed)
    reduction = tokenprune.plan(model, packed)
    assert reduction.tokens[0] == model.num_prefix_tokens + 150 and reduction.output_tokens == state.num_tokens
    assert reduction == tokenprune.plan(model, (16, 16 * 150))  # as an image of 150 patches
    assert tokenprune.flops(model, packed).total == counted_flops(model, packed)  # the pack's 2 sequences
    assert tokenprune.flops(model, packed, batch_size=1).total * 2 == counted_flops(model, packed)
    with pytest.raises(ValueError, match="VisionTransformer takes image or clip sizes, not packed patches"):
        tokenprune.plan(timm.create_model("vit_tiny_patch16_224"), packed)
    with pytest.raises(ValueError, match="convolutional patch embedding takes image batches only"):
        tokenprune.plan(naflex("conv_embed"), packed)


def test_packed_features_and_head_as_in_timm() -> None:
    """forward_head(**forward_features(packed)) is the forward, merged or unmerged, as in timm;
    the merged features say which tokens are patches."""
    model = tokenprune.patch(naflex("siglip_map"), r=8)
    packed = pack(mixed_images(), 150)
    with torch.no_grad():
        out = model(packed)
        features = model.forward_features(packed)
        full = model.forward_features(packed, unmerge=True)
        torch.testing.assert_close(model.forward_head(**features), out)
        torch.testing.assert_close(model.forward_head(**full), out, atol=1e-5, rtol=1e-5)
        # one token per position, as the unmerged features are: size=None counts each once
        torch.testing.assert_close(model.forward_head(full["patches"], patch_valid=full["patch_valid"], size=None), out,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    assert torch.equal(features["patch_valid"], features["size"][:, model.num_prefix_tokens :, 0] > 0)
    assert full["patches"].shape == (2, 150, 192) and full["patch_valid"] is packed["patch_valid"]
    # timm's call shape without the sizes: refused as on image batches, never pooled unweighted
    with pytest.raises(ValueError, match=r"pools by map and reduces tokens: the pooling needs the token sizes"):
        model.forward_head(features["patches"], patch_valid=features["patch_valid"])
    with pytest.raises(ValueError, match=r"merged tokens pool by their sizes"):
        model.forward_head(features["patches"], patch_valid=packed["patch_valid"], size=None)
    # without patch_valid (no padding): every position counts once, merged or not
    full_pack = {**packed, "patch_valid": None}
    with torch.no_grad():
        expected = model(full_pack)
        torch.testing.assert_close(model.forward_head(**model.forward_features(full_pack)), expected)
        torch.testing.assert_close(model.forward_head(**model.forward_features(full_pack, unmerge=True)), expected,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_a_sequence_of_padding_alone_pools_to_what_timm_gives(pool: str) -> None:
    """A pack entry with no valid patch gives what timm gives (the mean over nothing: 0, as
    timm's masked mean clamps its count; the max over nothing: NaN after fc_norm, in timm too),
    and the other sequences are untouched by it."""
    model = naflex("gap_registers", global_pool=pool)
    packed = pack(mixed_images(), 150)
    packed["patch_valid"][1] = False
    with torch.no_grad():
        expected = model(packed)
        tokenprune.patch(model, r=8)
        out = model(packed)
        first_alone = model({k: v[:1] for k, v in packed.items()})
    assert out[1].isfinite().all() == (pool == "avg")
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(out[0], first_alone[0], atol=1e-5, rtol=1e-5)


def test_packed_bfloat16_autocast() -> None:
    model = tokenprune.patch(naflex("siglip_map"), r=(16, -1))
    packed = pack(mixed_images(), 150)
    with torch.no_grad():
        expected = model(packed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(packed).float()
    assert got.isfinite().all()
    assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.99


def test_packed_triton_backend_matches_torch_backend() -> None:
    model = naflex("radio_token")
    packed = pack(mixed_images(), 150)
    with torch.no_grad():
        expected = tokenprune.patch(model, r=(16, -1), backend="torch")(packed)
        got = tokenprune.patch(model, r=(16, -1), backend="triton")(packed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_packed_training_has_finite_gradients(prop_attn: bool) -> None:
    """Padding-only tokens (size 0) neither divide 0 by 0 in the merge nor in its backward."""
    model = tokenprune.patch(naflex("gap_registers"), r=(16, -1), prop_attn=prop_attn).train()
    packed = pack(mixed_images(), 150)
    model(packed).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.isfinite().all() for g in grads)


def test_packed_inputs_are_refused_where_they_cannot_run() -> None:
    packed = pack(mixed_images(), 150)
    model = tokenprune.patch(naflex("siglip_map"), "pitome", r=8)
    with pytest.raises(ValueError, match="PiToMeConfig cannot tell NaFlex's padding.*method 'tome'"):
        model(packed)
    for method, options in [("pitome", {"r": 8}), ("local_global", {"local_block": 0}), ("evit", {"score": "random"}), ("dynamicvit", {})]:
        model = tokenprune.patch(naflex("siglip_map"), method, **options)
        for count in (tokenprune.plan, tokenprune.flops):  # as the forward refuses, not an IndexError
            with pytest.raises(ValueError, match="cannot tell NaFlex's padding"):
                count(model, packed)
    with pytest.raises(ValueError, match="convolutional patch embedding takes image batches only"):
        tokenprune.patch(naflex("conv_embed"), r=8)(packed)
    model = tokenprune.patch(naflex("siglip_map"), r=8)
    with pytest.raises(ValueError, match="attn_mask replaces the padding mask"):
        model({**packed, "attn_mask": torch.zeros(2, 1, 150, 150)})
    with pytest.raises(ValueError, match="forward_intermediates of packed patches"):
        model.forward_intermediates(packed)
    with pytest.raises(ValueError, match="pass patch_coord"):
        model(images(), patch_valid=packed["patch_valid"])
    with pytest.raises(ValueError, match="patch_valid must be"):
        model({**packed, "patch_valid": packed["patch_valid"][:, :10]})
    with pytest.raises(ValueError, match=r"timm's NaFlex dict with 'patches'.*got keys \['patch_coord'\]"):
        model({"patch_coord": packed["patch_coord"]})
    with pytest.raises(ValueError, match=r"expected an image batch \[B, C, H, W\].*got shape \(2, 3, 224\)"):
        model(images()[:, :, :, 0])


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
    with pytest.raises(ValueError, match="needs a class token") as refusal:
        tokenprune.patch(naflex("gap_registers"), "evit")
    assert "NaFlexVit has none there; use score='random'" in str(refusal.value)  # (not CaiT's reason)


def test_map_head_masks_padding_exactly_whatever_its_features() -> None:
    """Attention pooling over packed tokens: padding is masked as timm masks it (-inf from
    patch_valid), not merely down-weighted by log(1e-9), which padding keys with large logits
    (padding content is arbitrary) would leak through."""
    model = naflex("siglip_map")  # no prefix tokens, MAP head
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 30, 192, generator=generator)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, 20:] = False
    valid[1, 25:] = False
    tokens[~valid] *= 3000.0  # logits of padding keys far above the patches' (still < 1000 above them)
    with torch.no_grad():
        expected = model.forward_head(tokens, patch_valid=valid)  # timm's own masked pooling
        tokenprune.patch(model, r=8)
        got = model.forward_head(tokens, patch_valid=valid, size=None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unmerged_packed_features_carry_position_weights() -> None:
    """forward_features(packed, unmerge=True)['size']: one per position, 0 for padding, 1 for
    prefix tokens and patches (the weights timm's masked pooling uses)."""
    model = tokenprune.patch(naflex("gap_registers"), r=8)
    packed = pack(mixed_images(), 150)
    with torch.no_grad():
        full = model.forward_features(packed, unmerge=True)
    prefix = model.num_prefix_tokens
    expected = torch.cat([torch.ones(2, prefix), packed["patch_valid"].float()], dim=1)[..., None]
    assert full["size"] is not None
    torch.testing.assert_close(full["size"], expected)


# --- for tests/test_qwen3_vit.py --------------------------------------------------------------
@pytest.mark.parametrize("family", ["classifier", "classifier_projector"])
def test_flops_of_a_classifier_without_pooling(family: str) -> None:
    """global_pool='' puts the head on every output token (the patches, or the projector's LLM
    tokens, a quarter of them); the FLOPs must count it as FlopCounterMode does."""
    from tests.test_patch import counted_flops
    from tests.test_qwen3_vit import SIZE, images, qwen

    model = qwen(family, global_pool="").requires_grad_(False)
    assert tokenprune.flops(model, SIZE, batch_size=2).total == counted_flops(model, images())
    tokenprune.patch(model, r=(8, -1))
    assert tokenprune.flops(model, SIZE, batch_size=2).total == counted_flops(model, images())


def test_merge_map_of_a_packed_image_reads_its_patches_not_the_padding() -> None:
    """In a pack, an image's patches follow the prefix tokens and its padding follows them: the
    merge map of a padded image reads the rows·cols entries after ``num_prefix`` (not the last
    ones, which hold padding) and paints what an unpadded source index of the same groups paints."""
    from tokenprune.visualize import merge_groups, merge_map

    model = tokenprune.patch(naflex("gap_registers"), r=8)
    with torch.no_grad():  # the middle image: 208×160, a 13×10 grid, 130 patches and 10 padding positions
        state = model.forward_tokens(pack(mixed_images(middle=True), 140), trace_source=True)
    prefix, grid = model.num_prefix_tokens, (13, 10)
    source_index = state.source_index[1]
    patches = source_index[prefix : prefix + 130]
    assert patches.unique().numel() < 130  # patches merged too, not only padding
    assert torch.equal(merge_groups(source_index, grid, num_prefix=prefix), patches.reshape(grid))
    image = torch.rand(3, 208, 160, generator=torch.Generator().manual_seed(0))
    without_padding = torch.cat([source_index[:prefix], patches])  # the layout of an image batch
    picture = np.array(merge_map(image, source_index, grid, num_prefix=prefix))
    assert np.array_equal(picture, np.array(merge_map(image, without_padding, grid)))
    with pytest.raises(ValueError, match="needs more than"):
        merge_groups(source_index, (13, 11), num_prefix=prefix)

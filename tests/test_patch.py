"""Patching timm ViT families: exactness at r=0, merge invariants at r>0, the API contract."""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from torch import nn

import tokenprune
from evals.harness import counted_flops  # noqa: F401 (the other test modules import it from here)
from tokenprune.merge import source_matrix, unmerge
from tokenprune.patch.vit import attend

# One small model per supported family (random init, seeded): what differs is the token layout
# (prefix tokens), the pooling and the block internals (LayerScale, qk-norm).
FAMILIES = {
    "vit_cls": ("vit_tiny_patch16_224", {}),
    "vit_avg_no_cls": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "vit_map": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "map"}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {"depth": 4}),
    "dinov2_layerscale": ("vit_small_patch14_dinov2", {"img_size": 224, "depth": 4}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 224, "depth": 4}),
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True, "depth": 4}),
    "avgmax_with_prefix": ("vit_tiny_patch16_224", {"global_pool": "avgmax", "reg_tokens": 2, "depth": 4}),
    "max_pool": ("vit_tiny_patch16_224", {"global_pool": "max", "depth": 4}),
    "swiglu_aimv2": ("aimv2_large_patch14_224", {"depth": 2, "embed_dim": 128, "num_heads": 2}),
    # timm Eva: RoPE (cat, DINOv3's, per-block "mixed"), gamma LayerScale, post-norm, GQA.
    "eva02_rope": ("eva02_tiny_patch14_224", {"depth": 4}),
    "dinov3_rope_registers": ("vit_small_patch16_dinov3", {"depth": 4}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {"depth": 4}),
    "pe_map_rope": ("vit_pe_core_tiny_patch16_384", {"img_size": 224, "depth": 4}),
    "eva_post_norm": ("eva02_enormous_patch14_clip_224", {"depth": 2, "embed_dim": 128, "num_heads": 2}),
    "rope_gqa": ("vit_small_patch16_rope_224", {"depth": 4, "num_kv_heads": 2, "qkv_fused": False}),
    "hybrid_cnn_stem": ("vit_tiny_r_s16_p8_224", {"depth": 4}),  # ResNet stem, then a ViT
    "res_post_norm": ("vit_base_patch16_rpn_224", {"depth": 2, "embed_dim": 192, "num_heads": 3}),
    # timm Beit: relative position bias, per block or shared; gamma LayerScale.
    "beit_relpos": ("beit_base_patch16_224", {"depth": 3, "embed_dim": 192, "num_heads": 3}),
    "beit_shared_relpos": (
        "beitv2_base_patch16_224",
        {"depth": 3, "embed_dim": 192, "num_heads": 3, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True},
    ),
    # timm VisionTransformerRelPos: relative bias from an MLP or a table, per block or shared.
    "relpos_mlp_cls": ("vit_relpos_medium_patch16_cls_224", {"depth": 2}),
    "relpos_table": ("vit_relpos_small_patch16_224", {"depth": 2, "rel_pos_type": "bias"}),
    "relpos_shared_res_post": (
        "vit_srelpos_small_patch16_224",
        {"depth": 2, "block_fn": timm.models.vision_transformer_relpos.ResPostRelPosBlock},
    ),
}


def make(family: str, **extra) -> nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **{**kwargs, **extra}).eval()
    # LayerScale starts near zero at init (1e-5) and BEiT's relative position bias at ~0.02,
    # which would hide errors in the block; give them real-looking values (timm's
    # LayerScale.gamma, Eva's and BEiT's gamma_1/gamma_2).
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
            param.data.uniform_(0.5, 1.5)
        elif name.endswith("relative_position_bias_table"):
            param.data.normal_(0.0, 1.0)
    return model


def image(batch: int = 2, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_r0_is_bit_identical_and_unpatch_restores(family: str) -> None:
    model = make(family)
    x = image()
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        assert not torch.allclose(model(x), expected)
        tokenprune.unpatch(model)
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_invariants(family: str) -> None:
    model = make(family)
    prefix = model.num_prefix_tokens
    tokenprune.patch(model, r=(12, -1), trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        logits = model(image())
    reduction = tokenprune.plan(model, 224)
    assert state.num_tokens == reduction.output_tokens < reduction.tokens[0]
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    # sizes count every input token exactly once
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), float(reduction.tokens[0])))
    source = tokenprune.source(model)
    assert source.shape == (2, state.num_tokens, reduction.tokens[0])
    assert torch.equal(source.sum(dim=-1).float(), state.size[..., 0])
    assert torch.equal(source.sum(dim=1), torch.ones_like(source.sum(dim=1)))
    # prefix tokens (class, distillation, registers) are never merged and stay first
    eye = torch.eye(prefix, reduction.tokens[0], dtype=source.dtype)
    assert torch.equal(source[:, :prefix], eye.expand(2, -1, -1))


@pytest.mark.parametrize("family", ["vit_avg_no_cls", "vit_map", "avgmax_with_prefix"])
def test_pooling_weighs_tokens_by_size(family: str) -> None:
    """Size-weighted pooling of merged tokens = plain pooling of the unmerged token grid."""
    model = make(family)
    tokenprune.patch(model, r=8, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        pooled = model.forward_head(state.x, size=state.size)
        full = unmerge(state.x, model._tokenprune_source[0])
        plain = timm.models.VisionTransformer.forward_head(model, full) if family != "vit_map" else None
    if plain is not None:
        torch.testing.assert_close(pooled, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the token sizes"):
        model.forward_head(state.x)


def test_float64_size_weighted_pooling_keeps_float64() -> None:
    """A float64 model pools merged tokens in float64: avg+max pooling of the merged tokens by
    size equals plain pooling of the unmerged grid to float64 rounding (its weights / total were
    float32: 2e-9 off). A 3x3 grid, so that the totals are no power of two."""
    model = make("avgmax_with_prefix", img_size=48).double()
    tokenprune.patch(model, r=2, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image(2, 48).double())
        pooled = model.forward_head(state.x, size=state.size)
        plain = timm.models.VisionTransformer.forward_head(model, unmerge(state.x, model._tokenprune_source[0]))
    assert pooled.dtype == torch.float64
    torch.testing.assert_close(pooled, plain, atol=1e-12, rtol=0)


def test_map_pooling_uses_proportional_attention() -> None:
    model = make("vit_map")
    tokenprune.patch(model, r=8, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        full = unmerge(state.x, model._tokenprune_source[0])
        # attention over the unmerged grid = attention over merged tokens with log(size) bias
        expected = model.head(model.fc_norm(model.attn_pool(full)))
        torch.testing.assert_close(model.forward_head(state.x, size=state.size), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_map_pooling_is_sized_with_or_without_proportional_attention(prop_attn: bool) -> None:
    """ToMe pools by size even when the blocks run without proportional attention."""
    model = make("vit_map")
    tokenprune.patch(model, tokenprune.ToMeConfig(r=8, prop_attn=prop_attn, trace_source=True))
    with torch.no_grad():
        state = model.forward_tokens(image())
        expected = model.head(model.fc_norm(model.attn_pool(unmerge(state.x, model._tokenprune_source[0]))))
        torch.testing.assert_close(model(image()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["vit_avg_no_cls", "vit_map"])
def test_pooling_with_a_keep_mask_ignores_dropped_tokens(family: str) -> None:
    """0/1 pool weights (DynamicViT's training mask): pooling = plain pooling of the kept tokens."""
    model = make(family)
    tokenprune.patch(model, tokenprune.ToMeConfig(r=8, prop_attn=False))  # as DynamicViT: no size bias
    x = torch.randn(2, 20, model.embed_dim, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(2, 20, 1)
    keep[:, 5:12] = 0.0
    kept = torch.cat([x[:, :5], x[:, 12:]], dim=1)
    with torch.no_grad():
        pooled = model.forward_head(x, size=keep)
        expected = model.forward_head(kept, size=torch.ones(2, 13, 1))
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("evit", {"keep_ratio": 0.7, "fuse": False}),
        ("dynamicvit", {"keep_ratio": 0.7}),
        ("tome", {"r": 8}),
        ("merge_unmerge", {"ratio": 0.5}),
    ],
)
def test_forward_head_takes_the_pool_weights_of_any_method(method: str, options: dict) -> None:
    """The documented two-step call equals model(x), also for pruning, whose weights are None;
    without sizes, the head refuses merged tokens and takes pruned ones and merge_unmerge's,
    unmerged in every block (all of size 1), in training too (timm's
    forward_head(forward_features(x)))."""
    model = make("avgmax_with_prefix")
    tokenprune.patch(model, method, **options)
    with torch.no_grad():
        state = model.forward_tokens(image())
        torch.testing.assert_close(model.forward_head(state.x, size=state.pool_weights), model(image()))
        if method == "tome":
            with pytest.raises(ValueError, match="size=state.pool_weights"):
                model.forward_head(state.x)
        else:
            torch.testing.assert_close(model.forward_head(state.x), model(image()))
    model.train()
    if method == "dynamicvit":  # training keeps dropped tokens in place: the head needs their mask
        with pytest.raises(ValueError, match="size=state.pool_weights"):
            model.forward_head(model.forward_tokens(image()).x)
    elif method != "tome":  # EViT drops in training as at inference; merge_unmerge unmerges
        with torch.no_grad():
            torch.testing.assert_close(model.forward_head(model.forward_features(image())), model(image()))


def test_max_pooling_while_dynamicvit_trains_needs_the_keep_mask() -> None:
    """Max pooling needs no sizes, but while DynamicViT trains its dropped tokens stay in place and
    could win the max: the two-step call without the mask is refused there, and taken at inference."""
    model = tokenprune.patch(make("max_pool"), "dynamicvit", keep_ratio=0.5).train()
    with pytest.raises(ValueError, match="pools by 'max'.*keep mask.*size=state.pool_weights"):
        model.forward_head(model.forward_features(image()))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(image())), model(image()))


def test_a_forward_without_tracing_leaves_no_stale_source_map() -> None:
    model = make("vit_cls")
    tokenprune.patch(model, r=8, trace_source=True)
    with torch.no_grad():
        model(image())
        assert tokenprune.source(model).shape[:2] == (2, 197 - 8 * 12)
        model.forward_tokens(image(), trace_source=False)
    with pytest.raises(RuntimeError, match="no source map: .*told trace_source=False"):
        tokenprune.source(model)


def test_repatch_updates_options_and_models_share_nothing() -> None:
    a, b = make("vit_cls"), make("vit_cls")
    tokenprune.patch(a, r=8, prop_attn=False)
    tokenprune.patch(b, r=4)
    tokenprune.patch(a, r=12)
    assert a.tokenprune_config == tokenprune.ToMeConfig(r=12, prop_attn=False)
    assert b.tokenprune_config == tokenprune.ToMeConfig(r=4)
    assert tokenprune.plan(a, 224).removed == (12,) * 12
    assert tokenprune.plan(b, 224).removed == (4,) * 12
    tokenprune.patch(b, tokenprune.ToMeConfig(r=[3, 2]))
    assert tokenprune.plan(b, 224).removed == (3, 2) + (0,) * 10


@pytest.mark.parametrize(("method", "options"), [
    ("local_global", {"r": 8, "pos_weight": 0.5}), ("dynamicvit", {"keep_ratio": 0.7}), ("evit", {"keep_ratio": 0.7}),
])  # fmt: skip
def test_switching_methods_and_unpatching_restore_exactly(method: str, options: dict) -> None:
    """Any method, then ToMe: the same as ToMe on a fresh model; then unpatch: the original,
    bit for bit, with its classes and no extra parameters."""
    model, fresh = make("vit_cls"), make("vit_cls")
    with torch.no_grad():
        expected = model(image())
        tokenprune.patch(model, method, **options)
        reduced = model(image())
        tokenprune.patch(model, "tome", r=8)
        tokenprune.patch(fresh, "tome", r=8)
        assert not torch.allclose(reduced, expected)
        assert torch.equal(model(image()), fresh(image()))
        assert model.tokenprune_config == fresh.tokenprune_config
        tokenprune.patch(model, method, **options)
        tokenprune.unpatch(model)
        assert torch.equal(model(image()), expected)
    assert [type(m) for m in model.modules()] == [type(m) for m in make("vit_cls").modules()]
    assert model.state_dict().keys() == make("vit_cls").state_dict().keys()


def test_unpatch_of_a_part_names_the_patched_model() -> None:
    """model.blocks or one block of a patched model: not "the model is not patched"."""
    model = tokenprune.patch(make("vit_cls", depth=2), r=2)
    for part in (model.blocks, model.blocks[0]):
        with pytest.raises(ValueError, match="is or holds a block of a model patched by tokenprune: unpatch that model"):
            tokenprune.unpatch(part)
    with pytest.raises(ValueError, match="^the model is not patched by tokenprune$"):
        tokenprune.unpatch(make("vit_cls", depth=2))


def test_unpatch_leaves_no_trace() -> None:
    model = make("deit_distilled")
    before_model, before_blocks = dict(vars(model)), [dict(vars(blk)) for blk in model.blocks]
    classes = [type(m) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    tokenprune.patch(model, r=8, trace_source=True)
    with torch.no_grad():
        model(image())
    tokenprune.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert vars(model).keys() == before_model.keys()
    assert [vars(blk).keys() for blk in model.blocks] == [d.keys() for d in before_blocks]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not patched"):
        tokenprune.unpatch(model)


def test_patched_model_pickles(tmp_path) -> None:
    model = tokenprune.patch(make("deit_distilled"), r=8)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(image()), model(image()))
    assert loaded.tokenprune_config == model.tokenprune_config


def test_r_is_capped_and_readable() -> None:
    model = make("vit_cls")
    tokenprune.patch(model, r=500)
    reduction = tokenprune.plan(model, 224)
    assert reduction.removed[0] == 98  # half of the 196 mergeable tokens
    assert all(t - r >= 1 for t, r in zip(reduction.tokens, reduction.removed))
    with torch.no_grad():
        assert model.forward_tokens(image()).num_tokens == reduction.output_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_dtypes_and_batch_sizes(dtype: torch.dtype, batch: int) -> None:
    model = make("dinov2_layerscale")
    x = image(batch)
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=16)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        single = model(x[:1])
        with_others = model(torch.cat([x, torch.randn_like(x)]))[:1]
    assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
    cos = torch.nn.functional.cosine_similarity(logits.float(), expected, dim=-1)
    assert (cos > 0.9).all()
    # batch elements are reduced independently: an image's result does not depend on its batch
    torch.testing.assert_close(single, with_others, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "method", "options"),
    [
        ("deit3_layerscale", "tome", {"r": 12}),
        # EViT's fused token has a size: later stages read the class attention over keys with
        # log(size) on the attention kernel's path as on the manual one.
        ("vit_cls", "evit", {"keep_ratio": 0.7, "fuse": True, "prop_attn": True}),
    ],
)
def test_fused_and_manual_attention_agree(family: str, method: str, options: dict) -> None:
    model = make(family)
    tokenprune.patch(model, method, **options)
    manual = copy.deepcopy(model)
    for module in manual.modules():
        if isinstance(module, timm.layers.Attention):
            module.fused_attn = False
    with torch.no_grad():
        torch.testing.assert_close(model(image()), manual(image()), atol=1e-4, rtol=1e-4)


def test_dynamic_image_size() -> None:
    model = make("dinov2_layerscale", dynamic_img_size=True)
    tokenprune.patch(model, r=8)
    with torch.no_grad():
        for size in (224, 280, 168):
            assert model(image(1, size)).shape == (1, 10)
            grid = (size // 14) ** 2
            assert tokenprune.plan(model, size).tokens[0] == grid + 1
    fixed = tokenprune.patch(make("vit_cls"), r=8)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        tokenprune.plan(fixed, 256)
    with pytest.raises(ValueError, match="takes 224x224 images, got 256x256"):
        fixed(image(1, 256))
    # sizes that would plan a negative or an empty grid, and things that are no size
    for size in ((-14, 28), 0, "224", (224,), image(1), True):
        with pytest.raises(ValueError, match="input_size must be a positive int or a tuple of them"):
            tokenprune.plan(model, size)
    for batch_size in (0, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            tokenprune.flops(model, 224, batch_size=batch_size)


@pytest.mark.parametrize("family", ["vit_cls", "registers", "eva02_rope", "beit_relpos"])
def test_features_only_backbones_patch_through_their_wrapper(family: str) -> None:
    """timm's features_only=True backbone (a FeatureGetterNet around the pruned model) for dense
    heads: patched in one line, its maps on the full grid, the same as the inner model's
    intermediates; r=0 bit-identical, FLOPs by the counter, unpatch exact."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    backbone = timm.create_model(name, features_only=True, out_indices=(1, 2), **kwargs).eval()
    x = image()
    with torch.no_grad():
        expected = backbone(x)
        assert tokenprune.patch(backbone, r=0) is backbone
        assert all(map(torch.equal, backbone(x), expected))
        tokenprune.patch(backbone, r=8, trace_source=True)
        maps = backbone(x)
        inner = backbone.model
        direct = inner.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
        assert [m.shape for m in maps] == [m.shape for m in expected] and all(map(torch.equal, maps, direct))
        assert not torch.allclose(maps[1], expected[1])
        assert tokenprune.source(backbone).shape[1] == tokenprune.plan(backbone, 224).output_tokens
        assert tokenprune.flops(backbone, 224, batch_size=2).total == counted_flops(backbone, x)
        tokenprune.unpatch(backbone)
        assert all(map(torch.equal, backbone(x), expected)) and not hasattr(inner, "tokenprune_config")
    with pytest.raises(TypeError, match="cannot patch timm.models.resnet.ResNet"):
        tokenprune.patch(timm.create_model("resnet18", features_only=True, feature_cls="getter"), r=8)


def test_features_only_backbones_refuse_holes_and_count_what_runs() -> None:
    """Dense maps read every patch: methods that drop patches are refused (EViT's fused token
    holds its patches, so it is not); a backbone that keeps the model's head (prune=False) does
    not run it; a features_only wrapper around another wrapper (Qwen3's classifier) works."""
    from timm.models._features import FeatureGetterNet

    backbone = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 2), depth=3)
    for method, options in (("dynamicvit", {"stages": (1,)}), ("evit", {"stages": (1,), "fuse": False})):
        with pytest.raises(TypeError, match="drops tokens, but FeatureGetterNet's outputs read every patch position"):
            tokenprune.patch(backbone, method, **options)
    tokenprune.patch(backbone, "evit", stages=(1,))
    x = image(1)
    with torch.no_grad():
        assert all((m.abs().sum(dim=1) > 0).all() for m in backbone(x))  # no holes
    unpruned = FeatureGetterNet(make("vit_cls", depth=3), out_indices=(1, 2), prune=False)
    tokenprune.patch(unpruned, r=8)
    assert tokenprune.flops(unpruned, 224).total == counted_flops(unpruned, x)
    nested = timm.create_model(
        "qwen3_vit_88m", features_only=True, out_indices=(1,), depth=2, embed_dim=192, num_heads=3, img_size=224
    )
    tokenprune.patch(nested, r=4, trace_source=True)
    with torch.no_grad():
        assert nested(x)[0].shape == (1, 192, 14, 14)
    assert tokenprune.flops(nested, 224).total == counted_flops(nested, x)
    assert tokenprune.source(nested).shape == (1, 196 - 8, 196)


def test_a_patched_model_takes_the_image_sizes_timm_takes() -> None:
    """ViTamin (a convolutional stem in timm's HybridEmbed, which never checks the size, and no
    position embedding) runs at any size, and its 336 px checkpoint's pretrained_cfg asks for
    256 px; a padding patch embedding with strict_img_size=False takes a size that makes the grid
    its position embedding was made for; anything else takes only img_size, as in timm."""
    from functools import partial

    from timm.layers import PatchEmbed

    torch.manual_seed(0)
    # (ViTamin-XL has no position embedding; the small one, built the same way, is quicker to run)
    vitamin = timm.create_model("vitamin_small_224", depth=2, num_classes=10, pos_embed="none").eval()
    x = image(1, 256)
    with torch.no_grad():
        expected = vitamin(x)
        tokenprune.patch(vitamin, r=0)
        assert torch.equal(vitamin(x), expected)
        tokenprune.patch(vitamin, r=8)
        plan = tokenprune.plan(vitamin, 256)
        assert plan.tokens[0] == 16 * 16 and vitamin.forward_tokens(x).num_tokens == plan.head_tokens
        assert tokenprune.flops(vitamin, 256).total == counted_flops(vitamin, x)

    padded = timm.create_model(
        "vit_tiny_patch16_224", depth=2, num_classes=10, dynamic_img_pad=True,
        embed_layer=partial(PatchEmbed, strict_img_size=False),
    ).eval()  # fmt: skip
    x = image(1, 220)  # padded to 224: the 14 x 14 grid of the position embedding
    with torch.no_grad():
        expected = padded(x)
        tokenprune.patch(padded, r=0)
        assert torch.equal(padded(x), expected)
        assert tokenprune.plan(padded, 220).tokens[0] == 1 + 14 * 14
        with pytest.raises(ValueError, match="takes 224x224 images, got 256x256; create it with dynamic_img_size=True"):
            padded(image(1, 256))
        hybrid = tokenprune.patch(make("hybrid_cnn_stem"), r=8)  # a ResNet stem and a position embedding
        with pytest.raises(ValueError, match="takes 224x224 images, got 256x256"):
            hybrid(image(1, 256))
    # Partial patches: timm's patch embedding refuses them unless it pads, and a convolutional
    # stem rounds them up where the grid arithmetic rounds down: refused, in plan as in forward.
    with pytest.raises(ValueError, match=r"multiples of 16x16 \(its convolutional stem's reduction\), got 250x256"):
        tokenprune.plan(vitamin, (250, 256))
    with pytest.raises(ValueError, match=r"multiples of 16x16 \(its convolutional stem's reduction\), got 250x250"):
        vitamin(image(1, 250))
    unpadded = timm.create_model(
        "vit_tiny_patch16_224", depth=1, num_classes=10, embed_layer=partial(PatchEmbed, strict_img_size=False)
    )
    dynamic = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=10, dynamic_img_size=True)
    for model in (unpadded, dynamic):
        tokenprune.patch(model, r=4)
        with pytest.raises(ValueError, match=r"multiples of 16x16 \(its patch size\), got 230x230; create it with dynamic_img_pad=True"):
            tokenprune.plan(model, 230)


@pytest.mark.parametrize(
    "family",
    ["vit_cls", "registers", "vit_map", "deit_distilled", "swiglu_aimv2", "eva02_rope", "pe_map_rope", "rope_gqa",
     "rope_mixed", "dinov3_rope_registers", "eva_post_norm", "hybrid_cnn_stem", "beit_relpos", "beit_shared_relpos",
     "relpos_mlp_cls", "relpos_table", "relpos_shared_res_post", "res_post_norm"],
)  # fmt: skip
@pytest.mark.parametrize("r", [0, 8, (8, -1)])
def test_flops_agree_with_flop_counter(family: str, r) -> None:
    model = make(family).requires_grad_(False)
    tokenprune.patch(model, r=r)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_flops_take_a_numpy_batch_size() -> None:
    """batch_size takes any whole number, as input_size does: a NumPy integer (a sweep over
    np.array batch sizes, a config read with NumPy) counts that many images, in Python ints.
    Before, np.int64(2) was refused as "batch_size must be a positive int, got np.int64(2)"."""
    import numpy as np

    model = make("vit_cls", depth=2).requires_grad_(False)
    tokenprune.patch(model, r=8)
    report = tokenprune.flops(model, 224, batch_size=np.int64(2))
    assert report.total == counted_flops(model, image())  # two images, as FlopCounterMode counts them
    assert all(type(flops) is int for flops in (*report.per_block, report.embed_and_head))


def test_flops_of_a_convolutional_stem_on_one_channel_images() -> None:
    """A hybrid ViT built for grey images (in_chans=1): its stem is counted on one channel."""
    model = make("hybrid_cnn_stem", in_chans=1).requires_grad_(False)
    tokenprune.patch(model, r=8)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image()[:, :1])


def test_flops_of_a_head_on_every_token() -> None:
    """global_pool="": no pooling, the classifier runs on each token of the full grid."""
    model = make("vit_cls", global_pool="", depth=4).requires_grad_(False)
    tokenprune.patch(model, r=8)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


@pytest.mark.parametrize("family", ["vit_cls", "registers", "eva02_rope", "beit_relpos"])
def test_head_on_every_token_gives_logits_per_input_token(family: str) -> None:
    """global_pool="": timm returns logits for every input token; so does the patched model, each
    patch taking the logits of the token that absorbed it (read here from the dense source map).
    Before, it returned the reduced tokens' logits, which nothing told apart."""
    model = make(family, global_pool="").requires_grad_(False)
    x = image()
    unpatched = model(x)
    tokenprune.patch(model, r=8, trace_source=True)
    got = model(x)
    source = tokenprune.source(model)  # [B, T_out, T_in]
    reduced = model.forward_head(model.forward_tokens(x).x, size=None)  # [B, T_out, classes]
    assert got.shape == unpatched.shape and reduced.shape[1] < got.shape[1]
    torch.testing.assert_close(got, torch.einsum("boi,boc->bic", source.float(), reduced))
    tokenprune.patch(model, r=0)
    assert torch.equal(model(x), unpatched)


def test_head_on_every_token_refuses_dynamicvit_training() -> None:
    """Training keeps DynamicViT's dropped tokens, masked: per-token logits would count them."""
    model = tokenprune.patch(make("vit_cls", global_pool="", depth=4), "dynamicvit", stages=(1, 2)).train()
    with pytest.raises(ValueError, match="classifies every token"):
        model(image())


def test_max_pooling_ignores_tokens_a_training_mask_dropped() -> None:
    model = tokenprune.patch(make("max_pool"), r=0)
    tokens = torch.randn(2, 1 + 6, model.embed_dim)
    keep = torch.tensor([[1.0, 1, 0, 1, 0, 1, 1], [1.0, 0, 1, 1, 1, 0, 0]])[..., None]
    tokens[keep.expand_as(tokens) == 0] = 100.0  # would win every max if counted
    with torch.no_grad():
        got = model.forward_head(tokens, size=keep)
        kept_max = torch.stack([t[1:][k[1:, 0] > 0].amax(dim=0) for t, k in zip(tokens, keep)])
        assert torch.equal(got, model.head(model.fc_norm(kept_max)))
        # plain sizes (every token present): timm's own max pooling
        assert torch.equal(model.forward_head(tokens, size=torch.ones(2, 7, 1)), model.forward_head(tokens, size=None))


def test_forward_intermediates_on_full_grid() -> None:
    model = make("registers")
    with torch.no_grad():
        final0, inter0 = model.forward_intermediates(image(), indices=[0, 3])
        tokenprune.patch(model, r=16)
        final, inter = model.forward_intermediates(image(), indices=[0, 3], return_prefix_tokens=True)
    assert final.shape == final0.shape
    assert [f.shape for f, _ in inter] == [f.shape for f in inter0] == [(2, 384, 16, 16)] * 2
    assert [p.shape for _, p in inter] == [(2, 5, 384)] * 2
    # block 0 merges 16 pairs after its attention: only the ≤ 32 patches in those pairs change
    changed = (inter[0][0] - inter0[0]).abs().amax(dim=1) > 1e-4
    assert 0 < changed.sum(dim=(1, 2)).max() <= 32
    assert torch.isfinite(final).all()


@pytest.mark.parametrize("r", [0, 4])
def test_intermediate_maps_under_patch_dropout_are_refused_by_name(r: int) -> None:
    """timm's patch dropout (patch_drop_rate > 0, in train()) removes patches before the blocks,
    so the tokens fill no patch grid: NCHW maps are refused naming the cause and the remedies
    (before: a bare reshape error); the tokens themselves (NLC) are timm's, at r=0 bit for bit."""
    model = make("vit_cls", img_size=64, depth=2, patch_drop_rate=0.25).train()
    x = image(size=64)
    torch.manual_seed(3)
    expected = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
    tokenprune.patch(model, r=r)
    with pytest.raises(ValueError, match=r"patch_drop_rate > 0.*left 12 of the 16 patches.*model\.eval\(\)"):
        model.forward_intermediates(x, indices=[1])
    torch.manual_seed(3)
    got = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
    assert got.shape == expected.shape == (2, 12, 192)
    if r == 0:
        assert torch.equal(got, expected)
    model.eval()
    assert model.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == (2, 192, 4, 4)


def test_normed_intermediates_of_dropped_patches_stay_zero() -> None:
    """norm=True normalises each token, then unmerges: a patch DynamicViT dropped has no feature,
    0 as with norm=False and in forward_features(unmerge=True), not the norm's bias; the patches
    kept carry their token's normed feature."""
    model = tokenprune.patch(make("vit_cls"), "dynamicvit", keep_ratio=0.5).eval()
    with torch.no_grad():
        model.norm.bias.normal_(generator=torch.Generator().manual_seed(0))  # (initialised to 0)
    last = len(model.blocks) - 1
    with torch.no_grad():
        raw = model.forward_intermediates(image(), indices=[last], output_fmt="NLC", intermediates_only=True)[0]
        normed = model.forward_intermediates(image(), indices=[last], norm=True, output_fmt="NLC", intermediates_only=True)[0]
        features = model.forward_features(image(), unmerge=True)[:, model.num_prefix_tokens :]
    dropped = (raw == 0).all(dim=-1)
    assert dropped.any() and not dropped.all()
    assert (normed[dropped] == 0).all()
    torch.testing.assert_close(normed[~dropped], model.norm(raw[~dropped]))
    torch.testing.assert_close(normed, features)


@pytest.mark.parametrize("family", ["vit_cls", "eva02_rope", "beit_relpos"])
def test_a_patched_block_called_on_a_tensor_names_the_fix(family: str) -> None:
    """A loop of the user's own over model.blocks hands a patched block a tensor, not the state
    the model threads through them: a TypeError saying what to run instead."""
    model = tokenprune.patch(make(family), r=4)
    with pytest.raises(TypeError, match=r"TokenState.*got a Tensor.*tokenprune.unpatch"):
        model.blocks[0](torch.randn(2, 5, model.embed_dim))


@pytest.mark.parametrize("family", ["vit_cls", "eva02_rope", "beit_relpos"])
def test_inputs_that_are_not_a_batch_of_images_are_named(family: str) -> None:
    model = tokenprune.patch(make(family), r=4)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got shape \(3, 224, 224\).*unsqueeze\(0\)"):
        model(image()[0])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got shape \(2, 3, 4, 224, 224\)"):
        model(torch.randn(2, 3, 4, 224, 224))  # a video clip
    with pytest.raises(TypeError, match="torch.fx symbolic tracing.*torch.export"):
        torch.fx.symbolic_trace(model)


def test_attention_mask_with_merging_is_refused() -> None:
    model = tokenprune.patch(make("vit_cls"), r=4)
    with pytest.raises(ValueError, match="attn_mask"):
        model(image(), attn_mask=torch.ones(197, 197, dtype=torch.bool))


def test_unsupported_models_name_the_module() -> None:
    with pytest.raises(TypeError, match="SwinTransformer"):
        tokenprune.patch(timm.create_model("swin_tiny_patch4_window7_224"), r=4)
    custom = timm.create_model("vit_tiny_patch16_224", block_fn=timm.models.vision_transformer.ParallelThingsBlock)
    with pytest.raises(TypeError, match=r"blocks\[0\] of type ParallelThingsBlock"):
        tokenprune.patch(custom, r=4)

    class OtherAttention(timm.layers.Attention):
        pass

    custom = timm.create_model("vit_tiny_patch16_224", depth=1)
    custom.blocks[0].attn.__class__ = OtherAttention
    with pytest.raises(TypeError, match=r"blocks\[0\].attn of type OtherAttention \(attentions it can: .*diff_attention.DiffAttention"):
        tokenprune.patch(custom, r=4)
    with pytest.raises(ValueError, match="no transformer blocks"):
        tokenprune.patch(timm.create_model("vit_tiny_patch16_224", depth=0), r=4)
    convit = timm.create_model("convit_tiny", depth=1)
    for ask in (tokenprune.plan, tokenprune.flops):  # plans and FLOPs too: a clear TypeError
        with pytest.raises(TypeError, match="cannot patch .*ConVit"):
            ask(convit, 224)
    with pytest.raises(TypeError, match="cannot patch .*ConVit"):  # compiled, it is still named
        tokenprune.plan(torch.compile(convit), 224)


def test_patching_through_compile_and_data_parallel(tmp_path) -> None:
    """A model inside torch.compile or (Distributed)DataParallel is patched, planned and unpatched
    through them: Dynamo recompiles for the new class, DataParallel copies the model at every
    forward. DistributedDataParallel synchronises only the parameters it was built with, so a
    method that adds some (DynamicViT) is refused there; and DataParallel's per-device copies keep
    their own source maps."""
    import torch.distributed as dist

    vit = make("vit_cls", depth=2)
    x = image(1)
    compiled = torch.compile(vit, backend="eager")
    with torch.no_grad():
        unpatched = compiled(x)
        assert tokenprune.patch(compiled, r=4, trace_source=True) is compiled
        assert type(vit) is not timm.models.VisionTransformer and tokenprune.plan(compiled, 224).removed == (4, 4)
        merged = compiled(x)  # recompiled for the patched class
        torch.testing.assert_close(merged, vit(x))
        assert not torch.equal(merged, unpatched)
    parallel = torch.nn.DataParallel(vit)
    for wrapped in (compiled, parallel, torch.nn.DataParallel(compiled)):
        assert tokenprune.plan(wrapped, 224) == tokenprune.plan(vit, 224)
        assert tokenprune.flops(wrapped, 224) == tokenprune.flops(vit, 224)
    assert tokenprune.source(parallel).shape == (1, 197 - 4 * 2, 197)
    parallel.device_ids = [0, 1]  # as on two GPUs
    with pytest.raises(RuntimeError, match="DataParallel runs a copy of the model on each device"):
        tokenprune.source(parallel)
    tokenprune.unpatch(compiled)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), unpatched)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(vit)
        tokenprune.patch(ddp, r=4)  # ToMe adds no parameters
        assert tokenprune.plan(ddp, 224).removed == (4, 4)
        with pytest.raises(AttributeError, match=r"set r with tokenprune.patch\(model, r=16\)"):
            ddp.r = 16
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with pytest.raises(TypeError, match="adds parameters, which DistributedDataParallel, built before them, would not"):
            tokenprune.patch(ddp, "dynamicvit")
        assert vit.tokenprune_config == tokenprune.ToMeConfig(r=4)  # refused before anything changed
        # Patched, then wrapped: the predictors are DDP's, so a new keep ratio is no new parameter;
        # a new stage would be one, and is refused with the model as it was.
        pruned = make("vit_cls", depth=4)
        tokenprune.patch(pruned, "dynamicvit", keep_ratio=0.7, stages=(2,))
        ddp = torch.nn.parallel.DistributedDataParallel(pruned)
        tokenprune.patch(ddp, keep_ratio=0.5)
        assert tokenprune.plan(ddp, 224).removed == (0, 0, 98, 0)
        with pytest.raises(TypeError, match="adds parameters, which DistributedDataParallel"):
            tokenprune.patch(ddp, keep_ratio=0.6, stages=(1, 2))
        assert pruned.tokenprune_config.keep_ratio == 0.5 and pruned.blocks[2].reducer.keep_fraction == 0.5
        assert tokenprune.plan(ddp, 224).removed == (0, 0, 98, 0)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch: no batching rule for SDPA
@pytest.mark.parametrize(
    "method, options",
    [("tome", {"r": 8, "trace_source": True}), ("merge_unmerge", {"ratio": 0.5}), ("evit", {}), ("local_global", {"local_block": 0})],
)
def test_per_sample_gradients_with_torch_func(method: str, options: dict) -> None:
    """Per-sample gradients, torch.func's vmap over grad (DP-SGD, influence functions), go through
    a reducing model ("auto" takes the PyTorch references under the transform) and equal each
    image's own backward: the references build their assignments out of place, since vmap cannot
    write a batched index or value into a tensor they make."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=10, img_size=64).eval()
    tokenprune.patch(model, method, **options)
    assert_per_sample_gradients(model, image(2, 64))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize(("options", "named"), [({"local_threshold": 0.5}, "local_threshold"), ({"adaptive": True}, "adaptive=True")])
def test_data_dependent_counts_under_vmap_are_refused_by_name(options: dict, named: str) -> None:
    """local_global's counts read from the data (local_threshold, adaptive) cannot run under
    torch.func.vmap: the error names the option and the fixed count that works, instead of
    functorch's ".item()" error (fixed counts run there: test_per_sample_gradients_with_torch_func)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=10, img_size=64).eval()
    tokenprune.patch(model, "local_global", local_block=0, **options)
    with torch.no_grad():
        model(image(2, 64))  # runs outside vmap
    with pytest.raises(RuntimeError, match=rf"local_global's {re.escape(named)} reads its merge count from the data.*vmap"):
        torch.func.vmap(lambda one: model(one[None])[0])(image(2, 64))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_source_after_torch_func_vmap_says_where_the_map_is() -> None:
    """A traced forward under torch.func.vmap (per-sample gradients) leaves no map behind that
    tokenprune.source would fail on with functorch's "escaped tensor" error: it says where the map
    is, and that way (the source index returned from the vmapped function) gives each image the
    map of a plain batched forward. Under torch.func.grad alone the map is the image's own."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, num_classes=10, img_size=64).eval()
    tokenprune.patch(model, r=8, trace_source=True)
    x = image(2, 64)
    with torch.no_grad():
        model(x)
    expected = tokenprune.source(model)  # the independent reference: a plain batched forward
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(weights: dict, one: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, weights, (one[None],)).square().sum()

    torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    with pytest.raises(RuntimeError, match=r"the last forward ran under torch.func.vmap.*forward_tokens"):
        tokenprune.source(model)
    index = torch.func.vmap(lambda one: model.forward_tokens(one[None], trace_source=True).source_index[0])(x)
    assert torch.equal(source_matrix(index, expected.shape[1]), expected)
    torch.func.grad(loss, argnums=1)(params, x[1])
    assert torch.equal(tokenprune.source(model), expected[1:])
    model(x[:1])  # a plain forward leaves its map again
    assert torch.equal(tokenprune.source(model), expected[:1])


def assert_per_sample_gradients(model: nn.Module, inputs: torch.Tensor) -> None:
    """torch.func's vmap over grad gives each input the gradients of its own backward."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(weights: dict, one: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, weights, (one[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, inputs)
    for i in range(inputs.shape[0]):
        model.zero_grad()
        loss(dict(model.named_parameters()), inputs[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)


def test_tomes_model_r_raises_instead_of_changing_nothing() -> None:
    """Published ToMe is configured by ``model.r = 16`` after patching; here that attribute would
    be read by nothing, so setting it raises with the call that works."""
    model = make("vit_cls", depth=2)
    model.r = 3  # unpatched: an attribute like any other, kept through patch and unpatch
    tokenprune.patch(model, r=2)
    with pytest.raises(AttributeError, match=r"set r with tokenprune.patch\(model, r=16\)"):
        model.r = 16
    assert not hasattr(model, "r") and model.tokenprune_config.r == 2
    assert tokenprune.plan(model, 224).removed == (2, 2)
    tokenprune.unpatch(model)
    assert model.r == 3
    sam = tokenprune.patch(timm.create_model("samvit_base_patch16", depth=1, img_size=64, global_attn_indexes=()), ratio=0.5)
    with pytest.raises(AttributeError, match=r"set r with tokenprune.patch"):
        sam.r = 16


@pytest.mark.parametrize(("method", "option", "value"), [("merge_unmerge", "ratio", 0.25), ("evit", "keep_ratio", 0.5)])
def test_model_r_on_a_method_without_r_names_the_call_that_works(method: str, option: str, value: float) -> None:
    """On a model whose method has no r (SAM's merge_unmerge, token dropping), ``model.r = 16``
    names the method's own option, not ``tokenprune.patch(model, r=16)``, which refuses r there;
    the call it names patches."""
    if method == "merge_unmerge":
        model = timm.create_model("samvit_base_patch16", depth=1, img_size=64, global_attn_indexes=())
    else:
        model = make("vit_cls", depth=2)
    tokenprune.patch(model, method, **{option: 0.4})
    with pytest.raises(TypeError, match="has no option r"):  # what the old message's call did
        tokenprune.patch(model, r=16)
    with pytest.raises(AttributeError) as error:
        model.r = 16
    assert "patch(model, r=16)" not in str(error.value)
    named = re.search(r"set its options with tokenprune\.patch\(model, (\w+)=\.\.\.\)", str(error.value)).group(1)
    assert named == option
    tokenprune.patch(model, **{named: value})
    assert getattr(model.tokenprune_config, option) == value


def test_wrapper_r_raises_too_and_unpatch_restores_its_class(tmp_path) -> None:
    """timm's wrappers patched through (a features_only backbone, the Qwen3 ViT classifier)
    refuse ``wrapper.r = 16`` as the model does; they pickle, and unpatching gives them back
    their own class."""
    from tests.test_qwen3_vit import qwen
    from timm.models._features import FeatureGetterNet
    from timm.models.qwen3_vit import Qwen3VitClassifier

    backbone = timm.create_model("vit_tiny_patch16_224", depth=2, features_only=True, out_indices=(1,)).eval()
    for wrapper, own_class in ((backbone, FeatureGetterNet), (qwen("classifier"), Qwen3VitClassifier)):
        assert type(wrapper) is own_class
        tokenprune.patch(wrapper, r=2)
        with pytest.raises(AttributeError, match=r"set r with tokenprune.patch\(model, r=16\)"):
            wrapper.r = 16
        assert isinstance(wrapper, own_class) and not hasattr(wrapper, "r")
        torch.save(wrapper, tmp_path / "wrapper.pt")
        restored = torch.load(tmp_path / "wrapper.pt", weights_only=False)
        assert type(restored) is type(wrapper) and restored.state_dict().keys() == wrapper.state_dict().keys()
        tokenprune.patch(wrapper, r=1)  # patching again keeps the guard
        assert type(wrapper) is type(restored)
        tokenprune.unpatch(wrapper)
        assert type(wrapper) is own_class
        wrapper.r = 16  # unpatched: an attribute like any other


def test_data_parallel_r_raises_while_patched_through_it() -> None:
    """``DataParallel(model).r = 16`` after patching through the wrapper raises as the model's
    own does; the wrapper still runs, and unpatching gives it back its class."""
    vit = make("vit_cls", depth=2)
    parallel = torch.nn.DataParallel(vit)
    tokenprune.patch(parallel, r=2)
    with pytest.raises(AttributeError, match=r"set r with tokenprune.patch\(model, r=16\)"):
        parallel.r = 16
    assert isinstance(parallel, torch.nn.DataParallel) and not hasattr(parallel, "r")
    x = image(1)
    with torch.no_grad():
        torch.testing.assert_close(parallel(x), vit(x))
    tokenprune.unpatch(parallel)
    assert type(parallel) is torch.nn.DataParallel
    parallel.r = 16  # unpatched: an attribute like any other


def test_bad_options_name_the_fix() -> None:
    """A misspelt method or option names the close match, another method's option names the
    methods that have it, a config class asks for an object; plan takes numpy sizes and
    refuses a clip's size for an image model."""
    import numpy as np

    model = make("vit_cls")
    with pytest.raises(ValueError, match="unknown method 'ToMe'.*did you mean 'tome'"):
        tokenprune.patch(model, "ToMe", r=4)
    with pytest.raises(TypeError, match="has no option prop_atn.*did you mean prop_attn"):
        tokenprune.patch(model, "tome", r=4, prop_atn=False)
    with pytest.raises(TypeError, match=r"keep_ratio is an option of 'dynamicvit', 'evit': name the method, e\.g\. "
                                        r"tokenprune\.patch\(model, 'dynamicvit', keep_ratio=\.\.\.\)"):
        tokenprune.patch(model, "tome", keep_ratio=0.5)
    with pytest.raises(TypeError, match=r"a class: give an object, tokenprune\.patch\(model, ToMeConfig\(r=4\)\), or the name 'tome'"):
        tokenprune.patch(model, tokenprune.ToMeConfig, r=4)
    assert getattr(model, "tokenprune_config", None) is None  # nothing was patched on the way
    tokenprune.patch(model, r=4)
    assert tokenprune.plan(model, np.int64(224)) == tokenprune.plan(model, 224)
    assert tokenprune.flops(model, np.int64(224)) == tokenprune.flops(model, 224)
    with pytest.raises(ValueError, match=r"is an image model: input_size is \(H, W\) or \(C, H, W\); got \(3, 8, 224, 224\), four sizes as a clip.s \(C, T, H, W\) \(for a batch.s x\.shape, give x\.shape\[-2:\]\)"):
        tokenprune.plan(model, (3, 8, 224, 224))


def test_another_methods_option_names_only_methods_the_model_runs() -> None:
    """An option of other methods names, of those, the ones this model runs, so that the call
    the hint gives patches (SAM's r named 'tome', which SAM refuses; a video ViT's window named
    'local_global', which video refuses; a features_only backbone's keep_ratio named
    'dynamicvit', whose dropped patches its maps would read); where the model runs none of
    them, the hint says so."""
    from tokenprune.models import video_vit_small_patch16_224
    from tokenprune.patch.vit import reducing_model

    def sam() -> nn.Module:
        return timm.create_model("samvit_base_patch16", img_size=64, depth=1, embed_dim=64, num_heads=2, global_attn_indexes=())

    def video() -> nn.Module:
        return video_vit_small_patch16_224(num_frames=4, img_size=64, depth=2, embed_dim=64, num_heads=2)

    def backbone() -> nn.Module:
        return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, features_only=True, out_indices=(1, 3))

    for build, option, value, refused in [(video, "window", 2, "local_global"), (backbone, "keep_ratio", 0.7, "dynamicvit")]:
        with pytest.raises(TypeError, match=rf"'{refused}' too, refused on this model") as error:
            tokenprune.patch(build(), **{option: value})
        suggested = re.search(r"tokenprune\.patch\(model, '(\w+)', " + option, str(error.value)).group(1)
        assert suggested != refused
        model = tokenprune.patch(build(), suggested, **{option: value})  # the hint's call patches
        assert type(reducing_model(model).tokenprune_config) is tokenprune.METHODS[suggested]
    for build, option, value in [(sam, "r", 8), (lambda: make("vit_cls"), "joint_after", False)]:
        model = build()
        with pytest.raises(TypeError, match=rf"{option} is an option of .*, which \w+ refuses$"):
            tokenprune.patch(model, **{option: value})
        assert getattr(model, "tokenprune_config", None) is None
    with pytest.raises(TypeError, match="which VisionTransformerSAM refuses"):  # on a patched SAM too
        tokenprune.patch(tokenprune.patch(sam(), ratio=0.25), r=8)


def test_a_missing_option_names_the_call_that_patches_the_method() -> None:
    """The call an error shows for a missing r or ratio patches the method asked for: with
    'pitome' named, not ToMe's default (the call without the name patched ToMe); and a method
    the model cannot run is refused for that before its ratio is asked for, as before its r."""
    for method, value in [("pitome", 4), ("merge_unmerge", 0.25), ("tome", 4)]:
        model = make("vit_cls", depth=2)
        with pytest.raises(TypeError, match=rf"method '{method}' needs") as error:
            tokenprune.patch(model, method)
        named, option = re.search(r"e\.g\. tokenprune\.patch\(model, (?:'(\w+)', )?(\w+)=\.\.\.\)", str(error.value)).groups()
        tokenprune.patch(model, *[named] if named else [], **{option: value})  # the call as shown, with a value
        assert type(model.tokenprune_config) is tokenprune.METHODS[method]
    with pytest.raises(TypeError, match=r"needs r: e\.g\. tokenprune\.patch\(model, r=\.\.\.\)"):  # implied: no name
        tokenprune.patch(make("vit_cls", depth=2))
    eva = make("eva02_rope", depth=2)
    with pytest.raises(TypeError, match="MergeUnmergeConfig merges and unmerges inside every block"):
        tokenprune.patch(eva, "merge_unmerge")
    assert getattr(eva, "tokenprune_config", None) is None


def test_a_model_that_holds_a_supported_one_names_where() -> None:
    """A model of one's own around a timm ViT (nn.Sequential with a head, a module holding it as
    an attribute) is refused naming where the ViT is, and patching that one, as the error says,
    makes the outer model's forward run it patched: the logits of the same ViT patched alone."""
    torch.manual_seed(0)
    head = nn.Linear(10, 3)
    wrapped = nn.Sequential(make("vit_cls", depth=2), head)
    with pytest.raises(TypeError, match=r"cannot patch torch\.nn\.modules\.container\.Sequential; it holds a "
                                        r"VisionTransformer at '0': give that one, e\.g\. tokenprune\.patch\(model\.get_submodule\('0'\), \.\.\.\)"):
        tokenprune.patch(wrapped, r=4)
    inner = re.search(r"model\.get_submodule\('(\w+)'\)", str(pytest.raises(TypeError, tokenprune.plan, wrapped, 224).value)).group(1)
    tokenprune.patch(wrapped.get_submodule(inner), r=4)
    alone = tokenprune.patch(make("vit_cls", depth=2), r=4)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(image()), head(alone(image())), rtol=0, atol=0)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = make("vit_cls", depth=2)

    with pytest.raises(TypeError, match=r"it holds a VisionTransformer at 'backbone'"):
        tokenprune.patch(Holder(), r=4)
    with pytest.raises(TypeError, match=r"cannot patch torch\.nn\.modules\.linear\.Linear; supported"):  # nothing held
        tokenprune.patch(head, r=4)


def test_bad_options() -> None:
    model = make("vit_cls")
    with pytest.raises(ValueError, match="unknown method 'tomee'"):
        tokenprune.patch(model, "tomee", r=4)
    with pytest.raises(TypeError, match="has no option rr"):
        tokenprune.patch(model, rr=4)
    # the option it lacks, and ToMe's rule of thumb for it: ViT-Ti/16 at 224 has 197 tokens, 12 blocks
    with pytest.raises(TypeError, match=r"method 'tome' needs r: .*rule of thumb, r ≈ tokens / blocks, gives 16 here "
                                        r"\(197 tokens over 12 blocks at 224x224\)"):
        tokenprune.patch(model)
    # a method the model cannot run is refused for that, before its r is asked for
    sam = timm.create_model("samvit_base_patch16", depth=1, img_size=64, global_attn_indexes=())
    with pytest.raises(TypeError, match="SAM's blocks need every patch"):
        tokenprune.patch(sam, "tome")
    from tokenprune.models import video_vit_small_patch16_224

    with pytest.raises(TypeError, match=r"gives 5 here \(64 tokens over 12 blocks at 8x64x64\)"):  # frames counted
        tokenprune.patch(video_vit_small_patch16_224(num_frames=8, img_size=64))
    with pytest.raises(TypeError, match=r"needs r: e.g. tokenprune.patch\(model, r=...\)$"):  # the rule gives 0: no hint
        tokenprune.patch(video_vit_small_patch16_224(num_frames=2, img_size=32))
    with pytest.raises(ValueError, match="non-negative"):
        tokenprune.patch(model, r=-3)
    with pytest.raises(ValueError, match="13 entries"):
        tokenprune.patch(model, r=[1] * 13)
    with pytest.raises(ValueError, match="backend must be one of"):
        tokenprune.patch(model, r=4, backend="cuda")
    with pytest.raises(TypeError, match="prop_attn must be True or False"):
        tokenprune.patch(model, r=4, prop_attn="yes")
    assert not hasattr(model, "tokenprune_config")  # a failed patch leaves the model untouched


def test_source_map_belongs_to_the_last_forward_and_settings() -> None:
    model = tokenprune.patch(make("vit_cls", depth=2), r=4, trace_source=True)
    with torch.no_grad():
        model(image(1))
        assert tokenprune.source(model).shape[0] == 1
        model.forward_intermediates(image(3), indices=[1])  # a forward too: its map replaces the last
        assert tokenprune.source(model).shape == (3, 197 - 8, 197)
    tokenprune.patch(model, r=4, trace_source=False)  # the old map would describe other settings
    with pytest.raises(RuntimeError, match="patch the model with trace_source=True"):
        tokenprune.source(model)


@pytest.mark.parametrize("fused", [True, False])
def test_cls_attention_metric_counts_merged_keys_by_size(fused: bool) -> None:
    """EViT's metric over merged tokens (its fused token has a size): the class token's
    attention with log(size) on every key, as the attention itself takes it; by hand."""
    model = make("vit_cls", depth=1)
    attn = model.blocks[0].attn
    attn.fused_attn = fused
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, model.embed_dim, generator=gen)
    size = torch.randint(1, 6, (2, 11), generator=gen).float()
    with torch.no_grad():
        _, metric = attend(attn, x, None, metric="cls_attention", key_bias=size.log(), backend="auto")
        q, k, _ = attn.qkv(x).reshape(2, 11, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
        expected = logits.softmax(dim=-1).mean(dim=1)[:, 0]
    torch.testing.assert_close(metric, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stop_early", [False, True])
def test_forward_intermediates_prefix_tokens_and_stop_early_as_in_timm(stop_early: bool) -> None:
    """Register and class tokens returned with the maps are timm's (r=0: bit for bit; r>0:
    after block 0, whose merge follows its attention, the never-merged prefix is unchanged),
    and stop_early still runs the last requested block."""
    model = make("registers")
    x = image()
    options = dict(indices=[0, 2], return_prefix_tokens=True, norm=True, stop_early=stop_early, intermediates_only=True)
    with torch.no_grad():
        expected = model.forward_intermediates(x, **options)
        tokenprune.patch(model, r=0)
        unreduced = model.forward_intermediates(x, **options)
        tokenprune.patch(model, r=16)
        reduced = model.forward_intermediates(x, **options)
    assert len(unreduced) == len(reduced) == len(expected) == 2
    for (maps, prefix), (expected_maps, expected_prefix) in zip(unreduced, expected):
        assert torch.equal(maps, expected_maps) and torch.equal(prefix, expected_prefix)
    torch.testing.assert_close(reduced[0][1], expected[0][1], atol=1e-5, rtol=1e-5)


def test_avgmax_pooling_weighs_tokens_by_size_without_fc_norm() -> None:
    """Without fc_norm (a LayerNorm, blind to a factor on the pooled vector) the avgmax pooling
    must be timm's 0.5 · (max + mean) exactly: merged tokens pooled by size = timm's pooling of
    the unmerged grid."""
    model = make("avgmax_with_prefix", fc_norm=False)
    assert isinstance(model.fc_norm, torch.nn.Identity)
    tokenprune.patch(model, r=8, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        pooled = model.forward_head(state.x, size=state.size)
        full = unmerge(state.x, model._tokenprune_source[0])
        plain = timm.models.VisionTransformer.forward_head(model, full)
    torch.testing.assert_close(pooled, plain, atol=1e-5, rtol=1e-5)


def test_rule_of_thumb_hint_at_one_token_per_block() -> None:
    """tokens // blocks == 1 is still a usable r (the hint is dropped only below 1)."""
    from tokenprune.models import video_vit_small_patch16_224

    with pytest.raises(TypeError, match=r"gives 1 here \(16 tokens over 12 blocks at 2x64x64\)"):
        tokenprune.patch(video_vit_small_patch16_224(num_frames=2, img_size=64))


def test_a_config_object_with_keywords_is_refused() -> None:
    model = make("vit_cls", depth=2)
    with pytest.raises(TypeError, match="not both"):
        tokenprune.patch(model, tokenprune.ToMeConfig(r=4), r=8)
    assert not hasattr(model, "tokenprune_config")


def test_a_method_that_is_neither_a_name_nor_a_config_is_refused() -> None:
    """``patch(model, 16)`` (ToMe's r in the method's place), the config class, a dict: one
    error naming what ``method`` takes, not an AttributeError from inside."""
    model = make("vit_cls", depth=2)
    with pytest.raises(TypeError, match=r"got 16; for ToMe's r, tokenprune.patch\(model, r=16\)"):
        tokenprune.patch(model, 16)
    for method in (tokenprune.ToMeConfig, {"r": 2}):
        with pytest.raises(TypeError, match="method must be a name in tokenprune.METHODS or a config object"):
            tokenprune.patch(model, method)
    assert not hasattr(model, "tokenprune_config")
    # with no method named, an unknown option names the method it was taken for: the current one
    tokenprune.patch(model, "evit", keep_ratio=0.7)
    with pytest.raises(TypeError, match=r"method 'evit' \(the model's current method, as none is named\) has no option r"):
        tokenprune.patch(model, r=4)


def test_flops_of_map_pooling_that_skips_the_prefix_tokens() -> None:
    """Attention pooling without pool_include_prefix reads the patches alone; with registers the
    prefix is 5 tokens, which the kv projection and the pooling attention must not count."""
    model = make("registers", global_pool="map").requires_grad_(False)
    assert model.num_prefix_tokens == 5 and not model.pool_include_prefix
    tokenprune.patch(model, r=8)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


@pytest.mark.parametrize("family", ["vit_cls", "vit_avg_no_cls"])
def test_blocks_left_with_one_mergeable_token_pass_it_through(family: str) -> None:
    """At 32x32 (4 patches), r=2 leaves one mergeable token from block 2 on: the cap is 0 there
    and those blocks must run unreduced (no matching on an empty B set), as plan and FLOPs say."""
    model = make(family, img_size=32, depth=4).requires_grad_(False)
    tokenprune.patch(model, r=2, trace_source=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reduction = tokenprune.plan(model, 32)
    assert reduction.removed == (2, 1, 0, 0)
    with torch.no_grad():
        assert model.forward_tokens(x).num_tokens == reduction.output_tokens
    assert tokenprune.flops(model, 32, batch_size=2).total == counted_flops(model, x)


@pytest.mark.parametrize("class_token", [True, False])
def test_prr_pooling_weighs_tokens_by_size_and_counts_its_flops(class_token: bool) -> None:
    """timm's global_pool="prr" (parameter-free self-attention over every token, then the class
    token or the mean): r=0 is timm's, bit for bit; merged tokens pool as timm's own pooling of
    the unmerged grid (each patch carrying its token's feature); FLOPs as FlopCounterMode counts."""
    model = make("vit_cls", global_pool="prr", class_token=class_token, depth=2)
    with torch.no_grad():
        expected = model(image())
        tokenprune.patch(model, r=0)
        assert torch.equal(model(image()), expected)
        tokenprune.patch(model, r=16, trace_source=True)
        state = model.forward_tokens(image())
        full = unmerge(state.x, model._tokenprune_source[0])
        reference = timm.models.vision_transformer.VisionTransformer.forward_head(model, full)
        torch.testing.assert_close(model(image()), reference, atol=1e-5, rtol=1e-5)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_hooks_on_attention_are_refused_rather_than_silently_skipped() -> None:
    """The patched block computes attention itself, not through attn.forward, so a forward hook
    on blocks[i].attn (attention maps, feature capture) would stop firing, even at r=0: patch
    refuses it, naming the block, and leaves the model as it was."""
    model = make("vit_cls", depth=2)
    calls = []
    handle = model.blocks[1].attn.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with pytest.raises(TypeError, match=r"blocks\[1\]\.attn has forward hooks"):
        tokenprune.patch(model, r=0)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    with torch.no_grad():
        model(image())
    assert calls == [(2, 197, 192)]
    handle.remove()
    tokenprune.patch(model, r=0)  # without the hook it patches


@pytest.mark.parametrize("family", ["vit_cls", "eva02_rope", "beit_relpos"])
def test_hooks_put_on_attention_after_patching_raise_in_forward(family: str) -> None:
    """A hook put on blocks[i].attn after patching cannot be refused by patch: the forward
    refuses it, naming the fix, rather than run without it; removed, the model runs again."""
    model = tokenprune.patch(make(family, depth=2), r=4)
    calls = []
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(RuntimeError, match="attn has forward hooks, which would stop firing"), torch.no_grad():
        model(image())
    handle.remove()
    with torch.no_grad():
        model(image())


def test_backward_hooks_on_attention_are_refused_rather_than_silently_skipped() -> None:
    """A full backward hook on blocks[i].attn (gradients of attention outputs: Grad-CAM, gradient
    rollout) fires only where attn.forward runs, which the patched block never calls: it stopped
    firing, silently, where forward hooks are refused. patch refuses it too, one put on after
    patching raises in the forward, and attn.proj's backward hook, which the error names, sees the
    gradient the unpatched attn's saw."""
    model = make("vit_cls", depth=2)
    x = image()
    grads = []
    handle = model.blocks[1].attn.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0]))
    model(x).sum().backward()
    assert len(grads) == 1
    with pytest.raises(TypeError, match=r"blocks\[1\]\.attn has backward hooks, which would stop firing"):
        tokenprune.patch(model, r=0)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    handle.remove()

    tokenprune.patch(model, r=4)
    handle = model.blocks[1].attn.register_full_backward_pre_hook(lambda module, grad_out: None)
    with pytest.raises(RuntimeError, match="attn has backward hooks, which would stop firing"):
        model(x)
    handle.remove()

    tokenprune.patch(model, r=0)
    model.blocks[1].attn.proj.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0]))
    model(x).sum().backward()
    assert len(grads) == 2 and torch.equal(grads[1], grads[0])


@pytest.mark.parametrize("family", ["vit_cls", "deit_distilled", "cait"])
def test_hooks_on_the_blocks_container_are_refused_rather_than_silently_skipped(family: str) -> None:
    """timm's ViT, DeiT and CaiT run ``self.blocks(x)``, so a hook on ``model.blocks`` (the
    tokens leaving the last block, a common feature capture) fires unpatched; the patched model
    runs its blocks one by one and it stopped firing, silently. patch refuses it, leaving the
    model as it was; one put on after patching raises in the forward; the alternative the error
    names (hooks on the first and last block) sees exactly what the unpatched hook saw at r=0."""
    if family == "cait":
        torch.manual_seed(0)
        model = timm.create_model("cait_xxs24_224", depth=2, img_size=64, num_classes=10).eval()
        x = image(size=64)
    else:
        model, x = make(family, depth=2), image()
    seen = []
    handle = model.blocks.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        expected = model(x)
    assert len(seen) == 1
    with pytest.raises(TypeError, match=r"model\.blocks has forward hooks, which would stop firing"):
        tokenprune.patch(model, r=0)
    assert not type(model).__name__.startswith("Reducing") and not hasattr(model, "tokenprune_config")
    handle.remove()

    tokenprune.patch(model, r=4)
    handle = model.blocks.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(RuntimeError, match=r"model\.blocks of this patched model has forward hooks, which would stop firing"), torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match="model.blocks\\[0\\]"), torch.no_grad():
        model.forward_features(x)
    handle.remove()

    tokenprune.patch(model, r=0)
    entering, leaving = [], []
    model.blocks[0].register_forward_pre_hook(lambda module, args: entering.append(args[0].x))
    model.blocks[-1].register_forward_hook(lambda module, args, out: leaving.append(out.x))
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert torch.equal(entering[0], seen[0][0]) and torch.equal(leaving[0], seen[0][1])


def test_hooks_on_prr_pooling_are_refused_rather_than_silently_skipped() -> None:
    """Over merged tokens the patch runs timm's prr pooling itself (AttentionPoolPrr takes no
    mask to count tokens by size), so a hook on model.attn_pool fired unpatched and at r=0, then
    stopped firing, silently: patch refuses it, one put on after patching raises in a merging
    forward, and the hook the error names (a pre-hook on fc_norm) sees the pooled features."""
    model = make("vit_cls", global_pool="prr", depth=2)
    handle = model.attn_pool.register_forward_hook(lambda module, args, out: None)
    with pytest.raises(TypeError, match=r"model\.attn_pool \(timm's parameter-free prr pooling\) has forward hooks"):
        tokenprune.patch(model, r=8)
    assert type(model) is timm.models.vision_transformer.VisionTransformer
    handle.remove()
    pooled = []
    handle = model.attn_pool.register_forward_hook(lambda module, args, out: pooled.append(out))
    with torch.no_grad():
        model(image())
    handle.remove()
    tokenprune.patch(model, r=8)
    handle = model.attn_pool.register_forward_hook(lambda module, args, out: pooled.append(out))
    with pytest.raises(RuntimeError, match="attn_pool .* has forward hooks, which would stop firing"), torch.no_grad():
        model(image())
    assert len(pooled) == 1
    handle.remove()
    seen = []
    model.fc_norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        tokenprune.patch(model, r=0)
        model(image())
    torch.testing.assert_close(seen[0], pooled[0], rtol=0, atol=0)


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_parametrized_after_patching_unpatches_only_once_the_parametrizations_are_gone() -> None:
    """torch.nn.utils.parametrize replaces a module's class by a subclass of it: on a patched
    model, of tokenprune's class. unpatch refuses that, changing nothing (it used to restore the
    blocks, drop the settings and keep the patched model class: a model whose forward raised);
    once the parametrization is removed it restores timm's model exactly."""
    from torch.nn.utils import parametrize

    model = make("vit_cls", depth=2)
    with torch.no_grad():
        expected = model(image())
        tokenprune.patch(model, r=0)
        parametrize.register_parametrization(model, "pos_embed", _Doubled())
        parametrized = model(image())
        with pytest.raises(TypeError, match="parametriz"):
            tokenprune.unpatch(model)
        with pytest.raises(TypeError, match="parametriz"):
            tokenprune.patch(model, r=8)
        assert torch.equal(model(image()), parametrized)  # still patched, working
        parametrize.remove_parametrizations(model, "pos_embed", leave_parametrized=False)
        tokenprune.unpatch(model)
        assert type(model) is timm.models.vision_transformer.VisionTransformer
        assert torch.equal(model(image()), expected)
    fresh = make("vit_cls", depth=2)
    parametrize.register_parametrization(fresh, "pos_embed", _Doubled())
    with pytest.raises(TypeError, match="patch the model first, then parametrize"):
        tokenprune.patch(fresh, r=8)


@pytest.mark.parametrize(
    ("method", "neutral"),
    [("tome", {"r": 0}), ("evit", {"keep_ratio": 1.0}), ("local_global", {"local_block": 1, "local_ratio": 0.0, "r": 0})],
)
def test_a_neutral_setting_keeps_timms_two_step_head(method: str, neutral: dict) -> None:
    """At a setting that removes no token (r=0, keep ratio 1, local ratio 0) the patched model
    is the unpatched one, timm's forward_head(forward_features(x)) included: an average-pooling
    head is not refused for lack of sizes that no merge made."""
    model = make("avgmax_with_prefix")
    x = image()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x))
        tokenprune.patch(model, method, **neutral)
        assert torch.equal(model.forward_head(model.forward_features(x)), expected)


@pytest.mark.parametrize("family", ["vit_avg_no_cls", "vit_map"])
def test_evit_refusal_names_the_method_and_the_model(family: str) -> None:
    with pytest.raises(ValueError, match="method 'evit' with score='attention' needs a class token .*VisionTransformer"):
        tokenprune.patch(make(family), "evit", keep_ratio=0.7)


def test_a_token_mixing_gated_mlp_is_refused_when_patching() -> None:
    """mlp_layer=GatedMlp with timm's SpatialGatingUnit (gMLP) mixes a fixed seq_len of tokens:
    refused when patching, naming the module, the model left as it was (before: a bare shape
    mismatch in the first forward after any reduction). GatedMlp without the gate works per
    token and stays exact at r=0."""
    from functools import partial

    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import SpatialGatingUnit

    x = image(size=64)
    gated = partial(GatedMlp, gate_layer=partial(SpatialGatingUnit, seq_len=17))
    model = make("vit_cls", img_size=64, depth=2, mlp_layer=gated)
    with pytest.raises(TypeError, match=r"blocks\[0\]\.mlp\.gate: timm's SpatialGatingUnit mixes a fixed number"):
        tokenprune.patch(model, r=2)
    assert not hasattr(model, "tokenprune_config") and type(model) is timm.models.VisionTransformer
    per_token = make("vit_cls", img_size=64, depth=2, mlp_layer=GatedMlp)
    with torch.no_grad():
        expected = per_token(x)
        assert torch.equal(tokenprune.patch(per_token, r=0)(x), expected)

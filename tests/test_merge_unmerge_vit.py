"""``merge_unmerge`` on plain timm VisionTransformers (ToMe for SD's merge, attend, unmerge in
every block): the model against an independent dense reference (class and distillation tokens
protected, LayerScale, with and without proportional attention and a merged MLP), exactness at
ratio 0, FLOPs against FlopCounterMode, the full grid for dense outputs and clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import tokenprune
from tests.test_patch import counted_flops, image, make
from tests.tome_reference import _match

MODELS = {
    # LayerScale at 0.5, not its 1e-5 init, so that every block's update counts
    "dinov2": ("vit_small_patch14_dinov2", {"img_size": 98, "depth": 3, "init_values": 0.5}, 98),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"depth": 2, "img_size": 112}, 112),  # two protected tokens
}


def vit(name: str) -> tuple[torch.nn.Module, int]:
    architecture, kwargs, size = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(architecture, **kwargs).eval(), size


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def reference_logits(model, x: torch.Tensor, ratio: float, prop_attn: bool, mlp: bool) -> torch.Tensor:
    """The unpatched model with every block run as ToMe for SD would run it, written unlike
    tokenprune: published ToMe matching (class and distillation token protected) on the normed
    tokens applied to an identity matrix gives a dense token × input-token membership; timm's own
    attention module runs on the merged tokens with log(size) as its float mask; updates spread
    back with the membership's transpose."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    batch, num_tokens, _ = x.shape
    r = min(math.floor(ratio * (num_tokens - prefix) + 1e-9), (num_tokens - prefix) // 2)
    for block in model.blocks:
        h = block.norm1(x)
        merge = _match(h, r, True, prefix == 2, sort_unmerged=True)
        member = merge(torch.eye(num_tokens).expand(batch, -1, -1).contiguous(), "sum")  # [B, T', T]
        size = member.sum(-1)
        mask = size.log()[:, None, None, :] if prop_attn else None
        x = x + block.ls1(member.transpose(1, 2) @ block.attn((member @ h) / size[..., None], attn_mask=mask))
        h = block.norm2(x)
        update = member.transpose(1, 2) @ block.mlp((member @ h) / size[..., None]) if mlp else block.mlp(h)
        x = x + block.ls2(update)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("prop_attn", "mlp"), [(True, True), (False, True), (True, False)])
def test_model_matches_reference(name: str, prop_attn: bool, mlp: bool) -> None:
    model, size = vit(name)
    x = images(size)
    expected = reference_logits(model, x, 0.5, prop_attn, mlp)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5, prop_attn=prop_attn, merge_mlp=mlp)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and merging changed the output: the test can fail
        assert (tokenprune.unpatch(model)(x) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ratio_zero_is_exact_and_outputs_keep_every_token(name: str) -> None:
    model, size = vit(name)
    x = images(size)
    with torch.no_grad():
        expected = model(x)
        expected_features = model.forward_features(x)
    tokenprune.patch(model, "merge_unmerge", ratio=0.0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    tokenprune.patch(model, ratio=0.5)  # the same method, a new ratio
    assert isinstance(model.tokenprune_config, tokenprune.MergeUnmergeConfig)
    with torch.no_grad():
        features = model.forward_features(x)
        maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert features.shape == expected_features.shape  # every token leaves every block
    grid = size // model.patch_embed.patch_size[0]
    assert maps[0].shape == (2, model.embed_dim, grid, grid)
    assert tokenprune.plan(model, size).removed == (0,) * len(model.blocks)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("options", [{"ratio": 0.5}, {"ratio": 0.3, "merge_mlp": False}], ids=["all", "attention_only"])
def test_flops_match_flop_counter(name: str, options: dict) -> None:
    model, size = vit(name)
    patched = tokenprune.patch(copy.deepcopy(model), "merge_unmerge", backend="torch", **options)
    x = images(size, batch=1)
    assert tokenprune.flops(patched, size).total == counted_flops(patched, x)
    assert tokenprune.flops(patched, size).total < tokenprune.flops(model, size).total


def test_refused_where_blocks_give_positions_or_are_not_plain() -> None:
    with pytest.raises(TypeError, match="use tome"):
        tokenprune.patch(timm.create_model("eva02_tiny_patch14_224", depth=1), "merge_unmerge", ratio=0.5)
    with pytest.raises(TypeError, match="ParallelScalingBlock"):
        tokenprune.patch(timm.create_model("vit_pwee_patch16_reg1_gap_256", depth=1), "merge_unmerge", ratio=0.5)


def test_dense_fidelity_names_merge_unmerge_settings() -> None:
    from evals.dense_fidelity import COMPARED, describe

    assert describe(tokenprune.MergeUnmergeConfig(ratio=0.3, merge_mlp=False)) == "ratio=0.3, merge_mlp=False"
    compared = COMPARED["merge_unmerge"]
    assert compared.drawn is None  # no token outlives its block: no merge map
    assert {config.merge_mlp for config in compared.settings} == {True, False}


def test_differential_attention_runs_its_own_forward() -> None:
    """A ViT of timm Blocks with DiffAttention: its two maps on the merged tokens (through its
    registered forward), ratio 0 exact, FLOPs as counted."""
    torch.manual_seed(0)
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", depth=2, img_size=64).eval()
    x = images(64)
    with torch.no_grad():
        expected = model(x)
    tokenprune.patch(model, "merge_unmerge", ratio=0.0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    tokenprune.patch(model, ratio=0.5, backend="torch")
    with torch.no_grad():
        assert not torch.equal(model(x), expected)
    assert tokenprune.flops(model, 64).total == counted_flops(model, images(64, batch=1))


def test_source_names_why_merge_unmerge_has_no_map() -> None:
    model = tokenprune.patch(make("vit_cls", depth=2), "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        model(image(1))
    with pytest.raises(RuntimeError, match="unmerges inside every block"):
        tokenprune.source(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ratio_counts_only_the_mergeable_tokens(name: str) -> None:
    """At ratio 0.3, r = ⌊0.3 · patches⌋, the prefix tokens aside (⌊0.3 · all tokens⌋ would be
    one more here); at 0.5 the bipartite cap hides the difference."""
    model, size = vit(name)
    x = images(size)
    expected = reference_logits(model, x, 0.3, True, True)
    tokenprune.patch(model, "merge_unmerge", ratio=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_merged_count_is_the_exact_floor_of_the_ratio() -> None:
    """r = ⌊ratio · mergeable⌋ in exact arithmetic (0.29 · 100 is 28.999… in floating point),
    at most half of the mergeable tokens."""
    from fractions import Fraction

    from tokenprune.methods.merge_unmerge import MergeUnmergeStep

    for percent in range(1, 51):
        for prefix in (0, 1, 5):
            step = MergeUnmergeStep(percent / 100, True, prefix)
            for mergeable in (7, 49, 100, 180, 196, 200, 300, 1024):
                expected = min(math.floor(Fraction(percent, 100) * mergeable), mergeable // 2)
                assert step.merged_count(prefix + mergeable) == expected, (percent, prefix, mergeable)


def test_defaults_merge_the_mlp_with_proportional_attention() -> None:
    """The documented defaults: ToMe for SD's merge with proportional attention and the MLP
    run on the merged tokens too."""
    model, size = vit("dinov2")
    x = images(size)
    expected = reference_logits(model, x, 0.5, prop_attn=True, mlp=True)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)

"""timm's SAM image encoder with merge-attend-unmerge blocks (``merge_unmerge``): each block
against an independent dense reference (global and windowed, with timm's window padding,
LayerScale, with and without proportional attention and a merged MLP), the merged relative
position bias against its definition, exactness at ratio 0, FLOPs against FlopCounterMode,
gradients, compile capture and clear errors."""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Format, PatchEmbed
from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

import tokenprune
from tests.test_parallel_blocks import differs_between_seeds
from tests.test_patch import assert_per_sample_gradients, counted_flops
from tests.tome_reference import _match
from tokenprune.merge import BlockMerge
from tokenprune.patch.sam import merged_rel_pos_bias

SMALL = {"depth": 4, "embed_dim": 96, "num_heads": 4, "global_attn_indexes": [1, 3], "neck_chans": 32}


def sam(img_size: int = 160, window_size: int = 4, **extra) -> torch.nn.Module:
    """A small SAM encoder: 10x10 patches in 4x4 windows, so the windows pad the grid."""
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", img_size=img_size, window_size=window_size, **{**SMALL, **extra})
    # timm starts the relative position tables at zero: give them values, or the bias tests nothing.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
    return model.eval()


def images(batch: int = 2, size: int = 160) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def block_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.patch_embed(x) + model.pos_embed


def _groups(block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """[G, T, C] attention groups of the normed grid (zero-padded windows, or the whole grid)
    and their padding flags [G, T]."""
    batch, height, width, _ = h.shape
    size = block.window_size
    if size == 0:
        return h.flatten(1, 2), torch.zeros(batch, height * width, dtype=torch.bool), height, width
    pad = (0, 0, 0, -width % size, 0, -height % size)
    flags = F.pad(torch.zeros(batch, height, width, 1), pad, value=1.0)
    to_windows = "b (nh r) (nw c) ch -> (b nh nw) (r c) ch"
    return (
        rearrange(F.pad(h, pad), to_windows, r=size, c=size),
        rearrange(flags, to_windows, r=size, c=size)[..., 0].bool(),
        size,
        size,
    )


def _to_grid(block, groups: torch.Tensor, height: int, width: int) -> torch.Tensor:
    size = block.window_size
    if size == 0:
        return groups.reshape(groups.shape[0], height, width, -1)
    rows, cols = -(-height // size), -(-width // size)
    grid = rearrange(groups, "(b nh nw) (r c) ch -> b (nh r) (nw c) ch", nh=rows, nw=cols, r=size, c=size)
    return grid[:, :height, :width]


@torch.no_grad()
def sam_block_reference(block, x: torch.Tensor, ratio: float, prop_attn: bool = True, mlp: bool = True) -> torch.Tensor:
    """One SAM block run as ToMe for SD would run it, written unlike tokenprune: published ToMe
    matching (on the normed tokens, padding flagged in an extra channel) applied to an identity
    matrix gives a dense token × position membership; merged tokens are the mean of their
    patches; timm's own relative position bias of every pair of positions (each position asking
    with its token's query) is averaged over the pairs two tokens cover; softmax attention by
    hand; updates spread back with the membership's transpose."""
    attn = block.attn
    batch, height, width, channels = x.shape
    tokens, padding, rows, cols = _groups(block, block.norm1(x))
    num_groups, num_tokens, _ = tokens.shape
    r = min(math.floor(ratio * num_tokens + 1e-9), num_tokens // 2)
    merge = _match(torch.cat([tokens, padding[..., None].float()], dim=-1), r, False, False, sort_unmerged=True)
    member = merge(torch.eye(num_tokens).expand(num_groups, -1, -1).contiguous(), "sum")  # [G, T', T]
    patches = member * ~padding[:, None, :]
    size = member.sum(-1)
    mean_over = member / size[..., None]

    def merged(values: torch.Tensor) -> torch.Tensor:
        return (patches @ values) / patches.sum(-1, keepdim=True).clamp(min=1)

    heads, dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(merged(tokens)).reshape(num_groups, -1, 3, heads, dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * attn.scale
    if attn.use_rel_pos:
        q_per_position = (member.transpose(1, 2)[:, None] @ q).reshape(num_groups * heads, num_tokens, dim)
        full = get_decomposed_rel_pos_bias(q_per_position, attn.rel_pos_h, attn.rel_pos_w, (rows, cols), (rows, cols))
        logits = logits + mean_over[:, None] @ full.view(num_groups, heads, num_tokens, num_tokens) @ mean_over.transpose(1, 2)[:, None]
    if prop_attn:
        logits = logits + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(num_groups, -1, channels)
    x = x + block.ls1(_to_grid(block, member.transpose(1, 2) @ attn.proj(out), height, width))
    # The MLP runs merged where that is fewer tokens than the patches (padded windows may not be).
    if not mlp or num_groups // batch * (num_tokens - r) >= height * width:
        return x + block.ls2(block.mlp(block.norm2(x)))
    h, _, _, _ = _groups(block, block.norm2(x))
    return x + block.ls2(_to_grid(block, member.transpose(1, 2) @ block.mlp(merged(h)), height, width))


@pytest.mark.parametrize("index", [0, 1], ids=["windowed_padded", "global"])
@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("mlp", [True, False])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_block_matches_reference(index: int, prop_attn: bool, mlp: bool, ratio: float) -> None:
    model = sam(init_values=0.5)  # LayerScale: the patch must keep ls1/ls2
    x = block_input(model, images())
    expected = sam_block_reference(model.blocks[index], x, ratio, prop_attn, mlp)
    tokenprune.patch(model, "merge_unmerge", ratio=ratio, prop_attn=prop_attn, merge_mlp=mlp)
    with torch.no_grad():
        got = model.blocks[index](x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and the reference differs from the unmerged block: the test can fail
        assert (tokenprune.unpatch(model).blocks[index](x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("grid", [(10, 14), (14, 10), (7, 9)])
@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
def test_block_matches_reference_on_other_grids(grid: tuple[int, int], index: int) -> None:
    """Grids other than the model's (its global block interpolates its tables), not square,
    padded differently on each side; batch 3."""
    model = sam()
    x = torch.randn(3, *grid, 96, generator=torch.Generator().manual_seed(3))
    expected = sam_block_reference(model.blocks[index], x, 0.5)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[index](x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [0, 1], ids=["windowed", "global"])
def test_unfused_attention_matches_reference(index: int) -> None:
    model = sam()
    model.blocks[index].attn.fused_attn = False  # timm's manual path
    x = block_input(model, images())
    expected = sam_block_reference(model.blocks[index], x, 0.5)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[index](x), expected, rtol=1e-4, atol=1e-4)


def test_mlp_runs_merged_only_where_that_is_fewer_tokens() -> None:
    model = sam()  # 10x10 patches in nine padded 4x4 windows: 144 positions
    x = block_input(model, images())
    tokenprune.patch(model, "merge_unmerge", ratio=0.25)  # 9 x 12 = 108 merged tokens > 100 patches
    calls: list[torch.Size] = []
    hook = model.blocks[0].mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    with torch.no_grad():
        model.blocks[0](x)
        tokenprune.patch(model, ratio=0.5)  # 9 x 8 = 72 < 100
        model.blocks[0](x)
    hook.remove()
    assert [shape[:-1] for shape in calls] == [(2, 100), (18, 8)]


def test_windows_without_padding_match_reference() -> None:
    model = sam(img_size=128, window_size=4)  # 8x8 patches: whole windows, no padding channel
    x = block_input(model, images(size=128))
    expected = sam_block_reference(model.blocks[0], x, 0.5)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("merged", [0, 4, 7])
def test_merged_rel_pos_bias_is_the_mean_over_position_pairs(merged: int) -> None:
    """Against timm's bias of every pair of positions (each position asking with its token's
    query), averaged over the pairs two tokens cover; with nothing merged, timm's bias itself (in
    the merge's token order)."""
    attn = sam().blocks[1].attn
    rows, cols, groups, heads, dim = 5, 3, 2, attn.num_heads, attn.head_dim
    positions = rows * cols
    generator = torch.Generator().manual_seed(2)
    merging = BlockMerge(torch.randn(groups, positions, 8, generator=generator), merged, backend="torch")
    q = torch.randn(groups, heads, positions - merged, dim, generator=generator)
    member = F.one_hot(merging.dest, positions - merged).transpose(1, 2).float()  # [G, T', T]
    mean_over = member / member.sum(-1, keepdim=True)
    q_per_position = (member.transpose(1, 2)[:, None] @ q).flatten(0, 1)
    full = get_decomposed_rel_pos_bias(q_per_position, attn.rel_pos_h, attn.rel_pos_w, (rows, cols), (rows, cols))
    expected = mean_over[:, None] @ full.view(groups, heads, positions, positions) @ mean_over.transpose(1, 2)[:, None]
    with torch.no_grad():
        got = merged_rel_pos_bias(attn, q, merging, rows, cols)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 1.0  # the tables are not zero: the bias is there to get wrong


@pytest.mark.parametrize("windows", [True, False])
def test_model_matches_blockwise_reference(windows: bool) -> None:
    model = sam()
    x = images()
    with torch.no_grad():
        grid = block_input(model, x)
        for block in model.blocks:
            grid = sam_block_reference(block, grid, 0.5) if windows or block.window_size == 0 else block(grid)
        expected = model.forward_head(model.neck(grid.permute(0, 3, 1, 2)))
    tokenprune.patch(model, "merge_unmerge", ratio=0.5, merge_windows=windows)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert [block.reducer is not None for block in model.blocks] == [windows, True, windows, True]


def test_ratio_zero_and_unpatch_are_exact() -> None:
    model = sam()
    x = images()
    with torch.no_grad():
        expected = model(x)
        expected_maps = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    for ratio in (0.0, 0.009):  # less than one token of the 100-token grid: nothing merges
        tokenprune.patch(model, "merge_unmerge", ratio=ratio)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [m.shape for m in maps] == [m.shape for m in expected_maps]  # timm's own, on the grid
    assert not torch.equal(maps[1], expected_maps[1])
    tokenprune.unpatch(model)
    assert type(model).__name__ == "VisionTransformerSAM"
    assert not any(hasattr(block, "reducer") for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize(
    "options",
    [{"ratio": 0.5}, {"ratio": 0.3, "merge_mlp": False}, {"ratio": 0.5, "merge_windows": False}],
    ids=["all", "attention_only", "global_only"],
)
@pytest.mark.parametrize("img_size", [160, 128], ids=["padded", "whole_windows"])
def test_flops_match_flop_counter(options: dict, img_size: int) -> None:
    model = sam(img_size=img_size)
    x = images(batch=1, size=img_size)
    assert tokenprune.flops(model, img_size).total == counted_flops(model, x)
    patched = tokenprune.patch(copy.deepcopy(model), "merge_unmerge", backend="torch", **options)
    assert tokenprune.flops(patched, img_size).total == counted_flops(patched, x)
    assert tokenprune.flops(patched, img_size).total < tokenprune.flops(model, img_size).total
    assert tokenprune.plan(patched, img_size).tokens == (100 if img_size == 160 else 64,) * 4  # the stream keeps every patch


def test_features_only_backbone() -> None:
    """timm's ``features_only=True`` SAM (a FeatureGetterNet over forward_intermediates) patches
    through its wrapper: maps on the grid, FLOPs as counted (no head)."""
    torch.manual_seed(0)
    backbone = timm.create_model("samvit_base_patch16", img_size=160, window_size=4, features_only=True, out_indices=(1, 3), **SMALL).eval()
    x = images(batch=1)
    with torch.no_grad():
        expected = backbone(x)
    assert tokenprune.patch(backbone, "merge_unmerge", ratio=0.5) is backbone
    with torch.no_grad():
        maps = backbone(x)
    assert [m.shape for m in maps] == [m.shape for m in expected] == [(1, 96, 10, 10)] * 2
    assert not torch.equal(maps[1], expected[1])
    assert tokenprune.flops(backbone, 160).total == counted_flops(backbone, x)


def test_other_image_sizes_and_bad_ones() -> None:
    model = tokenprune.patch(sam(), "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        assert model(images(batch=1, size=224)).shape == (1, 32)  # position embedding resampled, more windows
    assert tokenprune.plan(model, 224).tokens[0] == 196
    with pytest.raises(ValueError, match="multiples of 16x16"):
        tokenprune.flops(model, 200)


@pytest.mark.parametrize("index", [0, 1], ids=["windowed_padded", "global"])
def test_float64_keeps_float64_and_passes_gradcheck(index: int) -> None:
    """A float64 SAM stays float64 through merge_unmerge: equal to the float64 dense reference to
    float64 rounding, and gradcheck passes. The mean over a padded window's real tokens was
    divided in float32, which rounded the tokens to float32 (1.5e-8 off: finite differences then
    miss the gradient); log s was a float32 log cast up (9e-10 off)."""
    model = sam(init_values=0.5).double()
    block = model.blocks[index]
    x = block_input(model, images().double())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference's membership and padding flags
    try:
        expected = sam_block_reference(block, x, 0.5)
    finally:
        torch.set_default_dtype(default)
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    with torch.no_grad():
        got = model.blocks[index](x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # gradcheck along three directions of the input (the whole grid would take thousands of runs)
    directions = torch.randn(3, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def run(v: torch.Tensor) -> torch.Tensor:
        return model.blocks[index](x + (v.view(3, 1, 1, 1, 1) * directions).sum(0)).square().mean(dim=(0, 1, 2))[:8]

    assert torch.autograd.gradcheck(run, (torch.zeros(3, dtype=torch.float64, requires_grad=True),))


def test_training_gradients_are_finite_with_padding() -> None:
    model = tokenprune.patch(sam(drop_path_rate=0.2, attn_drop_rate=0.1, proj_drop_rate=0.1), "merge_unmerge", ratio=0.5).train()
    model(images()).square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0  # the merged bias reaches its tables


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch: no batching rule for SDPA
def test_per_sample_gradients_with_torch_func() -> None:
    """torch.func's vmap over grad (per-sample gradients) runs SAM's merging blocks and gives each
    image the gradients of its own backward, the merged relative position bias included: its
    one-hot position rows are the same for every image while the matching is not, which the
    reference merge adds out of place under the transform."""
    model = tokenprune.patch(sam(img_size=64, window_size=2), "merge_unmerge", ratio=0.4)
    assert_per_sample_gradients(model, images(2, 64))


def test_bfloat16_autocast_runs() -> None:
    model = tokenprune.patch(sam(), "merge_unmerge", ratio=0.5)
    x = images()
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).float()
    assert F.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_triton_backend_matches_torch_backend() -> None:
    model = sam()
    x = images()
    with torch.no_grad():
        expected = tokenprune.patch(model, "merge_unmerge", ratio=0.5, backend="torch")(x)
        got = tokenprune.patch(model, "merge_unmerge", ratio=0.5, backend="triton")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fullgraph_capture() -> None:
    model = tokenprune.patch(sam(), "merge_unmerge", ratio=0.5)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))


def test_default_method_is_merge_unmerge_and_there_is_no_source_map() -> None:
    model = tokenprune.patch(sam(), ratio=0.5)
    assert isinstance(model.tokenprune_config, tokenprune.MergeUnmergeConfig)
    with torch.no_grad():
        model(images(batch=1))
    with pytest.raises(RuntimeError, match="no merged token outlives its block"):
        tokenprune.source(model)


def test_clear_errors() -> None:
    with pytest.raises(TypeError, match="use method='merge_unmerge'"):
        tokenprune.patch(sam(), "tome", r=8)
    with pytest.raises(TypeError, match="use method='merge_unmerge'"):
        tokenprune.patch(sam(), "dynamicvit", keep_ratio=0.7)
    with pytest.raises(TypeError, match="method 'merge_unmerge' \\(VisionTransformerSAM's default, as none is named\\) has no option r"):
        tokenprune.patch(sam(), r=8)
    for ratio in (0.6, -0.1, True):
        with pytest.raises(ValueError, match="0 ≤ ratio ≤ 0.5"):
            tokenprune.MergeUnmergeConfig(ratio=ratio)
    with pytest.raises(TypeError, match="merge_mlp must be True or False"):
        tokenprune.MergeUnmergeConfig(ratio=0.5, merge_mlp=1)
    with pytest.raises(TypeError, match="rotary"):
        rope = timm.create_model("samvit_base_patch16", img_size=64, use_rel_pos=False, use_rope=True, **SMALL)
        tokenprune.patch(rope, "merge_unmerge", ratio=0.5)


def test_attention_dropout_runs_only_while_training_sam() -> None:
    model = sam(attn_drop_rate=0.5)
    x = block_input(model, images())
    expected = sam_block_reference(model.blocks[0], x, 0.5)  # eval: no dropout
    tokenprune.patch(model, "merge_unmerge", ratio=0.5)
    block = model.blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)
        block.train()
        assert differs_between_seeds(lambda: block(x))


def test_auto_runs_sam_blocks_on_the_pytorch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="auto" keeps SAM on the PyTorch path, where an H200 measured it faster than the
    Triton path (bench_sam_cuda.md); "triton" still forces the kernels, and other families keep
    "auto" for each op to resolve. The option itself stays as given."""
    from evals import bench

    model = tokenprune.patch(sam(), "merge_unmerge", ratio=0.5)
    assert model.tokenprune_config.backend == "auto"
    assert {block.backend for block in model.blocks} == {"torch"}
    monkeypatch.setattr(bench, "use_triton", lambda backend, *tensors: backend != "torch")  # as on a GPU
    assert bench._backend_ran(model, images()) == "torch"
    tokenprune.patch(model, backend="triton")
    assert {block.backend for block in model.blocks} == {"triton"}
    assert bench._backend_ran(model, images()) == "triton"
    vit = tokenprune.patch(timm.create_model("vit_tiny_patch16_224", depth=2), "merge_unmerge", ratio=0.5)
    assert {block.backend for block in vit.blocks} == {"auto"}
    assert bench._backend_ran(vit, images()) == "triton"


def test_hooks_put_on_attention_after_patching_raise_where_the_block_merges() -> None:
    """A merging SAM block attends without attn.forward, so a hook put on its attn after
    patching would not fire: its forward raises. Where nothing merges, timm's forward runs the
    hook."""
    calls = []
    for ratio in (0.5, 0.0):
        model = tokenprune.patch(sam(), "merge_unmerge", ratio=ratio)
        model.blocks[0].attn.register_forward_hook(lambda module, args, out: calls.append(ratio))
        with pytest.raises(RuntimeError, match="attn has forward hooks") if ratio else nullcontext(), torch.no_grad():
            model(images())
    assert calls == [0.0]


def test_padding_patch_embedding_takes_any_size_in_model_plan_and_flops() -> None:
    """A SAM whose patch embedding pads the image to whole patches (timm's dynamic_img_pad) runs
    any size, so plan and flops take it too: the grid timm makes (sides rounded up to whole
    patches) and the FLOPs FlopCounterMode counts, unpatched and patched."""
    embed = partial(PatchEmbed, output_fmt=Format.NHWC, strict_img_size=False, dynamic_img_pad=True)
    model = sam(img_size=64, window_size=3, embed_layer=embed)
    x = images(batch=1, size=70)
    with torch.no_grad():
        assert model.forward_intermediates(x, indices=1, intermediates_only=True)[0].shape == (1, 96, 5, 5)
    patched = tokenprune.patch(copy.deepcopy(model), "merge_unmerge", ratio=0.5, backend="torch")
    for m in (model, patched):
        assert tokenprune.plan(m, 70).tokens == (25,) * 4
        assert tokenprune.flops(m, 70).total == counted_flops(m, x)
    assert tokenprune.flops(patched, 70).total < tokenprune.flops(model, 70).total

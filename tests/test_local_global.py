"""Two-stage locality-aware merging: window stage, positional global stage, unmerge."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import tokenprune
from tokenprune.merge import merge_state, start_state, unmerge
from tokenprune.methods.local_global import PositionalBipartiteMerge, WindowMerge, window_dest, window_scores
from tests.test_merge import brute_force_dest
from tests.test_patch import counted_flops, image, make


def tiled(grid: tuple[int, int], window: int, values: torch.Tensor) -> torch.Tensor:
    """[1, rows·cols, D] tokens where every window×window window holds copies of one row of
    ``values`` (one per window, raster order of windows) — constant regions."""
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols) // window
    c = torch.arange(cols).repeat(rows) // window
    return values[(r * (cols // window) + c).clamp(max=len(values) - 1)][None]


def gram_window_scores(unit: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The mean cosine over the ordered pairs of each 2×2 window, from each window's Gram matrix
    of the unit vectors ``unit`` [B, rows·cols, D]: [B, windows] in raster order."""
    rows, cols = grid
    patches = unit.reshape(unit.shape[0], rows, cols, -1)
    scores = []
    for wr in range(rows // 2):
        for wc in range(cols // 2):
            members = patches[:, 2 * wr : 2 * wr + 2, 2 * wc : 2 * wc + 2].flatten(1, 2)
            gram = members @ members.transpose(1, 2)
            scores.append((gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / 12)
    return torch.stack(scores, dim=1)


def test_window_scores_are_mean_pairwise_cosine() -> None:
    torch.manual_seed(0)
    metric = torch.randn(2, 6 * 4, 5)
    scores = window_scores(metric, (6, 4), 2)
    torch.testing.assert_close(scores, gram_window_scores(metric / metric.norm(dim=-1, keepdim=True), (6, 4)))


def test_window_scores_give_zero_vectors_cosine_zero() -> None:
    """A zero key has cosine 0 to every token (unit_vectors' convention, as in every match): a
    window of zero keys scores 0, not −1/3, and three equal keys beside a zero one score
    (3·2·1 + 6·0) / 12 = 1/2; a float64 Gram matrix over F.normalize rows is the reference."""
    torch.manual_seed(3)
    metric = torch.randn(2, 4 * 4, 6)
    grid = metric.view(2, 4, 4, 6)
    grid[0, 0:2, 0:2] = 0.0  # window 0: all zero
    grid[0, 0:2, 2:4] = torch.randn(6)  # window 1: three equal keys and a zero one
    grid[0, 1, 3] = 0.0
    grid[1, 2, 2] = 0.0  # one zero key among random ones
    scores = window_scores(metric, (4, 4), 2)
    expected = gram_window_scores(torch.nn.functional.normalize(metric.double(), dim=-1), (4, 4))
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=0)
    assert scores[0, :2].tolist() == [0.0, pytest.approx(0.5)]


def test_identical_windows_merge_and_distinct_ones_do_not() -> None:
    torch.manual_seed(1)
    grid = (4, 6)
    x = torch.randn(1, 24, 8)
    # windows 1 and 4 (of 2×3) are constant; every other token is random
    constant = tiled(grid, 2, torch.randn(6, 8))
    window_of = (torch.arange(4).repeat_interleave(6) // 2) * 3 + torch.arange(6).repeat(4) // 2
    x[0, (window_of == 1) | (window_of == 4)] = constant[0, (window_of == 1) | (window_of == 4)]
    merge = WindowMerge(window=2, ratio=None, threshold=0.999, num_protected=0)
    state = merge(start_state(x, trace_source=True, grid=grid), x)
    assert state.num_tokens == 24 - 2 * 3
    merged_windows = state.source_index[0].reshape(4, 6)
    assert (merged_windows[0:2, 2:4] == merged_windows[0, 2]).all()  # window 1 → one token
    assert (merged_windows[2:4, 2:4] == merged_windows[2, 2]).all()  # window 4 → one token
    assert state.size.flatten().tolist().count(4.0) == 2
    assert torch.equal(unmerge(state.x, state.source_index), x)  # constant regions exact


def test_window_dest_keeps_order_and_prefix() -> None:
    merged = torch.tensor([[False, True, False, False]])  # 2×2 windows on a 4×4 grid
    dest, num_out = window_dest(merged, 1, (4, 4), 2, num_protected=2)
    assert num_out == 2 + 16 - 3
    assert dest[0, :2].tolist() == [0, 1]
    body = dest[0, 2:].reshape(4, 4)
    assert (body[0:2, 2:4] == body[0, 2]).all()
    assert body.flatten().unique().numel() == 13 and torch.equal(body.flatten().unique(), torch.arange(2, 15))
    assert (body.flatten()[:2] < body[0, 2]).all() and body[0, 2] < body[1, 0]  # raster order kept


@pytest.mark.parametrize("grid", [(5, 7), (6, 4), (3, 3)])
def test_non_square_grids_sizes_and_centroids(grid: tuple[int, int]) -> None:
    torch.manual_seed(2)
    rows, cols = grid
    x = torch.randn(3, 1 + rows * cols, 16)
    state = start_state(x, trace_source=True, grid=grid, track_positions=True)
    state = WindowMerge(2, 0.5, None, 1)(state, x)
    state = PositionalBipartiteMerge(4, 0.5, False, 1)(state, state.x)
    assert torch.equal(state.size.sum(dim=1), torch.full((3, 1), float(1 + rows * cols)))
    # centroid of each token = mean (row, col) of the patches it covers
    r = torch.arange(rows).repeat_interleave(cols).float()
    c = torch.arange(cols).repeat(rows).float()
    coords = torch.cat([torch.zeros(1, 2), torch.stack([r, c], -1)])
    for n in range(3):
        for t in range(state.num_tokens):
            members = (state.source_index[n] == t).nonzero().flatten()
            torch.testing.assert_close(state.pos[n, t], coords[members].mean(0))
    assert (state.source_index[:, 0] == 0).all()  # class token alone and first
    assert (state.size[:, 0] == 1).all()


def test_threshold_counts_are_equal_across_the_batch() -> None:
    torch.manual_seed(3)
    grid = (4, 4)
    x = torch.randn(2, 16, 8)
    x[0] = tiled(grid, 2, torch.randn(4, 8))[0]  # image 0: 4 constant windows; image 1: none
    x[1, :2] = x[1, 4:6] = x[1, 0]  # image 1: window 0 constant
    state = WindowMerge(2, None, 0.999, 0)(start_state(x, False, grid), x)
    assert state.num_tokens == 16 - 3  # the smaller count (1) for both images


@pytest.mark.parametrize("family", ["vit_cls", "registers", "vit_avg_no_cls"])
def test_identity_settings_are_exact(family: str) -> None:
    model = make(family)
    with torch.no_grad():
        expected = model(image())
        tokenprune.patch(model, "local_global", local_ratio=0.0, r=0)
        assert torch.equal(model(image()), expected)
        tokenprune.patch(model, "local_global", local_threshold=1.0, r=0)
        assert torch.equal(model(image()), expected)


@pytest.mark.parametrize("family", ["vit_cls", "registers", "vit_map", "deit_distilled"])
@pytest.mark.parametrize("pos_weight", [0.0, 1.0])
def test_two_stage_model_bookkeeping(family: str, pos_weight: float) -> None:
    model = make(family)
    tokenprune.patch(
        model, "local_global", local_block=1, local_ratio=0.25, r=6, pos_weight=pos_weight, trace_source=True
    )
    with torch.no_grad():
        state = model.forward_tokens(image())
        logits = model(image())
        dense = model.forward_features(image(), unmerge=True)
    reduction = tokenprune.plan(model, 224)
    rows, cols = model.patch_embed.grid_size
    windows = (rows // 2) * (cols // 2)  # 14×14 grid → 49 windows (a border row/column left out)
    assert reduction.removed[:3] == (0, round(0.25 * windows) * 3, 6)
    assert state.num_tokens == reduction.output_tokens
    assert torch.isfinite(logits).all()
    assert dense.shape == (2, reduction.tokens[0], model.embed_dim)
    torch.testing.assert_close(dense, unmerge(state.x, state.source_index))
    source = tokenprune.source(model)
    prefix = model.num_prefix_tokens
    assert torch.equal(source[:, :prefix], torch.eye(prefix, reduction.tokens[0], dtype=source.dtype).expand(2, -1, -1))


def test_positional_penalty_prefers_near_partners() -> None:
    # Two equally similar B partners, one adjacent and one far: the penalty picks the near one.
    torch.manual_seed(4)
    grid = (1, 8)
    v = torch.randn(8)
    x = torch.randn(1, 8, 8)
    x[0, 6] = v  # A token (even position) at col 6
    x[0, 1] = v  # far B partner (col 1)
    x[0, 7] = v  # near B partner (col 7)
    state = start_state(x, trace_source=True, grid=grid, track_positions=True)
    plain = PositionalBipartiteMerge(1, 0.0, False, 0)(state, x)
    near = PositionalBipartiteMerge(1, 1.0, False, 0)(state, x)
    assert plain.source_index[0, 6] == plain.source_index[0, 1]  # ties → lowest B index: far
    assert near.source_index[0, 6] == near.source_index[0, 7]


def test_adaptive_counts_are_data_dependent() -> None:
    model = tokenprune.patch(make("vit_cls"), "local_global", local_threshold=0.5, r=16, adaptive=True)
    with torch.no_grad():
        assert torch.isfinite(model(image())).all()
    with pytest.raises(ValueError, match="data-dependent"):
        tokenprune.plan(model, 224)


def test_bad_options() -> None:
    model = make("vit_cls")
    with pytest.raises(ValueError, match="local_block"):
        tokenprune.patch(model, "local_global", local_block=12)
    with pytest.raises(ValueError, match="11 entries but after local_block=1 come 10 blocks"):
        tokenprune.patch(model, "local_global", local_block=1, r=[4] * 11)  # one entry per block after 1
    tokenprune.patch(model, "local_global", local_block=1, r=(8, -1))
    assert tokenprune.plan(model, 224).removed[2] == 16  # the ramp starts at stage 2's first block
    with pytest.raises(ValueError, match="local_ratio"):
        tokenprune.patch(model, "local_global", local_ratio=1.5)
    with pytest.raises(ValueError, match="window"):
        tokenprune.patch(model, "local_global", window=1)
    with pytest.raises(ValueError, match="window=15 does not fit the model's 14x14 patch grid"):
        tokenprune.patch(model, "local_global", window=15)  # (a 14×14 window is the whole grid: allowed)
    assert tokenprune.plan(tokenprune.patch(make("vit_cls"), "local_global", window=14, local_ratio=1.0), 224).removed[3] == 195
    for options, error in ((dict(window=2.0), TypeError), (dict(local_block=1.5), TypeError),
                           (dict(pos_weight=float("nan")), ValueError), (dict(pos_weight=float("inf")), ValueError)):
        with pytest.raises(error, match="window|local_block|pos_weight must be ≥ 0 and finite"):
            tokenprune.LocalGlobalConfig(**options)
    dropping = tokenprune.patch(make("vit_cls", patch_drop_rate=0.25), "local_global").train()
    with pytest.raises(ValueError, match="patch dropout"):
        dropping(image())
    # with positions too (pos_weight): refused before they are placed on a grid the tokens no longer fill
    tokenprune.patch(dropping, "local_global", pos_weight=0.5)
    with pytest.raises(ValueError, match=r"LocalGlobalConfig places tokens by .* 147 of the 196 patches .* patch dropout"):
        dropping(image())


def test_a_grid_too_small_for_windows_names_a_fix_that_works() -> None:
    # The error's advice must be an option that patches: on a grid one patch high (16×48 image:
    # 1×3 patches) no window of 2×2 or more fits, and "a window of at most 1" is itself refused.
    for size, grid in (((16, 48), "1x3"), ((48, 16), "3x1"), ((16, 16), "1x1")):
        model = make("vit_cls", img_size=size, depth=2)
        with pytest.raises(ValueError, match=f"window=2 does not fit the model's {grid} patch grid") as error:
            tokenprune.patch(model, "local_global", local_block=0, r=1)
        assert "at most 1 patches" not in str(error.value) and "use method 'tome'" in str(error.value)
        with pytest.raises(ValueError):
            tokenprune.LocalGlobalConfig(window=1)  # what "at most 1" would have sent the user to
        tokenprune.patch(model, "tome", r=1)(torch.randn(1, 3, *size))  # the named fix runs
    # Where a smaller window does fit, the advice names the largest, and that window patches.
    model = make("vit_cls", img_size=(32, 64), depth=2)
    with pytest.raises(ValueError, match="give a window of at most 2 patches"):
        tokenprune.patch(model, "local_global", local_block=0, window=3)
    tokenprune.patch(model, "local_global", local_block=0, window=2)(torch.randn(1, 3, 32, 64))


def test_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    model = tokenprune.patch(make("registers"), "local_global", local_ratio=0.25, r=6, pos_weight=0.5)
    with torch.no_grad():
        expected = model(image())
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(image()), expected, atol=1e-5, rtol=1e-5)


def test_flops_agree_with_flop_counter() -> None:
    model = tokenprune.patch(make("registers").requires_grad_(False), "local_global", r=6, pos_weight=1.0)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_dynamic_image_size() -> None:
    model = tokenprune.patch(make("dinov2_layerscale", dynamic_img_size=True), "local_global", r=4, pos_weight=0.5)
    with torch.no_grad():
        for size in (224, 182):  # 16×16 and 13×13 grids (odd: a border row/column stays out of windows)
            assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_merge_map_paints_groups_and_outlines() -> None:
    from tokenprune.visualize import merge_map

    image = torch.zeros(3, 4, 4)
    image[0, :2, :2] = 1.0  # top-left patch red, bottom-left patch green, right half black
    image[1, 2:, :2] = 1.0
    # 2×2 grid of 2×2-pixel patches (after a class token); the two left patches merged into token 1
    source_index = torch.tensor([0, 1, 2, 1, 3])
    picture = merge_map(image, source_index, (2, 2), boundary=(0, 0, 255))
    pixels = torch.from_numpy(np.array(picture)).long()
    assert pixels[0, 0].tolist() == pixels[2, 0].tolist() == [128, 128, 0]  # both painted the group's mean
    assert pixels[1, 0].tolist() == [128, 128, 0]  # no outline between patches of one group
    assert pixels[3, 1].tolist() == [0, 0, 255]  # outline against the right neighbour group
    assert pixels[1, 3].tolist() == [0, 0, 255]  # between the two right-hand groups
    assert pixels[0, 2].tolist() == [0, 0, 0]  # inside a single black patch
    for dtype in (torch.float16, torch.bfloat16):  # an image straight from a half-precision pipeline
        assert np.array_equal(np.array(merge_map(image.to(dtype), source_index, (2, 2), boundary=(0, 0, 255))), np.array(picture))
    with pytest.raises(ValueError, match="whole number"):
        merge_map(torch.zeros(3, 5, 4), source_index, (2, 2))
    # Pruning methods mark dropped patches -1: painted flat, outlined like a group.
    pruned = merge_map(image, torch.tensor([0, -1, 2, 1, -1]), (2, 2), boundary=(0, 0, 255), dropped=(9, 9, 9))
    pixels = torch.from_numpy(np.array(pruned)).long()
    assert pixels[0, 0].tolist() == [9, 9, 9] and pixels[3, 2].tolist() == [9, 9, 9]
    assert pixels[2, 0].tolist() == [0, 255, 0]  # the kept green patch, its own group


def test_merge_map_refuses_what_it_would_paint_wrongly() -> None:
    """A batch's source index would be read as its last image's; a normalised, 0-255 or uint8
    picture would be clamped to near-black and white; a channels-last one misread."""
    from tokenprune.visualize import merge_map

    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    source_index = torch.tensor([0, 1, 2, 1, 3])
    with pytest.raises(ValueError, match=r"one image's \[T_in\].*source_index\[i\]"):
        merge_map(image, source_index.expand(2, -1), (2, 2))
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with pytest.raises(ValueError, match="un-normalise"):
        merge_map((image - mean) / std, source_index, (2, 2))
    with pytest.raises(ValueError, match="255"):
        merge_map(image * 255, source_index, (2, 2))
    with pytest.raises(ValueError, match=r"float\(\) / 255"):
        merge_map((image * 255).to(torch.uint8), source_index, (2, 2))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        merge_map(image.permute(1, 2, 0), source_index, (2, 2))
    merge_map(image * 1.01 - 0.005, source_index, (2, 2))  # a resize's small overshoot is painted


def test_merge_groups_skip_any_number_of_prefix_tokens() -> None:
    """The prefix tokens (none, a class token, a class token and registers) come first in the
    source index: the grid is its last rows × cols entries, and the picture does not depend on
    how many there are."""
    from tokenprune.visualize import merge_groups, merge_map

    image = torch.rand(3, 4, 6, generator=torch.Generator().manual_seed(0))
    patches = torch.tensor([0, 0, 1, 2, 1, 3])  # a 2×3 grid of 2×2-pixel patches, four groups
    pictures = []
    for prefix in (0, 1, 5):
        source_index = torch.cat([torch.arange(prefix), patches + prefix])
        assert torch.equal(merge_groups(source_index, (2, 3)), (patches + prefix).reshape(2, 3))
        pictures.append(np.array(merge_map(image, source_index, (2, 3))))
    assert all(np.array_equal(picture, pictures[0]) for picture in pictures)


@pytest.mark.parametrize("method", [dict(method="local_global", local_block=0, r=8), dict(method="tome", r=8)])
def test_merge_map_refuses_a_grid_other_than_the_models(method: dict) -> None:
    """DINOv2 ViT-S/14 at 224 has a 16x16 grid. Given 14x14 (ViT-B/16's, which the photo also
    divides into), merge_map read the last 196 of 257 entries as the patches, 60 patches as if
    prefix tokens, and painted their groups without a word; the model's own grid (state.grid)
    paints exactly the patches' entries. A clip's (frames, rows, cols) grid is named too."""
    from tokenprune.visualize import merge_groups, merge_map

    model = tokenprune.patch(make("dinov2_layerscale", depth=1), trace_source=True, **method)
    photo = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = model.forward_tokens(photo[None])
    source_index, prefix = state.source_index[0], model.num_prefix_tokens
    assert state.grid == (16, 16) and source_index[prefix:].unique().numel() < 256  # patches merged
    with pytest.raises(ValueError, match=r"does not fit a 14x14 grid .*state\.grid"):
        merge_map(photo, source_index, (14, 14))
    assert torch.equal(merge_groups(source_index, state.grid), source_index[prefix:].reshape(16, 16))
    merge_map(photo, source_index, state.grid)
    with pytest.raises(ValueError, match="one frame at a time"):
        merge_map(photo, source_index[prefix:], (1, 16, 16))


def test_dense_fidelity_measures() -> None:
    from evals.dense_fidelity import interpolate, pearson, top_region_iou

    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert pearson(a, 2 * a + 1).item() == pytest.approx(1.0)
    assert pearson(a, -a).item() == pytest.approx(-1.0)
    assert top_region_iou(a, torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 0.5).item() == 0.0
    assert top_region_iou(a, a, 0.5).item() == 1.0
    curve = [(10.0, 1.0), (8.0, 0.9)]
    assert interpolate(curve, 9.0) == pytest.approx(0.95)
    assert interpolate(curve, 11.0) is None
    per_image = interpolate([(8.0, torch.tensor([0.9, 0.5])), (10.0, torch.tensor([1.0, 0.7]))], 9.5)
    assert per_image.tolist() == pytest.approx([0.975, 0.65])


def test_dense_fidelity_summary_curve_ends_and_partial_overlap() -> None:
    """A measure's summary is its mean over the images (one value per measure); a curve read at
    one of its own points (its ends too) gives that point; the top-region IoU of partly
    overlapping maps is shared / union of their top pixels."""
    from evals.dense_fidelity import MEASURES, interpolate, summary, top_region_iou

    per_image = torch.tensor([[1.0, 0.5, 0.2], [0.8, 0.3, 0.4], [0.6, 0.1, 0.9]])  # [images, MEASURES]
    columns = list(zip(*per_image.tolist()))
    assert summary(per_image) == pytest.approx({m: sum(c) / len(c) for m, c in zip(MEASURES, columns)})
    curve = [(8.0, 0.9), (10.0, 1.0), (12.0, 1.1)]
    assert [interpolate(curve, g) for g in (8.0, 10.0, 12.0)] == pytest.approx([0.9, 1.0, 1.1])
    # top half of 4 pixels: {2, 3} and {1, 3}, one pixel shared of three
    a, b = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    assert top_region_iou(a, b, 0.5).item() == pytest.approx(1 / 3)


def test_dense_fidelity_checks_the_photo_to_draw_before_the_run(monkeypatch) -> None:
    from evals import dense_fidelity

    monkeypatch.setattr(dense_fidelity, "Evaluator", lambda: pytest.fail("the run started"))
    with pytest.raises(SystemExit, match=r"--photo 20: there are 20 photos, give an index in \[0, 19\]"):
        dense_fidelity.main(["--photo", "20"])


def test_dense_fidelity_compares_with_the_better_tome_schedule() -> None:
    from evals.dense_fidelity import best_tome, describe

    # Two images, two measures: the constant schedule is better in the first measure at 7
    # GFLOPs, the decreasing one in the second; each measure takes its better curve whole.
    curves = {
        "constant": [(6.0, torch.tensor([[0.97, 0.5], [0.97, 0.5]])), (8.0, torch.tensor([[0.99, 0.5], [0.99, 0.5]]))],
        "decreasing": [(4.0, torch.tensor([[0.95, 0.6], [0.95, 0.8]])), (7.0, torch.tensor([[0.97, 0.6], [0.97, 0.8]]))],
    }
    torch.testing.assert_close(best_tome(curves, 7.0), torch.tensor([[0.98, 0.6], [0.98, 0.8]]))
    only_decreasing = best_tome(curves, 5.0)  # the constant curve does not reach 5 GFLOPs
    assert only_decreasing[:, 0].tolist() == pytest.approx([0.95 + 0.02 / 3] * 2)
    assert best_tome(curves, 9.0) is None
    assert describe(tokenprune.LocalGlobalConfig()) == "block 3, windows 1/16, r=16"
    assert describe(tokenprune.LocalGlobalConfig(local_block=0, r=(18, -1), pos_weight=1.0)) == "block 0, windows 1/16, r=(18,-1), λ=1"
    assert describe(tokenprune.LocalGlobalConfig(local_threshold=0.9, r=8)) == "block 3, windows cos ≥ 0.9, r=8"
    assert describe(tokenprune.LocalGlobalConfig(r=40, adaptive=True)) == "block 3, windows 1/16, r=40, adaptive"


def test_dense_fidelity_per_image_measures_follow_each_images_counts() -> None:
    """``measure_per_image`` (one image per forward) agrees with the batched ``measure`` on a
    fixed-count config, and with adaptive counts gives each image the GFLOPs of the counts it used."""
    from evals.dense_fidelity import Evaluator

    evaluator = object.__new__(Evaluator)  # a tiny model and decoder instead of the real ones
    evaluator.model, evaluator.img_size, evaluator.chunk = make("vit_cls", depth=4), 224, 2
    evaluator.grid = tuple(evaluator.model.patch_embed.grid_size)
    evaluator.decoder = lambda patches, grid: patches.mean(-1).reshape(-1, *grid)
    evaluator.photos = torch.cat([image(2), image(2, 224).flip(-1)])
    tokenprune.patch(evaluator.model, r=0)
    evaluator.embedding, evaluator.saliency = evaluator._outputs()

    fixed = tokenprune.LocalGlobalConfig(local_block=0, r=20)
    gflops, batched = evaluator.measure(fixed)
    per_image_gflops, per_image = evaluator.measure_per_image(fixed)
    assert per_image_gflops.tolist() == pytest.approx([gflops] * 4)
    torch.testing.assert_close(per_image, batched, atol=1e-5, rtol=1e-5)

    adaptive = tokenprune.LocalGlobalConfig(local_block=0, r=40, adaptive=True)
    per_image_gflops, _ = evaluator.measure_per_image(adaptive)
    for i, g in enumerate(per_image_gflops.tolist()):
        tokenprune.patch(evaluator.model, adaptive)
        tokens: list[int] = []
        evaluator.model._run_blocks(evaluator.photos[i : i + 1], None, False, False, on_block=lambda _, s: tokens.append(s.num_tokens))
        removed = [a - b for a, b in zip((197, *tokens), tokens)]
        fixed = tokenprune.LocalGlobalConfig(local_block=0, r=removed[1:])
        assert g == pytest.approx(tokenprune.flops(tokenprune.patch(evaluator.model, fixed), 224).gflops)


def test_dense_fidelity_per_image_gflops_count_the_matching_of_blocks_that_merge_none() -> None:
    """An adaptive stage-2 block scores its pairs even where none clears the threshold: each
    image's GFLOPs are FlopCounterMode's count of its forward, those blocks' matching included
    (a constant image merges none in its last blocks)."""
    from evals.dense_fidelity import Evaluator
    from evals.harness import counted_flops

    evaluator = object.__new__(Evaluator)
    evaluator.model, evaluator.img_size, evaluator.chunk = make("vit_cls", depth=4, img_size=64), 64, 2
    evaluator.grid = tuple(evaluator.model.patch_embed.grid_size)
    evaluator.decoder = lambda patches, grid: patches.mean(-1).reshape(-1, *grid)
    evaluator.photos = torch.cat([image(1, 64), torch.ones(1, 3, 64, 64)])
    tokenprune.patch(evaluator.model, r=0)
    evaluator.embedding, evaluator.saliency = evaluator._outputs()

    adaptive = tokenprune.LocalGlobalConfig(local_block=0, r=10, adaptive=True)
    per_image_gflops, _ = evaluator.measure_per_image(adaptive)
    tokenprune.patch(evaluator.model, adaptive)
    merged_none = 0
    for i, g in enumerate(per_image_gflops.tolist()):
        tokens: list[int] = []
        evaluator.model._run_blocks(evaluator.photos[i : i + 1], None, False, False, on_block=lambda _, s: tokens.append(s.num_tokens))
        merged_none += sum(before == after for before, after in zip(tokens, tokens[1:]))
        # (rel 1e-6: a float32 tensor of GFLOPs; the matching of one block here is 1e-4 of the total)
        assert g * 1e9 == pytest.approx(counted_flops(evaluator.model, evaluator.photos[i : i + 1]), rel=1e-6), i
    assert merged_none > 0  # (the case this test is for)


def test_positional_stage_equals_brute_force_penalised_matching() -> None:
    """Stage 2 scores cos − λ·‖c_a − c_b‖₂ / diagonal on fractional centroids (after a window
    stage) of a non-square grid: the same merges as a loop over every A×B pair."""
    torch.manual_seed(0)
    grid, lam, r = (5, 9), 2.0, 6
    x = torch.randn(3, 1 + 45, 4)
    state = start_state(x, trace_source=True, grid=grid, track_positions=True)
    state = WindowMerge(2, 0.5, None, 1)(state, x)
    got = PositionalBipartiteMerge(r, lam, False, 1, backend="torch")(state, state.x)
    diagonal = math.hypot(*grid)

    def penalty(n: int, i: int, j: int) -> float:  # λ·(Euclidean centroid distance) / grid diagonal
        return lam * float((state.pos[n, i] - state.pos[n, j]).norm()) / diagonal

    expected = merge_state(state, brute_force_dest(state.x, r, 1, penalty), state.num_tokens - r)
    assert torch.equal(got.source_index, expected.source_index)
    torch.testing.assert_close(got.x, expected.x)
    torch.testing.assert_close(got.pos, expected.pos)


def test_adaptive_count_is_the_batch_minimum_above_mean_plus_std() -> None:
    """ALGM's adaptive stage 2: per image, the A tokens whose best score exceeds mean + std;
    the batch merges the minimum of those counts (rectangular), at most r."""
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 48, 6)
    x[1, 1:17:2] = x[1, 2:18:2] + 0.05 * torch.randn(8, 6)  # image 1: 8 near-duplicate pairs
    unit = torch.nn.functional.normalize(x[:, 1:], dim=-1)
    best = (unit[:, 1::2] @ unit[:, 0::2].transpose(1, 2)).amax(-1)  # A: even absolute positions
    counts = [int((s > s.mean() + s.std()).sum()) for s in best]
    assert counts[0] != counts[1] and min(counts) > 0
    state = start_state(x, trace_source=False, grid=(6, 8))
    step = PositionalBipartiteMerge(r=20, pos_weight=0.0, adaptive=True, num_protected=1, backend="torch")
    assert step(state, x).num_tokens == 49 - min(counts)
    capped = PositionalBipartiteMerge(r=2, pos_weight=0.0, adaptive=True, num_protected=1, backend="torch")
    assert capped(state, x).num_tokens == 49 - 2


@pytest.mark.parametrize(("grid", "ratio"), [((5, 7), 0.5), ((14, 14), 0.3)])
def test_window_count_rounds_ratio_of_whole_windows(grid, ratio) -> None:
    """round(ratio · windows) windows merge, windows = (rows // 2)·(cols // 2) (the border of an
    odd grid is in none); 0.3 · 49 = 14.7 → 15, the count plan gives."""
    rows, cols = grid
    torch.manual_seed(1)
    x = torch.randn(2, 1 + rows * cols, 8)
    state = WindowMerge(2, ratio, None, 1)(start_state(x, False, grid), x)
    assert state.num_tokens == 1 + rows * cols - round(ratio * (rows // 2) * (cols // 2)) * 3
    model = tokenprune.patch(make("vit_cls"), "local_global", local_block=1, local_ratio=0.3, r=4)
    with torch.no_grad():
        assert model.forward_tokens(image()).num_tokens == tokenprune.plan(model, 224).output_tokens


def test_ratio_merges_each_images_most_self_similar_windows() -> None:
    """local_ratio (the default count) merges, in every image, the round(ratio · windows)
    windows of highest mean pairwise cosine by the Gram-matrix reference, not any windows of
    the right count: three images, each with its own most self-similar windows."""
    torch.manual_seed(6)
    grid, ratio = (6, 8), 0.25  # 3 × 4 = 12 windows, 3 merge
    x = torch.randn(3, 1 + 48, 8)
    patches = x[:, 1:].view(3, 6, 8, 8)
    for n, (row, col) in enumerate(((0, 0), (2, 6), (4, 2))):  # a near-constant window per image
        patches[n, row : row + 2, col : col + 2] = torch.randn(8) + 0.3 * torch.randn(2, 2, 8)
    state = WindowMerge(2, ratio, None, 1)(start_state(x, trace_source=True, grid=grid), x)
    expected = gram_window_scores(torch.nn.functional.normalize(x[:, 1:], dim=-1), grid).topk(3, dim=1).indices
    assert len({tuple(sorted(row)) for row in expected.tolist()}) == 3  # the images differ
    owners = state.source_index[:, 1:].reshape(3, 3, 2, 4, 2).permute(0, 1, 3, 2, 4).flatten(3)  # [B, window, 4 members]
    merged = (owners == owners[..., :1]).all(-1).flatten(1)  # the windows whose patches share one token
    for n in range(3):
        assert merged[n].nonzero()[:, 0].tolist() == sorted(expected[n].tolist()), n


def test_window_threshold_is_inclusive() -> None:
    """'at least the threshold': orthogonal one-hot windows score exactly 0, constant ones exactly 1."""
    eye = torch.eye(4)
    x = torch.zeros(1, 16, 4)
    g = x[0].view(4, 4, 4)
    g[0:2, 0:2] = eye.view(2, 2, 4)
    g[0:2, 2:4] = eye[0]
    g[2:4, 0:2] = -eye.view(2, 2, 4)
    g[2:4, 2:4] = torch.tensor([1.0, -1, 0, 0]).view(1, 1, 4) * torch.tensor([1.0, -1]).view(2, 1, 1)
    assert window_scores(x, (4, 4), 2).tolist() == [[0.0, 1.0, 0.0, pytest.approx(-1 / 3)]]
    for threshold, windows in ((0.0, 3), (1.0, 1)):
        state = WindowMerge(2, None, threshold, 0)(start_state(x, False, (4, 4)), x)
        assert state.num_tokens == 16 - 3 * windows


def test_local_threshold_replaces_local_ratio() -> None:
    """With local_threshold set (fresh config: local_ratio left at its 1/16 default), the count
    follows the data: at −1 every 2×2 window merges (mean cosine ≥ −1/3)."""
    model = tokenprune.patch(make("vit_cls"), "local_global", local_block=0, local_threshold=-1.0, r=0)
    assert model.blocks[0].reducer.ratio is None
    with torch.no_grad():
        assert model.forward_tokens(image()).num_tokens == 1 + 196 - 49 * 3
    with pytest.raises(ValueError, match="data-dependent"):
        tokenprune.plan(model, 224)


def test_a_ratio_that_the_threshold_would_ignore_is_refused() -> None:
    """local_threshold replaces local_ratio, so a ratio given with a threshold, or by re-patching
    a model patched with one (``patch`` keeps the other options), would change nothing: the
    forward kept merging every window (threshold −1) where a quarter was asked for. Refused,
    naming both; with the threshold cleared, the ratio merges as on a fresh model."""
    with pytest.raises(ValueError, match=r"local_threshold=0.5 replaces local_ratio, so local_ratio=0.25 would change nothing"):
        tokenprune.patch(make("vit_cls"), "local_global", local_ratio=0.25, local_threshold=0.5)
    model = tokenprune.patch(make("vit_cls"), "local_global", local_block=0, local_threshold=-1.0, r=0)
    with pytest.raises(ValueError, match=r"local_threshold=-1.0 replaces local_ratio.*\(local_threshold=None for local_ratio\)"):
        tokenprune.patch(model, local_ratio=0.25)
    assert model.tokenprune_config.local_threshold == -1.0  # left as it was
    tokenprune.patch(model, local_ratio=0.25, local_threshold=None)
    fresh = tokenprune.patch(make("vit_cls"), "local_global", local_block=0, local_ratio=0.25, r=0)
    with torch.no_grad():
        tokens = model.forward_tokens(image()).num_tokens
        assert tokens == fresh.forward_tokens(image()).num_tokens == 1 + 196 - round(0.25 * 49) * 3
    tokenprune.patch(model, local_threshold=-1.0)  # a threshold over a ratio: the threshold's count
    with torch.no_grad():
        assert model.forward_tokens(image()).num_tokens == 1 + 196 - 49 * 3


def test_adaptive_threshold_uses_the_sample_std_and_a_strict_exceed() -> None:
    """mean + std is torch's default (sample, n − 1) std, and a score must exceed it: six A
    tokens whose best scores put one above mean + sample std but two above mean + population
    std merge one; identical tokens (every best score equal, std 0) exceed nothing and merge none."""
    torch.manual_seed(5)
    x = torch.randn(1, 1 + 12, 6)
    unit = torch.nn.functional.normalize(x[:, 1:], dim=-1)
    best = (unit[:, 1::2] @ unit[:, 0::2].transpose(1, 2)).amax(-1)[0]  # A: even absolute positions
    n = len(best)
    mean = sum(best.tolist()) / n
    sample_std = math.sqrt(sum((s - mean) ** 2 for s in best.tolist()) / (n - 1))
    population_std = math.sqrt(sum((s - mean) ** 2 for s in best.tolist()) / n)
    assert sum(s > mean + sample_std for s in best.tolist()) == 1
    assert sum(s > mean + population_std for s in best.tolist()) == 2  # the case tells the two apart
    step = PositionalBipartiteMerge(r=20, pos_weight=0.0, adaptive=True, num_protected=1, backend="torch")
    assert step(start_state(x, False, (3, 4)), x).num_tokens == 13 - 1
    flat = torch.zeros(1, 1 + 12, 6)
    flat[..., 0] = 1.0  # one direction: every cosine exactly 1
    assert step(start_state(flat, False, (3, 4)), flat).num_tokens == 13


def test_plan_caps_stage_two_like_the_forward() -> None:
    """A fixed r above what a block can merge (half its mergeable tokens): plan counts the
    capped number, as the forward merges it (64 px: 16 patches, then 8, 4, 2 mergeable)."""
    model = tokenprune.patch(make("vit_cls", img_size=64, depth=4), "local_global", local_block=0, local_ratio=0.0, r=16)
    reduction = tokenprune.plan(model, 64)
    assert reduction.removed == (0, 8, 4, 2)
    with torch.no_grad():
        assert model.forward_tokens(torch.randn(2, 3, 64, 64)).num_tokens == reduction.output_tokens == 1 + 16 - 14


def test_local_ratio_one_is_allowed_and_merges_every_window() -> None:
    """local_ratio is in the closed interval [0, 1]: 1 merges all 49 windows of a 14×14 grid."""
    model = tokenprune.patch(make("vit_cls"), "local_global", local_block=0, local_ratio=1.0, r=0)
    assert tokenprune.plan(model, 224).output_tokens == 1 + 196 - 49 * 3


@pytest.mark.parametrize("option", ["local_ratio", "local_threshold", "pos_weight"])
@pytest.mark.parametrize("value", ["0.5", True, [0.5], torch.tensor(0.5)], ids=["str", "bool", "list", "tensor"])
def test_numeric_options_of_another_type_are_refused_by_name(option, value) -> None:
    """Not compared with Python's words ("'<=' not supported"), nor taken as 1 (a bool) or a
    tensor that reaches the forward."""
    with pytest.raises(TypeError, match=f"{option} must be a number .*got {re.escape(repr(value))}"):
        tokenprune.LocalGlobalConfig(**{option: value})


@pytest.mark.parametrize(
    "options",
    [dict(local_ratio=0.5), dict(local_threshold=0.2), dict(local_ratio=0.0, adaptive=True, pos_weight=1.0)],
    ids=["ratio", "threshold", "adaptive"],
)
def test_an_empty_batch_runs_as_in_the_unpatched_model(options: dict) -> None:
    """A batch of 0 images (an uneven shard's last batch) runs as in timm: window scores
    reshaped with a -1 that 0 elements leave ambiguous, and the threshold and adaptive counts
    took the minimum over no images. A fixed count leaves the planned tokens."""
    model = make("vit_cls", img_size=64, depth=3)
    empty = torch.randn(0, 3, 64, 64)
    with torch.no_grad():
        reference = model(empty)
        tokenprune.patch(model, "local_global", local_block=0, r=2, trace_source=True, **options)
        assert model(empty).shape == reference.shape == (0, 10)
        tokens = model.forward_tokens(empty)
        assert model.forward_features(empty, unmerge=True).shape == (0, 1 + 16, 192)
    assert tokenprune.source(model).shape == (0, tokens.num_tokens, 1 + 16)
    if "local_ratio" in options and not options.get("adaptive"):  # 2 of 4 windows, then r=2 twice
        assert tokens.num_tokens == tokenprune.plan(model, 64).output_tokens == 1 + 16 - 2 * 3 - 2 * 2

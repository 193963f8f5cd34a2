"""Token reduction on the video ViT: joint space-time ToMe, temporal merging, background merging."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import kernels
import tokenprune
from tokenprune.merge import TokenState, grid_positions, source_matrix
from tokenprune.models import VideoVisionTransformer, video_vit_small_patch16_224
from tokenprune.patch.vit import attend
from tests.test_patch import assert_per_sample_gradients, counted_flops

FRAMES, SIZE = 8, 64
GRID = (FRAMES // 2, SIZE // 16, SIZE // 16)  # (T', H', W') = (4, 4, 4)
NUM_TOKENS = GRID[0] * GRID[1] * GRID[2]

VARIANTS = {  # name: (method, options)
    "tome": ("tome", dict(r=6)),
    "temporal": ("temporal", dict(r=6, window=1)),
    "background": ("background", dict(early_blocks=1, early_r=16, r=4)),
    "background_received": ("background", dict(early_blocks=1, early_r=16, r=4, importance="received")),
}
IDENTITY = {
    "tome": dict(r=0),
    "temporal": dict(r=0),
    "background": dict(early_r=0, r=0),
}


def patch_variant(model: VideoVisionTransformer, variant: str, **extra) -> VideoVisionTransformer:
    method, options = VARIANTS[variant]
    return tokenprune.patch(model, method, **options, **extra)


def make_model(depth: int = 3, seed: int = 0, **kwargs) -> VideoVisionTransformer:
    torch.manual_seed(seed)
    model = video_vit_small_patch16_224(num_frames=FRAMES, img_size=SIZE, depth=depth, num_classes=10, **kwargs)
    return model.eval().requires_grad_(False)


def make_clip(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return make_clip()


@pytest.mark.parametrize("method", sorted(IDENTITY))
def test_zero_reduction_is_bit_identical(method, clip):
    model = make_model()
    reference = model(clip)
    tokenprune.patch(model, method, **IDENTITY[method])
    assert torch.equal(model(clip), reference)
    state = model.forward_tokens(clip)
    assert state.grid == GRID and state.num_tokens == NUM_TOKENS
    tokenprune.unpatch(model)
    assert type(model) is VideoVisionTransformer
    assert torch.equal(model(clip), reference)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sizes_and_sources(variant, clip):
    model = make_model()
    patch_variant(model, variant, trace_source=True)
    state = model.forward_tokens(clip)
    plan = tokenprune.plan(model, (FRAMES, SIZE, SIZE))
    assert state.num_tokens == plan.output_tokens < NUM_TOKENS
    sizes = state.size[..., 0]
    assert torch.equal(sizes.sum(dim=1), torch.full((clip.shape[0],), float(NUM_TOKENS)))
    # every input token lies in exactly one output token, every output token covers ≥ 1 input token
    source = tokenprune.source(model)
    assert source.shape == (clip.shape[0], state.num_tokens, NUM_TOKENS)
    assert torch.equal(source.sum(dim=1), torch.ones(clip.shape[0], NUM_TOKENS, dtype=source.dtype))
    assert torch.equal(source.sum(dim=2).float(), sizes)
    assert model(clip).shape == (clip.shape[0], 10)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_plan_matches_actual_token_counts(variant, clip):
    model = make_model(depth=4)
    patch_variant(model, variant)
    plan = tokenprune.plan(model, (FRAMES, SIZE, SIZE))
    counts: list[int] = []
    model._run_blocks(clip, None, False, False, on_block=lambda i, s: counts.append(s.num_tokens))
    assert counts == [plan.tokens_after(i) for i in range(4)]
    assert plan.tokens[0] == tokenprune.api.input_tokens(model, (FRAMES, SIZE, SIZE)) == NUM_TOKENS


@pytest.mark.parametrize("variant", [None, *sorted(VARIANTS)])
def test_flops_match_flop_counter(variant, clip):
    model = make_model()
    if variant is not None:
        patch_variant(model, variant)
    assert tokenprune.flops(model, (FRAMES, SIZE, SIZE), batch_size=clip.shape[0]).total == counted_flops(model, clip)


def test_input_size_forms_and_conv3d_embed_flops():
    model = make_model(depth=1)
    for size in (SIZE, (SIZE, SIZE), (FRAMES, SIZE, SIZE), (3, FRAMES, SIZE, SIZE)):
        assert tokenprune.api.patch_grid(model, size) == GRID
    with pytest.raises(ValueError, match="frames"):
        tokenprune.api.patch_grid(model, (FRAMES * 2, SIZE, SIZE))
    embed = tokenprune.flops(model, SIZE).embed_and_head - 2 * 384 * 10
    assert embed == 2 * NUM_TOKENS * 384 * 3 * 2 * 16 * 16  # tubelet 2×16×16 Conv3d
    dynamic = make_model(depth=1, dynamic_img_size=True)
    assert tokenprune.api.patch_grid(dynamic, (16, 32, 48)) == (8, 2, 3)
    assert tokenprune.plan(dynamic, (16, 32, 48)).tokens == (48,)


def test_dynamic_clip_size_runs_with_3d_grid():
    model = make_model(dynamic_img_size=True)
    tokenprune.patch(model, "temporal", r=[4])
    clip = torch.randn(1, 3, 4, 48, 32)
    state = model.forward_tokens(clip)
    assert state.grid == (2, 3, 2)
    assert state.num_tokens == tokenprune.plan(model, (4, 48, 32)).output_tokens


def test_temporal_merges_only_neighbouring_frames_within_window(clip):
    window = 1
    model = make_model(depth=2)
    tokenprune.patch(model, "temporal", r=[20], window=window, trace_source=True)
    state = model.forward_tokens(clip)
    coords = grid_positions(GRID, 0, clip.device)  # (frame, row, col) of every input token
    source = source_matrix(state.source_index, state.num_tokens).bool()
    merged = 0
    for b in range(clip.shape[0]):
        representatives = []
        for members in source[b]:
            index = members.nonzero()[:, 0]
            frames = coords[index, 0]
            if len(index) == 1:
                representatives.append(int(index[0]))
                continue
            merged += len(index) - 1
            odd = index[frames % 2 == 1]
            assert len(odd) == 1, "exactly one destination (odd-frame) token per merged group"
            anchor = coords[odd[0]]
            for member in index[frames % 2 == 0]:
                assert (coords[member, 0] - anchor[0]).abs() == 1, "merged across non-adjacent frames"
                assert (coords[member, 1:] - anchor[1:]).abs().max() <= window, "merged outside the window"
            representatives.append(int(odd[0]))
        assert representatives == sorted(representatives), "tokens must keep their (frame, row, col) order"
    assert merged == 20 * clip.shape[0]
    # centroids are the size-weighted means of the covered input positions
    expected = source.float() @ coords / source.sum(-1, keepdim=True)
    torch.testing.assert_close(state.pos, expected)
    # and the 20 merged are the most similar pairs: the block's keys (averaged over heads, from
    # its own qkv) give every even-frame token its best odd-frame token within the rule; the 20
    # best of those pairs, and no others, share an output token
    block = model.blocks[0]
    tokens = block.norm1(model._pos_embed(model.patch_embed(clip)))
    attn = block.attn
    keys = attn.qkv(tokens).reshape(*tokens.shape[:2], 3, attn.num_heads, attn.head_dim)[:, :, 1].mean(dim=2)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    gap = (coords[:, None] - coords[None]).abs()
    allowed = (coords[:, None, 0] % 2 == 0) & (gap[..., 0] == 1) & (gap[..., 1:].amax(-1) <= window)
    best, partner = (unit @ unit.transpose(1, 2)).masked_fill(~allowed, float("-inf")).max(dim=-1)
    owner = source.float().argmax(dim=1)  # each input token's output token
    for b in range(clip.shape[0]):
        ranked = best[b].argsort(descending=True)
        assert best[b, ranked[19]] - best[b, ranked[20]] > 1e-4  # no near tie decides the 20th merge
        for token in ranked[:20].tolist():
            assert owner[b, token] == owner[b, partner[b, token]], "a most similar pair did not merge"
        for token in ranked[20:].tolist():
            assert (owner[b] == owner[b, token]).sum() == 1 or coords[token, 0] % 2 == 1, "a weaker pair merged"


def test_temporal_multi_block_stays_local(clip):
    """Every block's merges follow the rule on the centroids the tokens had entering it: each
    merged group is one odd-frame (B) token and even-frame (A) tokens at most 1.5 frames and
    ``window`` patches in row and column from it, and no merge fell back outside the window
    (no warning). (A bound on the final groups' extent cannot fail here: 4 × 4 × 4 tokens
    span at most 3 frames, rows and columns.)"""
    blocks, window = 4, 1
    model = make_model(depth=blocks)
    tokenprune.patch(model, "temporal", r=6, window=window, trace_source=True)
    batch = clip.shape[0]
    entering = TokenState(clip, source_index=torch.arange(NUM_TOKENS).expand(batch, -1),
                          pos=grid_positions(GRID, 0, clip.device).expand(batch, -1, -1))  # block 0's input
    states = [entering]
    with warnings.catch_warnings():
        # a merge outside the window or without a partner warns
        warnings.filterwarnings("error", message="temporal merging", category=RuntimeWarning)
        final = model._run_blocks(clip, None, False, True, on_block=lambda i, s: states.append(s))
    assert final.num_tokens == NUM_TOKENS - 6 * blocks
    merged = 0
    for before, after in zip(states, states[1:]):
        for b in range(batch):
            # each token entering the block → the token it is in after the block
            moves = torch.full((before.pos.shape[1],), -1)
            moves[before.source_index[b]] = after.source_index[b]
            for token in range(after.pos.shape[1]):
                members = (moves == token).nonzero()[:, 0]
                if len(members) == 1:
                    continue
                merged += len(members) - 1
                centroids = before.pos[b, members]
                odd = torch.floor(centroids[:, 0] + 0.5) % 2 == 1
                assert int(odd.sum()) == 1, "exactly one odd-frame (B) token per merged group"
                gap = (centroids[~odd] - centroids[odd]).abs()
                assert (gap[:, 0] <= 1.5 + 1e-4).all(), "merged across non-neighbouring frames"
                assert (gap[:, 1:] <= window + 1e-4).all(), "merged outside the window"
    assert merged == 6 * blocks * batch


def test_temporal_window_zero_and_missing_partners(clip):
    model = make_model(depth=1)
    # window 0, one block: only same-position tokens of the neighbouring frame can merge, and
    # all 32 even-frame tokens have one, so r=32 (the cap) merges all of them.
    tokenprune.patch(model, "temporal", r=32, window=0, trace_source=True)
    model(clip)
    source = tokenprune.source(model).bool()
    assert (source.sum(-1) - 1).sum() == 32 * clip.shape[0]
    coords = grid_positions(GRID, 0, clip.device)
    for group in source.flatten(0, 1):
        members = coords[group.nonzero()[:, 0]]
        assert (members[:, 1:] == members[0, 1:]).all(), "window 0 merges the same spatial position only"
    # a single tubelet frame has no neighbouring frame: refuse rather than merge outside the rule
    dynamic = make_model(depth=1, dynamic_img_size=True)
    tokenprune.patch(dynamic, "temporal", r=2)
    with pytest.raises(ValueError, match="at least two tubelet frames"):
        dynamic(torch.randn(1, 3, 2, SIZE, SIZE))
    with pytest.raises(ValueError, match="at least two tubelet frames"):
        tokenprune.plan(dynamic, (2, SIZE, SIZE))  # the plan says so too, not a reduction the forward refuses


def test_temporal_step_outside_the_window_takes_the_best_outside_and_warns(monkeypatch):
    """Token 1 (frame 0) has no odd-frame token within the window: it merges into its most
    similar odd-frame token, eager (with a warning) and compiled (which cannot warn on data)
    alike."""
    from tokenprune.merge import TokenState
    from tokenprune.methods.temporal import TemporalMerge

    pos = torch.tensor([[[0.0, 0, 0], [0, 0, 5], [1, 0, 0], [1, 0, 9]]])
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [1, 0.1, 0], [0.1, 1, 0]]])
    x = torch.arange(12.0).reshape(1, 4, 3)
    state = TokenState(x, pos=pos)
    step = TemporalMerge(r=2, window=1, num_protected=0, backend="torch")
    with pytest.warns(RuntimeWarning, match="some merges had no partner"):
        eager = step(state, metric)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r=1: the one merge inside the window, no warning
        assert TemporalMerge(r=1, window=1, num_protected=0, backend="torch")(state, metric).num_tokens == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # while training (the metric has a gradient): only the warning above
        with pytest.warns(RuntimeWarning, match="some merges had no partner"):
            step(state, metric.requires_grad_(True))
    metric = metric.detach()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    merged = step(state, metric)
    # 0 joins 2 (inside the window), 1 joins 3 (outside, its best match): B tokens stay in order
    torch.testing.assert_close(merged.x, torch.stack([(x[0, 0] + x[0, 2]) / 2, (x[0, 1] + x[0, 3]) / 2])[None])
    torch.testing.assert_close(merged.size, torch.full((1, 2, 1), 2.0))
    torch.testing.assert_close(eager.x, merged.x)


BACKENDS = ["torch"] + (["triton"] if kernels.HAS_TRITON and kernels.INTERPRET else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_temporal_step_without_partners_stays_in_its_clip(backend):
    """Clips with fewer than r tokens that have an odd-frame partner (their B tokens drifted to
    even frames) still remove r tokens, inside the clip: tokens without a partner (even
    positions first) merge into the next token kept, and an A token whose partner was so
    removed follows it. Each clip gives what it gives alone, every size is kept, and the eager
    CPU forward warns."""
    from tokenprune.methods.temporal import TemporalMerge

    def clip(frames, metric):
        return torch.tensor([[0.0, 0, 0]] + [[f, 0, i] for i, f in enumerate(frames)]), torch.tensor([[0.0] * 4] + metric)

    e = torch.eye(4).tolist()
    near = lambda i: [v + 0.1 * (j == (i + 1) % 4) for j, v in enumerate(e[i])]  # noqa: E731
    clips = [
        clip([0, 0, 1, 1, 2, 2], [e[0], e[1], e[0], e[1], e[2], e[3]]),  # A 0 1 4 5, B 2 3: all merges temporal
        clip([0, 0, 2, 2, 2, 2], [e[0], e[1], e[2], e[3], e[0], e[1]]),  # no B token left
        clip([0, 1, 1, 1, 1, 2], [e[0], e[2], near(0), e[3], near(1), e[1]]),  # two A tokens for r = 3
    ]
    pos, metric = (torch.stack(t) for t in zip(*clips))
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    step = TemporalMerge(r=3, window=9, num_protected=1, backend=backend)
    with pytest.warns(RuntimeWarning, match="fewer than r tokens with an odd-frame partner"):
        out = step(TokenState(x, pos=pos), metric)
    # written out by hand (body index + 1 = token index; the class token stays first)
    groups = [
        [[0], [1, 3, 5], [2, 4], [6]],  # 1 and 5 (a tie: the lowest B) into 3, 2 into 4
        [[0], [1, 2], [3, 4], [5, 6]],  # 1, 3, 5 (even body positions) into the next token
        [[0], [2], [1, 3, 4], [5, 6]],  # 3 (B, no partner) into 4 and 1 follows its partner 3; 6 into 5
    ]
    for b, clip_groups in enumerate(groups):
        expected = torch.stack([x[b, g].mean(0) for g in clip_groups])
        torch.testing.assert_close(out.x[b], expected)
        assert out.size[b, :, 0].tolist() == [float(len(g)) for g in clip_groups]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = step(TokenState(x[b : b + 1], pos=pos[b : b + 1]), metric[b : b + 1])
        torch.testing.assert_close(alone.x[0], out.x[b], rtol=0, atol=0)


def test_temporal_drift_does_not_stop_a_planned_schedule():
    """window=0 over an odd number of tubelet frames: B tokens absorbing the next frame drift to
    a .5 frame, turn A, and strand the A tokens behind them. Every block the plan allows runs
    (warning for the merges taken outside) and leaves the planned token counts."""
    model = make_model(depth=4, dynamic_img_size=True)
    tokenprune.patch(model, "temporal", r=7, window=0)
    clip = torch.randn(1, 3, 6, 48, 80, generator=torch.Generator().manual_seed(5))  # 3 × 3 × 5 tokens
    planned = tokenprune.plan(model, tuple(clip.shape[2:]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = model.forward_tokens(clip)
    assert state.x.shape[1] == planned.tokens[-1] - planned.removed[-1]
    assert any("had no partner" in str(w.message) for w in caught)


@pytest.mark.parametrize("positions", ["fractional", "grid"])
def test_temporal_best_match_against_the_rule_pair_by_pair(positions):
    """Each A token's best partner equals a pair-by-pair reading of the rule, on fractional
    (merged) centroids and on the grid, where distances fall exactly on the limits: A (even
    frame) → B (odd frame), ≤ 1.5 frames apart, ≤ window patches in row and column; A → B pairs
    outside rank below all of those (cosine − 4); B tokens score −inf. The CPU's cdist and
    the broadcast that CUDA uses agree on which pairs are too far."""
    from kernels.temporal_match import far_pairs
    from kernels.temporal_match import temporal_best_match_reference as temporal_best_match

    generator = torch.Generator().manual_seed(3)
    if positions == "grid":
        pos = grid_positions((4, 5, 5), 0, torch.device("cpu")).expand(2, -1, -1)
    else:
        pos = torch.rand(2, 40, 3, generator=generator) * torch.tensor([6.0, 5.0, 5.0])
    n = pos.shape[1]
    metric = torch.randn(2, n, 8, generator=generator)
    unit = torch.nn.functional.normalize(metric, dim=-1)
    expected = unit @ unit.transpose(-1, -2)
    is_a = torch.floor(pos[..., 0] + 0.5) % 2 == 0
    for b in range(2):
        for i in range(n):
            for j in range(n):
                d = (pos[b, i] - pos[b, j]).abs()
                if not (is_a[b, i] and not is_a[b, j]):
                    expected[b, i, j] = float("-inf")
                elif not (d[0] <= 1.5 + 1e-6 and d[1:].max() <= 2 + 1e-6):
                    expected[b, i, j] -= 4.0
    best_score, best_b = temporal_best_match(metric, pos, 2)
    expected_score, expected_b = expected.max(dim=-1)
    torch.testing.assert_close(best_score, expected_score)
    assert torch.equal(best_b[is_a], expected_b[is_a])
    assert (best_score[is_a] > -1.0 - 1e-6).any() and (best_score[is_a] < -3.0).any() == (positions == "fractional")
    assert torch.equal(far_pairs(pos, 2, use_cdist=True), far_pairs(pos, 2, use_cdist=False))


def test_temporal_total_capped_at_even_frame_tokens(clip):
    """Only even-frame tokens merge, one per merge: plan caps the total at their count (32 of
    64 here), so FLOPs and budgets never promise a merge the frame rule forbids; the forward
    then does exactly what plan says."""
    model = make_model(depth=4)
    tokenprune.patch(model, "temporal", r=16, window=3, joint_after=False)
    reduction = tokenprune.plan(model, SIZE)
    assert reduction.removed == (16, 16, 0, 0)  # 32 even-frame tokens in all, not 4 × 16
    assert model.forward_tokens(clip).num_tokens == reduction.output_tokens == NUM_TOKENS - 32
    # Capped blocks skip the matching too: FLOPs count none for them.
    assert tokenprune.flops(model, (FRAMES, SIZE, SIZE), batch_size=clip.shape[0]).total == counted_flops(model, clip)


def test_temporal_joint_after_merges_jointly_once_even_frames_are_used(clip):
    """joint_after: blocks whose count the even-frame tokens left can still cover merge
    temporally; later ones merge jointly (ToMe), so the total is no longer capped at half."""
    from tokenprune.methods import BipartiteMerge, TemporalMerge

    model = make_model(depth=4)
    tokenprune.patch(model, "temporal", r=16, window=3, joint_after=True, trace_source=True)
    kinds = [type(block.reducer.step_for(GRID)) for block in model.blocks]  # the steps on this clip's grid
    assert kinds == [TemporalMerge, TemporalMerge, BipartiteMerge, BipartiteMerge]
    reduction = tokenprune.plan(model, SIZE)
    assert reduction.removed == (16, 16, 16, 8)  # ToMe's own cap (half the tokens) in the last block
    state = model.forward_tokens(clip)
    assert state.num_tokens == reduction.output_tokens == NUM_TOKENS - 56
    assert (tokenprune.source(model).sum(-1) == state.size[..., 0]).all()
    tokenprune.patch(model, "temporal", r=16, window=3, joint_after=False)
    assert tokenprune.plan(model, SIZE).removed == (16, 16, 0, 0)
    # Once joint, later blocks stay joint even when their count would fit the even-frame
    # tokens left: those were merged by the joint step, so a temporal step would find none.
    tokenprune.patch(model, "temporal", r=[20, 8, 10, 4], window=3, joint_after=True)
    assert [type(block.reducer.step_for(GRID)) for block in model.blocks] == [TemporalMerge, TemporalMerge, BipartiteMerge, BipartiteMerge]
    assert tokenprune.plan(model, SIZE).removed == (20, 8, 10, 4)
    assert model.forward_tokens(clip).num_tokens == NUM_TOKENS - 42
    # What a block removes counts, not its r: with 3 tubelet frames (32 of 48 tokens on even
    # frames) block 0's 32 is capped at half the tokens, 24, so 8 even-frame tokens are left
    # for blocks 1 and 2 to merge temporally.
    odd = video_vit_small_patch16_224(num_frames=6, img_size=SIZE, depth=4).eval()
    tokenprune.patch(odd, "temporal", r=[32, 4, 4, 0])
    assert [type(block.reducer) for block in odd.blocks] == [TemporalMerge, TemporalMerge, TemporalMerge, type(None)]
    assert tokenprune.plan(odd, (6, SIZE, SIZE)).removed == (24, 4, 4, 0)


@pytest.mark.parametrize(("depth", "early_blocks"), [(1, 1), (3, 1), (12, 6), (14, 6)])
def test_background_merges_early_in_half_the_blocks_up_to_six(depth, early_blocks):
    model = make_model(depth=depth)
    tokenprune.patch(model, "background", early_r=4, r=0)
    tokens = tokenprune.plan(model, (FRAMES, SIZE, SIZE)).tokens
    assert tokens == tuple(NUM_TOKENS - 4 * min(block, early_blocks) for block in range(depth))
    with pytest.raises(ValueError, match=f"early_blocks={depth + 1} exceeds the model's {depth} blocks"):
        tokenprune.patch(make_model(depth=depth), "background", early_blocks=depth + 1)
    later = depth - early_blocks
    with pytest.raises(ValueError, match=f"{later + 1} entries but after early_blocks={early_blocks} come {later} blocks"):
        tokenprune.patch(make_model(depth=depth), "background", early_blocks=early_blocks, r=[1] * (later + 1))


def test_background_merges_least_attended_tokens(clip):
    model = make_model(depth=1)
    tokenprune.patch(model, "background", early_blocks=1, early_r=10, pool=1, r=0, importance="received", trace_source=True)
    block = model.blocks[0]
    x = model._pos_embed(model.patch_embed(clip))
    _, (keys, received) = attend(block.attn, block.norm1(x), None, metric="attention_received")
    # the attention each token receives, from the block's own q and k: averaged over heads and queries
    attn = block.attn
    qkv = attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    weights = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(dim=-1)
    torch.testing.assert_close(received, weights.mean(dim=(1, 2)))
    torch.testing.assert_close(received.sum(-1), torch.ones(clip.shape[0]))
    state = model.forward_tokens(clip)
    source = tokenprune.source(model)
    assert state.num_tokens == NUM_TOKENS - 10
    odd = torch.arange(NUM_TOKENS) % 2 == 1  # sources come from the even positions
    least = received.masked_fill(odd, float("inf")).argsort(dim=-1)[:, :10]
    for b in range(clip.shape[0]):
        owner = source[b].argmax(0)  # output token of every input token
        members = source[b].sum(-1)
        # each least-attended token shares its output token with another (its partner)
        assert all(members[owner[i]] >= 2 for i in least[b].tolist())
        assert members.sum() == NUM_TOKENS


def test_background_merges_at_most_the_even_position_tokens(clip):
    """Sources come from the even positions only: a block removes at most half its tokens
    (rounded up), and the plan, the FLOP count and the forward agree on it."""
    model = make_model(depth=2)
    tokenprune.patch(model, "background", early_blocks=2, early_r=50, r=0, trace_source=True)
    assert tokenprune.plan(model, SIZE).removed == (32, 16)  # 64 tokens: 32 even; then 32: 16
    state = model.forward_tokens(clip)
    assert state.num_tokens == NUM_TOKENS - 48
    assert (tokenprune.source(model).sum(-1) == state.size[..., 0]).all()


def test_background_without_importance_is_the_widest_pool(clip):
    """importance="none" ranks nothing: every even token is a candidate, which is what a pool
    covering all even tokens does with an importance (same merges, same output), without the
    explicit attention map."""
    model = make_model(depth=3)
    tokenprune.patch(model, "background", early_blocks=2, early_r=12, r=4, importance="received", pool=100, trace_source=True)
    expected, expected_source = model(clip), tokenprune.source(model)
    tokenprune.patch(model, "background", early_blocks=2, early_r=12, r=4, importance="none", trace_source=True)
    assert model.blocks[0].reducer.metric == "keys"
    torch.testing.assert_close(model(clip), expected)
    assert torch.equal(tokenprune.source(model), expected_source)
    assert tokenprune.flops(model, (FRAMES, SIZE, SIZE), batch_size=clip.shape[0]).total == counted_flops(model, clip)


def test_background_sharpness_merges_the_broadest_attenders(clip):
    """importance="sharpness" (vid-TLDR): a token's importance is the negative entropy of its
    own attention row, averaged over heads, computed here from the block's q and k directly;
    the 10 even-position tokens with the flattest attention merge."""
    model = make_model(depth=1)
    tokenprune.patch(model, "background", early_blocks=1, early_r=10, pool=1, r=0, importance="sharpness", trace_source=True)
    block = model.blocks[0]
    tokens = block.norm1(model._pos_embed(model.patch_embed(clip)))
    attn = block.attn
    q, k, _ = attn.qkv(tokens).reshape(*tokens.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    sharpness = (weights * weights.log()).sum(dim=-1).mean(dim=1)
    _, (keys, importance) = attend(attn, tokens, None, metric="attention_sharpness")
    torch.testing.assert_close(importance, sharpness)
    torch.testing.assert_close(keys, k.mean(dim=1))
    assert (sharpness <= 0).all() and (sharpness >= -torch.log(torch.tensor(float(NUM_TOKENS))) - 1e-5).all()
    state = model.forward_tokens(clip)
    source = tokenprune.source(model)
    assert state.num_tokens == NUM_TOKENS - 10
    for b in range(clip.shape[0]):
        flattest = torch.zeros(NUM_TOKENS, dtype=torch.bool)
        flattest[sharpness[b].masked_fill(torch.arange(NUM_TOKENS) % 2 == 1, float("inf")).argsort()[:10]] = True
        # every output token holds exactly one of the other tokens: the flattest 10 all merged,
        # each into a token outside their group, and no other token moved
        assert (source[b][:, ~flattest].sum(-1) == 1).all()
        assert source[b][:, flattest].sum() == 10
    with pytest.raises(ValueError, match="importance"):
        tokenprune.BackgroundMergeConfig(importance="entropy")


def test_background_pool_lets_similarity_choose_among_unimportant_tokens(clip):
    """pool=3: of the 18 least-attended even-position tokens, the 6 most similar to a token
    outside those 18 merge into it (computed here from the block's own keys and attention); the
    other 12 unimportant tokens stay. pool=1 is the plain least-attended rule."""
    model = make_model(depth=1)
    tokenprune.patch(model, "background", early_blocks=1, early_r=6, pool=3, r=0, importance="received", trace_source=True)
    block = model.blocks[0]
    x = model._pos_embed(model.patch_embed(clip))
    _, (keys, received) = attend(block.attn, block.norm1(x), None, metric="attention_received")
    model(clip)
    source = tokenprune.source(model)
    odd = torch.arange(NUM_TOKENS) % 2 == 1
    for b in range(clip.shape[0]):
        pool = received[b].masked_fill(odd, float("inf")).argsort()[:18]
        assert (pool % 2 == 0).all()
        unit = torch.nn.functional.normalize(keys[b].float(), dim=-1)
        outside = torch.ones(NUM_TOKENS, dtype=torch.bool)
        outside[pool] = False
        similarity = unit[pool] @ unit[outside].T
        best, partner = similarity.max(dim=-1)
        chosen = best.argsort(descending=True)[:6]
        owner = source[b].argmax(0)
        for i in range(18):
            token = pool[i].item()
            if i in chosen.tolist():
                assert owner[token] == owner[outside.nonzero()[partner[i], 0]], "merged into its best match"
            else:
                assert source[b][owner[token]].sum() == 1, "an unchosen candidate keeps its own token"
    with pytest.raises(ValueError, match="pool"):
        tokenprune.BackgroundMergeConfig(pool=0.5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compile_fullgraph(variant, clip):
    model = make_model(depth=2)
    patch_variant(model, variant)
    eager = model(clip)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(clip), eager)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch: no batching rule for SDPA
@pytest.mark.parametrize("variant", ["temporal", "background_received"])
def test_per_sample_gradients_with_torch_func(variant, clip):
    """vmap over grad (per-sample gradients) runs the video methods and equals each clip's own
    backward: their matchings scatter out of place, and temporal merging's drift check, which
    reads a value back, is skipped under the transform."""
    model = make_model(depth=2).requires_grad_(True)
    patch_variant(model, variant)
    assert_per_sample_gradients(model, clip)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_an_empty_batch_gives_no_logits_like_the_unpatched_model(variant):
    """A batch of no clips runs as it does in the unpatched model (and timm): the patched
    attention reshaped its output with a -1 that 0 elements leave ambiguous, and temporal
    merging's drift check took the minimum of no ranks."""
    model = make_model()
    empty = make_clip(batch=0)
    reference = model(empty)
    patch_variant(model, variant, trace_source=True)
    assert model(empty).shape == reference.shape == (0, 10)
    output_tokens = tokenprune.plan(model, (FRAMES, SIZE, SIZE)).output_tokens
    assert model.forward_tokens(empty).x.shape == (0, output_tokens, 384)
    assert tokenprune.source(model).shape == (0, output_tokens, NUM_TOKENS)
    assert model.forward_features(empty, unmerge=True).shape == (0, NUM_TOKENS, 384)


def test_unsupported_methods_raise_clearly():
    model = make_model(depth=1)
    with pytest.raises(TypeError, match="video"):
        tokenprune.patch(model, "local_global")
    assert type(model) is VideoVisionTransformer


@pytest.mark.parametrize("variant", sorted(IDENTITY))
def test_forward_intermediates_on_the_full_token_grid(variant, clip):
    """The unpatched video ViT's maps at r=0, bit for bit; when merging, each tubelet's feature
    is that of the token that absorbed it (read from the dense source map of the same forward)."""
    model = make_model()
    final, maps = model.forward_intermediates(clip, indices=[0, 2])
    tokenprune.patch(model, variant, **IDENTITY[variant])
    got_final, got_maps = model.forward_intermediates(clip, indices=[0, 2])
    assert torch.equal(got_final, final) and all(torch.equal(a, b) for a, b in zip(got_maps, maps))

    patch_variant(model, variant, trace_source=True)
    final, (normed,) = model.forward_intermediates(clip, indices=[2], norm=True)
    source = tokenprune.source(model)  # [B, T_out, T_in] after the last block
    assert source.shape[1] < NUM_TOKENS
    expected = torch.einsum("boi,boc->bic", source.float(), model.forward_tokens(clip).x)
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(normed, expected.reshape(2, *GRID, 384).permute(0, 4, 1, 2, 3))


def test_temporal_needs_video_model():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=0)
    with pytest.raises(TypeError, match="video"):
        tokenprune.patch(model, "temporal", r=2)


def test_temporal_refuses_a_naflex_model_by_name():
    """NaFlexVit has no ``patch_embed``: the refusal names the method and the model instead of
    an AttributeError from inside the method."""
    import timm

    model = timm.create_model("naflexvit_base_patch16_gap", depth=1, embed_dim=64, num_heads=2, num_classes=0)
    with pytest.raises(TypeError, match="method 'temporal' needs a video model .* NaFlexVit"):
        tokenprune.patch(model, "temporal", r=2)


def test_image_grid_positions_unchanged():
    pos = grid_positions((2, 3), 1, torch.device("cpu"))
    expected = torch.tensor([[0, 0], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]], dtype=torch.float32)
    assert torch.equal(pos, expected)


def test_token_pooling_without_a_class_token_is_refused():
    """global_pool='token' reads token 0, which the video ViT does not protect (no prefix)."""
    model = make_model(depth=1, global_pool="token")
    for method, options in (("tome", {"r": 4}), ("temporal", {"r": 4}), ("background", {"early_r": 4})):
        with pytest.raises(TypeError, match="global_pool='avg'"):
            tokenprune.patch(model, method, **options)


def test_background_odd_token_count_merges_every_even_position() -> None:
    """Background merging may merge every even-position token, (n + 1) // 2 of an odd n, each
    into an odd-position partner, and plan counts the same cap."""
    model = make_model(depth=1, dynamic_img_size=True)
    tokenprune.patch(model, "background", early_blocks=1, early_r=50, r=0, trace_source=True)
    clip = torch.randn(1, 3, 6, 48, 48, generator=torch.Generator().manual_seed(0))  # 3×3×3 = 27 tokens
    assert tokenprune.plan(model, (6, 48, 48)).removed == (14,)  # 14 even positions, 13 odd partners
    assert model.forward_tokens(clip).num_tokens == 13
    source = tokenprune.source(model)[0]
    assert (source.sum(-1)[source.argmax(0)[0::2]] >= 2).all()  # every even-position token merged


def test_background_received_importance_is_per_patch() -> None:
    """Attention received by a merged token is divided by its size: token 0 (size 4, 0.40 in
    all, 0.10 per patch) is the least important per patch, and the one merged away."""
    from tokenprune.methods.temporal import BackgroundMerge

    x = torch.arange(12.0).view(1, 6, 2)
    size = torch.tensor([4.0, 1, 1, 1, 1, 1]).view(1, 6, 1)
    received = torch.tensor([[0.40, 0.10, 0.20, 0.10, 0.30, 0.10]])  # per patch: 0.10, ·, 0.20, ·, 0.30, ·
    keys = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))
    step = BackgroundMerge(r=1, num_protected=0, backend="torch", pool=1.0, metric="attention_received")
    out = step(TokenState(x, size=size), (keys, received))
    assert sorted(out.size[0, :, 0].tolist()) == [1.0, 1.0, 1.0, 1.0, 5.0]  # token 0 (size 4) merged into a partner


@pytest.mark.parametrize("metric", ["attention_received", "keys"])
def test_background_scores_in_float32_under_autocast(metric: str) -> None:
    """Under bf16 autocast background merging pairs tokens as without it: its scores stay
    float32 (bf16 would tie these near-copy keys, 5 % off one direction, and take the first)."""
    from tokenprune.methods.temporal import BackgroundMerge

    generator = torch.Generator().manual_seed(2)
    keys = (torch.randn(2, 1, 24, generator=generator) + 0.05 * torch.randn(2, 49, 24, generator=generator)).bfloat16()
    received = torch.rand(2, 49, generator=generator)
    x = torch.randn(2, 49, 8, generator=generator)
    step = BackgroundMerge(r=8, num_protected=1, backend="torch", pool=2.0, metric=metric)
    state = TokenState(x, source_index=torch.arange(49).expand(2, -1))
    inputs = (keys, received) if metric != "keys" else keys
    expected = step(state, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step(state, inputs)
    assert torch.equal(out.source_index, expected.source_index) and torch.equal(out.x, expected.x)


def test_temporal_inside_merge_of_dissimilar_tokens_does_not_warn() -> None:
    """The 'merged outside the window' warning is for partners outside it (score below −2), not
    for dissimilar partners inside it (cosine −0.98)."""
    from tokenprune.methods.temporal import TemporalMerge

    pos = torch.tensor([[[0.0, 0, 0], [1, 0, 1]]])
    metric = torch.tensor([[[1.0, 0], [-1.0, 0.2]]])  # inside the window, cosine −0.98
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = TemporalMerge(r=1, window=1, num_protected=0, backend="torch")(TokenState(torch.randn(1, 2, 3), pos=pos), metric)
    assert out.num_tokens == 1


def _ordered_dest_by_hand(is_src: list[bool], partner: list[int], p: int, has_partner: list[bool] | None) -> list[int]:
    """ordered_dest read token by token: a kept token's place among the kept ones; a source
    without a partner rests on the next kept token (the last when none follows); a source with
    one goes where its partner goes."""
    kept = [i for i, source in enumerate(is_src) if not source]

    def place(i: int) -> int:
        if not is_src[i]:
            return p + kept.index(i)
        following = [k for k in kept if k > i]
        return p + kept.index(following[0] if following else kept[-1])

    with_partner = has_partner if has_partner is not None else [True] * len(is_src)
    body = [place(partner[i]) if is_src[i] and with_partner[i] else place(i) for i in range(len(is_src))]
    return list(range(p)) + body


def test_ordered_dest_against_a_token_by_token_reading() -> None:
    """Random flags, partners and prefixes: ordered_dest equals the rule read token by token,
    sources at the very end (no kept token after them) included, with and without has_partner."""
    from tokenprune.methods.temporal import ordered_dest

    gen = torch.Generator().manual_seed(0)
    ends_on_a_source = 0
    for case in range(150):
        n = int(torch.randint(2, 14, (), generator=gen))
        p = int(torch.randint(0, 3, (), generator=gen))
        r = int(torch.randint(1, n // 2 + 1, (), generator=gen))
        is_src = torch.zeros(n, dtype=torch.bool)
        is_src[torch.randperm(n, generator=gen)[:r]] = True
        has_partner = (torch.rand(n, generator=gen) < 0.5) & is_src
        if case % 2:  # without has_partner: every source has a kept partner
            has_partner = None
        # a partner is never a source that has a partner itself (kept, or a source without one)
        allowed = (~is_src | ~(has_partner if has_partner is not None else is_src)).nonzero()[:, 0]
        partner = allowed[torch.randint(0, len(allowed), (n,), generator=gen)]
        ends_on_a_source += bool(is_src[-1])
        got = ordered_dest(is_src[None], partner[None], p, None if has_partner is None else has_partner[None])
        flags = None if has_partner is None else has_partner.tolist()
        want = _ordered_dest_by_hand(is_src.tolist(), partner.tolist(), p, flags)
        assert got[0].tolist() == want, dict(case=case, is_src=is_src.tolist(), partner=partner.tolist(), p=p)
    assert ends_on_a_source > 10


def test_temporal_tokens_without_partners_merge_from_the_first_even_position() -> None:
    """A clip of one even frame (no token has a partner) longer than a small sort: ties among
    the tokens without a partner go to the lowest even positions, each into the next token, in
    whatever order the sort visits the ties."""
    from tokenprune.methods.temporal import TemporalMerge

    n, r = 24, 5
    pos = torch.tensor([[0.0, 0, float(i)] for i in range(n)])[None]
    metric = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, n, 3, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="fewer than r tokens with an odd-frame partner"):
        out = TemporalMerge(r=r, window=1, num_protected=0, backend="torch")(TokenState(x, pos=pos), metric)
    groups = [[2 * k, 2 * k + 1] for k in range(r)] + [[i] for i in range(2 * r, n)]
    torch.testing.assert_close(out.x[0], torch.stack([x[0, g].mean(0) for g in groups]))
    assert out.size[0, :, 0].tolist() == [float(len(g)) for g in groups]


def test_temporal_cap_leaves_the_prefix_out_of_the_even_frame_tokens() -> None:
    """With prefix tokens, the blocks' counts still add up to the even-frame tokens exactly
    (num_removed after each earlier block's removals), as without a prefix."""
    from tokenprune.methods.temporal import TemporalMerge

    grid = (4, 2, 2)  # 8 even-frame tokens of 16
    for p in (0, 1, 2):
        step = TemporalMerge(r=100, window=1, num_protected=p)
        tokens, total = p + 16, 0
        while removed := step.num_removed(tokens, grid):
            total, tokens = total + removed, tokens - removed
        assert total == (grid[0] + 1) // 2 * grid[1] * grid[2], p


def test_temporal_joint_after_follows_the_clip_size_of_a_dynamic_model():
    """Whether a block merges temporally or jointly is decided on the clip's own grid: a
    dynamic_img_size model built for a short clip runs a longer one as the model built for that
    clip does (temporal steps while even-frame tokens are left), not as joint ToMe throughout
    because its default clip's few even-frame tokens ran out; plan and FLOPs follow."""
    torch.manual_seed(0)
    fixed = video_vit_small_patch16_224(num_frames=FRAMES, img_size=SIZE, depth=4, num_classes=10).eval()
    dynamic = video_vit_small_patch16_224(num_frames=4, img_size=32, depth=4, num_classes=10, dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())  # the weights do not depend on the clip size
    clip = make_clip()
    for model in (fixed, dynamic):
        tokenprune.patch(model, "temporal", r=16, window=3)
    assert tokenprune.plan(dynamic, (FRAMES, SIZE, SIZE)) == tokenprune.plan(fixed, (FRAMES, SIZE, SIZE))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(clip), fixed(clip), rtol=1e-5, atol=1e-5)
    assert tokenprune.flops(dynamic, (FRAMES, SIZE, SIZE), batch_size=2).total == counted_flops(dynamic, clip)
    # and a shorter clip than the default one goes joint once its own even-frame tokens are used
    short = video_vit_small_patch16_224(num_frames=4, img_size=32, depth=4, num_classes=10).eval()
    short.load_state_dict(fixed.state_dict())
    big = video_vit_small_patch16_224(num_frames=FRAMES, img_size=SIZE, depth=4, num_classes=10, dynamic_img_size=True).eval()
    big.load_state_dict(fixed.state_dict())
    for model in (short, big):
        tokenprune.patch(model, "temporal", r=2, window=3)
    small_clip = make_clip()[:, :, :4, :32, :32]
    assert tokenprune.plan(big, (4, 32, 32)) == tokenprune.plan(short, (4, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(big(small_clip), short(small_clip), rtol=1e-5, atol=1e-5)


def test_joint_after_takes_a_bool():
    """Like every other flag: joint_after=0 read as False only by accident of truthiness."""
    from tokenprune.methods.temporal import TemporalMergeConfig

    with pytest.raises(TypeError, match="joint_after must be True or False"):
        TemporalMergeConfig(joint_after=0)


def test_background_pool_and_importance_refused_by_name() -> None:
    """pool: a finite number (an infinite one overflowed in the forward's round), not a bool, a
    string or a tensor; importance: a name, not a list (unhashable for the lookup)."""
    with pytest.raises(ValueError, match="pool is a multiple of early_r, at least 1 and finite, got inf"):
        tokenprune.BackgroundMergeConfig(pool=float("inf"), importance="received")
    for value in (True, "4", None, torch.tensor(4.0)):
        with pytest.raises(TypeError, match=f"pool must be a number .*got {re.escape(repr(value))}"):
            tokenprune.BackgroundMergeConfig(pool=value)
    with pytest.raises(ValueError, match=r"importance must be one of \['none', 'received', 'sharpness'\], got \['received'\]"):
        tokenprune.BackgroundMergeConfig(importance=["received"])


@pytest.mark.parametrize("variant", ["temporal", "background", "background_received"])
def test_torch_jit_trace(variant: str) -> None:
    """torch.jit.trace records the video methods too, with the eager model's outputs exactly at
    the traced batch and another (their bool masks were scattered with the Python scalar True,
    on which the tracer stopped with an INTERNAL ASSERT)."""
    model = patch_variant(make_model(), variant)
    with torch.no_grad():
        traced = torch.jit.trace(model, make_clip(1), check_trace=False)
        assert torch.equal(traced(make_clip(1)), model(make_clip(1)))
        assert torch.equal(traced(make_clip(2, seed=3)), model(make_clip(2, seed=3)))


@pytest.mark.parametrize("metric", ["attention_received", "attention_sharpness"])
def test_float64_attention_that_reads_the_map_stays_float64(metric: str) -> None:
    """Background merging by importance reads the whole attention map, which takes its softmax
    in float32 for half precision; a float64 model keeps float64 there: the block's attention
    output equals timm's own attention to float64 rounding (it was rounded to float32, 1e-8
    off), and gradcheck passes through the patched model."""
    model = make_model(depth=2).double()
    block = model.blocks[0]
    tokens = block.norm1(model._pos_embed(model.patch_embed(make_clip(1).double())))
    out, _ = attend(block.attn, tokens, None, metric=metric)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, block.attn(tokens), atol=1e-13, rtol=0)

    importance = metric.removeprefix("attention_")
    tokenprune.patch(model, "background", early_blocks=1, early_r=16, r=4, importance=importance)
    clip = make_clip(1).double()
    directions = torch.randn(2, *clip.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def run(v: torch.Tensor) -> torch.Tensor:
        return model(clip + (v.view(2, 1, 1, 1, 1, 1) * directions).sum(0))[0, :6]

    assert torch.autograd.gradcheck(run, (torch.zeros(2, dtype=torch.float64, requires_grad=True),))

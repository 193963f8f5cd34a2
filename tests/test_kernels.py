"""The Triton kernels (kernels/) against their PyTorch references.

Runs on CPU in the Triton interpreter (``TRITON_INTERPRET=1``, set by ``make test`` before
anything imports triton) or unchanged on a CUDA device. The interpreter runs every program of
the grid in Python, so shapes are chosen to cover the edge cases (odd/even T, T=3, ragged
tiles, D not a power of two, several D chunks and channel blocks, strided views, ties, r at its
cap, the 1569-token video case) with few programs.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import kernels
from kernels import (
    best_match,
    best_match_reference,
    best_match_triton,
    merge_wavg,
    merge_wavg_reference,
    merge_wavg_triton,
)
from kernels.merge import GPU_TILES
from tokenprune.merge import bipartite_soft_matching, max_bipartite_r

HAS_TRITON = importlib.util.find_spec("triton") is not None
# The interpreter is chosen when triton is imported (kernels/ imported it above), so ask kernels.
DEVICE = "cpu" if kernels.INTERPRET else "cuda"

pytestmark = [
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
    pytest.mark.skipif(
        HAS_TRITON and not kernels.INTERPRET and not torch.cuda.is_available(),
        reason="needs a CUDA device, or TRITON_INTERPRET=1 (set before triton is imported) to run "
        "the kernels on CPU in the Triton interpreter",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances for outputs stored in the input dtype. bf16 allows one ulp (2**-7 relative at
# worst): the Triton *interpreter* casts fp32 → bf16 by truncation where torch (and compiled
# Triton on GPU) round to nearest even. fp16 casts round to nearest in both.
MERGE_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-5, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=2**-7),
}
SCORE_ATOL = 1e-5  # fp32 accumulation in both; only the summation order differs
NEAR_TIE = 1e-5  # reference top-2 gap below which the two argmaxes may legitimately differ


@pytest.fixture(autouse=True)
def _ieee_fp32_matmul():
    """The references' fp32 matmul must be IEEE fp32 on GPU too, not TF32 (which another test
    or user code may have enabled): it is the definition the kernels are held to."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def split_ab(metric: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's A/B sets exactly as bipartite_soft_matching forms them: strided views."""
    body = metric[:, p:]
    body = body / body.norm(dim=-1, keepdim=True)
    a_start, b_start = p % 2, 1 - p % 2
    return body[:, a_start::2], body[:, b_start::2]


def assert_best_match(a: torch.Tensor, b: torch.Tensor) -> None:
    """Kernel vs reference: scores within SCORE_ATOL; indices equal except on near ties, where
    the kernel's pick must still be (within tolerance) a maximum."""
    score, index = best_match_triton(a, b)
    ref_score, ref_index = best_match_reference(a, b)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    assert score.shape == index.shape == a.shape[:2]
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)

    unit = torch.nn.functional.normalize
    full = unit(a.float(), dim=-1) @ unit(b.float(), dim=-1).transpose(-1, -2)  # every cosine
    if b.shape[1] >= 2:
        top2 = full.topk(2, dim=-1).values
        near_tie = (top2[..., 0] - top2[..., 1]) < NEAR_TIE
    else:
        near_tie = torch.zeros_like(index, dtype=torch.bool)
    mismatch = (index != ref_index) & ~near_tie
    assert not mismatch.any(), f"{int(mismatch.sum())} argmax mismatches away from ties"
    picked = full.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert (ref_score - picked).max() <= NEAR_TIE


# ---------------------------------------------------------------------------------- best_match


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch,tokens,dim,p",
    [
        (1, 3, 8, 1),  # T=3: one A and one B token; every tile dimension is padding
        (3, 18, 48, 1),  # even T, D not a power of two, batch 3
        (3, 17, 72, 0),  # odd T, no prefix (A starts at 0)
        (2, 161, 200, 1),  # Na = Nb = 80: two ragged 64-row tiles; D = 200: four D chunks
        (2, 42, 24, 5),  # five protected tokens (class + registers): A starts one later
    ],
)
def test_best_match_matches_reference(batch: int, tokens: int, dim: int, p: int, dtype: torch.dtype) -> None:
    torch.manual_seed(tokens * dim + batch)
    metric = torch.randn(batch, tokens, dim, device=DEVICE).to(dtype)
    a, b = split_ab(metric, p)
    if a.shape[1] > 1:  # (a single-row view counts as contiguous)
        assert not a.is_contiguous() and not b.is_contiguous()  # strides go to the kernel as is
    assert_best_match(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_best_match_video_tokens(dtype: torch.dtype) -> None:
    # 1 class token + 8×14×14 patches (a video ViT): Na = Nb = 784, 13 × 13 tiles.
    torch.manual_seed(1569)
    metric = torch.randn(1, 1569, 64, device=DEVICE).to(dtype)
    assert_best_match(*split_ab(metric, 1))


def test_best_match_feature_strided_layout() -> None:
    # Features stored [B, D, T] and viewed as [B, T, D]: the feature stride is not 1.
    torch.manual_seed(0)
    metric = torch.randn(2, 40, 51, device=DEVICE).transpose(1, 2)
    a, b = split_ab(metric, 1)
    assert a.stride(-1) != 1
    assert_best_match(a, b)


def test_best_match_exact_ties_pick_lowest_index() -> None:
    # Entries k/8 with |k| ≤ 4: every product and partial sum is exact in fp32 whatever the
    # summation order, so equal rows give bitwise-equal scores in every implementation and the
    # tie rule alone decides. Nb = 100 puts copies in both 64-row tiles of B.
    torch.manual_seed(0)
    batch, num_a, num_b, dim = 2, 70, 100, 24
    b = torch.randint(-4, 5, (batch, num_b, dim), device=DEVICE).float() / 8
    b[:, 9] = b[:, 3]  # duplicate inside the first tile
    b[:, 80] = b[:, 3]  # ... and in the second tile
    b[:, 90] = b[:, 70]  # duplicate within the second tile only
    a = torch.randint(-4, 5, (batch, num_a, dim), device=DEVICE).float() / 8
    a[:, 0], a[:, 1], a[:, 69] = b[:, 3], b[:, 70], b[:, 90]
    a[:, 2] = 0.0  # all scores 0: a tie across all 100 columns → index 0

    score, index = best_match_triton(a, b)
    ref_score, ref_index = best_match_reference(a, b)
    # Scores differ in the last bits (the kernel divides by the norms, the reference normalises
    # first), but duplicate rows get bitwise-equal scores within each, so ties stay ties.
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index, ref_index)
    assert index[:, 0].tolist() == [3] * batch
    assert index[:, 1].tolist() == [70] * batch and index[:, 69].tolist() == [70] * batch
    assert index[:, 2].tolist() == [0] * batch
    # The tie rule in full: the kernel's index is the first column attaining the row max.
    unit = torch.nn.functional.normalize
    full = unit(a, dim=-1) @ unit(b, dim=-1).transpose(-1, -2)
    first_max = (full == full.max(dim=-1, keepdim=True).values).int().argmax(dim=-1)
    assert torch.equal(index, first_max)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_best_match_duplicate_tokens(dtype: torch.dtype) -> None:
    # Padding / flat background: many bitwise-identical tokens, normalised as ToMe does. Rows
    # equal to the repeated token tie exactly across all its copies in B; both sides must pick
    # the first copy, so indices are compared with no near-tie allowance.
    torch.manual_seed(1)
    metric = torch.randn(2, 101, 40, device=DEVICE).to(dtype)
    metric[:, 30:] = metric[:, 30:31]  # tokens 30..100 are all the same
    a, b = split_ab(metric, 1)
    score, index = best_match_triton(a, b)
    ref_score, ref_index = best_match_reference(a, b)
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    # B row j is token 2j+1, A row i is token 2i+2: A rows ≥ 14 are copies of the repeated
    # token, and B row 15 (token 31) is its first copy in B.
    assert (index[:, 14:] == 15).all()
    # Every row whose best match is the repeated token (copies included) is an exact tie.
    exact_tie = ref_index == 15
    assert torch.equal(index[exact_tie], ref_index[exact_tie])
    assert_best_match(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_best_match_normalises_raw_rows(dtype: torch.dtype) -> None:
    """Rows of any length (keys straight from the model), zero rows included: the kernel
    divides by the norms it accumulates, the reference normalises first (F.normalize)."""
    torch.manual_seed(11)
    metric = torch.randn(2, 41, 72) * torch.rand(2, 41, 1) * 30
    metric[0, 3] = 0  # a zero A row (A: tokens 1, 3, 5, …): cosine 0 to every B row
    metric[1, 4] = 0  # a zero B row (B: tokens 2, 4, 6, …)
    metric = metric.to(DEVICE, dtype)
    a, b = metric[:, 1::2], metric[:, 2::2]
    score, index = best_match_triton(a, b)
    ref_score, ref_index = best_match_reference(a, b)
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index, ref_index)  # random directions: no near ties here
    assert score[0, 1].item() == 0.0 and ref_score[0, 1].item() == 0.0  # the zero A row


def test_best_match_dispatch_and_validation() -> None:
    torch.manual_seed(2)
    a, b = split_ab(torch.randn(1, 21, 16, device=DEVICE), 1)
    for got, want in zip(best_match(a, b, backend="triton"), best_match_triton(a, b)):
        assert torch.equal(got, want)
    for got, want in zip(best_match(a, b, backend="torch"), best_match_reference(a, b)):
        assert torch.equal(got, want)
    # auto: Triton only for CUDA tensors
    auto = best_match_triton(a, b) if a.is_cuda else best_match_reference(a, b)
    for got, want in zip(best_match(a, b), auto):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"expected \[B, N, D\] inputs"):
        best_match(a[0], b[0], backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        best_match(a, b, backend="cuda")
    # float64 is outside the kernel's dtypes: best_match falls back to the reference.
    a64, b64 = a.double(), b.double()
    for got, want in zip(best_match(a64, b64, backend="triton"), best_match_reference(a64, b64)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError):
        best_match_triton(a, b[:, :0])
    empty_score, empty_index = best_match_triton(a[:, :0], b)
    assert empty_score.shape == empty_index.shape == (1, 0)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_match_ops_check_their_inputs_on_every_backend(backend: str) -> None:
    """best_match and temporal_best_match refuse what their contract excludes whichever backend
    runs: the references alone would broadcast a batch of 1 against B (a result for inputs the
    kernel refuses), take [N, D] rows or a negative window. A misspelt backend fails for every
    dtype, also where the dtype alone routes the call to the reference."""
    a, b = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="batch/feature sizes differ"):
        best_match(a[:1], b, backend=backend)
    with pytest.raises(ValueError, match=r"expected \[B, N, D\] inputs"):
        best_match(a[0], b[0], backend=backend)
    with pytest.raises(ValueError, match="b has no rows"):
        best_match(a, b[:, :0], backend=backend)
    metric, pos = torch.randn(2, 45, 8, device=DEVICE), video_positions(2, (5, 3, 3), merged=False)
    with pytest.raises(ValueError, match="different tokens"):
        kernels.temporal_best_match(metric, pos[:1], 1, backend=backend)
    with pytest.raises(ValueError, match="non-negative"):
        kernels.temporal_best_match(metric, pos, -1, backend=backend)
    x, size, dest = torch.randn(2, 5, 8, dtype=torch.float64), torch.ones(2, 5, 1), torch.zeros(2, 5, dtype=torch.long)
    misspelt = backend.upper()
    with pytest.raises(ValueError, match="backend must be one of"):
        best_match(a.double(), b.double(), backend=misspelt)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.temporal_best_match(metric.double(), pos, 1, backend=misspelt)
    with pytest.raises(ValueError, match="backend must be one of"):
        merge_wavg(x, size, dest, 1, misspelt)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.bipartite_dest(torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.long), 1, 4, 0, misspelt)
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.attention(q, q, q, None, 0.5, misspelt)


# -------------------------------------------------------------------------- temporal_best_match


def video_positions(batch: int, grid: tuple[int, int, int], merged: bool, seed: int = 0) -> torch.Tensor:
    """[B, T·H·W, 3] (frame, row, col) centroids in token order: on the grid, or ``merged``:
    jittered as merged tokens' centroids drift (some across the frame parity, some out of the
    window of every partner)."""
    from tokenprune.merge import grid_positions

    pos = grid_positions(grid, 0, torch.device("cpu")).expand(batch, -1, -1).clone()
    if merged:
        generator = torch.Generator().manual_seed(seed)
        pos += (torch.rand(pos.shape, generator=generator) - 0.5) * torch.tensor([1.4, 3.0, 3.0])
    return pos.to(DEVICE)


def rule_scores(metric: torch.Tensor, pos: torch.Tensor, window: float) -> torch.Tensor:
    """Every A → B score the rule allows (cosine, or cosine − 4 outside), −inf elsewhere: what
    the reference reduces, to tell near ties from real mismatches."""
    from kernels.temporal_match import far_pairs

    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    is_a = torch.remainder(torch.floor(pos[..., 0] + 0.5), 2) == 0
    scores = unit @ unit.transpose(-1, -2) - 4.0 * far_pairs(pos.float(), window)
    return scores.masked_fill(is_a[:, None, :] | ~is_a[:, :, None], float("-inf"))


def assert_temporal_match(metric: torch.Tensor, pos: torch.Tensor, window: float) -> None:
    score, index = kernels.temporal_best_match_triton(metric, pos, window)
    ref_score, ref_index = kernels.temporal_best_match_reference(metric, pos, window)
    assert score.dtype == torch.float32 and index.dtype == torch.int64 and score.shape == metric.shape[:2]
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    is_a = torch.isfinite(ref_score)
    assert is_a.any() and not is_a.all()
    assert torch.equal(index[~is_a], ref_index[~is_a])  # B tokens: index 0 in both
    top2 = rule_scores(metric, pos, window).topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < NEAR_TIE
    mismatch = (index != ref_index) & is_a & ~near_tie
    assert not mismatch.any(), f"{int(mismatch.sum())} argmax mismatches away from ties"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch,grid,dim,window,merged",
    [
        (1, (2, 1, 2), 8, 1, False),  # 4 tokens: every tile dimension is padding
        (2, (3, 3, 5), 40, 1, False),  # 45 tokens, an odd number of frames, D not a power of two
        (2, (4, 5, 5), 72, 2, True),  # 100 tokens: two ragged tiles, drifted centroids, two D chunks
        (1, (6, 4, 4), 24, 0, True),  # window 0: most A tokens have no partner inside
    ],
)
def test_temporal_match_matches_reference(batch, grid, dim, window, merged, dtype) -> None:
    torch.manual_seed(dim + window)
    tokens = grid[0] * grid[1] * grid[2]
    metric = (torch.randn(batch, tokens, dim) * torch.rand(batch, tokens, 1) * 10).to(DEVICE, dtype)
    assert_temporal_match(metric, video_positions(batch, grid, merged), window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temporal_match_video_tokens(dtype: torch.dtype) -> None:
    # 8 × 14 × 14 tubelets of a 16-frame clip (25 × 25 tiles, half of them skipped): the 1,568
    # tokens after the class token, which TemporalMerge strips before matching. The keys are a
    # strided view of a wider tensor: it goes to the kernel as is.
    torch.manual_seed(1568)
    metric = torch.randn(1, 1568, 80, device=DEVICE).to(dtype)[..., 8:72]
    assert not metric.is_contiguous()
    assert_temporal_match(metric, video_positions(1, (8, 14, 14), merged=True), 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temporal_match_exact_ties_and_the_outside_fallback(dtype: torch.dtype) -> None:
    """Copies of one token in both neighbouring frames tie exactly: the lowest index wins. An A
    token with every partner out of the window takes its most similar B token outside,
    penalised by 4; with no B token at all, it has no partner (−inf, index 0). Entries k/8
    (|k| ≤ 4) are exact in every dtype, so half-precision copies tie exactly too."""
    torch.manual_seed(0)
    grid = (4, 3, 3)  # frames 0 and 2 are A, 1 and 3 are B; 9 tokens per frame
    metric = (torch.randint(-4, 5, (1, 36, 16)).float() / 8).to(DEVICE, dtype)
    metric[:, [10, 19, 28]] = metric[:, 4:5].clone()  # token 4 (frame 0) has copies in frames 1, 2, 3
    pos = video_positions(1, grid, merged=False)
    score, index = kernels.temporal_best_match_triton(metric, pos, 1)
    ref_score, ref_index = kernels.temporal_best_match_reference(metric, pos, 1)
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index, ref_index)
    assert index[0, 4] == 10 and index[0, 19] == 10  # frame 2's copy also sees frame 1's first
    assert score[0, 4].item() == pytest.approx(1.0, abs=1e-6)

    far = pos.clone()
    far[:, 9:18, 1:] += 10.0  # frame 1 moved out of every window
    far[:, 27:, 1:] += 10.0  # and frame 3
    score, index = kernels.temporal_best_match_triton(metric, far, 1)
    ref_score, ref_index = kernels.temporal_best_match_reference(metric, far, 1)
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index, ref_index)
    assert (score[0, :9] < -3.0 + 1e-6).all() and index[0, 4] == 10

    no_b = pos[:, :9]  # frame 0 alone
    score, index = kernels.temporal_best_match_triton(metric[:, :9], no_b, 1)
    assert torch.isneginf(score).all() and (index == 0).all()


def test_temporal_match_dispatch_and_validation() -> None:
    torch.manual_seed(3)
    metric = torch.randn(2, 45, 24, device=DEVICE)
    pos = video_positions(2, (5, 3, 3), merged=True)
    for got, want in zip(kernels.temporal_best_match(metric, pos, 1, backend="triton"), kernels.temporal_best_match_triton(metric, pos, 1)):
        assert torch.equal(got, want)
    for got, want in zip(kernels.temporal_best_match(metric, pos, 1, backend="torch"), kernels.temporal_best_match_reference(metric, pos, 1)):
        assert torch.equal(got, want)
    auto = kernels.temporal_best_match_triton if metric.is_cuda else kernels.temporal_best_match_reference
    for got, want in zip(kernels.temporal_best_match(metric, pos, 1), auto(metric, pos, 1)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="different tokens"):
        kernels.temporal_best_match_triton(metric, pos[:, 1:], 1)
    # no tokens: empty rows on both backends
    for backend in ("triton", "torch"):
        score, index = kernels.temporal_best_match(metric[:, :0], pos[:, :0], 1, backend=backend)
        assert score.shape == index.shape == (2, 0) and (score.dtype, index.dtype) == (torch.float32, torch.int64)
    with pytest.raises(ValueError, match="pos \\[B, N, 3\\]"):
        kernels.temporal_best_match_triton(metric, pos[..., :2], 1)
    with pytest.raises(TypeError, match="floating point"):
        kernels.temporal_best_match_triton(metric, pos.long(), 1)
    with pytest.raises(ValueError, match="non-negative"):
        kernels.temporal_best_match_triton(metric, pos, -1)


# ------------------------------------------------------------------------------ bipartite_dest


def assignment_inputs(batch: int, num_a: int, num_b: int, seed: int, levels: int | None = None):
    """Best scores and B partners; ``levels`` draws scores from that many values (many ties)."""
    gen = torch.Generator().manual_seed(seed)
    if levels is None:
        score = torch.rand(batch, num_a, generator=gen) * 2 - 1
    else:
        score = torch.randint(0, levels, (batch, num_a), generator=gen).float() / levels
    best_b = torch.randint(0, max(num_b, 1), (batch, num_a), generator=gen)
    return score.to(DEVICE), best_b.to(DEVICE)


def a_tokens(tokens: int, p: int) -> int:
    return len(range(tokens)[p:][p % 2 :: 2])


@pytest.mark.parametrize(
    "batch,tokens,p",
    [
        (1, 3, 1),  # T=3: one A, one B
        (3, 18, 1),  # even T, class token
        (2, 17, 0),  # odd T, no prefix: A starts at 0
        (2, 22, 5),  # odd prefix (registers): A starts one later
        (2, 40, 2),  # even prefix (class and distillation tokens)
        (2, 34, 1),  # Nb = Na + 1 = 17: the B tokens take two 16-token chunks
        (2, 197, 1),  # ViT-B/16 at 224²
        (1, 1569, 1),  # video: Na = 784 needs several rank chunks
    ],
)
def test_bipartite_dest_matches_reference(batch: int, tokens: int, p: int) -> None:
    """The kernel's dest, and the member lists it lays out beside it, are the reference's dest
    and that dest's stable sort (what the merge kernel would otherwise sort)."""
    num_a = a_tokens(tokens, p)
    num_b = tokens - p - num_a
    for levels in (None, 3):  # distinct scores, then mostly ties (lowest A index first)
        score, best_b = assignment_inputs(batch, num_a, num_b, seed=tokens + p, levels=levels)
        cap = kernels.bipartite.max_bipartite_r(tokens, p)
        for r in sorted({0, 1, cap // 2, cap}):
            want = kernels.bipartite_dest_reference(score, best_b, r, tokens, p)
            assert torch.equal(kernels.bipartite_dest_triton(score, best_b, r, tokens, p), want), (levels, r)
            assert_members_are_stable_sort(kernels.bipartite_members(score, best_b, r, tokens, p, "triton"), want)


def assert_members_are_stable_sort(members: kernels.MemberLists, dest: torch.Tensor, case: object = None) -> None:
    assert members._sorted is not None, "the kernel laid out no member lists"
    assert torch.equal(members.dest, dest), case
    sorted_dest, order = torch.sort(dest, dim=1, stable=True)
    assert torch.equal(members._sorted[0], sorted_dest) and torch.equal(members._sorted[1], order), case


def test_bipartite_members_on_random_small_cases() -> None:
    """Many small random cases (token counts, prefixes, r, scores with ties, NaN and ±inf, B
    partners piling onto a few B tokens): dest and its member lists against the reference's
    dest and its stable sort."""
    generator = torch.Generator().manual_seed(11)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    for case in range(40):
        tokens = int(torch.randint(3, 42, (), generator=generator))
        p = int(torch.randint(0, min(6, tokens - 1), (), generator=generator))
        num_a = a_tokens(tokens, p)
        num_b = tokens - p - num_a
        if num_a == 0 or num_b == 0:
            continue
        score = torch.randint(0, 4, (3, num_a), generator=generator).float() / 4
        pick = torch.rand(3, num_a, generator=generator) < 0.2
        score[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=generator)]
        best_b = torch.randint(0, min(num_b, 3), (3, num_a), generator=generator)  # crowded B tokens
        r = int(torch.randint(0, max_bipartite_r(tokens, p) + 1, (), generator=generator))
        score, best_b = score.to(DEVICE), best_b.to(DEVICE)
        want = kernels.bipartite_dest_reference(score, best_b, r, tokens, p)
        members = kernels.bipartite_members(score, best_b, r, tokens, p, "triton")
        assert_members_are_stable_sort(members, want, dict(case=case, tokens=tokens, p=p, r=r))


def test_bipartite_dest_nan_and_infinite_scores_rank_like_a_stable_sort() -> None:
    """torch's descending stable sort puts NaN first (ties among NaN by index), then +inf, …,
    -inf; the kernel counts the same order without sorting."""
    score = torch.tensor([[0.5, float("nan"), float("inf"), -float("inf"), float("nan"), 0.5, -float("inf"), 0.2]])
    best_b = torch.arange(8).flip(0).unsqueeze(0)
    score, best_b = score.to(DEVICE), best_b.to(DEVICE)
    for r in range(9):
        want = kernels.bipartite_dest_reference(score, best_b, r, 17, 1)
        assert torch.equal(kernels.bipartite_dest_triton(score, best_b, r, 17, 1), want), r
        assert_members_are_stable_sort(kernels.bipartite_members(score, best_b, r, 17, 1, "triton"), want)


def test_bipartite_dest_strided_scores_and_dispatch() -> None:
    score, best_b = assignment_inputs(4, 24, 24, seed=3)
    strided_score, strided_b = score.t().contiguous().t(), best_b[:, None].expand(-1, 2, -1)[:, 1]
    assert not strided_score.is_contiguous()
    want = kernels.bipartite_dest_reference(score, best_b, 10, 49, 1)
    assert torch.equal(kernels.bipartite_dest_triton(strided_score, strided_b, 10, 49, 1), want)
    assert torch.equal(kernels.bipartite_dest(score, best_b, 10, 49, 1, backend="triton"), want)
    assert torch.equal(kernels.bipartite_dest(score.double(), best_b, 10, 49, 1, backend="triton"), want)
    with pytest.raises(ValueError, match="r=25 is outside"):
        kernels.bipartite_dest(score, best_b, 25, 49, 1)
    with pytest.raises(ValueError, match="24 A tokens do not fit 52 tokens"):
        kernels.bipartite_dest(score, best_b, 1, 52, 1)
    # a prefix longer than the sequence: refused, never written past the row
    empty_score, empty_b = score[:, :0], best_b[:, :0]
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"num_protected=5 must be in \[0, num_tokens=3\]"):
            kernels.bipartite_dest(empty_score, empty_b, 0, 3, 5, backend=backend)
        with pytest.raises(ValueError, match=r"num_protected=5 must be in \[0, num_tokens=3\]"):
            kernels.bipartite_members(empty_score, empty_b, 0, 3, 5, backend=backend)
    with pytest.raises(TypeError, match="int64"):
        kernels.bipartite_dest(score, best_b.int(), 1, 49, 1)
    with pytest.raises(TypeError, match="float32"):
        kernels.bipartite_dest_triton(score.half(), best_b, 1, 49, 1)
    empty = kernels.bipartite_dest_triton(score[:0], best_b[:0], 1, 49, 1)
    assert empty.shape == (0, 49)
    # The reference path's member lists: the same dest, sorted when a merge kernel asks.
    members = kernels.bipartite_members(score, best_b, 10, 49, 1, backend="torch")
    assert members._sorted is None and torch.equal(members.dest, want)
    assert torch.equal(members.sorted()[1], torch.sort(want, dim=1, stable=True)[1])


def test_bipartite_members_read_scores_and_partners_through_their_strides() -> None:
    """The member-list counts read every A token's score and partner again, through their own
    strides: a transposed score buffer and a partner row of token stride 2 give the reference's
    dest and its stable sort, as contiguous inputs do."""
    for tokens, p, r in ((49, 1, 10), (40, 2, 19)):
        num_a = a_tokens(tokens, p)
        score, best_b = assignment_inputs(3, num_a, tokens - p - num_a, seed=tokens, levels=3)
        strided_score = score.t().contiguous().t()
        strided_b = torch.stack([torch.zeros_like(best_b), best_b], dim=-1)[..., 1]
        assert strided_score.stride(1) != 1 and strided_b.stride(1) == 2 and torch.equal(strided_b, best_b)
        want = kernels.bipartite_dest_reference(score, best_b, r, tokens, p)
        members = kernels.bipartite_members(strided_score, strided_b, r, tokens, p, "triton")
        assert_members_are_stable_sort(members, want, dict(tokens=tokens, p=p, r=r))


def test_launch_arithmetic() -> None:
    """The launchers' own grid arithmetic (plain Python, not Triton's host-side helpers):
    ceil-division, and powers of two against their definition."""
    from kernels._triton import cdiv, next_power_of_2

    for n in range(0, 70):
        for d in (1, 2, 16, 64):
            assert cdiv(n, d) == math.ceil(n / d)
        power = next_power_of_2(n)
        assert power >= max(n, 1) and power & (power - 1) == 0 and (power == 1 or power // 2 < n)


def test_torch_func_transforms_take_the_reference() -> None:
    """The launches read raw storage, which torch.func's wrapped tensors lack: under grad/vmap
    "auto" takes the references (on a GPU too), with the gradients of the same steps run by the
    reference outside the transform, and "triton" says why it cannot run."""
    from tokenprune.merge import merge_state, start_state

    x = torch.randn(2, 9, 8, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))

    def merged_sum(t: torch.Tensor, backend: str) -> torch.Tensor:
        members = bipartite_soft_matching(t, 3, 1, backend)
        return merge_state(start_state(t, False), members, 6, backend).x.square().sum()

    expected = torch.func.grad(merged_sum)(x, "torch")
    reference = x.clone().requires_grad_(True)
    merged_sum(reference, "torch").backward()
    torch.testing.assert_close(expected, reference.grad)
    torch.testing.assert_close(torch.func.grad(merged_sum)(x, "auto"), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot run under torch.func transforms"):
        torch.func.grad(merged_sum)(x, "triton")
    with pytest.raises(RuntimeError, match="cannot run under torch.func transforms"):
        torch.func.vmap(lambda t: kernels.best_match(t[None, 0::2], t[None, 1::2], "triton")[0])(x)


def test_auto_leaves_the_kernels_where_the_references_are_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" where the kernels could run (a GPU: faked here, with the kernels replaced by
    recorders): a float32 match of more than FP32_KERNEL_MAX_FLOPS and an assignment of more
    than AUTO_MAX_A_TOKENS A tokens take the references (cuBLAS's float32 matmul; a sort), as
    bench_kernels measured on an H200; bf16 and fp16 rows of any size and float32 matches up
    to the limit take the kernel; "triton" takes the kernels everywhere."""
    import kernels.bipartite
    import kernels.match

    ran: list[str] = []
    for module, name in ((kernels.match, "best_match"), (kernels.bipartite, "bipartite_dest")):
        monkeypatch.setattr(module, "use_triton", lambda backend, *tensors: backend != "torch")
        reference = getattr(module, f"{name}_reference")
        monkeypatch.setattr(module, f"{name}_reference", lambda *a, _r=reference: ran.append("reference") or _r(*a))
    monkeypatch.setattr(kernels.match, "best_match_triton", lambda a, b: ran.append("kernel"))
    monkeypatch.setattr(kernels.bipartite, "_launch", lambda *args, **kwargs: ran.append("kernel") or kernels.MemberLists(None))
    monkeypatch.setattr(kernels.match, "INTERPRET", False)  # a compiled kernel: bf16 goes to the tensor cores

    def match(dim: int, dtype: torch.dtype, backend: str = "auto") -> str:
        ran.clear()
        kernels.best_match(torch.randn(2, 5, dim, dtype=dtype), torch.randn(2, 6, dim, dtype=dtype), backend)
        return ran[0]

    # 2 · B · Na · Nb · D = 120 · D FLOPs here
    monkeypatch.setattr(kernels.match, "FP32_KERNEL_MAX_FLOPS", 120 * 64)
    assert match(64, torch.float32) == "kernel"
    assert match(65, torch.float32) == "reference"
    assert match(65, torch.float32, "triton") == "kernel"
    assert match(769, torch.bfloat16) == match(769, torch.float16) == "kernel"

    def assign(num_a: int, backend: str = "auto") -> str:
        ran.clear()
        score, best_b = torch.randn(2, num_a), torch.randint(0, num_a, (2, num_a))
        kernels.bipartite_dest(score, best_b, 3, 2 * num_a + 1, 1, backend)
        return ran[0]

    most = kernels.bipartite.AUTO_MAX_A_TOKENS
    assert assign(most) == "kernel"
    assert assign(most + 1) == "reference"
    assert assign(most + 1, "triton") == "kernel"


def test_auto_lays_out_member_lists_up_to_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the assignment kernel runs, "auto" has it lay out the member lists up to
    AUTO_MEMBERS_MAX_A_TOKENS A tokens and write dest alone beyond (the merge sorts it then);
    "triton" lays them out at any count, and bipartite_dest never does."""
    import kernels.bipartite

    emitted: list[bool] = []
    monkeypatch.setattr(kernels.bipartite, "use_triton", lambda backend, *tensors: backend != "torch")
    monkeypatch.setattr(
        kernels.bipartite, "_launch", lambda *args, emit_members: emitted.append(emit_members) or kernels.MemberLists(None)
    )

    def lists(num_a: int, backend: str = "auto", function=kernels.bipartite_members) -> bool:
        emitted.clear()
        score, best_b = torch.randn(2, num_a), torch.randint(0, num_a, (2, num_a))
        function(score, best_b, 3, 2 * num_a + 1, 1, backend)
        return emitted[0]

    most = kernels.bipartite.AUTO_MEMBERS_MAX_A_TOKENS
    assert lists(most) and not lists(most + 1) and lists(most + 1, "triton")
    # the image models at 224² the limit is meant to cover: ViT-B/16 (197 tokens), and 256 patches with a class token
    assert lists(a_tokens(197, 1)) and lists(a_tokens(257, 1))
    assert not lists(most, "triton", kernels.bipartite_dest)


# ---------------------------------------------------------------------------------- merge_wavg


def tome_inputs(
    batch: int, tokens: int, channels: int, p: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Tokens, sizes as left by earlier merges (1..5), and ToMe's dest at the maximum r."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen).to(DEVICE, dtype)
    size = torch.randint(1, 6, (batch, tokens, 1), generator=gen).float().to(DEVICE)
    r = max_bipartite_r(tokens, p)
    dest = bipartite_soft_matching(x.float(), r, p)
    return x, size, dest, tokens - r


def assert_merge(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, num_out: int) -> None:
    """Forward vs reference, then the gradient w.r.t. x vs autograd through the reference."""
    tol = MERGE_TOL[x.dtype]
    x_kernel = x.detach().requires_grad_(True)  # detach, not clone: a strided view stays strided
    x_ref = x.detach().clone().requires_grad_(True)
    merged, new_size = merge_wavg_triton(x_kernel, size, dest, num_out)
    ref_merged, ref_size = merge_wavg_reference(x_ref, size, dest, num_out)
    assert merged.dtype == x.dtype and new_size.dtype == torch.float32
    assert merged.shape == ref_merged.shape and new_size.shape == ref_size.shape
    torch.testing.assert_close(merged, ref_merged, equal_nan=True, **tol)
    torch.testing.assert_close(new_size, ref_size, atol=0, rtol=0)  # sums of small integers: exact

    grad = torch.randn(merged.shape, generator=torch.Generator().manual_seed(7)).to(x.device, x.dtype)
    (grad_x,) = torch.autograd.grad(merged, x_kernel, grad)
    (ref_grad_x,) = torch.autograd.grad(ref_merged, x_ref, grad)
    assert grad_x.dtype == x.dtype
    torch.testing.assert_close(grad_x, ref_grad_x, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "batch,tokens,channels,p",
    [
        (1, 3, 8, 1),  # T=3, r=1: one pair merges; C below the 16-wide block
        (3, 16, 48, 1),  # even T, C not a power of two
        (3, 17, 72, 0),  # odd T, no prefix
        (2, 9, 1100, 1),  # C > 1024: two channel blocks, the second ragged
    ],
)
def test_merge_matches_reference(batch: int, tokens: int, channels: int, p: int, dtype: torch.dtype) -> None:
    assert_merge(*tome_inputs(batch, tokens, channels, p, dtype, seed=tokens * channels))


@pytest.mark.parametrize("tile", GPU_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_merge_every_gpu_tile_matches_reference(tile: tuple[int, int, int]) -> None:
    """Autotuning keeps whichever tile is fastest on the GPU at hand, so each must be right:
    ragged in rows and channels (13 outputs, 1100 channels), every tile against the reference."""
    from kernels.merge import _merge_wavg_forward

    x, size, dest, num_out = tome_inputs(2, 25, 1100, 1, torch.bfloat16, seed=11)
    merged, new_size = _merge_wavg_forward(x, size, dest, num_out, tile=tile)
    ref_merged, ref_size = merge_wavg_reference(x, size, dest, num_out)
    torch.testing.assert_close(merged, ref_merged, **MERGE_TOL[torch.bfloat16])
    assert torch.equal(new_size, ref_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_video_tokens(dtype: torch.dtype) -> None:
    # T = 1569 at r = 784 (the cap): 785 outputs, most of them pairs.
    assert_merge(*tome_inputs(1, 1569, 64, 1, dtype, seed=0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_duplicate_tokens_behind_registers(dtype: torch.dtype) -> None:
    """Flat background behind five protected tokens (class + registers): bitwise-identical
    tokens tie in the matching, so at r's cap ToMe sends every copy in A to the first copy in
    B, whose output then has dozens of members; the kernel against the reference, and the
    merge of copies is the copy itself."""
    batch, tokens, channels, p = 2, 61, 40, 5
    gen = torch.Generator().manual_seed(61)
    x = torch.randn(batch, tokens, channels, generator=gen)
    x[:, 20:] = x[:, 20:21]  # tokens 20..60 are copies of one token
    x = x.to(DEVICE, dtype)
    size = torch.randint(1, 6, (batch, tokens, 1), generator=gen).float().to(DEVICE)
    r = max_bipartite_r(tokens, p)
    dest = bipartite_soft_matching(x.float(), r, p)
    num_out = tokens - r
    assert torch.equal(dest[:, :p], torch.arange(p, device=DEVICE).expand(batch, -1))  # prefix stays
    members = torch.zeros(batch, num_out, dtype=torch.long, device=DEVICE).scatter_add_(1, dest, torch.ones_like(dest))
    assert members.max() >= 20  # the copies pile onto one output
    assert_merge(x, size, dest, num_out)
    merged, _ = merge_wavg_triton(x, size, dest, num_out)
    for item in range(batch):  # outputs of copies only average to the copy
        is_copy = torch.arange(tokens, device=DEVICE) >= 20
        pure = [o for o in range(num_out) if (dest[item] == o).sum() > 1 and is_copy[dest[item] == o].all()]
        assert pure
        torch.testing.assert_close(merged[item, pure], x[item, 20].expand(len(pure), -1), **MERGE_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_arbitrary_groups_strided(dtype: torch.dtype) -> None:
    # Not a bipartite matching: uneven groups (one output takes 20 tokens), members scattered,
    # and x / size are non-contiguous views.
    gen = torch.Generator().manual_seed(3)
    batch, tokens, channels, num_out = 2, 40, 24, 7
    base = torch.randn(batch, tokens, 2 * channels, generator=gen).to(DEVICE, dtype)
    x = base[..., ::2]
    size = torch.randint(1, 4, (batch, tokens, 2), generator=gen).float().to(DEVICE)[..., 1:]
    assert not x.is_contiguous() and not size.is_contiguous()
    # Every output at least once, output 0 twenty more times, the rest at random.
    extra = torch.randint(0, num_out, (13,), generator=gen)
    dest = torch.cat([torch.arange(num_out), torch.zeros(20, dtype=torch.long), extra])
    dest = torch.stack([dest[torch.randperm(tokens, generator=gen)] for _ in range(batch)]).to(DEVICE)
    assert_merge(x, size, dest, num_out)
    # dest itself transposed (strides (1, B)): its sort keeps those strides, the kernel reads rows
    transposed = dest.t().contiguous().t()
    assert not transposed.is_contiguous() and torch.equal(transposed, dest)
    assert_merge(x, size, transposed, num_out)


def test_merge_weight_zero_members_count_nowhere() -> None:
    """Zero sizes (how RoPE rows of patches a pruning method dropped join a token,
    tokenprune.merge.mean_over_sources) add nothing, as long as each output keeps a member."""
    gen = torch.Generator().manual_seed(4)
    batch, tokens, channels, num_out = 2, 30, 16, 6
    x = torch.randn(batch, tokens, channels, generator=gen).to(DEVICE)
    size = (torch.rand(batch, tokens, 1, generator=gen) > 0.4).float()
    size[:, :num_out] = 1.0
    dest = torch.cat([torch.arange(num_out).expand(batch, -1), torch.randint(0, num_out, (batch, tokens - num_out), generator=gen)], 1)
    assert_merge(x, size.to(DEVICE), dest.to(DEVICE), num_out)


@pytest.mark.parametrize("tokens,num_out,target", [(1, 1, 0), (2, 1, 0), (9, 5, 4), (9, 5, 0), (16, 3, 2)])
def test_merge_group_bounds_at_the_ends(tokens: int, num_out: int, target: int) -> None:
    """The kernel finds each output's members by binary search on the sorted destinations:
    a single token, every token in the first or in the last output (the others empty: 0, as
    in the reference), powers of two."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, 8, generator=gen).to(DEVICE)
    size = torch.randint(1, 4, (2, tokens, 1), generator=gen).float().to(DEVICE)
    dest = torch.full((2, tokens), target, device=DEVICE)
    assert_merge(x, size, dest, num_out)


def test_merge_outputs_without_members_are_zero_like_reference() -> None:
    """Outputs past the last destination have no members: 0 tokens and 0 sizes (not 0/0), as
    in the reference."""
    x, size, dest, num_out = tome_inputs(2, 11, 16, 1, torch.float32, seed=4)
    merged, new_size = merge_wavg_triton(x, size, dest, num_out + 2)
    ref_merged, ref_size = merge_wavg_reference(x, size, dest, num_out + 2)
    assert (merged[:, num_out:] == 0).all() and (new_size[:, num_out:] == 0).all()
    torch.testing.assert_close(merged, ref_merged)
    torch.testing.assert_close(new_size, ref_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_of_size_zero_tokens_is_zero_and_adds_nothing(dtype: torch.dtype) -> None:
    """Size-0 tokens (NaFlex padding) leave a real token's average unchanged, an output of
    padding alone is 0 rather than 0/0, and no gradient is NaN: kernel, reference and the
    definition (the weighted mean over the real members) agree."""
    gen = torch.Generator().manual_seed(11)
    batch, tokens, channels, num_out = 2, 14, 24, 5
    x = torch.randn(batch, tokens, channels, generator=gen).to(DEVICE, dtype)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=gen).float()
    size[:, 8:] = 0.0  # the last six tokens are padding
    dest = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 4, 4, 1, 4, 2]).expand(batch, -1)
    size, dest = size.to(DEVICE), dest.to(DEVICE)
    assert_merge(x, size, dest, num_out)
    merged, new_size = merge_wavg_triton(x, size, dest, num_out)
    assert (merged[:, 4] == 0).all() and (new_size[:, 4] == 0).all()  # padding alone
    real = size[:, :8]
    for out in range(4):  # real members only: tokens out and out + 4
        members = x[:, [out, out + 4]].float()
        weights = real[:, [out, out + 4]]
        expected = (members * weights).sum(1) / weights.sum(1)
        torch.testing.assert_close(merged[:, out].float(), expected, **MERGE_TOL[dtype])
    x_grad = x.detach().clone().requires_grad_(True)
    merge_wavg_triton(x_grad, size, dest, num_out)[0].sum().backward()
    assert x_grad.grad.isfinite().all() and (x_grad.grad[:, 8:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_is_deterministic(dtype: torch.dtype) -> None:
    x, size, dest, num_out = tome_inputs(2, 41, 96, 1, dtype, seed=5)
    x.requires_grad_(True)
    grad = torch.randn(2, num_out, 96, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    runs = []
    for _ in range(2):
        merged, new_size = merge_wavg_triton(x, size, dest, num_out)
        (grad_x,) = torch.autograd.grad(merged, x, grad)
        runs.append((merged, new_size, grad_x))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_merge_sizes_get_no_gradient() -> None:
    x, size, dest, num_out = tome_inputs(1, 9, 16, 1, torch.float32, seed=8)
    x.requires_grad_(True)
    size.requires_grad_(True)
    merged, new_size = merge_wavg_triton(x, size, dest, num_out)
    assert merged.requires_grad and not new_size.requires_grad
    grad_x, grad_size = torch.autograd.grad(merged.sum(), (x, size), allow_unused=True)
    assert grad_x is not None and grad_size is None


@pytest.mark.parametrize("merge", [merge_wavg_triton, merge_wavg_reference], ids=["triton", "reference"])
def test_merge_of_tokens_without_channels_still_sums_their_sizes(merge) -> None:
    """C = 0: no channel block to run, but the summed sizes are still written (not left as
    uninitialised memory), and the reference does not fail to flatten its rows."""
    size = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]], device=DEVICE)
    dest = torch.tensor([[0, 1, 0, 1]], device=DEVICE)
    merged, new_size = merge(torch.randn(1, 4, 0, device=DEVICE), size, dest, 2)
    assert merged.shape == (1, 2, 0)
    assert new_size.flatten().tolist() == [4.0, 6.0]


def test_merge_dispatch_and_validation() -> None:
    x, size, dest, num_out = tome_inputs(1, 13, 16, 1, torch.float32, seed=9)
    for got, want in zip(merge_wavg(x, size, dest, num_out, "triton"), merge_wavg_triton(x, size, dest, num_out)):
        assert torch.equal(got, want)
    # The reference's index_add_ uses atomics on CUDA, so two calls may differ in the last bit:
    # compare to rounding, not bits.
    for got, want in zip(merge_wavg(x, size, dest, num_out, "torch"), merge_wavg_reference(x, size, dest, num_out)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # float64 is outside the kernel's dtypes: merge_wavg falls back to the reference.
    x64 = x.double()
    fallback = merge_wavg(x64, size, dest, num_out, "triton")
    for got, want in zip(fallback, merge_wavg_reference(x64, size, dest, num_out)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # float32 sums, atomics on CUDA
    with pytest.raises(TypeError):
        merge_wavg_triton(x, size.half(), dest, num_out)
    with pytest.raises(ValueError):
        merge_wavg_triton(x, size, dest[:, :-1], num_out)
    with pytest.raises(ValueError, match="MemberLists"):
        merge_wavg_triton(x, size, dest, num_out, kernels.MemberLists(dest.clone()))


def test_merges_of_one_matching_share_one_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors one matching merges share the kernel's sort of ``dest``: ToMe's tokens and
    their positions (video, two-stage merging), and a merge-unmerge block's sizes, attention
    input and MLP input (SAM). Each merge gives what it gives alone; the sort runs once, or
    never where ToMe's assignment kernel laid out the member lists (the block's matching)."""
    from tokenprune.merge import BlockMerge, TokenState, merge_state

    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    x, size, dest, num_out = tome_inputs(2, 21, 16, 1, torch.float32, seed=4)
    pos = torch.randn(2, 21, 3, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    merged = merge_state(TokenState(x, size, pos=pos), dest, num_out, "triton")
    assert len(sorts) == 1
    for got, tensor in ((merged.x, x), (merged.pos, pos)):
        assert torch.equal(got, merge_wavg_triton(tensor, size, dest, num_out)[0])

    tokens = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    sorts.clear()
    merging = BlockMerge(tokens, 5, backend="triton")
    merged_tokens, mlp_input = merging.merge(tokens), merging.merge(tokens * 2)
    assert len(sorts) == 0
    ones = torch.ones(3, 16, 1, device=DEVICE)
    assert torch.equal(merged_tokens, merge_wavg_triton(tokens, ones, merging.dest, merging.num_out)[0])
    assert torch.equal(mlp_input, merge_wavg_triton(tokens * 2, ones, merging.dest, merging.num_out)[0])


# ------------------------------------------------------------------------------ whole model


@pytest.mark.parametrize(
    "family,method,options",
    [
        ("registers", "tome", {}),
        ("deit_distilled", "tome", {}),
        ("dinov3_rope_registers", "tome", {}),
        ("registers", "pitome", {}),
        ("registers", "local_global", dict(local_block=0, pos_weight=0.5)),  # stage 2: the member lists
    ],
)
def test_patched_model_same_on_both_backends(family: str, method: str, options: dict) -> None:
    from tests.test_patch import image, make

    import tokenprune

    model = make(family, depth=2).to(DEVICE)
    x = image().to(DEVICE)
    with torch.no_grad():
        tokenprune.patch(model, method, r=16, backend="torch", trace_source=True, **options)
        expected, expected_source = model(x), tokenprune.source(model)
        tokenprune.patch(model, backend="triton")
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(tokenprune.source(model), expected_source)


@pytest.mark.parametrize(
    "method,options",
    [("temporal", dict(r=10, window=1)), ("temporal", dict(r=[20, 20, 8], window=2)), ("background", dict(early_blocks=2, early_r=12, r=4))],
)
def test_patched_video_model_same_on_both_backends(method: str, options: dict) -> None:
    """Temporal merging (its match kernel, then the merge kernel; joint ToMe once the even
    frames are used up, in the second case) and background merging (ToMe's match kernel on the
    even and odd tokens, in place) give the torch path's tokens and outputs."""
    from tests.test_video_reduction import make_clip, make_model

    import tokenprune

    model = make_model().to(DEVICE)
    clip = make_clip().to(DEVICE)
    with torch.no_grad():
        tokenprune.patch(model, method, backend="torch", trace_source=True, **options)
        expected, expected_source = model(clip), tokenprune.source(model)
        tokenprune.patch(model, method, backend="triton", trace_source=True, **options)
        torch.testing.assert_close(model(clip), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(tokenprune.source(model), expected_source)


# ------------------------------------------------------------------------------ attention

ATTENTION_TOL = {  # relative to the output's scale; half precision rounds p and v to 8-11 bits
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.5e-2,
}


def qkv_views(batch: int, heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v as the attention layer makes them: strided views of one [B, T, 3, H, D] tensor."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=generator).to(DEVICE, dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def log_sizes(batch: int, tokens: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 9, (batch, tokens), generator=generator).float().log().to(DEVICE)


def assert_attention(q, k, v, key_bias, scale: float) -> None:
    out = kernels.attention_triton(q, k, v, key_bias, scale)
    # The reference in float64 on the same (rounded) inputs: the definition, free of its own rounding.
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), None if key_bias is None else key_bias.double(), scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    error = (out.double() - ref).norm() / ref.norm()
    assert error < ATTENTION_TOL[q.dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,heads,tokens,dim",
    [(2, 3, 3, 64), (1, 2, 17, 64), (2, 1, 64, 32), (1, 2, 101, 48), (1, 1, 197, 64), (3, 2, 21, 80)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_attention_matches_reference(batch, heads, tokens, dim, dtype, with_bias) -> None:
    q, k, v = qkv_views(batch, heads, tokens, dim, dtype)
    assert_attention(q, k, v, log_sizes(batch, tokens) if with_bias else None, dim**-0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_video_tokens(dtype: torch.dtype) -> None:
    q, k, v = qkv_views(1, 1, 1569, 64, dtype)
    assert_attention(q, k, v, log_sizes(1, 1569), 0.125)


def test_attention_bias_is_proportional_attention() -> None:
    """Attending to one token of size s equals attending to s identical copies of it (ToMe's
    motivation for log s): the kernel on merged tokens vs the reference on the expanded ones."""
    q, k, v = qkv_views(1, 2, 5, 32, torch.float32, seed=3)
    sizes = torch.tensor([[1, 3, 1, 2, 4]], device=DEVICE)
    merged = kernels.attention_triton(q, k, v, sizes.float().log(), 32**-0.5)
    copies = torch.repeat_interleave(torch.arange(5, device=DEVICE), sizes[0])
    expanded = kernels.attention_reference(q, k[:, :, copies], v[:, :, copies], None, 32**-0.5)
    torch.testing.assert_close(merged, expanded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,heads,tokens,dim",
    [(2, 3, 3, 64), (1, 2, 17, 64), (1, 2, 101, 48), (1, 1, 197, 64), (3, 2, 21, 80), (2, 2, 9, 6), (1, 2, 12, 33)],
)
def test_attention_folded_matches_reference(batch, heads, tokens, dim, dtype) -> None:
    """The bias folded into two extra q/k channels (any head size: padded to a multiple of 8)."""
    q, k, v = qkv_views(batch, heads, tokens, dim, dtype)
    key_bias = log_sizes(batch, tokens)
    out = kernels.attention_folded(q, k, v, key_bias, dim**-0.5)
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), dim**-0.5)
    assert out.dtype == q.dtype and out.shape == q.shape
    error = (out.double() - ref).norm() / ref.norm()
    assert error < ATTENTION_TOL[q.dtype], f"relative error {error:.2e}"


def test_attention_folded_keeps_large_biases_in_half_precision() -> None:
    """Video-sized tokens (log 1568 / scale ≈ 59) in bfloat16: the hi/lo split keeps the bias to
    ~16 bits, so the folded result is closer to float64 than the reference's bf16 mask is."""
    q, k, v = qkv_views(2, 2, 64, 64, torch.bfloat16, seed=4)
    generator = torch.Generator().manual_seed(5)
    key_bias = torch.randint(1, 1569, (2, 64), generator=generator).float().log().to(DEVICE)
    exact = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), 0.125)

    def error(out: torch.Tensor) -> float:
        return ((out.double() - exact).norm() / exact.norm()).item()

    folded = error(kernels.attention_folded(q, k, v, key_bias, 0.125))
    masked = error(kernels.attention_reference(q, k, v, key_bias, 0.125))
    assert folded < ATTENTION_TOL[torch.bfloat16] and folded < masked, (folded, masked)


def test_attention_folded_is_proportional_attention_with_gradients() -> None:
    """One token of size s attends like s copies of it (as for the kernel), and the folded
    path's gradients are SDPA's gradients on the mask: the bias channels take no part in them."""
    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(1, 2, 5, 32, torch.float32, seed=3))
    sizes = torch.tensor([[1, 3, 1, 2, 4]], device=DEVICE)
    out = kernels.attention_folded(q, k, v, sizes.float().log(), 32**-0.5)
    copies = torch.repeat_interleave(torch.arange(5, device=DEVICE), sizes[0])
    expanded = kernels.attention_reference(q, k[:, :, copies], v[:, :, copies], None, 32**-0.5)
    torch.testing.assert_close(out, expanded, atol=1e-5, rtol=1e-5)

    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    reference = kernels.attention_reference(q, k, v, sizes.float().log(), 32**-0.5)
    for got, expected in zip(grads, torch.autograd.grad(reference, (q, k, v), upstream)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_folded_gradients_in_half_precision(dtype: torch.dtype) -> None:
    """The hi/lo split under autograd, where lo is not 0: gradients to q, k, v and the bias
    against float64 SDPA on the same (rounded) inputs."""
    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(2, 2, 24, 32, dtype, seed=6))
    key_bias = (log_sizes(2, 24) * 3).requires_grad_(True)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    got = torch.autograd.grad(kernels.attention_folded(q, k, v, key_bias, 32**-0.5), (q, k, v, key_bias), upstream)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v, key_bias)]
    reference = kernels.attention_reference(*exact, 32**-0.5)
    expected = torch.autograd.grad(reference, exact, upstream.double())
    for name, g, e in zip("qkvb", got, expected):
        error = (g.double() - e).norm() / e.norm()
        assert error < 2 * ATTENTION_TOL[dtype], f"{name}: relative error {error:.2e}"


def test_attention_folded_masks_keys_with_minus_infinity() -> None:
    q, k, v = qkv_views(1, 2, 9, 16, torch.bfloat16)
    key_bias = log_sizes(1, 9)
    key_bias[0, [2, 5]] = float("-inf")
    out = kernels.attention_folded(q, k, v, key_bias, 0.25)
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), 0.25)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).norm() / ref.norm() < ATTENTION_TOL[torch.bfloat16]


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRET, reason="flash attention needs a CUDA GPU")
def test_attention_folded_runs_flash_attention_and_biased_attention_trains_and_compiles() -> None:
    """On a GPU in half precision: the folded bias runs SDPA's flash kernel, which refuses any
    mask ("No available kernel" if the bias reached it as one); and where the Triton kernel does
    not run (gradients, torch.compile), attention with the size bias matches the exact result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.detach().requires_grad_(True) for t in qkv_views(4, 3, 101, 64, torch.bfloat16))
    key_bias = log_sizes(4, 101)
    exact = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), 0.125)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
        folded = kernels.attention_folded(q, k, v, key_bias, 0.125)
    out = kernels.attention(q, k, v, key_bias, 0.125)
    out.float().square().sum().backward()
    with torch.no_grad():
        out_compiled = torch.compile(kernels.attention, fullgraph=True)(q, k, v, key_bias, 0.125)
    for result in (folded, out, out_compiled):
        error = (result.double() - exact).norm() / exact.norm()
        assert error < ATTENTION_TOL[torch.bfloat16], f"relative error {error:.2e}"
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_attention_auto_takes_the_kernel_where_it_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="auto" (every patched block's default) on a device where Triton runs: the kernel
    for fp16/bf16 without gradients, with the size bias at any length and without it up to 64
    tokens; SDPA for fp32, for gradients and for longer unbiased sequences."""
    import importlib

    module = importlib.import_module("kernels.attention")
    calls: list[int] = []

    def kernel(q, k, v, key_bias, scale):
        calls.append(q.shape[2])
        return module.attention_reference(q, k, v, key_bias, scale)

    monkeypatch.setattr(module, "use_triton", lambda backend, *tensors: backend != "torch")
    monkeypatch.setattr(module, "attention_triton", kernel)

    def takes_kernel(tokens: int, dtype: torch.dtype, bias: bool, grad: bool = False, backend: str = "auto") -> bool:
        q, k, v = (torch.randn(1, 2, tokens, 8, dtype=dtype, requires_grad=grad) for _ in range(3))
        calls.clear()
        module.attention(q, k, v, torch.zeros(1, tokens) if bias else None, 0.3, backend)
        return calls == [tokens]

    assert takes_kernel(197, torch.bfloat16, bias=True)
    assert takes_kernel(197, torch.float16, bias=True)
    assert takes_kernel(64, torch.bfloat16, bias=False)
    assert not takes_kernel(65, torch.bfloat16, bias=False)
    assert not takes_kernel(197, torch.float32, bias=True)
    assert not takes_kernel(197, torch.bfloat16, bias=True, grad=True)
    assert takes_kernel(197, torch.float32, bias=True, backend="triton")  # forced: any supported dtype
    assert not takes_kernel(197, torch.bfloat16, bias=True, backend="torch")
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.bfloat16) for _ in range(3))
    calls.clear()
    module.attention(q, k, v, torch.zeros(1, 9), 0.3, "triton", dropout=0.5)  # no dropout in the kernel
    assert calls == []


def test_sdpa_takes_the_bias_as_a_mask_wherever_the_kernel_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel does not run (gradients, dropout, torch.compile), SDPA takes the bias
    as a mask, on CUDA in half precision too: folding it into q and k lost to the mask on the
    H200 at every length. Checked on CPU with tensors that report CUDA: which function
    receives the call."""
    import importlib

    module = importlib.import_module("kernels.attention")
    calls: list[str] = []
    monkeypatch.setattr(module, "attention_folded", lambda *args: calls.append("folded"))
    monkeypatch.setattr(module, "attention_reference", lambda *args: calls.append("mask"))
    monkeypatch.setattr(module, "attention_triton", lambda *args: calls.append("kernel"))
    monkeypatch.setattr(module, "use_triton", lambda backend, *tensors: backend != "torch")

    class ReportsCuda(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # type: ignore[override]
            return True

    def path(dtype: torch.dtype, cuda: bool, grad: bool = False, dropout: float = 0.0, compiling: bool = False) -> str:
        q, k, v = (torch.randn(1, 2, 9, 8, dtype=dtype, requires_grad=grad) for _ in range(3))
        if cuda:
            q = q.as_subclass(ReportsCuda)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        calls.clear()
        module.attention(q, k, v, torch.zeros(1, 9), 0.3, "auto", dropout)
        return calls[0]

    assert path(torch.bfloat16, cuda=True) == "kernel"  # inference: the kernel, as before
    assert path(torch.bfloat16, cuda=True, grad=True) == "mask"
    assert path(torch.float16, cuda=True, dropout=0.1) == "mask"
    assert path(torch.bfloat16, cuda=True, compiling=True) == "mask"
    assert path(torch.float32, cuda=True, grad=True) == "mask"
    assert path(torch.bfloat16, cuda=False, grad=True) == "mask"


def test_attention_output_layout_and_dispatch() -> None:
    q, k, v = qkv_views(2, 3, 9, 16, torch.bfloat16)
    out = kernels.attention_triton(q, k, v, None, 0.25)
    # [B, H, T, D] view of a [B, T, H, D] tensor: the output projection's reshape is free.
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(kernels.attention(q, k, v, None, 0.25, "triton"), out)
    torch.testing.assert_close(
        kernels.attention(q, k, v, None, 0.25, "torch"), kernels.attention_reference(q, k, v, None, 0.25)
    )
    # Gradients need the differentiable reference, whatever the backend: SDPA's gradient.
    qg = q.detach().float().requires_grad_(True)
    kernels.attention(qg, k.float(), v.float(), None, 0.25, "triton").sum().backward()
    expected = q.detach().float().requires_grad_(True)
    torch.nn.functional.scaled_dot_product_attention(expected, k.float(), v.float(), scale=0.25).sum().backward()
    torch.testing.assert_close(qg.grad, expected.grad)
    with pytest.raises(ValueError, match="key_bias must be"):
        kernels.attention_triton(q, k, v, torch.zeros(2, 8, device=DEVICE), 0.25)
    with pytest.raises(TypeError, match="float32"):
        kernels.attention_triton(q, k, v, torch.zeros(2, 9, device=DEVICE, dtype=torch.bfloat16), 0.25)


def test_compiled_attention_runs_the_kernel_as_one_op_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo cannot trace the attention kernel's launch, so under torch.compile "triton" puts
    it in the graph as one op (torch.ops.tokenprune.attention, in the kernel's own layout), and
    "auto", which eagerly takes the kernel for bf16 on a GPU (faked here), keeps SDPA: the path
    measured compiled on the H200."""
    import sys

    # (the module, which kernels.attention, the function, hides)
    monkeypatch.setattr(sys.modules["kernels.attention"], "use_triton", lambda backend, *tensors: backend != "torch")
    q, k, v = qkv_views(2, 3, 21, 16, torch.bfloat16)
    bias = torch.randn(2, 21, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert kernels.attention(q, k, v, bias, 0.25).transpose(1, 2).is_contiguous()  # eager "auto": the kernel
    for backend, op_in_graph in (("triton", True), ("auto", False)):
        graphs = []

        def capture(graph_module, example_inputs, graphs=graphs):
            graphs.append(graph_module)
            return graph_module.forward

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(kernels.attention, fullgraph=True, backend=capture)(q, k, v, bias, 0.25, backend)
        called = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
        assert (torch.ops.tokenprune.attention.default in called) == op_in_graph, called
        reference = kernels.attention_reference(q.double(), k.double(), v.double(), bias.double(), 0.25)
        error = ((out.double() - reference).abs().max() / reference.abs().max()).item()
        assert error < ATTENTION_TOL[torch.bfloat16], f"relative error {error:.2e}"
        if op_in_graph:
            assert out.transpose(1, 2).is_contiguous()  # the kernel's [B, T, H, D] layout, as eager


def test_zero_metric_vectors_match_the_same_on_every_backend() -> None:
    """A zero key vector has no direction: it scores 0 against every token (F.normalize), not
    NaN, so torch.max and the kernel (which ranks NaN differently) pick the same partners."""
    from tokenprune.merge import bipartite_best_match, bipartite_soft_matching

    torch.manual_seed(5)
    metric = torch.randn(2, 9, 8, device=DEVICE)
    metric[0, 2] = 0  # an A token (ToMe's parity follows absolute positions: A = 2, 4, 6, 8)
    metric[1, 3] = 0  # a B token
    scores, _ = bipartite_best_match(metric, 1, backend="torch")
    assert torch.isfinite(scores).all()
    for r in (1, 2, 4):
        torch_dest = bipartite_soft_matching(metric, r, 1, "torch")
        assert torch.equal(bipartite_soft_matching(metric, r, 1, "triton"), torch_dest)
    # the zero A token's score is 0 (cosine with every B token), so it is not merged first
    assert scores[0, 0].item() == 0.0 and scores[0].max() > 0


def near_copies(batch: int, tokens: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tokens 5 % off one direction per sample: their cosines, all within ~0.01 of 1, are
    distinct in float32 but round to a few values in bf16 (spacing 2**-8 below 1)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(batch, 1, dim, generator=generator)
    return (direction + 0.05 * torch.randn(batch, tokens, dim, generator=generator)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_references_score_in_float32_under_autocast(dtype: torch.dtype) -> None:
    """Under bf16 autocast the references' matmuls still score in float32: bit for bit the
    scores and partners of the same inputs without autocast, and the kernels' partners. (A
    bf16 score matrix would tie these near copies and pick the lowest index.)"""
    metric = near_copies(2, 97, 40, seed=3, dtype=dtype)
    a, b = split_ab(metric, 1)
    pos = video_positions(2, (4, 4, 6), merged=True)
    expected = best_match_reference(a, b), kernels.temporal_best_match_reference(metric[:, 1:], pos, 1)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        matched = best_match_reference(a, b), kernels.temporal_best_match_reference(metric[:, 1:], pos, 1)
        on_kernels = best_match_triton(a, b), kernels.temporal_best_match_triton(metric[:, 1:], pos, 1)
    for (score, index), (expected_score, expected_index), (_, kernel_index) in zip(matched, expected, on_kernels):
        assert torch.equal(index, kernel_index) and torch.equal(index, expected_index)
        assert score.dtype == torch.float32 and torch.equal(score, expected_score)


def test_patched_model_same_on_both_backends_under_autocast() -> None:
    """Under bf16 autocast (keys in bf16), ToMe's torch path merges the tokens the match kernel
    merges: an image of one repeated patch makes the keys near copies, whose bf16 cosines tie."""
    from tests.test_patch import make

    import tokenprune

    model = make("registers", depth=2).to(DEVICE)
    generator = torch.Generator().manual_seed(1)
    tile = torch.randn(2, 3, 16, 16, generator=generator)
    x = (tile.repeat(1, 1, 14, 14) + 0.1 * torch.randn(2, 3, 224, 224, generator=generator)).to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        tokenprune.patch(model, r=16, backend="torch", trace_source=True)
        expected, expected_source = model(x), tokenprune.source(model)
        tokenprune.patch(model, backend="triton")
        out = model(x)
        assert torch.equal(tokenprune.source(model), expected_source)
    # the same merges; the outputs differ only by the bf16 rounding of the merge and attention
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_cait_same_on_both_backends() -> None:
    """CaiT (talking heads, class attention over merged tokens) on the Triton merge."""
    from tests.test_cait import cait
    from tests.test_patch import image

    import tokenprune

    model = cait(depth=2).to(DEVICE)
    x = image().to(DEVICE)
    with torch.no_grad():
        tokenprune.patch(model, r=16, backend="torch", trace_source=True)
        expected, expected_source = model(x), tokenprune.source(model)
        tokenprune.patch(model, backend="triton")
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(tokenprune.source(model), expected_source)


@pytest.mark.parametrize("kind", ["parallel", "differential"])
def test_parallel_blocks_same_on_both_backends(kind: str) -> None:
    """Parallel blocks: merged ParallelScalingBlocks take the attention kernel, and both kinds
    the match and merge kernels."""
    from tests.test_parallel_blocks import images, parallel

    import tokenprune

    model = parallel(kind).to(DEVICE)
    x = images().to(DEVICE)
    with torch.no_grad():
        tokenprune.patch(model, r=(8, -1), backend="torch")
        expected = model(x)
        tokenprune.patch(model, backend="triton")
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_pitome_merges_on_the_merge_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="triton" reaches PiToMe's merge: one merge launch per merging block."""
    from tests.test_patch import image, make

    import kernels.merge
    import tokenprune

    launches = []
    launcher = kernels.merge.merge_wavg_triton
    monkeypatch.setattr(kernels.merge, "merge_wavg_triton", lambda *args: launches.append(1) or launcher(*args))
    model = tokenprune.patch(make("registers", depth=2).to(DEVICE), "pitome", r=16, backend="triton")
    with torch.no_grad():
        model(image().to(DEVICE))
    assert len(launches) == 2


def test_tome_step_on_the_triton_path_is_three_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Triton path exists for: a block's ToMe step (match, assignment, merge) launches
    its three kernels, and every other PyTorch op it dispatches only allocates: no sort, as the
    assignment kernel lays out the merge kernel's member lists.
    The kernels are replaced by recorders (the interpreter would add its own copies), and the
    PyTorch ops are counted below the dispatcher, where views and allocations are told apart."""
    import collections

    import kernels.bipartite
    import kernels.match
    import kernels.merge
    from torch.utils._python_dispatch import TorchDispatchMode

    from tokenprune.merge import TokenState
    from tokenprune.methods.tome import BipartiteMerge

    launches: collections.Counter[str] = collections.Counter()

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name
            self.fn = self  # the merge launcher reaches under the autotuner for fixed tiles

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.update([self.name])

    monkeypatch.setattr(kernels.match, "_best_match_kernel", Recorder("match"))
    monkeypatch.setattr(kernels.bipartite, "_bipartite_dest_kernel", Recorder("assignment"))
    monkeypatch.setattr(kernels.merge, "_merge_wavg_kernel", Recorder("merge"))

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch.Tag.view_copy not in func.tags and not func.is_view:
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    metric = torch.randn(2, 197, 64, device=DEVICE).bfloat16()
    state = TokenState(torch.randn(2, 197, 96, device=DEVICE), torch.ones(2, 197, 1, device=DEVICE))
    with CountOps() as counter:
        BipartiteMerge(r=16, num_protected=1, backend="triton")(state, metric)
    assert launches == {"match": 1, "assignment": 1, "merge": 1}
    assert set(counter.ops) <= {"empty", "empty_like"}, dict(counter.ops)


def test_temporal_match_centroids_exactly_window_apart() -> None:
    """Merged centroids 7/3 and 13/3 rows (float32: 2 + 1 ulp apart) are inside window 2 for
    the kernel as for the reference (both with CENTROID_TOLERANCE)."""
    from kernels import merge_wavg_reference

    coords = torch.tensor([[[0.0, 2, 0], [0, 2, 0], [0, 3, 0], [1, 4, 0], [1, 4, 0], [1, 5, 0]]])
    pos, _ = merge_wavg_reference(coords, torch.ones(1, 6, 1), torch.tensor([[0, 0, 0, 1, 1, 1]]), 2)
    assert pos[0, 1, 1] - pos[0, 0, 1] > 2.0  # the rounding the tolerance is for
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1]]])
    score, index = kernels.temporal_best_match_triton(metric.to(DEVICE), pos.to(DEVICE), 2)
    ref_score, ref_index = kernels.temporal_best_match_reference(metric, pos, 2)
    assert ref_score[0, 0] > -1.0  # inside
    torch.testing.assert_close(score.cpu(), ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index.cpu(), ref_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_reads_tokens_through_their_channel_stride(dtype: torch.dtype) -> None:
    """x a non-dense view (channel stride 2) handed to the kernel as it is. (assert_merge passes
    ``x.detach().clone()``, and clone() of a non-dense view is contiguous: the existing
    test_merge_arbitrary_groups_strided never gives the kernel a strided x.)"""
    gen = torch.Generator().manual_seed(3)
    batch, tokens, channels, num_out = 2, 40, 24, 7
    base = torch.randn(batch, tokens, 2 * channels, generator=gen).to(DEVICE, dtype)
    x = base[..., ::2]
    assert x.stride(-1) == 2
    size = torch.randint(1, 4, (batch, tokens, 1), generator=gen).float().to(DEVICE)
    dest = torch.cat([torch.arange(num_out), torch.randint(0, num_out, (tokens - num_out,), generator=gen)])
    dest = torch.stack([dest[torch.randperm(tokens, generator=gen)] for _ in range(batch)]).to(DEVICE)
    merged, new_size = merge_wavg_triton(x, size, dest, num_out)
    # independent reference: the weighted mean of each group, member by member
    expected = torch.zeros(batch, num_out, channels, dtype=torch.float64)
    for b in range(batch):
        for o in range(num_out):
            members = (dest[b] == o).nonzero().squeeze(-1)
            w = size[b, members].double().cpu()
            expected[b, o] = (x[b, members].double().cpu() * w).sum(0) / w.sum()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=2**-7)
    torch.testing.assert_close(merged.cpu().double(), expected.to(torch.float64), **tol)
    # and under autograd, with the leaf keeping its strides (detach, not clone)
    leaf = x.detach().requires_grad_(True)
    assert leaf.stride() == x.stride()
    out, _ = merge_wavg_triton(leaf, size, dest, num_out)
    torch.testing.assert_close(out, merged)


@pytest.mark.skipif(not kernels.INTERPRET, reason="bitwise: the CUDA reference sums with atomics, the GPU may fuse mul-adds")
def test_merge_sums_each_group_in_input_order_bitwise() -> None:
    """The kernel's contract: each output sums its members in input order (a stable sort), in
    float32. On CPU the reference's index_add_ adds in input order too, so the two agree bit
    for bit on groups large enough (≥ 100 tokens) for an unstable sort to reorder them, with
    terms of very different magnitudes so that the order shows in the last bits."""
    gen = torch.Generator().manual_seed(0)
    batch, tokens, channels, num_out = 2, 300, 8, 5
    x = torch.randn(batch, tokens, channels, generator=gen) * torch.logspace(-3, 3, tokens)[None, :, None]
    size = torch.randint(1, 6, (batch, tokens, 1), generator=gen).float()
    dest = torch.randint(0, num_out, (batch, tokens), generator=gen)
    merged, new_size = merge_wavg_triton(x, size, dest, num_out)
    ref_merged, ref_size = merge_wavg_reference(x, size, dest, num_out)
    assert torch.equal(new_size, ref_size)
    assert torch.equal(merged, ref_merged), (merged - ref_merged).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.125, 48**-0.5])
def test_attention_folded_keeps_the_low_part_of_the_bias(dtype: torch.dtype, scale: float) -> None:
    """hi + lo carries ~twice the bits of the bias that the reference's half-precision mask
    keeps: the folded error must be well below the mask's, not merely below it (with a
    power-of-two scale, hi alone rounds exactly like the mask and lands within noise of it)."""
    q, k, v = qkv_views(2, 2, 64, 64, dtype, seed=4)
    generator = torch.Generator().manual_seed(5)
    key_bias = torch.randint(1, 1569, (2, 64), generator=generator).float().log().to(DEVICE)
    exact = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), scale)

    def error(out: torch.Tensor) -> float:
        return ((out.double() - exact).norm() / exact.norm()).item()

    folded = error(kernels.attention_folded(q, k, v, key_bias, scale))
    masked = error(kernels.attention_reference(q, k, v, key_bias, scale))
    assert folded < 0.5 * masked, (folded, masked)


@pytest.mark.parametrize("needs_grad", ["q", "k", "v"])
def test_attention_takes_the_differentiable_path_when_any_input_needs_gradients(needs_grad: str) -> None:
    """The kernel has no backward: with backend="triton", a k or v that requires grad (a frozen
    q projection, LoRA on v only, ...) must still get SDPA's gradient, not a detached output."""
    q, k, v = (t.float() for t in qkv_views(1, 2, 9, 16, torch.float32, seed=0))
    tensors = {"q": q, "k": k, "v": v}
    tensors[needs_grad] = tensors[needs_grad].detach().clone().requires_grad_(True)
    key_bias = torch.randint(1, 9, (1, 9), generator=torch.Generator().manual_seed(1)).float().log().to(DEVICE)
    out = kernels.attention(tensors["q"], tensors["k"], tensors["v"], key_bias, 0.25, "triton")
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.square().sum(), tensors[needs_grad])
    leaf = tensors[needs_grad].detach().requires_grad_(True)
    ref_inputs = {**tensors, needs_grad: leaf}
    ref = kernels.attention_reference(ref_inputs["q"], ref_inputs["k"], ref_inputs["v"], key_bias, 0.25)
    (expected,) = torch.autograd.grad(ref.square().sum(), leaf)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_attention_kernel_takes_a_strided_key_bias() -> None:
    """A key bias that is a non-contiguous view (every other column of a wider tensor)."""
    q, k, v = qkv_views(2, 2, 21, 32, torch.float32, seed=2)
    wide = torch.randint(1, 9, (2, 42), generator=torch.Generator().manual_seed(3)).float().log().to(DEVICE)
    key_bias = wide[:, ::2]
    assert key_bias.stride(1) == 2
    out = kernels.attention_triton(q, k, v, key_bias, 32**-0.5)
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double().contiguous(), 32**-0.5)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


def test_attention_kernel_masks_whole_key_tiles_with_minus_infinity() -> None:
    """A key bias of -inf masks its key, in the kernel as in the reference, also where a query's
    first key tile (64 keys) is masked entirely, whose running max is then -inf: no -inf - (-inf)
    = NaN. A query with every key masked gets 0, as from SDPA."""
    q, k, v = qkv_views(3, 1, 80, 16, torch.float32, seed=8)
    key_bias = log_sizes(3, 80)
    key_bias[0, :64] = float("-inf")  # the first tile masked, the second not
    key_bias[1, 64:] = float("-inf")  # the last tile masked
    key_bias[2] = float("-inf")  # every key masked
    out = kernels.attention_triton(q, k, v, key_bias, 0.25)
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), 0.25)
    assert torch.isfinite(out).all()
    assert (out[2] == 0).all() and (ref[2] == 0).all()
    assert (out[:2].double() - ref[:2]).norm() / ref[:2].norm() < 1e-5


def test_attention_takes_the_differentiable_path_when_the_key_bias_needs_gradients() -> None:
    """The kernel has no backward: a key bias that needs a gradient (q, k, v frozen) must take
    SDPA on every backend, not leave the bias without its gradient."""
    q, k, v = qkv_views(1, 2, 9, 16, torch.float32, seed=9)
    key_bias = log_sizes(1, 9).requires_grad_(True)
    out = kernels.attention(q, k, v, key_bias, 0.25, backend="triton")
    assert out.requires_grad
    (grad,) = torch.autograd.grad(out.square().sum(), key_bias)
    exact = key_bias.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(kernels.attention_reference(q, k, v, exact, 0.25).square().sum(), exact)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("tokens", [9, 101])
def test_attention_kernel_takes_q_k_v_of_different_layouts(tokens: int) -> None:
    """q, k, v with three different strides, as attend gives them under RoPE (k rotated into a
    new contiguous tensor, v still a view of the fused qkv projection) or GQA: each operand must
    be read through its own strides."""
    batch, heads, dim = 2, 3, 32
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(batch, tokens, 3, heads, dim, generator=generator).to(DEVICE).permute(2, 0, 3, 1, 4)[0]
    k = torch.randn(batch, heads, tokens, dim, generator=generator).to(DEVICE)  # contiguous
    v = torch.randn(batch, tokens, heads, dim, generator=generator).to(DEVICE).transpose(1, 2)
    assert len({q.stride(), k.stride(), v.stride()}) == 3
    key_bias = torch.randint(1, 9, (batch, tokens), generator=generator).float().log().to(DEVICE)
    out = kernels.attention_triton(q, k, v, key_bias, dim**-0.5)
    ref = kernels.attention_reference(q.double(), k.double(), v.double(), key_bias.double(), dim**-0.5)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5


# ------------------------------------------------------------------ stores stay inside outputs


class GuardedOutputs:
    """Stands in for ``torch`` inside a kernel module: its ``empty`` (how every launcher makes
    its outputs) returns a view into a buffer with a pad of sentinel values on both sides. A
    store past either end of an output (a mask missing on the last tile) changes a pad instead
    of crashing the interpreter or, on a GPU, silently writing over a neighbour's memory (the
    interpreter copies an argument's whole storage, so it sees the pads as memory too)."""

    SENTINEL = -777

    def __init__(self) -> None:
        self.buffers: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def empty(self, *shape, device=None, dtype=None) -> torch.Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        numel = math.prod(shape)
        pad = numel + 4096  # past any tile's overrun
        buffer = torch.full((pad + numel + pad,), self.SENTINEL, device=device, dtype=dtype)
        self.buffers.append((buffer, buffer.clone(), pad, numel))
        return buffer[pad : pad + numel].view(shape)

    def assert_pads_intact(self) -> None:
        assert self.buffers, "the launcher made no outputs through torch.empty"
        for buffer, initial, pad, numel in self.buffers:
            for side in (slice(0, pad), slice(pad + numel, None)):
                changed = int((buffer[side] != initial[side]).sum())
                assert changed == 0, f"{changed} values written outside a {numel}-element output"


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch):
    """Route the kernel modules' output allocations through one GuardedOutputs."""
    guard = GuardedOutputs()
    for name in ("attention", "bipartite", "match", "merge", "temporal_match"):
        # (by module path: kernels.attention is also the name of a function in kernels)
        monkeypatch.setattr(importlib.import_module(f"kernels.{name}"), "torch", guard)
    return guard


def test_match_kernels_store_inside_their_outputs(guarded: GuardedOutputs) -> None:
    """Ragged last tiles in every dimension: 37 A rows over 16-row tiles, 29 B rows, D = 40."""
    generator = torch.Generator().manual_seed(37)
    metric = torch.randn(2, 67, 40, generator=generator).to(DEVICE)
    a, b = split_ab(metric, 1)
    score, index = best_match_triton(a, b)
    ref_score, ref_index = best_match_reference(a, b)
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)

    dest = kernels.bipartite_dest_triton(score, index, 20, 67, 1)
    assert torch.equal(dest, kernels.bipartite_dest_reference(score, index, 20, 67, 1))

    grid = (3, 3, 5)
    video = torch.randn(2, 45, 40, generator=generator).to(DEVICE)
    pos = video_positions(2, grid, merged=True)
    kernels.temporal_best_match_triton(video, pos, 1)
    guarded.assert_pads_intact()


@pytest.mark.parametrize("tile", GPU_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_merge_kernel_stores_inside_its_outputs(guarded: GuardedOutputs, tile: tuple[int, int, int]) -> None:
    """Every GPU tile on 13 outputs of 1100 channels: ragged in rows and in channels."""
    from kernels.merge import _merge_wavg_forward

    x, size, dest, num_out = tome_inputs(2, 25, 1100, 1, torch.float32, seed=13)
    merged, new_size = _merge_wavg_forward(x, size, dest, num_out, tile=tile)
    ref_merged, ref_size = merge_wavg_reference(x, size, dest, num_out)
    torch.testing.assert_close(merged, ref_merged, **MERGE_TOL[torch.float32])
    assert torch.equal(new_size, ref_size)
    guarded.assert_pads_intact()


@pytest.mark.parametrize("tile", GPU_TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_merge_grid_fits_cuda_launch_limits_for_long_sequences(monkeypatch: pytest.MonkeyPatch, tile) -> None:
    """CUDA launches at most 65,535 programs on grid axes 1 and 2 (2**31 - 1 on axis 0); a
    larger grid fails with "invalid argument", which the interpreter never checks. The merge
    of 70,000 output tokens (a 256 × 274 patch grid, or a long clip) with one output row per
    program must still fit, on every GPU tile the autotuner may pick. The kernel is replaced
    by a recorder of its grids: interpreting 70,000 programs would take minutes."""
    import kernels.merge
    from kernels.merge import _merge_wavg_forward

    grids: list[tuple[int, ...]] = []

    class Recorder:
        fn = None  # set below: the launcher reaches under the autotuner for fixed tiles

        def __getitem__(self, grid):
            def launch(*args, BLOCK_T: int, BLOCK_C: int, **kwargs) -> None:
                grids.append(tuple(grid({"BLOCK_T": BLOCK_T, "BLOCK_C": BLOCK_C})))

            return launch

    recorder = Recorder()
    recorder.fn = recorder
    monkeypatch.setattr(kernels.merge, "_merge_wavg_kernel", recorder)
    batch, tokens, channels = 2, 70_000, 8
    x = torch.zeros(batch, tokens, channels, device=DEVICE)
    size = torch.ones(batch, tokens, 1, device=DEVICE)
    dest = torch.arange(tokens, device=DEVICE).expand(batch, -1)
    _merge_wavg_forward(x, size, dest, tokens, tile=tile)
    (grid,) = grids
    programs = batch * -(-tokens // tile[0]) * -(-channels // tile[1])
    assert math.prod(grid) == programs  # every output tile of every batch item, once
    assert grid[0] <= 2**31 - 1 and all(n <= 65_535 for n in grid[1:]), f"grid {grid} exceeds CUDA's limits"


def test_every_launch_runs_on_the_gpu_its_tensors_are_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches a kernel on the *current* CUDA device and its stream, not on its tensors'
    device (triton/runtime/jit.py, JITFunction.run: driver.active.get_current_device(), which is
    torch.cuda.current_device()). So each launcher makes its inputs' GPU current around the
    launch: a model on cuda:1 while cuda:0 is current must not run its kernels on GPU 0 over
    GPU 1's memory. Faked without a second GPU: fake tensors on cuda:1, torch.cuda.device
    recording the device it makes current, and every kernel a recorder of that device."""
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode

    current = [0]  # torch.cuda.current_device(), as torch.cuda.device sets it

    class Device:
        def __init__(self, device: torch.device) -> None:
            self.index = torch.device(device).index

        def __enter__(self) -> None:
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc: object) -> None:
            current[0] = self.previous

    launched: dict[str, int] = {}

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name, self.fn = name, self  # (.fn: the merge launcher's fixed tiles reach under the autotuner)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.setdefault(self.name, current[0])

    monkeypatch.setattr(torch.cuda, "device", Device)
    for module, name in (("attention", "_attention_kernel"), ("match", "_best_match_kernel"),
                         ("bipartite", "_bipartite_dest_kernel"), ("merge", "_merge_wavg_kernel"),
                         ("temporal_match", "_temporal_match_kernel")):  # fmt: skip
        monkeypatch.setattr(sys.modules[f"kernels.{module}"], name, Recorder(name))
    gpu = torch.device("cuda", 1)
    with FakeTensorMode(), torch.no_grad():
        q, k, v = torch.empty(3, 2, 4, 21, 16, device=gpu)
        kernels.attention_triton(q, k, v, torch.zeros(2, 21, device=gpu), 0.25)
        metric = torch.empty(2, 21, 16, device=gpu)
        best_match_triton(metric[:, 0::2], metric[:, 1::2])
        kernels.temporal_best_match_triton(metric, torch.zeros(2, 21, 3, device=gpu), 1.0)
        kernels.bipartite_members(torch.zeros(2, 10, device=gpu), torch.zeros(2, 10, dtype=torch.long, device=gpu), 3, 21, 1, "triton")
        dest = torch.zeros(2, 21, dtype=torch.long, device=gpu)
        merge_wavg_triton(metric, torch.ones(2, 21, 1, device=gpu), dest, 5)
    assert launched == dict.fromkeys(
        ["_attention_kernel", "_best_match_kernel", "_temporal_match_kernel", "_bipartite_dest_kernel", "_merge_wavg_kernel"], 1
    )
    assert current == [0]  # and the caller's device is current again afterwards


def test_attention_kernel_stores_inside_its_output(guarded: GuardedOutputs) -> None:
    """21 tokens over 32-token tiles, D = 40 over a 64-wide block."""
    q, k, v = qkv_views(2, 3, 21, 40, torch.float32, seed=5)
    assert_attention(q, k, v, log_sizes(2, 21), 40**-0.5)
    guarded.assert_pads_intact()


def far_apart(tmp_path, shape: tuple[int, ...], dim: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A [1, ...] view of random values whose ``dim`` steps 2**26 elements at a time, as in a
    transposed sequence-first tensor of more than 2**31 elements: its last rows lie beyond
    2**31 elements from its first. The storage is a sparse memory-mapped file (a few pages are
    ever written) and the view starts 2**32 elements into it, so an offset wrapped around in
    int32 still reads inside the file (zeros) rather than crashing the interpreter."""
    step, start = 2**26, 2**32
    strides = [1] * len(shape)
    for axis in reversed(range(len(shape) - 1)):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    strides[dim] = step
    strides[0] = step * shape[dim]
    numel = start + sum((n - 1) * st for n, st in zip(shape, strides)) + 1
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as file:
        file.truncate(numel * dtype.itemsize)
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    view = storage.as_strided(shape, strides, start)
    view.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype))
    assert (shape[dim] - 1) * step > 2**31
    return view


needs_cpu_storage = pytest.mark.skipif(DEVICE != "cpu", reason="a sparse memory map stands in for a > 2**31-element tensor")


@needs_cpu_storage
@pytest.mark.parametrize("kernel", ["match", "temporal", "attention", "merge"])
def test_kernels_read_rows_beyond_2_31_elements_apart(tmp_path, kernel: str) -> None:
    """A kernel's offsets inside one batch item are int32 (the batch offset alone is int64). A
    view whose rows are more than 2**31 elements apart (a [B, N, D] transpose of a sequence-first
    [N, B, D] tensor of over 2**31 elements) must still be read where it lies, not where a
    wrapped-around offset points: each kernel against its reference on such a view."""
    generator = torch.Generator().manual_seed(3)
    a = far_apart(tmp_path, (1, 40, 16), dim=1)
    if kernel == "match":
        b = torch.randn(1, 8, 16, generator=generator).half()
        score, _ = best_match_triton(a, b)
        torch.testing.assert_close(score, best_match_reference(a, b)[0], atol=SCORE_ATOL, rtol=0)
    elif kernel == "temporal":
        pos = video_positions(1, (2, 4, 5), merged=False)
        score, _ = kernels.temporal_best_match_triton(a, pos, 1)
        ref_score, _ = kernels.temporal_best_match_reference(a, pos, 1)
        torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    elif kernel == "attention":
        q = a.unsqueeze(1)  # [1, 1, 40, 16]: tokens 2**26 apart
        k, v = (torch.randn(1, 1, 40, 16, generator=generator).half() for _ in range(2))
        out = kernels.attention_triton(q, k, v, log_sizes(1, 40), 0.25)
        ref = kernels.attention_reference(q.double(), k.double(), v.double(), log_sizes(1, 40).double(), 0.25)
        assert (out.double() - ref).norm() / ref.norm() < 1e-3
    else:
        x = a.transpose(1, 2)  # [1, 16, 40]: channels 2**26 apart
        size = torch.ones(1, 16, 1)
        dest = torch.arange(16).remainder(5).unsqueeze(0)
        merged, _ = merge_wavg_triton(x, size, dest, 5)
        torch.testing.assert_close(merged, merge_wavg_reference(x, size, dest, 5)[0], **MERGE_TOL[torch.float16])


@needs_cpu_storage
def test_assignment_reads_scores_beyond_2_31_elements_apart(tmp_path) -> None:
    """The assignment kernel's token offsets are int32 too: scores 2**26 elements apart."""
    score = far_apart(tmp_path, (1, 40), dim=1, dtype=torch.float32)
    best_b = torch.randint(0, 40, (1, 40), generator=torch.Generator().manual_seed(2))
    want = kernels.bipartite_dest_reference(score, best_b, 20, 81, 1)
    assert torch.equal(kernels.bipartite_dest_triton(score, best_b, 20, 81, 1), want)


# ---------------------------------------------- edge shapes of the match, attention and temporal kernels


def test_best_match_padding_columns_never_win_against_negative_cosines() -> None:
    """Every real cosine negative (A rows opposite to all B rows): the padding columns of the
    16-wide B tile score exactly 0 before their mask, so without it they would win with an
    index past Nb."""
    gen = torch.Generator().manual_seed(21)
    b = torch.randn(2, 3, 24, generator=gen).abs() + 0.1  # Nb = 3, padded to a 16-row tile
    a = -(torch.randn(2, 5, 24, generator=gen).abs() + 0.1)  # every cosine with B is < 0
    a, b = a.to(DEVICE), b.to(DEVICE)
    score, index = best_match_triton(a, b)
    ref_score, ref_index = best_match_reference(a, b)
    assert (ref_score < 0).all()
    torch.testing.assert_close(score, ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index, ref_index) and (index < 3).all()


@pytest.mark.parametrize("num_a,num_b", [(10, 100), (100, 10)])
def test_best_match_unequal_set_sizes(num_a: int, num_b: int) -> None:
    """Na and Nb in different tile sizes (16 vs 64): A's tile arithmetic must not borrow B's."""
    gen = torch.Generator().manual_seed(num_a)
    a = torch.randn(2, num_a, 40, generator=gen).to(DEVICE)
    b = torch.randn(2, num_b, 40, generator=gen).to(DEVICE)
    assert_best_match(a, b)


@pytest.mark.parametrize("dim", [1, 65])
def test_best_match_one_column_last_d_chunk(dim: int) -> None:
    """D = 64·k + 1 (and D = 1): the last D chunk holds a single column, which every loop over
    D must still visit (norms and dots alike)."""
    gen = torch.Generator().manual_seed(dim)
    metric = torch.randn(2, 41, dim, generator=gen)
    metric[..., -1] *= 50  # the last column dominates every norm and cosine
    assert_best_match(*split_ab(metric.to(DEVICE), 1))


def test_best_match_edge_shapes_and_validation() -> None:
    """D = 0: every cosine is 0 and the first B row wins, as in the reference; batch sizes that
    differ are refused."""
    a, b = torch.randn(2, 5, 0, device=DEVICE), torch.randn(2, 7, 0, device=DEVICE)
    for got, want in zip(best_match_triton(a, b), best_match_reference(a, b)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="batch/feature sizes differ"):
        best_match_triton(torch.randn(2, 5, 8, device=DEVICE), torch.randn(3, 7, 8, device=DEVICE))


def test_native_dot_only_for_one_half_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (INTERPRET faked off): the tensor-core dot takes bf16 or fp16 rows of one dtype
    only; mixed or float32 rows are upcast (tl.dot refuses mixed operand dtypes)."""
    import kernels.match

    monkeypatch.setattr(kernels.match, "INTERPRET", False)
    rows = {dtype: torch.zeros(1, 2, 16, dtype=dtype) for dtype in DTYPES}
    assert kernels.match.native_dot(rows[torch.bfloat16], rows[torch.bfloat16])
    assert kernels.match.native_dot(rows[torch.float16], rows[torch.float16])
    assert not kernels.match.native_dot(rows[torch.float16], rows[torch.bfloat16])
    assert not kernels.match.native_dot(rows[torch.bfloat16], rows[torch.float32])
    assert not kernels.match.native_dot(rows[torch.float32], rows[torch.float32])


@pytest.mark.parametrize("dim", [17, 33])
def test_attention_head_dim_one_past_a_power_of_two(dim: int) -> None:
    """Head sizes 2^k + 1: the kernel's D block must cover the last channel."""
    q, k, v = qkv_views(2, 2, 19, dim, torch.float32, seed=dim)
    assert_attention(q, k, v, log_sizes(2, 19), dim**-0.5)


def test_temporal_match_centroids_beyond_the_tolerance_are_outside() -> None:
    """CENTROID_TOLERANCE absorbs float32 rounding (1e-4), nothing more: a B token 2.001 rows
    from its A token is outside window 2 (penalised), for the kernel as for the reference."""
    pos = torch.tensor([[[0.0, 0, 0], [1, 2.001, 0], [1, 2.0, 3.0]]])
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    score, index = kernels.temporal_best_match_triton(metric.to(DEVICE), pos.to(DEVICE), 2)
    ref_score, ref_index = kernels.temporal_best_match_reference(metric, pos, 2)
    assert ref_score[0, 0] < -2.0  # both B tokens outside: the similar one, penalised
    assert ref_index[0, 0] == 1
    torch.testing.assert_close(score.cpu(), ref_score, atol=SCORE_ATOL, rtol=0)
    assert torch.equal(index.cpu(), ref_index)


@pytest.mark.parametrize("dim", [6, 33, 64])
def test_attention_folded_pads_the_head_to_a_multiple_of_eight(monkeypatch: pytest.MonkeyPatch, dim: int) -> None:
    """Flash attention's alignment (checked on the GPU only by the flash test): the folded q, k
    and v reach SDPA with D + 2 rounded up to a multiple of 8 channels, and no mask."""
    import sys

    module = sys.modules["kernels.attention"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen: list[tuple[int, bool]] = []

    def recording(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.shape[-1], attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", recording)
    q, k, v = qkv_views(1, 2, 9, dim, torch.float32)
    kernels.attention_folded(q, k, v, log_sizes(1, 9), dim**-0.5)
    assert seen == [(-(-(dim + 2) // 8) * 8, True)]

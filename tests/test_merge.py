"""The merge primitives against brute-force loops written from their definitions."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from kernels import merge_wavg_reference as merge_wavg
from tokenprune.merge import (
    TokenState,
    bipartite_best_match,
    bipartite_soft_matching,
    keep_top_tokens,
    max_bipartite_r,
    merge_state,
    padding_first_matching,
    source_matrix,
    start_state,
    unmerge,
)


def brute_force_dest(
    metric: torch.Tensor, r: int, p: int, penalty: Callable[[int, int, int], float] | None = None
) -> torch.Tensor:
    """ToMe's matching by loops: A = even positions, B = odd, prefix excluded; the r A tokens
    with the best cosine to any B token merge into it; order prefix, unmerged A, B.
    ``penalty(n, i, j)``: subtracted from the cosine of tokens i and j of sample n."""
    dest = torch.empty(metric.shape[:2], dtype=torch.long)
    for n, tokens in enumerate(metric):
        t = tokens.shape[0]
        a = [i for i in range(p, t) if i % 2 == 0]
        b = [i for i in range(p, t) if i % 2 == 1]
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        best = {}
        for i in a:
            sims = [float(unit[i] @ unit[j]) - (penalty(n, i, j) if penalty else 0.0) for j in b]
            k = max(range(len(b)), key=lambda j: (sims[j], -j))  # first maximum
            best[i] = (sims[k], k)
        ranked = sorted(a, key=lambda i: (-best[i][0], i))
        merged = set(ranked[:r])
        unmerged = [i for i in a if i not in merged]
        for i in range(p):
            dest[n, i] = i
        for rank, i in enumerate(unmerged):
            dest[n, i] = p + rank
        for k, j in enumerate(b):
            dest[n, j] = p + len(unmerged) + k
        for i in merged:
            dest[n, i] = p + len(unmerged) + best[i][1]
    return dest


@pytest.mark.parametrize("t,p", [(3, 0), (3, 1), (8, 0), (9, 1), (12, 2), (21, 5), (50, 1)])
def test_matching_equals_brute_force(t: int, p: int) -> None:
    torch.manual_seed(t * 10 + p)
    metric = torch.randn(3, t, 6)
    for r in range(max_bipartite_r(t, p) + 1):
        assert torch.equal(bipartite_soft_matching(metric, r, p), brute_force_dest(metric, r, p)), r


@pytest.mark.parametrize("t,p", [(5, 0), (12, 1), (13, 4), (33, 1), (34, 8)])
def test_padding_first_matching_spends_merges_on_padding(t: int, p: int) -> None:
    """Read from ``dest`` alone, for padding counts around |A| and every r: prefix tokens stay,
    every output is used, each sequence's m padding tokens leave first (m - min(r, m) outputs
    hold padding alone, no patch merges into padding), patches merge for the rest of r; a
    sequence without padding is matched as by plain ToMe; the Triton backend agrees."""
    gen = torch.Generator().manual_seed(t * 10 + p)
    n = t - p
    num_a = len(range(p % 2, n, 2))
    counts = sorted({0, 1, num_a - 1, num_a, num_a + 1, n - 1} & set(range(n)))
    padding = torch.zeros(len(counts), t, dtype=torch.bool)
    for row, m in enumerate(counts):
        padding[row, p + torch.randperm(n, generator=gen)[:m]] = True
    metric = torch.randn(len(counts), t, 6, generator=gen)
    for r in range(1, max_bipartite_r(t, p) + 1):
        dest = padding_first_matching(metric, padding, r, p, backend="torch")
        assert torch.equal(dest, padding_first_matching(metric, padding, r, p, backend="triton")), r
        assert torch.equal(dest[:, :p], torch.arange(p).expand(len(counts), -1))
        for row, m in enumerate(counts):
            assert sorted(set(dest[row].tolist())) == list(range(t - r)), (r, m)
            holding_patches = set(dest[row][~padding[row]].tolist())
            assert len(holding_patches) == (t - m) - (r - min(r, m)), (r, m)
            if m == 0:
                assert torch.equal(dest[row], brute_force_dest(metric[row : row + 1], r, p)[0]), r


def documented_padding_first_dest(metric: torch.Tensor, padding: torch.Tensor, r: int, p: int) -> torch.Tensor:
    """:func:`padding_first_matching` as its docstring lays the tokens out, by loops: a sequence
    with m padding tokens puts them in the last min(m, |A|) A positions and the last m − |A| B
    positions (where m > |A|), its real tokens (and its padding) in order in the other positions;
    that sequence is matched by ToMe (:func:`brute_force_dest`) with every padding row scoring
    +inf into the first B token; each token takes the destination of its position."""
    dest = torch.empty(metric.shape[:2], dtype=torch.long)
    t = metric.shape[1]
    a = [i for i in range(p, t) if i % 2 == 0]
    b = [i for i in range(p, t) if i % 2 == 1]
    for n in range(metric.shape[0]):
        pads = [i for i in range(p, t) if padding[n, i]]
        in_a = min(len(pads), len(a))
        pad_slots = sorted(a[len(a) - in_a :] + b[len(b) - (len(pads) - in_a) :])
        real_slots = [i for i in range(p, t) if i not in pad_slots]
        slot_of = dict(zip([i for i in range(p, t) if not padding[n, i]], real_slots)) | dict(zip(pads, pad_slots))
        order = list(range(p)) + sorted(range(p, t), key=lambda i: slot_of[i])  # order[slot] = token
        moved = metric[n : n + 1, order]

        def penalty(_: int, i: int, j: int) -> float:  # (−inf: a score of +inf, for padding into b[0])
            return -math.inf if i in pad_slots and j == b[0] else 0.0

        moved_dest = brute_force_dest(moved, r, p, penalty)[0]
        dest[n] = torch.tensor([moved_dest[slot_of.get(i, i)] for i in range(t)])
    return dest


@pytest.mark.parametrize("t,p", [(12, 1), (13, 4), (33, 1), (34, 8)])
def test_padding_first_matching_lays_out_tokens_as_documented(t: int, p: int) -> None:
    """The matching equals the documented layout built by loops: every real token's destination
    exactly (which real tokens pair up, and the output order), padding's as a multiset (the
    order of padding among the padding positions is not promised: any order merges the same
    real tokens)."""
    gen = torch.Generator().manual_seed(t * 100 + p)
    n = t - p
    num_a = len(range(p % 2, n, 2))
    counts = sorted({1, 2, num_a - 1, num_a, num_a + 1} & set(range(1, n)))
    padding = torch.zeros(len(counts), t, dtype=torch.bool)
    for row, m in enumerate(counts):
        padding[row, p + torch.randperm(n, generator=gen)[:m]] = True
    metric = torch.randn(len(counts), t, 6, generator=gen)
    for r in range(1, max_bipartite_r(t, p) + 1):
        got = padding_first_matching(metric, padding, r, p, backend="torch")
        expected = documented_padding_first_dest(metric, padding, r, p)
        for row, m in enumerate(counts):
            real, pad = ~padding[row], padding[row]
            assert torch.equal(got[row][real], expected[row][real]), (r, m)
            assert got[row][pad].sort().values.tolist() == expected[row][pad].sort().values.tolist(), (r, m)


def test_ties_break_to_lowest_index() -> None:
    # Every token identical: all scores tie, so the first A tokens merge into the first B token.
    metric = torch.ones(1, 9, 4)
    dest = bipartite_soft_matching(metric, 2, 1)
    assert torch.equal(dest, brute_force_dest(metric, 2, 1))
    # prefix 0 stays; A = 2,4,6,8 (2 and 4 merge into B[0] = token 1); B = 1,3,5,7
    assert dest.tolist() == [[0, 3, 3, 4, 3, 5, 1, 6, 2]]


def test_matching_is_a_valid_assignment() -> None:
    torch.manual_seed(0)
    metric = torch.randn(4, 197, 32)
    dest = bipartite_soft_matching(metric, 40, 1)
    assert dest.min() == 0 and dest.max() == 197 - 40 - 1
    for row in dest:  # every output slot receives at least one token
        assert torch.equal(row.unique(), torch.arange(157))
    assert (dest[:, 0] == 0).all()


def near_copies(batch: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    """bf16 tokens 5 % off one direction per sample (keys as autocast makes them): cosines
    distinct in float32 that bf16 (spacing 2**-8 below 1) rounds to a few values."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(batch, 1, dim, generator=generator)
    return (direction + 0.05 * torch.randn(batch, tokens, dim, generator=generator)).bfloat16()


@pytest.mark.parametrize("pos_weight", [0.0, 0.02])
def test_matching_scores_in_float32_under_autocast(pos_weight: float) -> None:
    """Under bf16 autocast the torch path scores in float32, as the match kernel does: the
    scores, partners and merges of the same keys without autocast, bit for bit (bf16 scores
    would tie these near copies), with the positional penalty too."""
    metric = near_copies(2, 65, 24, seed=7)
    pos = torch.rand(2, 65, 2, generator=torch.Generator().manual_seed(8))

    def match() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        score, partner = bipartite_best_match(metric, 1, pos, pos_weight, backend="torch")
        return score, partner, bipartite_soft_matching(metric, 16, 1, backend="torch")

    expected = match()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        matched = match()
    assert torch.equal(matched[2], expected[2]) and torch.equal(matched[1], expected[1])  # merges, partners
    assert matched[0].dtype == torch.float32 and torch.equal(matched[0], expected[0])


def test_r_above_cap_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        bipartite_soft_matching(torch.randn(1, 10, 4), 5, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_wavg_equals_loop(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 11, 5).to(dtype)
    size = torch.randint(1, 4, (2, 11, 1)).float()
    dest = bipartite_soft_matching(torch.randn(2, 11, 3), 4, 1)
    merged, new_size = merge_wavg(x, size, dest, 7)
    assert merged.dtype == dtype and new_size.dtype == torch.float32
    for n in range(2):
        for o in range(7):
            members = (dest[n] == o).nonzero().flatten()
            s = size[n, members]
            expected = (x[n, members].float() * s).sum(0) / s.sum()
            torch.testing.assert_close(merged[n, o].float(), expected, atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=1e-2)
            assert new_size[n, o, 0] == s.sum()


@pytest.mark.parametrize("size_dtype,count", [(torch.bfloat16, 301), (torch.float16, 4097)])
def test_half_precision_sizes_are_summed_in_float32(size_dtype: torch.dtype, count: int) -> None:
    """Sizes given in bf16 (integers exact up to 256) or fp16 (up to 2048), which
    ``kernels.merge_wavg`` routes here, are summed in float32 like the tokens: ``count`` size-1
    tokens merged into one sum to exactly ``count``, and the average of equal tokens is that
    token (a sum kept in the size's dtype rounded 301 to 300: an average 301/300 too large)."""
    torch.manual_seed(2)
    value = torch.randn(1, 1, 6)
    x = torch.cat([value.expand(1, count, 6), torch.randn(1, 2, 6)], dim=1)
    size = torch.ones(1, count + 2, 1, dtype=size_dtype)
    size[0, -1] = 3.0
    dest = torch.cat([torch.zeros(count, dtype=torch.long), torch.tensor([1, 1])]).unsqueeze(0)
    merged, new_size = merge_wavg(x, size, dest, 2)
    # (float32 sums of thousands of terms round to ~1e-5; the rounded sizes were off by 3e-3)
    torch.testing.assert_close(merged[0, 0], value[0, 0], atol=1e-4, rtol=1e-4)
    expected = (x[0, -2].double() + 3 * x[0, -1].double()) / 4
    torch.testing.assert_close(merged[0, 1].double(), expected, atol=1e-6, rtol=1e-6)
    assert new_size.flatten().tolist() == [count, 4.0] and new_size.dtype == torch.float32


def test_float64_merges_in_float64_and_passes_gradcheck() -> None:
    """A float64 model (the precision gradcheck needs) keeps float64 through the merge: the
    average equals the loop's to float64 rounding, and its gradient the finite differences'
    (accumulating in float32, as for bf16/fp16, rounds x to 24 bits: gradcheck fails)."""
    torch.manual_seed(1)
    x = (torch.randn(2, 11, 5, dtype=torch.float64) * 100 + 1 / 3).requires_grad_(True)
    size = torch.randint(1, 4, (2, 11, 1)).float()
    dest = bipartite_soft_matching(torch.randn(2, 11, 3), 4, 1)
    merged, _ = merge_wavg(x, size, dest, 7)
    for n in range(2):
        for o in range(7):
            members = (dest[n] == o).nonzero().flatten()
            s = size[n, members].double()
            expected = (x[n, members] * s).sum(0) / s.sum()
            torch.testing.assert_close(merged[n, o], expected, atol=1e-12, rtol=1e-13)
    assert torch.autograd.gradcheck(lambda t: merge_state(start_state(t, False), dest, 7).x, (x,))


def test_a_fused_token_of_a_float64_model_is_averaged_in_float64() -> None:
    """EViT's fused token (keep_top_tokens with fuse_weights) of a float64 model: the weighted
    average of the dropped tokens to float64 rounding, and gradcheck passes through it."""
    torch.manual_seed(3)
    x = (torch.randn(2, 9, 4, dtype=torch.float64) * 100 + 1 / 3).requires_grad_(True)
    scores, weights = torch.randn(2, 8, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64) + 0.1
    state = keep_top_tokens(start_state(x, False), scores, 5, 1, fuse_weights=weights)
    dropped = scores.argsort(dim=1, descending=True)[:, 5:]
    for n in range(2):
        w = weights[n, dropped[n]].unsqueeze(-1)
        expected = (x[n, 1 + dropped[n]] * w).sum(0) / w.sum()
        torch.testing.assert_close(state.x[n, -1], expected, atol=1e-12, rtol=1e-13)
    assert torch.autograd.gradcheck(lambda t: keep_top_tokens(start_state(t, False), scores, 5, 1, weights).x, (x,))


def test_state_bookkeeping_through_several_merges() -> None:
    torch.manual_seed(2)
    state = start_state(torch.randn(2, 30, 8), trace_source=True)
    for r in (6, 5, 4):
        dest = bipartite_soft_matching(state.x, r, 2)
        state = merge_state(state, dest, state.num_tokens - r)
    assert state.num_tokens == 15
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), 30.0))
    source = source_matrix(state.source_index, state.num_tokens)
    assert torch.equal(source.sum(dim=-1).float(), state.size[..., 0])  # sizes = patches covered
    assert torch.equal(source.sum(dim=1), torch.ones(2, 30, dtype=source.dtype))  # each input once
    assert torch.equal(state.source_index[:, :2], torch.tensor([[0, 1], [0, 1]]))  # prefix kept


def test_unmerge_of_merged_constant_regions_is_exact() -> None:
    # A = positions 0,2,4,6 and B = 1,3,5,7; the first three A tokens have an identical B partner
    # (cosine 1), the last does not. Merging r=3 averages identical tokens, so unmerging gives
    # every input token its own value back, bit for bit.
    torch.manual_seed(3)
    v = torch.randn(5, 16)
    x = torch.stack([v[0], v[0], v[1], v[1], v[2], v[2], v[3], v[4]])[None]
    state = merge_state(start_state(x, trace_source=True), bipartite_soft_matching(x, 3, 0), 5)
    assert state.size.flatten().tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]
    assert torch.equal(unmerge(state.x, state.source_index), x)


def test_merging_after_dropping_keeps_dropped_sources_dropped() -> None:
    from tokenprune.merge import drop_tokens

    state = start_state(torch.randn(1, 6, 4), trace_source=True)
    state = drop_tokens(state, torch.tensor([[0, 2, 3, 5]]))  # inputs 1 and 4 dropped
    state = merge_state(state, torch.tensor([[0, 1, 1, 2]]), 3)  # kept 2 and 3 merge
    assert state.source_index.tolist() == [[0, -1, 1, 1, -1, 2]]


def test_sizes_default_to_ones() -> None:
    state = TokenState(torch.randn(2, 5, 3))
    assert state.size is None and torch.equal(state.sizes(), torch.ones(2, 5, 1))

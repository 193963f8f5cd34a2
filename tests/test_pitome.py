"""PiToMe (method="pitome"): energy-protected merging against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch

import tokenprune
from tests.pitome_reference import pitome_match
from tests.test_patch import counted_flops, image, make
from tests.tome_reference import tome_reference_forward
from tokenprune.merge import bipartite_soft_matching
from tokenprune.methods.pitome import default_margins, energy_matching, energy_scores
from tokenprune.schedule import resolve_r


@pytest.mark.parametrize(
    "family,extra", [("vit_cls", {}), ("deit_distilled", {}), ("vit_cls", {"reg_tokens": 4})]
)  # fmt: skip
@pytest.mark.parametrize(
    "options", [{"r": 8}, {"r": (16, -1)}, {"r": 13, "prop_attn": False}, {"r": 16, "margin": 0.3, "alpha": 0.5}]
)  # fmt: skip
def test_matches_the_reference(family: str, extra: dict, options: dict) -> None:
    """Logits equal the reference's, whose token order differs (protected tokens in energy
    order, then the B tokens): the merging is the same, the order does not matter. (The
    reference raises NearTie on inputs where float rounding could decide a merge.)"""
    model = make(family, **extra)
    depth = len(model.blocks)
    config = tokenprune.PiToMeConfig(**options)
    margin = options.get("margin")  # the released schedule written out, not read from the config
    margins = [0.9 - 0.8 * block / depth for block in range(depth)] if margin is None else [margin] * depth

    def match(metric, r, block):
        return pitome_match(metric, r, model.num_prefix_tokens, margins[block], config.alpha)

    counts = list(resolve_r(config.r, depth))
    expected = tome_reference_forward(model, image(), counts, config.prop_attn, match)
    expected_tokens, expected_size = tome_reference_forward(model, image(), counts, config.prop_attn, match, tokens=True)
    tokenprune.patch(model, config)
    with torch.no_grad():
        logits = model(image())
        state = model.forward_tokens(image())
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits, make(family, **extra)(image()), atol=1e-3)
    # The logits read the class token, which no merge in the last block reaches: the final
    # tokens and sizes must match too, as sets (the two orders differ).
    for b in range(2):
        ours, reference = torch.cat([state.x[b], state.size[b]], -1), torch.cat([expected_tokens[b], expected_size[b]], -1)
        distance = torch.cdist(ours, reference, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not |a|²+|b|²-2ab
        nearest = distance.argmin(dim=1)
        assert sorted(nearest.tolist()) == list(range(state.num_tokens))  # one to one
        assert distance.min(dim=1).values.max() < 1e-4


@pytest.mark.parametrize("margin", [0.9, 0.5, 0.1667, -0.2])
@pytest.mark.parametrize("prefix,r", [(0, 1), (1, 4), (1, 12), (2, 12), (5, 7)])  # 12: the cap of 25 tokens
def test_each_merge_equals_the_reference(margin: float, prefix: int, r: int) -> None:
    """One merge on its own, where the logits would not see it (a class-token model's last
    block): the tokens that ``dest`` sums together are the reference's groups, up to order."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(3, prefix + 25, 16, generator=generator)
    x = torch.randn(3, prefix + 25, 6, dtype=torch.float64, generator=generator)
    dest = energy_matching(metric, r, prefix, margin, alpha=0.7)
    ours = x.new_zeros(3, prefix + 25 - r, 6).scatter_add_(1, dest.unsqueeze(-1).expand_as(x), x)
    expected = pitome_match(metric, r, prefix, margin, alpha=0.7)(x, "sum")
    assert torch.equal(ours[:, :prefix], expected[:, :prefix])

    def by_first_channel(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, t[..., :1].argsort(dim=1).expand_as(t))

    torch.testing.assert_close(by_first_channel(ours), by_first_channel(expected), atol=1e-12, rtol=0)


def test_the_released_margin_schedule_reaches_every_block_and_r_is_capped() -> None:
    model = tokenprune.patch(make("vit_cls"), "pitome", r=16)
    assert [block.reducer.margin for block in model.blocks] == pytest.approx([0.9 - 0.8 * i / 12 for i in range(12)])
    with torch.no_grad():  # 16 in each of 11 blocks, then the last block's cap: half of its 20 patches
        assert model.forward_tokens(image()).num_tokens == 1 + 196 - 16 * 11 - 10


def test_energy_by_its_definition() -> None:
    unit = torch.nn.functional.normalize(torch.randn(2, 7, 5, dtype=torch.float64), dim=-1)
    margin, alpha = 0.3, 0.7
    energy, similarity = energy_scores(unit, margin, alpha)
    for b in range(2):
        for i in range(7):
            terms = []
            for j in range(7):
                cos = float(unit[b, i] @ unit[b, j])
                terms.append(cos - margin if cos >= margin else alpha * (math.exp(cos - margin) - 1))
                assert similarity[b, i, j].item() == pytest.approx(cos)
            assert energy[b, i].item() == pytest.approx(sum(terms) / 7)


def test_energy_scores_in_float32_under_autocast() -> None:
    """Under bf16 autocast the energies, similarities and merges are those of float32, bit for
    bit: bf16 similarities of these near copies (keys 5 % off one direction) would round into
    ties and reorder the energies."""
    generator = torch.Generator().manual_seed(4)
    metric = (torch.randn(2, 1, 24, generator=generator) + 0.05 * torch.randn(2, 41, 24, generator=generator)).bfloat16()
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    expected = energy_scores(unit, 0.9, 1.0), energy_matching(metric, 12, 1, 0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (energy, similarity), dest = energy_scores(unit, 0.9, 1.0), energy_matching(metric, 12, 1, 0.9)
    assert torch.equal(dest, expected[1])
    assert similarity.dtype == torch.float32
    assert torch.equal(energy, expected[0][0]) and torch.equal(similarity, expected[0][1])


def test_isolated_tokens_are_protected() -> None:
    """Sixteen near-copies of one direction (background) and four distinct directions, on
    ToMe's A side: every PiToMe merge happens inside the background and the four keep their
    own slots, where ToMe at r=8 must merge some of them (8 of its 10 A tokens go)."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    metric = basis[0] + 0.05 * torch.randn(20, 16, generator=generator)
    isolated = [2, 6, 10, 14]
    metric[isolated] = basis[1:5]
    metric = metric.unsqueeze(0)
    for r in (4, 8):
        dest = energy_matching(metric, r, num_protected=0, margin=0.5)
        counts = torch.bincount(dest[0])
        assert len(counts) == 20 - r and counts.min() == 1  # r tokens gone, every slot used
        assert all(counts[dest[0, i]] == 1 for i in isolated)
        assert dest[0, isolated].tolist() == sorted(dest[0, isolated].tolist())  # order kept
    tome_dest = bipartite_soft_matching(metric, 8, num_protected=0)[0]
    assert torch.bincount(tome_dest)[tome_dest[isolated]].max() > 1


def test_merge_bookkeeping_and_prefix_tokens() -> None:
    model = tokenprune.patch(make("registers"), "pitome", r=(16, -1), trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
    p = model.num_prefix_tokens
    assert state.num_tokens == tokenprune.plan(model, 224).output_tokens
    assert torch.equal(state.size[:, :p], torch.ones(2, p, 1))
    assert torch.equal(state.size.sum(1), torch.full((2, 1), 5.0 + 256))
    counts = torch.nn.functional.one_hot(state.source_index, state.num_tokens).sum(1)
    assert torch.equal(counts.unsqueeze(-1).float(), state.size)
    assert torch.equal(state.source_index[:, :p], torch.arange(p).expand(2, -1))


def test_video_model_merges_space_time_tokens() -> None:
    from tests.test_video_reduction import make_clip, make_model

    model = tokenprune.patch(make_model(), "pitome", r=40, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(make_clip())
    num_tubelets = state.source_index.shape[1]
    assert num_tubelets == 64  # no prefix token; each of the 3 blocks merges its cap, half
    assert state.num_tokens == tokenprune.plan(model, tuple(make_clip().shape[1:])).output_tokens == 64 - 32 - 16 - 8
    assert torch.equal(state.size.sum(1), torch.full((state.x.shape[0], 1), float(num_tubelets)))


@pytest.mark.parametrize("family", ["vit_cls", "registers", "eva02_rope", "beit_relpos"])
@pytest.mark.parametrize("r", [8, (8, -1)])
def test_flops_agree_with_flop_counter(family: str, r) -> None:
    model = make(family).requires_grad_(False)
    tokenprune.patch(model, "pitome", r=r)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


@pytest.mark.parametrize("family", ["registers", "dinov3_rope_registers"])
def test_fullgraph_capture(family: str) -> None:
    torch._dynamo.reset()
    model = tokenprune.patch(make(family), "pitome", r=(8, -1))
    with torch.no_grad():
        expected = model(image())
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(image()), expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_merged_tokens() -> None:
    """Training with PiToMe: the merge is differentiable (the choice of tokens is not)."""
    model = tokenprune.patch(make("vit_cls", depth=3), "pitome", r=16).train()
    assert model.forward_tokens(image()).num_tokens == 197 - 3 * 16
    model(image()).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_margins_and_bad_options() -> None:
    assert default_margins(4) == pytest.approx((0.9, 0.7, 0.5, 0.3))
    assert tokenprune.PiToMeConfig(r=4, margin=0.2).margins(3) == (0.2, 0.2, 0.2)
    model = tokenprune.patch(make("vit_cls", depth=2), "pitome", r=4, margin=[0.8, 0.1])
    assert [block.reducer.margin for block in model.blocks] == [0.8, 0.1]
    with pytest.raises(ValueError, match="one per block"):
        tokenprune.patch(make("vit_cls", depth=2), "pitome", r=4, margin=[0.8, 0.5, 0.1])
    with pytest.raises(ValueError, match=r"margin must be a cosine similarity in \[-1, 1\]"):
        tokenprune.PiToMeConfig(r=4, margin=1.5)
    with pytest.raises(ValueError, match=r"margin must be .* got None"):
        tokenprune.PiToMeConfig(r=4, margin=[0.5, None])
    with pytest.raises(ValueError, match=r"r must be in \[1, 2\]"):
        energy_matching(torch.randn(1, 6, 4), 3, num_protected=1, margin=0.5)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        tokenprune.PiToMeConfig(r=4, alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        tokenprune.PiToMeConfig(r=4, alpha=True)
    with pytest.raises(TypeError, match="method 'pitome' has no option window"):
        tokenprune.patch(make("vit_cls", depth=2), "pitome", r=4, window=2)


def test_dense_fidelity_names_pitome_settings() -> None:
    from evals.dense_fidelity import COMPARED, describe

    assert describe(tokenprune.PiToMeConfig(r=(16, -1))) == "r=(16,-1)"
    assert describe(tokenprune.PiToMeConfig(r=8, margin=0.5, alpha=0.5)) == "r=8, margin=0.5, α=0.5"
    assert all(isinstance(config, tokenprune.PiToMeConfig) for config in COMPARED["pitome"].settings)
    assert [25, 23, 20, 18, 17, 15, 13, 12, 11, 10, 9, 8] in [config.r for config in COMPARED["pitome"].settings]


def test_flops_count_no_energy_where_a_block_cannot_merge() -> None:
    """At 32x32 (4 patches) r=2 leaves one mergeable token from block 2 on: those blocks merge
    nothing and skip the energy matmul, as the count must."""
    model = make("vit_cls", img_size=32, depth=4).requires_grad_(False)
    tokenprune.patch(model, "pitome", r=2)
    assert tokenprune.plan(model, 32).removed == (2, 1, 0, 0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert tokenprune.flops(model, 32, batch_size=2).total == counted_flops(model, x)


def test_margin_bounds_and_list_length() -> None:
    for margin in (-1.0, 1.0, [-1.0, 1.0]):  # the closed interval [-1, 1]
        assert tokenprune.PiToMeConfig(r=4, margin=margin)
    with pytest.raises(ValueError, match="one per block"):  # too short, as too long, is refused
        tokenprune.patch(make("vit_cls", depth=2), "pitome", r=4, margin=[0.8])
    with pytest.raises(ValueError, match=r"r must be in \[1, 2\]"):  # r = 0 too
        energy_matching(torch.randn(1, 6, 4), 0, num_protected=1, margin=0.5)


def _brute_force_dest(metric: torch.Tensor, r: int, p: int, margin: float, alpha: float) -> torch.Tensor:
    """energy_matching's documented rules written as loops: energy order highest first, ties by
    the lower index; A = 1st, 3rd, ... candidates, B = 2nd, 4th, ...; each A token's partner is
    its most similar B token, ties to the higher-energy (earlier) B token."""
    from tokenprune.merge import unit_vectors
    from tokenprune.methods.pitome import energy_scores

    rows = []
    for b in range(metric.shape[0]):
        energy, sim = energy_scores(unit_vectors(metric[b : b + 1, p:]), margin, alpha)
        energy, sim = energy[0].tolist(), sim[0].tolist()
        n = len(energy)
        order = sorted(range(n), key=lambda i: (-energy[i], i))
        a_side, b_side = order[0 : 2 * r : 2], order[1 : 2 * r : 2]
        partner = {}
        for a in a_side:
            best = b_side[0]
            for cand in b_side[1:]:
                if sim[a][cand] > sim[a][best]:
                    best = cand
            partner[a] = best
        survivors = [i for i in range(n) if i not in partner]
        slot = {i: k for k, i in enumerate(survivors)}
        rows.append(list(range(p)) + [p + slot[partner.get(i, i)] for i in range(n)])
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix,r", [(0, 3), (1, 5), (2, 6)])
def test_energy_matching_breaks_exact_ties_as_documented(seed: int, prefix: int, r: int) -> None:
    """Duplicate tokens (a flat background) tie exactly in energy and in similarity: the order
    and the partner are then the documented ones, not whatever the sort or argmax returns."""
    generator = torch.Generator().manual_seed(seed)
    distinct = torch.randn(3, 8, generator=generator)
    picks = torch.randint(0, 3, (2, prefix + 14), generator=generator)
    metric = distinct[picks]
    dest = energy_matching(metric, r, prefix, margin=0.3, alpha=1.0)
    assert torch.equal(dest, _brute_force_dest(metric, r, prefix, 0.3, 1.0))


def test_non_finite_alpha_is_refused() -> None:
    """α = ∞ would make every dissimilar pair subtract ∞ (energies −∞/NaN): refused like α ≤ 0."""
    for alpha in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="alpha must be a positive number"):
            tokenprune.PiToMeConfig(r=4, alpha=alpha)

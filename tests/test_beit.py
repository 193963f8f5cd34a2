"""timm Beit (BEiT, BEiT v2): ToMe against an independent reference with the relative position
bias following merged tokens. (Exactness at r=0, merge invariants, FLOPs and compilation run
for the BEiT families of tests/test_patch.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tokenprune
from tests.test_patch import image, make
from tests.tome_reference import _match
from tokenprune.merge import drop_tokens, mean_over_source_pairs, merge_state, source_matrix, start_state
from tokenprune.schedule import resolve_r


@torch.no_grad()
def beit_tome_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output tokens and sizes of an unpatched timm Beit run as published ToMe would run it,
    the relative position bias following the merged tokens.

    Written unlike tokenprune: a dense membership matrix W (token × input token, rows
    normalised) turns each bias B into W B Wᵀ; timm's own attention module runs with its table
    swapped for that, and with proportional attention (and the merged shared bias) as its
    ``shared_rel_pos_bias``; the keys are sliced from the qkv projection as timm computes it;
    merging is ToMe's published matching.
    """
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    batch, num_tokens, channels = x.shape
    size = torch.ones(batch, num_tokens, 1)
    member = torch.eye(num_tokens).expand(batch, -1, -1)
    for block, r in zip(model.blocks, r_per_block):
        attn = block.attn
        w = (member / member.sum(-1, keepdim=True)).unsqueeze(1)  # [B, 1, T, N]

        def over_pairs(bias: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            return w @ bias @ w.transpose(-1, -2)

        extra = size.log()[:, None, None, :, 0]
        if shared is not None:
            extra = extra + over_pairs(shared)
        if attn.relative_position_bias_table is not None:
            own = type(attn)._get_rel_pos_bias(attn)
            attn._get_rel_pos_bias = lambda own=own, over_pairs=over_pairs: over_pairs(own)
        h = block.norm1(x)
        attn_out = attn(h, shared_rel_pos_bias=extra)
        attn.__dict__.pop("_get_rel_pos_bias", None)
        qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        keys = qkv.reshape(batch, x.shape[1], 3, attn.num_heads, -1)[:, :, 1].mean(2)
        x = x + (attn_out if block.gamma_1 is None else block.gamma_1 * attn_out)
        if r:
            merge = _match(keys, r, class_token=True, distill_token=False)
            x, member, size = merge(x * size, "sum"), merge(member, "sum"), merge(size, "sum")
            x = x / size
        mlp_out = block.mlp(block.norm2(x))
        x = x + (mlp_out if block.gamma_2 is None else block.gamma_2 * mlp_out)
    assert channels == x.shape[-1]
    return model.norm(x), size


@pytest.mark.parametrize("family", ["beit_relpos", "beit_shared_relpos"])
@pytest.mark.parametrize("r", [8, (16, -1)])
def test_matches_the_reference_with_relative_position_bias(family: str, r) -> None:
    model = make(family)
    x = image()
    tokens, size = beit_tome_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        logits = model(x)
    assert state.num_tokens == tokenprune.plan(model, 224).output_tokens < 197
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)
    # BEiT's head: the size-weighted mean over the patch tokens, fc_norm, then the classifier
    pooled = (tokens[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
    torch.testing.assert_close(logits, model.head(model.fc_norm(pooled)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(3, 13, 13), (1, 3, 13, 13), (2, 3, 13, 13)])
def test_mean_over_source_pairs_against_the_membership_matrix(shape: tuple[int, ...]) -> None:
    """After merges and drops, the bias between two tokens is the mean over the pairs of input
    tokens they cover; dropped input tokens count nowhere."""
    generator = torch.Generator().manual_seed(0)
    batch, num_tokens = 2, 13
    bias = torch.randn(shape, generator=generator)
    state = start_state(torch.randn(batch, num_tokens, 4, generator=generator), trace_source=True)
    assert mean_over_source_pairs(bias, state) is bias
    dest = torch.cat([torch.arange(8).expand(batch, -1), torch.randint(1, 8, (batch, 5), generator=generator)], 1)
    state = merge_state(state, dest, 8, backend="torch")
    state = drop_tokens(state, torch.tensor([[0, 1, 2, 4, 5, 7], [0, 2, 3, 4, 6, 7]]))
    member = source_matrix(state.source_index, state.num_tokens).float()
    w = (member / member.sum(-1, keepdim=True)).unsqueeze(1)
    expected = w @ bias @ w.transpose(-1, -2)
    got = mean_over_source_pairs(bias, state)
    assert got.shape == (batch, 3, 6, 6)
    torch.testing.assert_close(got, expected)
    # The definition, pair by pair: the mean of bias(i, j) over the inputs i of t and j of u.
    per_sample = bias.expand(batch, *bias.shape[-3:])
    for b in range(batch):
        for t in range(6):
            for u in range(6):
                inputs_t = (state.source_index[b] == t).nonzero()[:, 0]
                inputs_u = (state.source_index[b] == u).nonzero()[:, 0]
                pairs = per_sample[b][:, inputs_t][:, :, inputs_u]
                torch.testing.assert_close(got[b, :, t, u], pairs.mean(dim=(1, 2)))


@pytest.mark.parametrize("method,options", [("local_global", {"local_block": 1}), ("evit", {"keep_ratio": 0.7})])
def test_other_methods_run_on_beit(method: str, options: dict) -> None:
    model = tokenprune.patch(make("beit_relpos"), method, trace_source=True, **options)
    with torch.no_grad():
        state = model.forward_tokens(image())
        logits = model(image())
    assert torch.isfinite(logits).all() and logits.shape == (2, 10)
    assert state.num_tokens == tokenprune.plan(model, 224).output_tokens < 197


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_unreduced_is_bit_identical(dtype: torch.dtype) -> None:
    """The relative position bias is not a keep mask: half-precision BEiT keeps timm's fused
    attention (no float32 softmax detour) and so its exact output at r=0."""
    model = make("beit_relpos").to(dtype)
    x = image().to(dtype)
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("fused", [True, False])
def test_both_biases_unreduced_is_bit_identical(fused: bool) -> None:
    """The block's table and the shared bias: timm's manual path adds them one after the other,
    its fused call their sum; both are reproduced bit for bit at r=0."""
    model = make("beit_relpos", use_shared_rel_pos_bias=True)
    model.rel_pos_bias.relative_position_bias_table.data.normal_(0.0, 1.0)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    with torch.no_grad():
        expected = model(image())
        tokenprune.patch(model, r=0)
        assert torch.equal(model(image()), expected)


def test_fusing_a_single_token_changes_nothing() -> None:
    """EViT leaving out exactly one token keeps it in place (fusing it alone would only move it),
    so the FLOPs of the bias between tokens are counted exactly (none: nothing merged)."""
    from tests.test_patch import counted_flops

    model = make("beit_relpos").requires_grad_(False)
    expected = model.forward_features(image())
    tokenprune.patch(model, "evit", keep_ratio=195 / 196, stages=(1,))
    assert tokenprune.plan(model, 224).tokens == (197, 197, 197)
    with torch.no_grad():
        state = model.forward_tokens(image())
    assert state.size is None and torch.equal(state.x, expected)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_block_and_shared_biases_both_follow_merged_tokens() -> None:
    """A block's own table and the model's shared bias together: between merged tokens, the
    sum of both, each averaged over the pairs of input tokens (unreduced, the two are
    test_both_biases_unreduced_is_bit_identical's)."""
    model = make("beit_relpos", use_shared_rel_pos_bias=True)
    model.rel_pos_bias.relative_position_bias_table.data.normal_(0.0, 1.0)
    x = image()
    tokens, size = beit_tome_reference(model, x, [8] * len(model.blocks))
    tokenprune.patch(model, r=8, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)


@pytest.mark.parametrize("method", ["evit", "dynamicvit"])
def test_pruned_tokens_keep_their_own_relative_position_bias(method: str) -> None:
    """Pruning without merging (no sizes): the bias between two kept tokens is the table's entry
    for their input tokens. Reference: timm's blocks, the kept tokens (read from the source map)
    selected after block 1's attention (EViT) or before it (DynamicViT), and each later block's
    table indexed by them."""
    model = make("beit_relpos")
    x = image(1)
    options = {"fuse": False} if method == "evit" else {}
    tokenprune.patch(model, method, keep_ratio=0.5, stages=(1,), trace_source=True, **options)
    with torch.no_grad():
        state = model.forward_tokens(x)
    kept = tokenprune.source(model)[0].float().argmax(-1)  # input token of each output token
    assert state.num_tokens == len(kept) == 1 + 98
    reference = copy.deepcopy(tokenprune.unpatch(model))
    with torch.no_grad():
        h = torch.cat((reference.cls_token.expand(1, -1, -1), reference.patch_embed(x)), dim=1)
        for index, block in enumerate(reference.blocks):
            if index == 1 and method == "dynamicvit":
                h = h[:, kept]
            if index > 1 or (index == 1 and method == "dynamicvit"):
                own = type(block.attn)._get_rel_pos_bias(block.attn)
                block.attn._get_rel_pos_bias = lambda own=own: own[..., kept, :][..., kept]
            h = h + block.gamma_1 * block.attn(block.norm1(h))
            if index == 1 and method == "evit":
                h = h[:, kept]
            h = h + block.gamma_2 * block.mlp(block.norm2(h))
    torch.testing.assert_close(state.x, reference.norm(h), atol=1e-4, rtol=1e-4)


def test_absolute_position_embedding_is_added() -> None:
    """BEiT created with ``use_abs_pos_emb=True`` (timm's class default): its embedding is added
    to the tokens, unreduced bit for bit and merged as the reference runs it."""
    model = make("beit_relpos", use_abs_pos_emb=True)
    model.pos_embed.data.normal_(0.0, 1.0)
    x = image()
    with torch.no_grad():
        expected = model(x)
    tokens, size = beit_tome_reference(model, x, [8] * len(model.blocks))
    tokenprune.patch(model, r=0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    tokenprune.patch(model, r=8, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)

"""timm Eva (EVA-02, DINOv3, PE, RoPE-ViT): ToMe against an independent reference with RoPE,
RoPE following merged tokens, and the other methods on Eva. (Exactness at r=0, merge
invariants, FLOPs and compilation run for the Eva families of tests/test_patch.py.)"""

from __future__ import annotations

import pytest
import torch

import tokenprune
from tests.test_patch import image, make
from tests.tome_reference import _match
from tokenprune.merge import drop_tokens, mean_over_sources, merge_state, source_matrix, start_state
from tokenprune.schedule import resolve_r


def eva_tome_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output tokens and sizes of an unpatched timm Eva with one class token, run as published
    ToMe would run it, RoPE following the merged tokens.

    Written unlike tokenprune: a dense membership matrix (token × input token) merged along
    with the tokens gives each token's RoPE as the mean of its patches' rows; timm's own
    attention module runs with that RoPE and proportional attention as its float mask; the keys
    come from a hook on its ``k_norm`` (before RoPE); merging is ToMe's published matching.
    """
    x = model.patch_embed(x)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    batch, num_tokens, _ = x.shape
    size = torch.ones(batch, num_tokens, 1)
    member = torch.eye(num_tokens).expand(batch, -1, -1)
    for i, (block, r) in enumerate(zip(model.blocks, r_per_block)):
        rows = rope[i] if model.rope_mixed else rope  # [N, D] or [heads, N, D]
        patches = member[:, 1:, 1:]
        block_rope = (patches / patches.sum(-1, keepdim=True)).unsqueeze(1) @ rows
        keys: list[torch.Tensor] = []
        hook = block.attn.k_norm.register_forward_hook(lambda module, args, out: keys.append(out))
        attn_out = block.attn(block.norm1(x), rope=block_rope, attn_mask=size.log()[:, None, None, :, 0])
        hook.remove()
        x = x + (attn_out if block.gamma_1 is None else block.gamma_1 * attn_out)
        if r:
            merge = _match(keys[0].mean(1), r, class_token=True, distill_token=False)
            x, member, size = merge(x * size, "sum"), merge(member, "sum"), merge(size, "sum")
            x = x / size
        mlp_out = block.mlp(block.norm2(x))
        x = x + (mlp_out if block.gamma_2 is None else block.gamma_2 * mlp_out)
    return model.norm(x), size


@pytest.mark.parametrize("family", ["eva02_rope", "rope_mixed", "rope_gqa", "pe_map_rope"])
@pytest.mark.parametrize("r", [8, (16, -1)])
def test_matches_the_reference_with_rope(family: str, r) -> None:
    model = make(family)
    x = image()
    with torch.no_grad():
        tokens, size = eva_tome_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        logits = model(x)
    assert state.num_tokens == tokenprune.plan(model, 224).output_tokens < tokenprune.plan(model, 224).tokens[0]
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)
    if model.global_pool == "avg":  # the size-weighted mean over the patch tokens, then timm's head
        pooled = (tokens[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
        torch.testing.assert_close(logits, model.head(model.fc_norm(pooled)), atol=1e-4, rtol=1e-4)


def test_gradients_match_the_reference_through_merged_rope() -> None:
    """Training through merging: every parameter's gradient, the learned per-block RoPE
    frequencies of "mixed" RoPE included (they reach the loss through the averaged rows)."""
    model = make("rope_mixed")
    x = image()
    tokens, _ = eva_tome_reference(model, x, [8] * len(model.blocks))
    tokens.square().mean().backward()
    expected = {name: p.grad for name, p in model.named_parameters()}  # None: the head (not in the loss)
    model.zero_grad(set_to_none=True)
    tokenprune.patch(model, r=8, backend="torch")
    model.forward_tokens(x).x.square().mean().backward()
    assert expected["rope.freqs"].abs().sum() > 0
    for name, p in model.named_parameters():
        if expected[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_blocks_before_the_first_merge_are_bit_identical() -> None:
    """Until a block merges, its tokens get timm's RoPE tensor itself, not an average."""
    model = make("eva02_rope")
    with torch.no_grad():
        _, expected = model.forward_intermediates(image(), indices=[0, 1, 2])
        tokenprune.patch(model, r=[0, 0, 8, 8])
        _, got = model.forward_intermediates(image(), indices=[0, 1, 2])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.allclose(got[2], expected[2])


@pytest.mark.parametrize("shape", [(12, 6), (3, 12, 6), (2, 3, 12, 6)])
def test_mean_over_sources_against_the_membership_matrix(shape: tuple[int, ...]) -> None:
    """After merges and drops, each token's row is the mean of its patches' rows; dropped
    patches count nowhere."""
    generator = torch.Generator().manual_seed(0)
    prefix, patches, batch = 1, 12, 2
    values = torch.randn(shape, generator=generator)
    state = start_state(torch.randn(batch, prefix + patches, 4, generator=generator), trace_source=True)
    assert mean_over_sources(values, state, prefix) is values
    dest = torch.cat([torch.zeros(batch, 1, dtype=torch.long), 1 + torch.randint(0, 7, (batch, patches), generator=generator)], 1)
    dest[:, 1:8] = torch.arange(1, 8)  # every output slot is used
    state = merge_state(state, dest, 8, backend="torch")
    state = drop_tokens(state, torch.tensor([[0, 1, 2, 4, 5, 7], [0, 2, 3, 4, 6, 7]]))
    member = source_matrix(state.source_index, state.num_tokens)[:, prefix:, prefix:].float()
    expected = (member / member.sum(-1, keepdim=True)).unsqueeze(1) @ values
    got = mean_over_sources(values, state, prefix, backend="torch")
    assert got.shape == (batch, shape[-3] if len(shape) > 2 else 1, 5, 6)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "method,options",
    [
        ("local_global", {}),
        ("evit", {"keep_ratio": 0.7}),
        ("dynamicvit", {"keep_ratio": 0.7}),
    ],
)
def test_other_methods_run_on_eva_with_registers(method: str, options: dict) -> None:
    model = tokenprune.patch(make("dinov3_rope_registers"), method, trace_source=True, **options)
    with torch.no_grad():
        state = model.forward_tokens(image())
        logits = model(image())
    assert torch.isfinite(logits).all() and logits.shape == (2, 10)
    assert state.num_tokens == tokenprune.plan(model, 224).output_tokens < 201
    source = tokenprune.source(model)
    eye = torch.eye(5, 201, dtype=source.dtype)  # the class token and four registers stay first, alone
    assert torch.equal(source[:, :5], eye.expand(2, -1, -1))


def test_forward_intermediates_of_eva() -> None:
    model = make("dinov3_rope_registers")
    with torch.no_grad():
        expected = model.forward_intermediates(image(), indices=[1, 3])
        tokenprune.patch(model, r=0)
        unreduced = model.forward_intermediates(image(), indices=[1, 3])
        tokenprune.patch(model, r=8)
        final, inter = model.forward_intermediates(image(), indices=[1, 3])
    assert torch.equal(unreduced[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(unreduced[1], expected[1]))
    assert final.shape == expected[0].shape and [f.shape for f in inter] == [(2, 384, 14, 14)] * 2


@pytest.mark.parametrize("family", ["eva02_rope", "rope_mixed"])
def test_dynamic_image_size_takes_the_rope_of_each_size(family: str) -> None:
    model = make(family, dynamic_img_size=True)
    x = image(2, 280 if family == "eva02_rope" else 288)  # another grid than the 224 one
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        state = model.forward_tokens(x)
    assert state.num_tokens == tokenprune.plan(model, x.shape[-1]).output_tokens
    assert torch.isfinite(state.x).all()


def test_patch_dropout_while_training_is_refused() -> None:
    model = make("eva02_rope", patch_drop_rate=0.25).train()
    torch.manual_seed(0)
    expected = model(image(1))
    tokenprune.patch(model, r=0)  # nothing reduced: timm's patch dropout and its batched RoPE as they are
    torch.manual_seed(0)
    assert torch.equal(model(image(1)), expected)
    tokenprune.patch(model, r=4)
    with pytest.raises(ValueError, match="patch_drop_rate=0"):
        model(image(1))
    model.eval()  # timm's patch dropout is off in eval: a reduced model runs
    with torch.no_grad():
        assert model(image(1)).shape == (1, 10)


def test_intermediates_take_evas_positional_order() -> None:
    """timm's Eva has attn_mask where ViT has output_dict: positional calls keep their meaning."""
    model = make("eva02_rope")
    x = image()
    with torch.no_grad():
        expected_final, expected = model.forward_intermediates(x, [1], False, True, False, "NLC", False, None)
        tokenprune.patch(model, r=0)
        final, maps = model.forward_intermediates(x, [1], False, True, False, "NLC", False, None)
    assert torch.equal(final, expected_final) and torch.equal(maps[0], expected[0])


def test_separate_qkv_projections() -> None:
    """EvaAttention with three linears (``qkv_fused=False``, as several timm Eva models are
    built): q, k and v from their own projections, unreduced bit for bit and merged as the
    reference runs timm's attention."""
    model = make("eva02_rope", qkv_fused=False, depth=2)
    assert model.blocks[0].attn.qkv is None
    x = image()
    with torch.no_grad():
        expected = model(x)
        tokens, size = eva_tome_reference(model, x, [8] * len(model.blocks))
    tokenprune.patch(model, r=0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    tokenprune.patch(model, r=8, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
    torch.testing.assert_close(state.x, tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.size, size)

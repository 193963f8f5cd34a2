"""Differential attention (timm ``DiffAttention``: ``vit_dlittle_*``, ``vit_dwee_*``) in ViT
blocks: ToMe against timm's own modules run on the unmerged grid; exactness at r=0 on both of
timm's paths; FLOPs; the other methods."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tests.test_naflexvit import _protected_match
from tests.test_patch import counted_flops
from tokenprune.schedule import resolve_r

SIZE = 128  # an 8 x 8 grid


def dwee(fused: bool = True, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"depth": 3, "num_classes": 10, "img_size": SIZE, **extra}
    model = timm.create_model("vit_dwee_patch16_reg1_gap_256", **kwargs).eval()
    for name, param in model.named_parameters():
        if name.endswith("gamma"):  # LayerScale away from its 1e-5 start
            param.data.uniform_(0.5, 1.5)
        if name.rsplit(".", 1)[-1].startswith("lambda_"):  # λ away from its near-constant start
            param.data.normal_(0.0, 0.5)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def grid_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and sizes of the unpatched model with ToMe's matching and proportional attention
    taken literally: timm's DiffAttention runs on the unmerged token grid, each merged token
    repeated once per input token it covers (both attention maps see the copies). No log s."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    batch, num_tokens, _ = x.shape
    member = torch.eye(num_tokens).expand(batch, -1, -1)  # [B, T, N] merged token × input token

    def on_grid(tokens: torch.Tensor) -> torch.Tensor:
        return member.transpose(1, 2) @ tokens

    def per_token(full: torch.Tensor) -> torch.Tensor:
        return (member @ full) / member.sum(-1, keepdim=True)

    for block, r in zip(model.blocks, r_per_block):
        h = block.norm1(x)
        x = x + block.ls1(per_token(block.attn(on_grid(h))))
        if r:
            attn = block.attn
            k = attn.qkv(h).chunk(3, dim=2)[1].reshape(batch, x.shape[1], 2 * attn.num_heads, attn.head_dim)
            merge = _protected_match(attn.k_norm(k.transpose(1, 2)).mean(1), r, model.num_prefix_tokens)
            total = merge(x * member.sum(-1, keepdim=True))
            member = merge(member)
            x = total / member.sum(-1, keepdim=True)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(on_grid(x))), member.sum(-1, keepdim=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("r", [6, (12, -1)])
def test_matches_the_grid_reference(fused: bool, r) -> None:
    model = dwee(fused)
    x = images()
    logits, size = grid_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        out = model(x)
    assert state.num_tokens == tokenprune.plan(model, SIZE).output_tokens < 1 + 64
    torch.testing.assert_close(state.size, size)
    torch.testing.assert_close(out, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{"fused": True}, {"fused": False}, {"qk_norm": True}])
def test_r0_is_bit_identical_and_unpatch_restores(options: dict) -> None:
    model = dwee(**options)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        assert not torch.allclose(model(x), expected)
        tokenprune.unpatch(model)
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("method", ["tome", "pitome", "local_global"])
def test_flops_agree_with_flop_counter(method: str) -> None:
    model = dwee().requires_grad_(False)
    options = {"r": 4, "local_block": 0} if method == "local_global" else {"r": (8, -1)}
    tokenprune.patch(model, method, **options)
    assert tokenprune.flops(model, SIZE, batch_size=2).total == counted_flops(model, images())


def test_learned_dropping_trains_and_prunes() -> None:
    """DynamicViT: the keep mask masks both maps while training; tokens leave at inference."""
    model = tokenprune.patch(dwee(), "dynamicvit", keep_ratio=0.7, stages=(1, 2))
    model.train()
    out = model(images())
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        assert model(images()).shape == (2, 10)
        assert model.forward_tokens(images()).num_tokens == tokenprune.plan(model, SIZE).output_tokens


def assert_keep_mask_hides_dropped_tokens(model: torch.nn.Module) -> None:
    """Changing the tokens a training keep mask dropped leaves the kept tokens' outputs of
    block 0 (which has no predictor of its own) as they were, to the mask's 1e-9 leak."""
    from tokenprune.merge import TokenState

    block = model.blocks[0]
    x = torch.randn(2, 9, model.embed_dim, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(2, 9, 1)
    keep[:, 4:7] = 0
    changed = x.clone()
    changed[:, 4:7] = 10 * torch.randn(2, 3, model.embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, out_changed = block(TokenState(x=x, keep=keep)).x, block(TokenState(x=changed, keep=keep)).x
    kept = keep[..., 0].bool()
    torch.testing.assert_close(out[kept], out_changed[kept], atol=1e-5, rtol=1e-5)


def assert_close_under_bfloat16_autocast(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.nn.functional.cosine_similarity(out.float(), expected).min() > 0.99


def test_a_training_keep_mask_masks_the_dropped_keys() -> None:
    """While training a pruning method, kept tokens must not see the dropped ones: changing the
    dropped tokens leaves the kept tokens' outputs as they were (to the mask's 1e-9 leak)."""
    assert_keep_mask_hides_dropped_tokens(tokenprune.patch(dwee(), "dynamicvit", keep_ratio=0.7, stages=(1, 2)))


# timm's RmsNorm (the sub-norm) warns that autocast's bf16 input meets its float32 weight
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bfloat16_autocast_with_merged_tokens() -> None:
    """Under autocast the residual stream stays float32 while q is bfloat16: the size bias must
    reach SDPA all the same."""
    assert_close_under_bfloat16_autocast(tokenprune.patch(dwee(), r=(8, -1)), images())


def test_fullgraph_capture() -> None:
    model = tokenprune.patch(dwee(), r=(8, -1))
    x = images()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), expected)


def test_q_and_k_take_their_own_norms() -> None:
    """qk_norm with trained-looking (unequal) q_norm and k_norm weights: unreduced bit for bit,
    merged as the grid reference runs timm's module."""
    model = dwee(qk_norm=True)
    gen = torch.Generator().manual_seed(4)
    for block in model.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            norm.weight.data = torch.rand(norm.weight.shape, generator=gen) + 0.5
            norm.bias.data = torch.randn(norm.bias.shape, generator=gen)
    x = images()
    with torch.no_grad():
        expected = model(x)
    logits, _ = grid_reference(model, x, [6] * len(model.blocks))
    tokenprune.patch(model, r=0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    tokenprune.patch(model, r=6, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_unreduced_gradients_are_timms(fused: bool) -> None:
    """Training through the patched attention: every parameter's gradient (λ's included) is
    timm's own at r=0."""
    model = dwee(fused).train()
    x = images()
    model(x).square().mean().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(expected[name].abs().sum() > 0 for name in expected if ".lambda_" in name)
    model.zero_grad(set_to_none=True)
    tokenprune.patch(model, r=0)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=0, rtol=0, msg=name)


def test_float16_training_keep_masks_are_refused() -> None:
    model = tokenprune.patch(dwee().half(), "dynamicvit", keep_ratio=0.7, stages=(1, 2)).train()
    with pytest.raises(ValueError, match="in float16 would round its keep mask's gradient to zero"):
        model(images().half())


def test_attention_map_methods_are_refused_naming_the_differential_attention() -> None:
    """A plain ViT ``Block`` built with ``attn_layer="diff"`` gives its reducer only keys through
    its DiffAttention: the refusal names that attention (before it named only "Block", which
    takes EViT with timm's own Attention, as the same model without attn_layer shows)."""
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5)
    tokenprune.patch(plain, "evit", stages=(1,))  # the same Block with timm's Attention: accepted
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5, attn_layer="diff")
    with pytest.raises(TypeError, match=r"blocks\[1\] \(Block with DiffAttention\) give their reducer only the keys"):
        tokenprune.patch(model, "evit", stages=(1,))

"""Parallel ViT blocks (timm ``ParallelScalingBlock``: ``vit_pwee_*``; ``DiffParallelScalingBlock``:
``vit_dpwee_*``), which reduce after the whole block: ToMe against timm's own blocks run on the
unmerged grid; exactness at r=0 on both of timm's paths; FLOPs; the other methods."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch

import tokenprune
from tests.test_diff_attention import assert_close_under_bfloat16_autocast, assert_keep_mask_hides_dropped_tokens
from tests.test_naflexvit import _protected_match
from tests.test_patch import counted_flops
from tokenprune.schedule import resolve_r

SIZE = 128  # an 8 x 8 grid
MODELS = {"parallel": "vit_pwee_patch16_reg1_gap_256", "differential": "vit_dpwee_patch16_reg1_gap_256"}


def parallel(kind: str, fused: bool = True, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(MODELS[kind], depth=3, num_classes=10, img_size=SIZE, **extra).eval()
    for name, param in model.named_parameters():
        if name.endswith("gamma"):  # LayerScale away from its 1e-5 start
            param.data.uniform_(0.5, 1.5)
        if name.rsplit(".", 1)[-1].startswith("lambda_"):
            param.data.normal_(0.0, 0.5)
    for block in model.blocks:
        block.fused_attn = fused
    return model


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def block_keys(block, x: torch.Tensor) -> torch.Tensor:
    """The block's keys averaged over heads (half-heads for differential attention)."""
    batch, num_tokens, _ = x.shape
    _, _, k, _ = torch.split(block.in_proj(block.in_norm(x)), block.in_split, dim=-1)
    heads = block.num_heads * (2 if isinstance(block, timm.models.vision_transformer.DiffParallelScalingBlock) else 1)
    return block.k_norm(k.reshape(batch, num_tokens, heads, block.head_dim).transpose(1, 2)).mean(1)


@torch.no_grad()
def grid_reference(model, x: torch.Tensor, r_per_block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and sizes of the unpatched model with ToMe's matching (after each block, on its
    keys) and proportional attention taken literally: timm's whole block runs on the unmerged
    token grid, each merged token repeated once per input token it covers. No log s."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    batch, num_tokens, _ = x.shape
    member = torch.eye(num_tokens).expand(batch, -1, -1)

    def on_grid(tokens: torch.Tensor) -> torch.Tensor:
        return member.transpose(1, 2) @ tokens

    for block, r in zip(model.blocks, r_per_block):
        keys = block_keys(block, x)
        x = (member @ block(on_grid(x))) / member.sum(-1, keepdim=True)
        if r:
            merge = _protected_match(keys, r, model.num_prefix_tokens)
            total = merge(x * member.sum(-1, keepdim=True))
            member = merge(member)
            x = total / member.sum(-1, keepdim=True)
    return model.forward_head(model.norm(on_grid(x))), member.sum(-1, keepdim=True)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("r", [6, (12, -1)])
def test_matches_the_grid_reference(kind: str, fused: bool, r) -> None:
    model = parallel(kind, fused)
    x = images()
    logits, size = grid_reference(model, x, list(resolve_r(r, len(model.blocks))))
    tokenprune.patch(model, r=r, backend="torch")
    with torch.no_grad():
        state = model.forward_tokens(x)
        out = model(x)
    assert state.num_tokens == tokenprune.plan(model, SIZE).output_tokens < 1 + 64
    torch.testing.assert_close(state.size, size)
    torch.testing.assert_close(out, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("options", [{"fused": True}, {"fused": False}, {"qk_norm": True}])
def test_r0_is_bit_identical_and_unpatch_restores(kind: str, options: dict) -> None:
    model = parallel(kind, **options)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tokenprune.patch(model, r=0)
        assert torch.equal(model(x), expected)
        tokenprune.patch(model, r=8)
        assert not torch.allclose(model(x), expected)
        tokenprune.unpatch(model)
        assert torch.equal(model(x), expected)
    assert all(type(block) in (timm.models.vision_transformer.ParallelScalingBlock,
                               timm.models.vision_transformer.DiffParallelScalingBlock) for block in model.blocks)  # fmt: skip


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ["tome", "pitome", "local_global", "dynamicvit"])
def test_flops_agree_with_flop_counter(kind: str, method: str) -> None:
    model = parallel(kind).requires_grad_(False)
    options = {
        "tome": {"r": (8, -1)},
        "pitome": {"r": (8, -1)},
        "local_global": {"r": 4, "local_block": 0},
        "dynamicvit": {"keep_ratio": 0.7, "stages": (1, 2)},
    }[method]
    tokenprune.patch(model, method, **options)
    assert tokenprune.flops(model, SIZE, batch_size=2).total == counted_flops(model, images())


@pytest.mark.parametrize("kind", MODELS)
def test_learned_dropping_trains_and_prunes(kind: str) -> None:
    model = tokenprune.patch(parallel(kind), "dynamicvit", keep_ratio=0.7, stages=(1, 2))
    model.train()
    model(images()).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        assert model.forward_tokens(images()).num_tokens == tokenprune.plan(model, SIZE).output_tokens


@pytest.mark.parametrize("kind", MODELS)
def test_a_training_keep_mask_masks_the_dropped_keys(kind: str) -> None:
    """While training a pruning method, kept tokens must not see the dropped ones: changing the
    dropped tokens leaves the kept tokens' outputs as they were (to the mask's 1e-9 leak)."""
    assert_keep_mask_hides_dropped_tokens(tokenprune.patch(parallel(kind), "dynamicvit", keep_ratio=0.7, stages=(1, 2)))


# timm's RmsNorm (the sub-norm) warns that autocast's bf16 input meets its float32 weight
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("kind", MODELS)
def test_bfloat16_autocast_with_merged_tokens(kind: str) -> None:
    assert_close_under_bfloat16_autocast(tokenprune.patch(parallel(kind), r=(8, -1)), images())


def test_methods_that_read_the_attention_map_are_refused_when_patching() -> None:
    model = parallel("parallel", class_token=True, global_pool="token")
    with pytest.raises(TypeError, match=r"reads the attention map \('cls_attention'\), but blocks\[1\] \(ParallelScalingBlock\)"):
        tokenprune.patch(model, "evit", stages=(1,))
    assert not hasattr(model, "tokenprune_config")


def test_float16_training_keep_masks_are_refused() -> None:
    model = tokenprune.patch(parallel("differential").half(), "dynamicvit", keep_ratio=0.7, stages=(1, 2)).train()
    with pytest.raises(ValueError, match="in float16 would round its keep mask's gradient to zero"):
        model(images().half())


def test_a_patched_parallel_block_called_on_a_tensor_names_the_fix() -> None:
    model = tokenprune.patch(parallel("parallel"), r=4)
    with pytest.raises(TypeError, match=r"TokenState.*got a Tensor"):
        model.blocks[0](torch.randn(2, 65, model.embed_dim))


def test_fullgraph_capture() -> None:
    model = tokenprune.patch(parallel("differential"), r=(8, -1))
    x = images()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), expected)


@pytest.mark.parametrize("kind", ["parallel", "differential"])
def test_matches_the_grid_reference_with_a_trained_mlp_bias(kind: str) -> None:
    """timm's parallel blocks without qkv_bias keep a separate mlp_bias (zeros at init, trained
    in real weights): the patched block must add it, as timm's does."""
    model = parallel(kind, qkv_bias=False)  # (timm's vit_pwee/dpwee configs set qkv_bias=True: no mlp_bias)
    generator = torch.Generator().manual_seed(9)
    for block in model.blocks:
        assert block.mlp_bias is not None
        block.mlp_bias.data = torch.randn(block.mlp_bias.shape, generator=generator)
    x = images()
    logits, _ = grid_reference(model, x, list(resolve_r(6, len(model.blocks))))
    tokenprune.patch(model, r=6, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)


def differs_between_seeds(run: Callable[[], torch.Tensor]) -> bool:
    """Whether two runs of ``run`` under different seeds differ (dropout is live)."""
    torch.manual_seed(0)
    a = run()
    torch.manual_seed(1)
    return not torch.allclose(a, run())


@pytest.mark.parametrize("kind", ["parallel", "differential"])
def test_attention_dropout_runs_only_while_training_parallel(kind: str) -> None:
    model = parallel(kind, attn_drop_rate=0.5)
    x = images()
    logits, _ = grid_reference(model, x, list(resolve_r(6, len(model.blocks))))  # timm's blocks in eval
    tokenprune.patch(model, r=6, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-4, rtol=1e-4)
        model.train()
        assert differs_between_seeds(lambda: model(x))

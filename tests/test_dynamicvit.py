"""Learned (DynamicViT) and training-free (EViT-style) token dropping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.merge import TokenState
from tokenprune.methods.dynamicvit import (
    DynamicViTLoss,
    DynamicViTOutput,
    default_stages,
    forward_train,
    predictors,
    save_predictors,
)
from tokenprune.patch.vit import _weighted_mean, attend, keep_bias
from tests.test_patch import counted_flops, image, make


def test_default_stages_scale_with_depth() -> None:
    assert default_stages(12) == (3, 6, 9)
    assert default_stages(24) == (6, 12, 18)
    assert default_stages(4) == (1, 2, 3)
    assert default_stages(2) == (1,)  # never a block the model lacks


@pytest.mark.parametrize("family", ["vit_cls", "registers", "vit_avg_no_cls", "deit3_layerscale"])
def test_inference_keeps_the_schedule_and_prefix(family: str) -> None:
    model = make(family)
    tokenprune.patch(model, "dynamicvit", keep_ratio=0.7, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        assert torch.isfinite(model(image())).all()
    rows, cols = model.patch_embed.grid_size
    prefix = model.num_prefix_tokens
    reduction = tokenprune.plan(model, 224)
    stages = default_stages(len(model.blocks))
    for s, block in enumerate(stages, 1):
        assert reduction.tokens_after(block) == prefix + int(rows * cols * 0.7**s)
    assert state.num_tokens == reduction.output_tokens
    source = tokenprune.source(model)
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix, dtype=source.dtype).expand(2, -1, -1))
    assert (source.sum(dim=1) <= 1).all()  # every input token held at most once (dropped: none)


def test_predictor_of_an_image_with_every_token_dropped_stays_finite() -> None:
    """While training, a few-patch image can lose all its tokens; the next predictor's global
    feature (the mean over kept tokens) is then zero, not 0/0."""
    predictor = tokenprune.patch(make("vit_cls"), "dynamicvit").blocks[3].reducer
    x = torch.randn(2, 5, predictor.in_conv[1].in_features)
    keep = torch.ones(2, 5, 1)
    keep[1] = 0.0
    log_probs = predictor.log_probs(x, keep)
    assert torch.isfinite(log_probs).all()
    torch.testing.assert_close(log_probs[0], predictor.log_probs(x[:1], keep[:1])[0])


@pytest.mark.parametrize("pool", ["max", "avgmax", "avg"])
def test_an_image_with_every_patch_dropped_pools_finite(pool: str) -> None:
    """While training, a few-patch image can lose every patch: max pooling over no tokens is 0,
    as the average is, not -inf, whose NaN logits and gradients would reach every weight through
    the batch's loss; the other images pool as they would alone."""
    model = tokenprune.patch(make("vit_cls", global_pool=pool, depth=4, img_size=32), "dynamicvit").train()
    x = torch.randn(2, 4, model.embed_dim, generator=torch.Generator().manual_seed(4))
    keep = torch.ones(2, 4, 1)
    keep[1] = 0.0  # image 1: every patch dropped
    x.requires_grad_(True)
    logits = model.forward_head(x, size=keep)
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        expected = model.forward_head(x[:1], size=keep[:1])
        pooled_zero = model.forward_head(torch.zeros(1, 4, model.embed_dim), size=torch.ones(1, 4, 1))
    torch.testing.assert_close(logits[:1], expected)
    torch.testing.assert_close(logits[1:], pooled_zero)
    logits.square().sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_weighted_mean_over_no_weight_has_finite_gradients() -> None:
    """An image whose training decisions dropped every patch pools to 0 with bounded gradients for
    the (differentiable) decisions: dividing by a clamped total of ~1e-38 would scale them by
    ~1e38, inf (then NaN) in the backward of any non-trivial loss."""
    x = 10 * torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(2, 4, 1)
    weights[1] = 0.0
    weights.requires_grad_(True)
    mean = _weighted_mean(x, weights)
    torch.testing.assert_close(mean[0], x[0].mean(dim=0))
    torch.testing.assert_close(mean[1], torch.zeros(8))
    (100 * mean).sum().backward()
    assert torch.isfinite(weights.grad).all() and weights.grad.abs().max() < 1e6


def test_training_masks_are_cumulative_and_counted() -> None:
    torch.manual_seed(0)
    model = tokenprune.patch(make("vit_cls"), "dynamicvit").train()
    output = forward_train(model, image())
    assert len(output.decisions) == 3
    previous = torch.ones_like(output.decisions[0])
    for decision in output.decisions:
        assert set(decision.unique().tolist()) <= {0.0, 1.0}
        assert (decision <= previous).all()  # once dropped, always dropped
        previous = decision
    assert output.tokens.shape == (2, 196, model.embed_dim)  # tokens stay in place while training


def test_masked_attention_equals_attention_over_kept_tokens() -> None:
    torch.manual_seed(1)
    block = make("deit3_layerscale").blocks[0]
    x = torch.randn(2, 11, block.attn.qkv.in_features)
    keep = torch.ones(2, 11, 1)
    keep[0, [2, 5, 6]] = 0
    keep[1, [1, 9]] = 0
    masked, _ = attend(block.attn, x, keep_bias(keep, x.dtype))
    for n in range(2):
        kept = keep[n, :, 0].bool()
        alone, _ = attend(block.attn, x[n : n + 1, kept], None)
        torch.testing.assert_close(masked[n, kept], alone[0], atol=1e-5, rtol=1e-5)
        # a dropped token's query sees the kept keys and itself (DynamicViT's policy matrix)
        for t in (~kept).nonzero().flatten().tolist():
            visible = kept.clone()
            visible[t] = True
            with_self, _ = attend(block.attn, x[n : n + 1, visible], None)
            position = visible[:t].sum()
            torch.testing.assert_close(masked[n, t], with_self[0, position], atol=1e-5, rtol=1e-5)


def test_training_equals_inference_when_every_token_is_kept() -> None:
    model = make("vit_cls")
    with torch.no_grad():
        expected = model(image())
    tokenprune.patch(model, "dynamicvit", keep_ratio=1.0)
    for predictor in predictors(model).values():  # bias the predictors to always say "keep"
        predictor.out_conv[4].bias.data = torch.tensor([100.0, -100.0])
    with torch.no_grad():
        inference = model.eval()(image())
        for predictor in predictors(model).values():
            predictor.train()
        training = forward_train(model, image()).logits
    torch.testing.assert_close(inference, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(training, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_predictors_through_masked_attention() -> None:
    torch.manual_seed(2)
    model = tokenprune.patch(make("vit_cls"), "dynamicvit").train()
    model.requires_grad_(False)
    for predictor in predictors(model).values():
        predictor.requires_grad_(True)
    output = forward_train(model, image())
    output.logits.sum().backward()  # no ratio term: gradient only through the masks
    for name, predictor in predictors(model).items():
        grad = predictor.out_conv[4].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_predictor_gradients_under_autocast_match_float32(dtype: torch.dtype) -> None:
    """A dropped key's attention weight (~1e-9) is below float16's range: its softmax runs in
    float32, so the predictors' gradients match float32 training (with a float16 softmax their
    cosine to the float32 gradients was −0.50 on a ViT-Ti)."""
    torch.manual_seed(2)
    model = tokenprune.patch(make("vit_cls"), "dynamicvit").train()
    images = image()

    def predictor_grads(autocast_dtype: torch.dtype | None) -> torch.Tensor:
        model.zero_grad()
        torch.manual_seed(3)  # the same Gumbel noise
        with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = forward_train(model, images).logits.float().logsumexp(-1).mean()
        (loss * 1024).backward()  # loss scaling, as GradScaler would
        return torch.cat([p.grad.flatten() for p in predictors(model).parameters()])

    reference, reduced = predictor_grads(None), predictor_grads(dtype)
    assert F.cosine_similarity(reference, reduced, dim=0) > 0.99
    assert reduced.norm() == pytest.approx(reference.norm().item(), rel=0.05)


def test_keep_bias_gradient_matches_multiplicative_mask() -> None:
    """d out / d keep of the bias form = that of DynamicViT's multiplicative mask, dropped keys too."""
    torch.manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 6, 4).unbind(0)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]).reshape(1, 6, 1).requires_grad_(True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_bias(keep, q.dtype))
    (grad_bias,) = torch.autograd.grad(out.square().sum(), keep)

    keep2 = keep.detach().clone().requires_grad_(True)
    logits = (q @ k.transpose(-2, -1)) / 2.0
    policy = keep2.reshape(1, 1, 1, 6) + (1 - keep2.reshape(1, 1, 1, 6)) * torch.eye(6)
    weights = logits.exp() * policy
    out2 = (weights / weights.sum(-1, keepdim=True)) @ v
    (grad_mult,) = torch.autograd.grad(out2.square().sum(), keep2)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_bias, grad_mult, atol=1e-4, rtol=1e-3)


def test_loss_terms_against_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    decisions = (torch.tensor([[[1.0], [1.0], [0.0], [0.0]], [[1.0], [0.0], [0.0], [0.0]]]),)
    tokens = torch.tensor([[[1.0], [2.0], [3.0], [4.0]], [[1.0], [1.0], [1.0], [1.0]]])
    teacher_tokens = torch.zeros_like(tokens)
    terms = DynamicViTLoss(keep_ratio=0.5)(DynamicViTOutput(logits, tokens, decisions), torch.tensor([0, 1]), teacher, teacher_tokens)
    ce = (-torch.log_softmax(logits, -1)[0, 0] - torch.log_softmax(logits, -1)[1, 1]) / 2
    ratio = ((0.5 - 0.5) ** 2 + (0.25 - 0.5) ** 2) / 2
    p_t, log_s = torch.softmax(teacher, -1), torch.log_softmax(logits, -1)
    kl = (p_t * (p_t.log() - log_s)).sum() / 2
    token = (1.0**2 + 2.0**2 + 1.0**2) / 3  # the kept tokens: (0,0), (0,1), (1,0)
    torch.testing.assert_close(terms["cls"], ce)
    torch.testing.assert_close(terms["ratio"], torch.tensor(ratio))
    torch.testing.assert_close(terms["distill"], kl)
    torch.testing.assert_close(terms["token"], torch.tensor(token))
    output = DynamicViTOutput(logits, tokens, decisions)
    with pytest.raises(ValueError, match=r"teacher's patch tokens.*\(2, 4, 1\); got \(2, 5, 1\).*num_prefix_tokens"):
        DynamicViTLoss(keep_ratio=0.5)(output, torch.tensor([0, 1]), teacher, torch.zeros(2, 5, 1))  # with a class token
    for keep_ratio in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="keep_ratio must be in"):
            DynamicViTLoss(keep_ratio=keep_ratio)
    torch.testing.assert_close(terms["loss"], ce + 2.0 * ratio + 0.5 * kl + 0.5 * token)


def test_predictor_checkpoint_round_trip(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    model = tokenprune.patch(make("vit_cls"), "dynamicvit")
    for p in predictors(model).parameters():
        p.data.normal_()
    save_predictors(model, tmp_path / "predictors.safetensors")
    other = tokenprune.patch(make("vit_cls"), "dynamicvit", predictor=str(tmp_path / "predictors.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(other(image()), model(image()))
    # re-patching with a new keep ratio keeps the predictor weights, also those trained since
    # the file was loaded (the file is not read again)
    with torch.no_grad():
        predictors(other)["3"].out_conv[4].weight.add_(1.0)
    tuned = predictors(other)["3"].out_conv[4].weight.clone()
    tokenprune.patch(other, keep_ratio=0.5)
    assert torch.equal(predictors(other)["3"].out_conv[4].weight, tuned)
    # ... and with stages dropped then added back: the file is read into the re-created stage
    # alone, the others keep what they learnt
    tokenprune.patch(other, stages=(3, 6))
    tokenprune.patch(other, stages=None)
    assert torch.equal(predictors(other)["3"].out_conv[4].weight, tuned)
    assert torch.equal(predictors(other)["9"].out_conv[4].weight, predictors(model)["9"].out_conv[4].weight)
    # naming the file again with another method in between reads it again
    tokenprune.patch(other, "tome", r=2)
    tokenprune.patch(other, "dynamicvit", predictor=str(tmp_path / "predictors.safetensors"))
    assert torch.equal(predictors(other)["3"].out_conv[4].weight, predictors(model)["3"].out_conv[4].weight)
    with pytest.raises(ValueError, match="do not fit"):
        tokenprune.patch(make("vit_cls"), "dynamicvit", stages=(2, 4), predictor=str(tmp_path / "predictors.safetensors"))
    # A whole patched model's weights (train_dynamicvit --train-backbone's model.safetensors) are
    # not predictors: the error names the order that loads them, and that order works.
    whole = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(whole))
    with pytest.raises(ValueError, match="whole patched model's weights.*load_state_dict"):
        tokenprune.patch(make("vit_cls"), "dynamicvit", predictor=str(whole))
    fresh = tokenprune.patch(make("vit_cls"), "dynamicvit")
    fresh.load_state_dict(load_file(str(whole)))
    assert torch.equal(predictors(fresh)["3"].out_conv[4].weight, predictors(model)["3"].out_conv[4].weight)
    tokenprune.unpatch(other)
    assert "blocks.3.reducer.in_conv.1.weight" not in other.state_dict()


def test_misuse_of_the_training_helpers_is_named(tmp_path) -> None:
    """Saving predictors of a model that has none, a training forward in eval mode (no keep
    decisions for the loss), a bool keep ratio: each stops with what to do."""
    with pytest.raises(ValueError, match="no DynamicViT predictors to save: patch it with method 'dynamicvit' first"):
        save_predictors(tokenprune.patch(make("vit_cls"), r=2), tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()
    with pytest.raises(ValueError, match="needs a model patched with method 'dynamicvit'"):
        forward_train(tokenprune.patch(make("vit_cls"), r=2), image())
    model = tokenprune.patch(make("vit_cls"), "dynamicvit").eval()
    with pytest.raises(ValueError, match=r"call model.train\(\)"):
        forward_train(model, image())
    predictors(model).train()  # a frozen backbone: the predictors alone train
    assert len(forward_train(model, image()).decisions) == 3
    for config in (tokenprune.DynamicViTConfig, tokenprune.AttentionDropConfig):
        for keep_ratio in (True, "0.5", float("nan")):
            with pytest.raises(ValueError, match="keep_ratio must be in"):
                config(keep_ratio=keep_ratio)


def test_a_predictor_file_that_fails_to_load_leaves_the_model_as_it_was(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    model = tokenprune.patch(make("vit_cls"), "dynamicvit", keep_ratio=0.7)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_plan = tokenprune.plan(model, 224).tokens
    narrow = tokenprune.patch(make("vit_cls", embed_dim=48), "dynamicvit")
    save_predictors(narrow, tmp_path / "narrow.safetensors")  # same names, other shapes
    state = {k: v.contiguous() for k, v in predictors(model).state_dict().items()}
    save_file({k: v for k, v in state.items() if not k.startswith("3.")}, str(tmp_path / "partial.safetensors"))
    for bad, error in [("missing.safetensors", FileNotFoundError), ("narrow.safetensors", ValueError), ("partial.safetensors", ValueError)]:
        with pytest.raises(error):
            tokenprune.patch(model, keep_ratio=0.3, predictor=str(tmp_path / bad))
        assert model.tokenprune_config.keep_ratio == 0.7
        assert tokenprune.plan(model, 224).tokens == before_plan
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before_state.items())
    # The message names a few of the missing keys and counts the rest instead of listing them all.
    missing = sorted(k for k in state if k.startswith("3."))
    assert len(missing) > 6
    with pytest.raises(ValueError, match=rf"missing \[.*'{missing[5]}'\] and {len(missing) - 6} more, unexpected \[\]"):
        tokenprune.patch(model, predictor=str(tmp_path / "partial.safetensors"))


@pytest.mark.parametrize("fuse", [True, False])
def test_attention_drop_keeps_most_attended_and_fuses(fuse: bool) -> None:
    model = tokenprune.patch(make("vit_cls"), "evit", keep_ratio=0.7, fuse=fuse, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
    reduction = tokenprune.plan(model, 224)
    assert state.num_tokens == reduction.output_tokens == 1 + int(196 * 0.7**3) + fuse
    source = tokenprune.source(model)
    if fuse:  # nothing lost: every input token is in exactly one output token
        assert torch.equal(source.sum(dim=1), torch.ones_like(source.sum(dim=1)))
        assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), 197.0))


def test_attention_scores_pick_the_attended_tokens() -> None:
    from tokenprune.methods.evit import AttentionDrop

    x = torch.randn(1, 6, 4)
    cls_attention = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.02, 0.03]])
    step = AttentionDrop(keep_fraction=0.4, fuse=False, score="attention", num_protected=1)
    state = step(TokenState(x, grid=(1, 5)), cls_attention)
    assert torch.equal(state.x, x[:, [0, 1, 2]])  # class token, then the two most attended, in order
    # Fused: the three dropped tokens become one extra token, their attention-weighted average
    # (normalised, unlike EViT's trained sum), of size 3.
    fused = AttentionDrop(keep_fraction=0.4, fuse=True, score="attention", num_protected=1)(TokenState(x, grid=(1, 5)), cls_attention)
    weights = torch.tensor([0.05, 0.02, 0.03])
    expected = (weights[:, None] * x[0, [3, 4, 5]]).sum(0) / weights.sum()
    torch.testing.assert_close(fused.x, torch.cat([x[:, [0, 1, 2]], expected[None, None]], dim=1))
    assert fused.size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 3.0]
    # Random scores rank the tokens but weigh nothing: the fused token is the plain average.
    torch.manual_seed(0)
    randomly = AttentionDrop(keep_fraction=0.4, fuse=True, score="random", num_protected=1)(TokenState(x, grid=(1, 5)), None)
    kept = [i for i in range(1, 6) if any(torch.equal(x[0, i], t) for t in randomly.x[0, 1:-1])]
    dropped = [i for i in range(1, 6) if i not in kept]
    torch.testing.assert_close(randomly.x[0, -1], x[0, dropped].mean(0))
    # A later stage that drops the earlier fused token (size 3) again: the new fused token is the
    # mean over every patch it covers, the earlier token counting three times, not once.
    again = AttentionDrop(keep_fraction=0.2, fuse=True, score="random", num_protected=1)(randomly, None)
    patches = {i: x[0, i] for i in kept} | {"fused": randomly.x[0, -1]}
    left = [key for key, token in patches.items() if not any(torch.equal(token, t) for t in again.x[0, 1:-1])]
    assert "fused" in left  # (this seed's draw; kept, it would not test the weighting)
    counts = {"fused": 3.0}
    expected = sum(counts.get(k, 1.0) * patches[k] for k in left) / sum(counts.get(k, 1.0) for k in left)
    torch.testing.assert_close(again.x[0, -1], expected)
    assert again.size[0, -1, 0] == sum(counts.get(k, 1.0) for k in left)
    # Attention that underflowed to 0 on every dropped token: the size-weighted average, not 0.
    silent = AttentionDrop(keep_fraction=0.4, fuse=True, score="attention", num_protected=1)(
        TokenState(x, grid=(1, 5)), torch.tensor([[0.5, 0.1, 0.3, 0.0, 0.0, 0.0]])
    )
    torch.testing.assert_close(silent.x[0, -1], x[0, [3, 4, 5]].mean(0))


def test_inference_keeps_the_tokens_the_predictor_scores_highest() -> None:
    """Each stage keeps the k patch tokens with the highest predicted keep log-probability (k
    from the schedule), the class token first, the rest in their order."""
    model = tokenprune.patch(make("vit_cls"), "dynamicvit", keep_ratio=0.7)
    predictor = model.blocks[3].reducer.eval()
    torch.manual_seed(4)
    x = torch.randn(2, 197, model.embed_dim)
    with torch.no_grad():
        state = predictor(TokenState(x, grid=(14, 14)))
        scores = predictor.log_probs(x[:, 1:], torch.ones(2, 196, 1))[..., 0]
    kept = scores.topk(int(196 * 0.7), dim=1).indices.sort(dim=1).values + 1
    for n in range(2):
        torch.testing.assert_close(state.x[n], x[n, [0, *kept[n].tolist()]])


@pytest.mark.parametrize("method", ["dynamicvit", "evit"])
def test_flops_agree_with_flop_counter(method: str) -> None:
    model = tokenprune.patch(make("registers").requires_grad_(False), method)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_compiles_fullgraph_in_inference() -> None:
    torch._dynamo.reset()
    model = tokenprune.patch(make("registers"), "dynamicvit")
    with torch.no_grad():
        expected = model(image())
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(image()), expected, atol=1e-5, rtol=1e-5)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="keep_ratio"):
        tokenprune.patch(make("vit_cls"), "dynamicvit", keep_ratio=0.0)
    with pytest.raises(ValueError, match="stages"):
        tokenprune.patch(make("vit_cls"), "dynamicvit", stages=(6, 3))
    # DynamicViT prunes before its stage's block, EViT after the attention of its own
    with pytest.raises(ValueError, match=r"stages must be increasing block indices in \[1, 11\], got \(0, 3\)"):
        tokenprune.patch(make("vit_cls"), "dynamicvit", stages=(0, 3))
    with pytest.raises(ValueError, match=r"in \[0, 11\], got \(3, 12\)"):
        tokenprune.patch(make("vit_cls"), "evit", stages=(3, 12))
    assert tokenprune.plan(tokenprune.patch(make("vit_cls"), "evit", stages=(0,)), 224).removed[0] > 0
    for method in ("dynamicvit", "evit"):  # block indices are whole numbers
        with pytest.raises(TypeError, match=r"a stage \(block index\) must be a non-negative int, got 1.5"):
            tokenprune.patch(make("vit_cls"), method, stages=(1.5,))
        # one number or a string: named as such, not Python's "'int' object is not iterable"
        for stages in (6, "3,6"):
            with pytest.raises(TypeError, match=r"stages must be a tuple of block indices, e\.g\. stages=\(3, 6, 9\)"):
                tokenprune.patch(make("vit_cls"), method, stages=stages)
    with pytest.raises(ValueError, match="needs a class token"):
        tokenprune.patch(make("vit_avg_no_cls"), "evit")
    with pytest.raises(ValueError, match="score"):
        tokenprune.patch(make("vit_cls"), "evit", score="entropy")


@pytest.mark.parametrize("family", ["vit_cls", "vit_avg_no_cls"])
def test_keeping_every_token_is_bit_identical_and_costs_nothing(family: str) -> None:
    """keep_ratio=1.0 at inference leaves the tokens untouched (a gather would make them
    contiguous and change the pooling's summation order) and skips the predictors."""
    model = make(family).requires_grad_(False)
    unpatched_flops = counted_flops(model, image())
    with torch.no_grad():
        expected = model(image())
        tokenprune.patch(model, "dynamicvit", keep_ratio=1.0)
        assert torch.equal(model(image()), expected)
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image()) == unpatched_flops


def test_pruned_patches_unmerge_to_zeros_and_have_no_source() -> None:
    """Dropped patches (EViT without fusion) unmerge to zeros, not to another token's features,
    and are in no output token's source; kept patches unmerge to their token."""
    model = tokenprune.patch(make("vit_cls"), "evit", keep_ratio=0.7, fuse=False, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(image())
        full = model.forward_features(image(), unmerge=True)
    dropped = state.source_index < 0
    assert dropped.any()
    assert (full[dropped] == 0).all()
    kept_features = state.x.gather(1, state.source_index.clamp(min=0)[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(full[~dropped], kept_features[~dropped])
    source = tokenprune.source(model)
    assert torch.equal(source.sum(1).bool(), ~dropped)  # dropped patches: an all-zero column
    assert (source.sum(-1) == 1).all()  # no fusion: every output token is one input token


@pytest.mark.parametrize("family", ["beit_relpos", "relpos_mlp_cls"])
def test_flops_of_a_relative_bias_between_pruned_tokens(family: str) -> None:
    """Pruning before attention (DynamicViT) shrinks the relative-bias gather to the kept tokens:
    the bias term is counted on the attended tokens, not on those entering the block."""
    model = tokenprune.patch(make(family).requires_grad_(False), "dynamicvit")
    assert tokenprune.flops(model, 224, batch_size=2).total == counted_flops(model, image())


def test_predictor_global_feature_is_the_mean_over_the_kept_tokens_only() -> None:
    """Eq. 4: z_global averages the tokens still kept (D ⊙ z). A predictor over a partial mask
    scores each kept token exactly as a predictor that never saw the dropped tokens."""
    predictor = tokenprune.patch(make("vit_cls"), "dynamicvit").blocks[3].reducer
    generator = torch.Generator().manual_seed(5)
    x = 3.0 * torch.randn(2, 9, predictor.in_conv[1].in_features, generator=generator)
    keep = torch.ones(2, 9, 1)
    keep[0, [1, 4, 5, 8]] = 0.0
    keep[1, [0, 2]] = 0.0
    with torch.no_grad():
        got = predictor.log_probs(x, keep)
        for n in range(2):
            kept = keep[n, :, 0].bool()
            alone = predictor.log_probs(x[n : n + 1, kept], torch.ones(1, int(kept.sum()), 1))
            torch.testing.assert_close(got[n, kept], alone[0], atol=1e-6, rtol=1e-5)


def test_loss_terms_over_several_stages_against_hand_computation() -> None:
    """Two stages: the ratio term averages (mean D_s − ρ^s)² over the stages, and the token
    term distils the tokens the *last* stage keeps."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    d1 = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])[..., None]
    d2 = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])[..., None]
    tokens = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])[..., None]
    teacher_tokens = torch.zeros_like(tokens)
    terms = DynamicViTLoss(keep_ratio=0.5)(DynamicViTOutput(logits, tokens, (d1, d2)), torch.tensor([0, 1]), logits, teacher_tokens)
    stage1 = ((0.75 - 0.5) ** 2 + (0.5 - 0.5) ** 2) / 2  # target ρ¹ = 0.5
    stage2 = ((0.5 - 0.25) ** 2 + (0.25 - 0.25) ** 2) / 2  # target ρ² = 0.25
    ratio = (stage1 + stage2) / 2
    token = (1.0**2 + 3.0**2 + 6.0**2) / 3  # kept by d2: (0,0), (0,2), (1,1)
    torch.testing.assert_close(terms["ratio"], torch.tensor(ratio))
    torch.testing.assert_close(terms["token"], torch.tensor(token))
    torch.testing.assert_close(terms["loss"], terms["cls"] + 2.0 * ratio + 0.5 * token)


@pytest.mark.parametrize("fuse", [True, False])
def test_attention_drop_keeping_every_token_changes_nothing(fuse: bool) -> None:
    """keep_ratio=1 keeps every patch at every stage: the plan removes none (none is fused
    either), and the model is the unpatched one."""
    model = make("vit_cls", depth=4).requires_grad_(False)
    with torch.no_grad():
        expected = model(image())
    tokenprune.patch(model, "evit", keep_ratio=1.0, fuse=fuse)
    assert tokenprune.plan(model, 224).tokens == (197,) * len(model.blocks)
    with torch.no_grad():
        assert torch.equal(model(image()), expected)


def test_attention_drop_leaves_proportional_attention_off_by_default() -> None:
    """EViT's fused token is attended as one token unless asked (prop_attn=False by default, as
    in EViT): the default model is the one with prop_attn=False, and differs from True."""
    x = image()
    outputs = {}
    for options in ({}, {"prop_attn": False}, {"prop_attn": True}):
        model = tokenprune.patch(make("vit_cls", depth=4), "evit", keep_ratio=0.5, stages=(1,), **options)
        with torch.no_grad():
            outputs[options.get("prop_attn")] = model(x)
    assert torch.equal(outputs[None], outputs[False])
    assert not torch.allclose(outputs[None], outputs[True])


def test_predictor_and_stages_of_another_type_refused_when_configured(tmp_path) -> None:
    """A predictor that is no path is named at the config (it was read as a file name at patch
    time: "No such file or directory: 2"); a 0-d tensor of stages gets the form of stages."""
    for value in (2, ["a.safetensors"]):
        with pytest.raises(TypeError, match=r"predictor must be the path \(a str or Path\) of a safetensors file"):
            tokenprune.DynamicViTConfig(predictor=value)
    tokenprune.DynamicViTConfig(predictor=tmp_path / "predictors.safetensors")  # a Path is a path
    for config in (tokenprune.DynamicViTConfig, tokenprune.AttentionDropConfig):
        with pytest.raises(TypeError, match=r"stages must be a tuple of block indices"):
            config(stages=torch.tensor(3))


def test_predictors_of_a_model_inside_data_parallelism(tmp_path) -> None:
    """DynamicViT is patched, then wrapped (DDP would not synchronise predictors added after):
    the wrapped model's predictors are the inner model's, and they save and load like them, as
    plans and FLOPs see through the wrapper. forward_train, which would run past the wrapper's
    forward (no scatter, no gradient synchronisation), says where to call it instead."""
    pytest.importorskip("safetensors")
    model = tokenprune.patch(make("vit_cls"), "dynamicvit")
    for p in predictors(model).parameters():
        p.data.normal_(0.0, 0.1)
    through = tokenprune.patch(torch.nn.DataParallel(make("vit_cls")), "dynamicvit")  # patched through it too
    for wrapped in (torch.nn.DataParallel(model), through):
        inner = wrapped.module
        assert list(predictors(wrapped).keys()) == ["3", "6", "9"]
        assert all(a is b for a, b in zip(predictors(wrapped).values(), predictors(inner).values()))
    save_predictors(torch.nn.DataParallel(model), tmp_path / "predictors.safetensors")
    loaded = tokenprune.patch(make("vit_cls"), "dynamicvit", predictor=str(tmp_path / "predictors.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(image()), model(image()))
    with pytest.raises(ValueError, match=r"past data parallelism's.*forward_train\(model\.module, x\)"):
        forward_train(torch.nn.DataParallel(model).train(), image())


def test_a_predictor_file_of_other_stages_names_the_stages_to_patch_with(tmp_path) -> None:
    """Patching does not read the stages from the file: a file trained at other stages says which
    ones it holds, and patching with those loads it; one whose stages this model lacks says it
    was trained for another model."""
    pytest.importorskip("safetensors")
    path = tmp_path / "predictors.safetensors"
    trained = tokenprune.patch(make("vit_cls"), "dynamicvit")  # 12 blocks: stages (3, 6, 9)
    for p in predictors(trained).parameters():
        p.data.normal_(0.0, 0.1)
    save_predictors(trained, path)
    with pytest.raises(ValueError, match=r"holds predictors for stages \(3, 6, 9\), so patch with stages=\(3, 6, 9\)"):
        tokenprune.patch(make("vit_cls"), "dynamicvit", stages=(2, 5, 8), predictor=str(path))
    advised = tokenprune.patch(make("vit_cls"), "dynamicvit", stages=(3, 6, 9), predictor=str(path))
    with torch.no_grad():
        torch.testing.assert_close(advised(image()), trained(image()))
    with pytest.raises(ValueError, match=r"stages \(3, 6, 9\), so they were trained for another model than this 4-block one"):
        tokenprune.patch(make("vit_cls", depth=4), "dynamicvit", predictor=str(path))

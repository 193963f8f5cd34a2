"""The video ViT (VideoMAE layout) and its VideoMAE checkpoint loader: shapes, token order, the
sin-cos table, Hugging Face / original-format conversion equivalence, strict-load errors and
learned position-embedding resizing. CPU only, small sizes."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch
from torch import nn

import tokenprune
from tokenprune.models import (
    VideoVisionTransformer,
    load_videomae,
    resize_pos_embed,
    sincos_pos_embed,
    use_transformers_norm_eps,
    video_vit_base_patch16_224,
    video_vit_large_patch16_224,
    video_vit_small_patch16_224,
    videomae_config_from_transformers,
)


def small(**kwargs) -> VideoVisionTransformer:
    torch.manual_seed(0)
    return video_vit_small_patch16_224(**{"num_frames": 8, "img_size": 64, "depth": 2, **kwargs}).eval()


def clip(batch: int = 2, frames: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- model


def test_forward_intermediates_are_the_blocks_outputs_on_the_token_grid():
    """timm's forward_intermediates for clips, against a loop over the blocks: [B, C, T', H', W']
    maps ("NCTHW") or tokens ("NLC"), normed on request, the final tokens as forward_features."""
    model = small(depth=3)
    x = clip()
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        final, maps = model.forward_intermediates(x, indices=[0, -1])
        assert torch.equal(final, model.forward_features(x))
        grid = model.grid_size
        for got, want in zip(maps, [outputs[0], outputs[2]]):
            assert got.shape == (2, 384, *grid)
            assert torch.equal(got, want.reshape(2, *grid, 384).permute(0, 4, 1, 2, 3))
        normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        assert len(normed) == 1 and torch.equal(normed[0], model.norm(outputs[2]))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, output_dict=True)
        assert torch.equal(early["image_intermediates"][0], maps[0])
        assert torch.equal(early["image_features"], model.norm(outputs[0]))  # stopped after block 0
    with pytest.raises(ValueError, match="NCTHW"):
        model.forward_intermediates(x, output_fmt="NCHW")


@pytest.mark.parametrize("size", [64, 112])
def test_shapes(size):
    model = small(img_size=size)
    grid = (4, size // 16, size // 16)
    assert model.patch_embed.grid_size == grid and model.grid_size == grid
    assert model.num_frames == 8 and model.tubelet_size == 2
    num_tokens = math.prod(grid)
    assert model.patch_embed.num_patches == num_tokens
    x = clip(size=size)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, num_tokens, 384)
        assert model.forward_head(features, pre_logits=True).shape == (2, 384)
        assert model.forward_head(features).shape == (2, 400)
        assert model(x).shape == (2, 400)


def test_timm_attributes():
    model = small()
    assert model.attn_pool is None and model.global_pool == "avg" and not model.pool_include_prefix
    assert model.num_prefix_tokens == 0 and model.cls_token is None
    assert isinstance(model.patch_drop, nn.Identity) and isinstance(model.norm_pre, nn.Identity)
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    assert model.grad_checkpointing is False and model.dynamic_img_size is False
    assert model.patch_embed.img_size == (64, 64) and model.patch_embed.strict_img_size
    assert model.patch_embed.dynamic_feat_size((64, 32)) == (4, 2)
    assert model.patch_embed.dynamic_feat_size((16, 64, 32)) == (8, 4, 2)
    assert "pos_embed" not in model.state_dict()  # sin-cos: a non-persistent buffer
    # VideoMAE fine-tuning ('token' pooling = no mean pooling): final norm, no fc_norm
    token = small(global_pool="token")
    assert isinstance(token.fc_norm, nn.Identity) and isinstance(token.norm, nn.LayerNorm)


@pytest.mark.parametrize("patched", [False, True])
def test_reset_classifier_keeps_the_models_dtype(patched):
    """reset_classifier after model.double() (or .half(), .cuda()) gives a head in the model's
    dtype, as timm's models do: the new logits are the pooled features through that head,
    computed here by hand in float64."""
    model = small().double()
    if patched:
        tokenprune.patch(model, r=8)
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64 and model.num_classes == 5
    x = clip().double()
    with torch.no_grad():
        logits = model(x)
        if patched:
            state = model.forward_tokens(x)
            pooled = model.forward_head(state.x, pre_logits=True, size=state.pool_weights)
        else:
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, pooled @ model.head.weight.T + model.head.bias)


def test_named_configs():
    for factory, (dim, depth, heads) in (
        (video_vit_small_patch16_224, (384, 12, 6)),
        (video_vit_base_patch16_224, (768, 12, 12)),
        (video_vit_large_patch16_224, (1024, 24, 16)),
    ):
        with torch.device("meta"):
            model = factory()
        assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)
        assert model.patch_embed.grid_size == (8, 14, 14) and model.num_classes == 400
        assert model.patch_embed.proj.kernel_size == (2, 16, 16)


def test_wrong_clip_size_raises():
    model = small()
    with pytest.raises(ValueError, match="8 frames of 64x64"):
        model(clip(frames=4))
    with pytest.raises(ValueError, match="8 frames of 64x64"):  # patched: the same clip message
        tokenprune.patch(small(), r=4)(clip(size=48))
    dynamic = tokenprune.patch(small(dynamic_img_size=True), r=4)
    with pytest.raises(ValueError, match="frames 3 is not a multiple of the tubelet/patch size 2"):
        tokenprune.plan(dynamic, (3, 64, 64))  # as the forward says, not a floored one-frame grid
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"C=3.*\(1, 8, 3, 64, 64\).*frames first\? x.permute\(0, 2, 1, 3, 4\)"):
        model(clip(batch=1).transpose(1, 2))  # as many video loaders give it
    for patched in (False, True):
        with pytest.raises(ValueError, match=r"C=3.*\(1, 1, 8, 64, 64\)"):
            (tokenprune.patch(small(), r=4) if patched else model)(clip(batch=1)[:, :1])
    for name, value in (("num_frames", 0), ("tubelet_size", 0), ("img_size", 0), ("patch_size", 0)):
        with pytest.raises(ValueError, match=f"{name} must be positive, got 0"):
            small(**{name: value})


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_dynamic_clip_size(pos_embed):
    model = small(dynamic_img_size=True, pos_embed=pos_embed)
    with torch.no_grad():
        assert model.forward_features(clip(frames=4, size=96)).shape == (2, 2 * 6 * 6, 384)
        # the model's own size gives exactly the fixed-size model's output
        fixed = small(pos_embed=pos_embed)
        fixed.load_state_dict(model.state_dict())
        x = clip()
        torch.testing.assert_close(model(x), fixed(x), rtol=0, atol=0)


def test_token_order_is_t_h_w():
    model = small()
    embed = model.patch_embed
    nn.init.zeros_(embed.proj.bias)
    frames, rows, cols = embed.grid_size
    with torch.no_grad():
        x = clip(batch=1)
        tokens = embed(x)
        conv = embed.proj(x)  # [1, C, T', H', W']
        for t in range(frames):
            for h in range(rows):
                for w in range(cols):
                    torch.testing.assert_close(tokens[0, t * rows * cols + h * cols + w], conv[0, :, t, h, w])
        # one non-zero tubelet lights exactly the token at t·H'W' + h·W' + w
        t, h, w = 2, 1, 3
        x = torch.zeros(1, 3, 8, 64, 64)
        x[:, :, 2 * t : 2 * t + 2, 16 * h : 16 * h + 16, 16 * w : 16 * w + 16] = 1.0
        lit = embed(x).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert lit == [t * rows * cols + h * cols + w]


def test_sincos_matches_videomae_formula():
    num_positions, dim = 64, 384
    # VideoMAE's code, written out: angle = p / 10000^(2·(j//2)/d); sin on even j, cos on odd j
    expected = torch.tensor(
        [
            [
                (math.sin if j % 2 == 0 else math.cos)(p / math.pow(10000, 2 * (j // 2) / dim))
                for j in range(dim)
            ]
            for p in range(num_positions)
        ],
        dtype=torch.float64,
    ).float()[None]
    table = sincos_pos_embed(num_positions, dim)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(small().pos_embed, expected, rtol=0, atol=1e-6)
    modeling = pytest.importorskip("transformers.models.videomae.modeling_videomae")
    if hasattr(modeling, "get_sinusoid_encoding_table"):
        torch.testing.assert_close(table, modeling.get_sinusoid_encoding_table(num_positions, dim), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- conversion


def hf_model(use_mean_pooling: bool = True, **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.VideoMAEConfig(
        **{
            "image_size": 64,
            "patch_size": 16,
            "num_frames": 8,
            "tubelet_size": 2,
            "hidden_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 384,
            "num_labels": 7,
            "use_mean_pooling": use_mean_pooling,
            **overrides,
        }
    )
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(config).eval()
    # The init zeroes biases and sets norms to 1, which would hide a misplaced bias or norm.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        model.classifier.weight.mul_(20)
    return model


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x.permute(0, 2, 1, 3, 4)).logits  # HF clips are [B, T, C, H, W]


def ours_from_hf(hf) -> VideoVisionTransformer:
    torch.manual_seed(1)
    return VideoVisionTransformer(**videomae_config_from_transformers(hf.config)).eval()


def to_original_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original VideoMAE repo's names for a HF state dict (written independently of the loader)."""
    out = {}
    for key, value in hf_state.items():
        key = key.removeprefix("videomae.")
        if m := re.match(r"encoder\.layer\.(\d+)\.(.*)", key):
            i, rest = m.groups()
            if rest.startswith("attention.attention."):
                continue  # fused below
            rest = (
                rest.replace("layernorm_before", "norm1")
                .replace("layernorm_after", "norm2")
                .replace("attention.output.dense", "attn.proj")
                .replace("intermediate.dense", "mlp.fc1")
                .replace("output.dense", "mlp.fc2")
            )
            out[f"blocks.{i}.{rest}"] = value
            continue
        key = key.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        key = key.replace("classifier", "head").replace("layernorm", "norm")
        out[key] = value
    layers = {int(m.group(1)) for k in hf_state if (m := re.search(r"layer\.(\d+)\.", k))}
    for i in layers:
        p = f"videomae.encoder.layer.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf_state[p + n + ".weight"] for n in ("query", "key", "value")])
        out[f"blocks.{i}.attn.q_bias"] = hf_state[p + "query.bias"]
        out[f"blocks.{i}.attn.v_bias"] = hf_state[p + "value.bias"]
    return out


@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_transformers_save_pretrained_matches(tmp_path, use_mean_pooling):
    hf = hf_model(use_mean_pooling)
    hf.save_pretrained(tmp_path)
    model = ours_from_hf(hf)
    result = load_videomae(model, tmp_path)
    assert result.format == "transformers" and not result.missing_keys and not result.unexpected_keys
    x = clip()
    reference = hf_logits(hf, x)
    with torch.no_grad():
        logits = model(x)
    assert reference.abs().max() > 1.0  # logits of a real size, so the tolerance means something
    assert (logits - reference).abs().max() < 1e-4
    # VideoMAE has no key bias: the fused bias is (q, 0, v)
    dim = model.embed_dim
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias[dim : 2 * dim]) == 0


def test_transformers_files_and_old_bias_names(tmp_path):
    hf = hf_model()
    state = hf.state_dict()
    # hub checkpoints (transformers < 5) name the biases q_bias / v_bias
    old = {
        k.replace("attention.attention.query.bias", "attention.attention.q_bias").replace(
            "attention.attention.value.bias", "attention.attention.v_bias"
        ): v
        for k, v in state.items()
    }
    assert any(k.endswith("q_bias") for k in old)
    torch.save(old, tmp_path / "pytorch_model.bin")
    x = clip()
    reference = hf_logits(hf, x)
    for source in (tmp_path / "pytorch_model.bin", str(tmp_path), old):
        model = ours_from_hf(hf)
        load_videomae(model, source)
        with torch.no_grad():
            assert (model(x) - reference).abs().max() < 1e-4


def test_a_factory_model_runs_hugging_face_weights_with_their_norm_eps(tmp_path):
    """transformers' VideoMAE normalises with its config's layer_norm_eps (default 1e-12) in the
    blocks and 1e-5 in fc_norm; a factory builds the original VideoMAE's 1e-6. The Kinetics eval,
    loading a save_pretrained folder into a factory's model, gives every LayerNorm the eps of its
    transformers counterpart; a weights file with no config beside it gets transformers' default."""
    from evals import kinetics

    sizes = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}
    hf = hf_model(layer_norm_eps=1e-7, **sizes)
    hf.save_pretrained(tmp_path / "hf")
    expected = [m.eps for m in hf.modules() if isinstance(m, nn.LayerNorm)]
    assert set(expected) == {1e-7, 1e-5}
    args = argparse.Namespace(
        model="video_vit_small_patch16_224", num_frames=8, img_size=64, num_classes=7,
        checkpoint=str(tmp_path / "hf"), budget=None, method="none",
    )  # fmt: skip
    model, _ = kinetics.build_model(args, {})
    assert [m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)] == expected
    x = clip()
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max() < 1e-4
    (tmp_path / "bare").mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "bare" / "model.safetensors")
    use_transformers_norm_eps(model, tmp_path / "bare" / "model.safetensors")
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-12, 1e-5}
    assert model.fc_norm.eps == 1e-5


def test_original_pth_round_trip(tmp_path):
    hf = hf_model()
    original = to_original_names(hf.state_dict())
    x = clip()
    reference = hf_logits(hf, x)
    for wrapper in ("model", "module"):
        path = tmp_path / f"checkpoint_{wrapper}.pth"
        # VideoMAE's training checkpoints carry the run's argparse.Namespace next to the weights
        torch.save({wrapper: original, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
        model = ours_from_hf(hf)
        assert load_videomae(model, path).format == "original"
        with torch.no_grad():
            assert (model(x) - reference).abs().max() < 1e-4
    # and back: our weights under original names load into a fresh model exactly
    ours = model.state_dict()
    resaved = {}
    for key, value in ours.items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            resaved[key.replace("qkv.bias", "q_bias")], resaved[key.replace("qkv.bias", "v_bias")] = q, v
        else:
            resaved[key] = value
    fresh = ours_from_hf(hf)
    load_videomae(fresh, resaved)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_sharded_ddp_and_pretraining_layouts(tmp_path):
    """The other layouts checkpoints come in: a sharded save_pretrained folder, DDP's 'module.'
    prefix, and a pre-training checkpoint whose encoder sits under 'encoder.'."""
    hf = hf_model()
    x = clip()
    reference = hf_logits(hf, x)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    original = to_original_names(hf.state_dict())
    ddp = {f"module.{k}": v for k, v in original.items()}
    pretraining = {k if k.startswith(("head.", "fc_norm.")) else f"encoder.{k}": v for k, v in original.items()}
    pretraining["decoder.norm.weight"] = torch.ones(3)  # the decoder is not ours: reported, not loaded
    for source, unexpected in ((tmp_path / "sharded", []), (ddp, []), (pretraining, ["decoder.norm.weight"])):
        model = ours_from_hf(hf)
        result = load_videomae(model, source, strict=False)
        assert not result.missing_keys and result.unexpected_keys == unexpected
        with torch.no_grad():
            assert (model(x) - reference).abs().max() < 1e-4


def test_layerscale_gammas_load_into_ls():
    """VideoMAE's LayerScale (``gamma_1``/``gamma_2``, from init_values) loads into timm's
    ``ls1``/``ls2``: a model saved under the original names reloads exactly."""
    source = small(init_values=0.1, num_classes=3)
    with torch.no_grad():
        for block in source.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    renamed = {}
    for key, value in source.state_dict().items():
        key = key.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            renamed[key.replace("qkv.bias", "q_bias")], renamed[key.replace("qkv.bias", "v_bias")] = q, v
        else:
            renamed[key] = value
    assert any(k.endswith("gamma_1") for k in renamed)
    target = video_vit_small_patch16_224(num_frames=8, img_size=64, depth=2, init_values=0.1, num_classes=3).eval()
    load_videomae(target, renamed)
    with torch.no_grad():
        torch.testing.assert_close(target(clip()), source(clip()), rtol=0, atol=0)


def test_strict_load_names_missing_and_unexpected_keys():
    hf = hf_model()
    original = to_original_names(hf.state_dict())
    del original["blocks.1.norm2.weight"]
    original["blocks.0.attn.extra"] = torch.zeros(1)
    model = ours_from_hf(hf)
    with pytest.raises(ValueError) as error:
        load_videomae(model, original)
    message = str(error.value)
    assert "missing keys (1): blocks.1.norm2.weight" in message
    assert "unexpected keys (1): blocks.0.attn.extra" in message
    # HF names are reported after mapping, in the model's names
    state = hf.state_dict()
    del state["videomae.encoder.layer.2.intermediate.dense.bias"], state["classifier.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(2\): blocks\.2\.mlp\.fc1\.bias, head\.weight"):
        load_videomae(ours_from_hf(hf), state)
    # a lone q bias: the fused bias is missing and the stray part is named
    partial = to_original_names(hf.state_dict())
    del partial["blocks.2.attn.v_bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.2\.attn\.qkv\.bias\n"
                       r"unexpected keys \(1\): blocks\.2\.attn\.q_bias"):
        load_videomae(model, partial)
    result = load_videomae(model, original, strict=False)
    assert result.missing_keys == ["blocks.1.norm2.weight"] and result.unexpected_keys == ["blocks.0.attn.extra"]
    with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
        load_videomae(model, {"foo.weight": torch.zeros(1)})


def test_shape_mismatch_raises():
    hf = hf_model()
    state = hf.state_dict()
    model = VideoVisionTransformer(**{**videomae_config_from_transformers(hf.config), "num_classes": 5})
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(7, 96\) vs model \(5, 96\)"):
        load_videomae(model, state)


# ----------------------------------------------------------------------------- learned pos-embed


def test_learned_pos_embed_resized_on_load():
    source = small(num_frames=4, pos_embed="learned", num_classes=3)
    assert source.pos_embed.shape == (1, 2 * 4 * 4, 384)
    state = source.state_dict()
    # 8 frames: 4 temporal positions; inferred grid (2, 4, 4) from the model's spatial grid
    target = small(num_frames=8, pos_embed="learned", num_classes=3)
    load_videomae(target, state)
    assert target.pos_embed.shape == (1, 4 * 4 * 4, 384)
    expected = resize_pos_embed(state["pos_embed"], (4, 4, 4), (2, 4, 4))
    torch.testing.assert_close(target.pos_embed.data, expected)
    # linear in time, align_corners=False: the outer frames copy the source's, the inner blend
    grid = target.pos_embed.data.reshape(4, 16, 384)
    old = state["pos_embed"].reshape(2, 16, 384)
    torch.testing.assert_close(grid[0], old[0])
    torch.testing.assert_close(grid[3], old[1])
    torch.testing.assert_close(grid[1], 0.75 * old[0] + 0.25 * old[1])
    with torch.no_grad():
        assert target(clip()).shape == (2, 3)


def test_pos_embed_resize_space_and_time():
    pos = torch.randn(1, 2 * 4 * 4, 8)
    assert resize_pos_embed(pos, (2, 4, 4), (2, 4, 4)) is pos
    out = resize_pos_embed(pos, (3, 6, 5), (2, 4, 4))
    assert out.shape == (1, 3 * 6 * 5, 8)
    # a grid that cannot be inferred needs pos_embed_grid
    source = small(num_frames=4, img_size=32, pos_embed="learned")  # (2, 2, 2): 8 entries
    target = small(num_frames=6, img_size=64, pos_embed="learned")  # (3, 4, 4)
    state = source.state_dict()
    with pytest.raises(ValueError, match="pos_embed_grid"):
        load_videomae(target, state)
    load_videomae(target, state, pos_embed_grid=(2, 2, 2))
    assert target.pos_embed.shape == (1, 48, 384)


def test_pos_embed_grid_is_asked_for_when_two_readings_fit():
    """A 16-frame 112² table (8·7·7 = 392 entries) loaded for 16 frames at 224² (8×14×14) could
    also be 2 frames of 14×14: the loader must not guess (VideoMAE would keep the frames)."""
    from tokenprune.models.videomae import _infer_grid

    with pytest.raises(ValueError, match=r"could be \(8, 7, 7\) or \(2, 14, 14\).*pos_embed_grid"):
        _infer_grid(392, (8, 14, 14))
    assert _infer_grid(8 * 7 * 7, (8, 16, 16)) == (8, 7, 7)  # only the same frame count fits
    assert _infer_grid(4 * 14 * 14, (8, 14, 14)) == (4, 14, 14)  # only the same frame size fits
    with pytest.raises(ValueError, match="fits neither"):
        _infer_grid(30, (8, 14, 14))


def test_a_learned_16_by_9_model_reloads_its_own_weights():
    """A 144×256 clip has a 9×16 patch grid, and 9·16 = 12²: a table of the model's own token
    count could also be read as 12×12 frames. It is the model's own table, loaded unchanged
    (VideoMAE's script resizes only when the sizes differ), not refused or resampled."""
    torch.manual_seed(0)
    source = VideoVisionTransformer(img_size=(144, 256), num_frames=4, embed_dim=32, depth=1, num_heads=2,
                                    num_classes=3, pos_embed="learned").eval()
    assert source.grid_size == (2, 9, 16)
    state = source.state_dict()
    target = VideoVisionTransformer(img_size=(144, 256), num_frames=4, embed_dim=32, depth=1, num_heads=2,
                                    num_classes=3, pos_embed="learned").eval()
    result = load_videomae(target, state)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(target.pos_embed.data, state["pos_embed"], rtol=0, atol=0)
    x = torch.randn(1, 3, 4, 144, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_a_non_square_table_is_not_read_as_square_frames():
    """A 9×16 table (144 per frame, a 144×256 clip) loaded into a 16:9 model at 288×512 (18×32)
    is also 12×12 frames: the loader must ask, not resample it as 12×12 (a silent scramble). A
    table of the model's aspect ratio that is no square (7×10 → 14×20) is read as such."""
    from tokenprune.models.videomae import _infer_grid

    def learned(height: int, width: int) -> VideoVisionTransformer:
        return VideoVisionTransformer(img_size=(height, width), num_frames=4, embed_dim=16, depth=1, num_heads=2,
                                      num_classes=3, pos_embed="learned").eval()

    torch.manual_seed(0)
    state = learned(144, 256).state_dict()
    target = learned(288, 512)
    with pytest.raises(ValueError, match=r"could be \(2, 12, 12\) or \(2, 9, 16\).*pos_embed_grid"):
        load_videomae(target, state)
    load_videomae(target, state, pos_embed_grid=(2, 9, 16))
    torch.testing.assert_close(target.pos_embed.data, resize_pos_embed(state["pos_embed"], (2, 18, 32), (2, 9, 16)))
    assert _infer_grid(2 * 7 * 10, (2, 14, 20)) == (2, 7, 10)
    assert _infer_grid(2 * 7 * 7, (2, 14, 14)) == (2, 7, 7)  # square models: the square reading, as before


def test_pos_embed_resize_is_linear_in_time_and_timms_resize_in_space():
    """A separable table a[t] + b[h, w] resizes to interp(a)[t'] + timm_resize(b)[h', w']: the
    time step is 1-D linear interpolation, the space step timm's image resize, frame by frame."""
    from timm.layers import resample_abs_pos_embed

    a, b = torch.randn(2, 8), torch.randn(4 * 3, 8)  # (T, H, W) = (2, 4, 3): not square
    pos = (a[:, None, :] + b[None, :, :]).reshape(1, 2 * 4 * 3, 8)
    out = resize_pos_embed(pos, (3, 6, 5), (2, 4, 3)).reshape(3, 6 * 5, 8)
    a_new = torch.nn.functional.interpolate(a.T[None], size=3, mode="linear", align_corners=False)[0].T
    b_new = resample_abs_pos_embed(b[None], new_size=[6, 5], old_size=[4, 3], num_prefix_tokens=0)[0]
    torch.testing.assert_close(out, a_new[:, None, :] + b_new[None, :, :], atol=1e-5, rtol=1e-5)
    # Loading at another resolution, same frames: the stored grid is inferred and each frame
    # resized like timm resizes an image ViT's table.
    source = small(num_frames=4, img_size=64, pos_embed="learned")  # (2, 4, 4)
    target = small(num_frames=4, img_size=96, pos_embed="learned")  # (2, 6, 6)
    state = source.state_dict()
    load_videomae(target, state)
    frames = state["pos_embed"].reshape(2, 16, -1)
    expected = torch.cat([resample_abs_pos_embed(f[None], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=0) for f in frames], 1)
    torch.testing.assert_close(target.pos_embed.data, expected)


def test_sincos_model_ignores_stored_table_but_not_learned_one():
    model = small(num_classes=3)
    state = dict(model.state_dict())
    state["pos_embed"] = sincos_pos_embed(64, 384)  # someone saved the fixed table: dropped
    load_videomae(model, state)
    for dtype in (torch.float16, torch.bfloat16):  # also a half-precision copy of it
        state["pos_embed"] = sincos_pos_embed(64, 384).to(dtype)
        load_videomae(model, state)
    state["pos_embed"] = torch.randn(1, 64, 384)  # a learned one cannot go into a sin-cos model
    with pytest.raises(ValueError, match="unexpected keys \\(1\\): pos_embed"):
        load_videomae(model, state)


def test_a_position_embedding_of_the_other_kind_is_named_with_the_fix():
    """A checkpoint trained with use_learnable_pos_emb into a sin-cos model, or a sin-cos one
    (no pos_embed stored) into a learned model: the error says which and how to build the model."""
    state = dict(small(num_classes=3).state_dict())
    state["pos_embed"] = torch.randn(1, 64, 384)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): pos_embed\n.*learned.*pos_embed='learned'"):
        load_videomae(small(num_classes=3), state)
    learned = small(num_classes=3, pos_embed="learned")
    load_videomae(learned, state)  # the right kind loads
    torch.testing.assert_close(learned.pos_embed.data, state["pos_embed"], rtol=0, atol=0)
    del state["pos_embed"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): pos_embed\n.*sin-cos.*pos_embed='sincos'"):
        load_videomae(small(num_classes=3, pos_embed="learned"), state)


def test_an_image_batch_is_refused_as_not_a_clip() -> None:
    model = tokenprune.patch(small(), r=4)
    for size in (64, 32):  # the clip's size or not: the error says a clip is expected
        with pytest.raises(ValueError, match=r"expected a clip \[B, C, T, H, W\]"):
            model(torch.randn(1, 3, size, size))


def test_dynamic_sincos_equals_the_model_built_for_that_clip_size():
    """With dynamic_img_size, a sin-cos model fed another clip size must use VideoMAE's table
    for that token count (what VideoMAE builds for that size), i.e. give exactly the output of
    the model created at that size: not an interpolated copy of its own table."""
    dynamic = small(dynamic_img_size=True)
    fixed = small(num_frames=4, img_size=96)
    fixed.load_state_dict(dynamic.state_dict())  # the weights do not depend on the clip size
    modeling = pytest.importorskip("transformers.models.videomae.modeling_videomae")
    if hasattr(modeling, "get_sinusoid_encoding_table"):  # the reference table, 2·6·6 positions
        torch.testing.assert_close(fixed.pos_embed, modeling.get_sinusoid_encoding_table(72, 384), rtol=0, atol=1e-6)
    x = clip(frames=4, size=96)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_grid", [(2, 4, 6), (2, 6, 4), (3, 4, 6)])
def test_pos_embed_resize_when_only_one_spatial_side_changes(new_grid):
    from timm.layers import resample_abs_pos_embed

    a, b = torch.randn(2, 8), torch.randn(4 * 4, 8)  # separable: a[t] + b[h, w]
    pos = (a[:, None, :] + b[None, :, :]).reshape(1, 2 * 4 * 4, 8)
    t, h, w = new_grid
    out = resize_pos_embed(pos, new_grid, (2, 4, 4))
    assert out.shape == (1, t * h * w, 8)
    a_new = torch.nn.functional.interpolate(a.T[None], size=t, mode="linear", align_corners=False)[0].T
    b_new = resample_abs_pos_embed(b[None], new_size=[h, w], old_size=[4, 4], num_prefix_tokens=0)[0]
    torch.testing.assert_close(out.reshape(t, h * w, 8), a_new[:, None, :] + b_new[None, :, :], atol=1e-5, rtol=1e-5)


def test_norm_eps_match_transformers():
    """Hugging Face's blocks use layer_norm_eps, its fc_norm nn.LayerNorm's 1e-5: the tolerance of
    the logits comparison cannot see 1e-12 vs 1e-5, so compare the eps with transformers' modules."""
    for pooling in (True, False):
        hf = hf_model(use_mean_pooling=pooling, layer_norm_eps=1e-9)
        ours = VideoVisionTransformer(**videomae_config_from_transformers(hf.config))
        layer = hf.videomae.encoder.layer[0]
        assert ours.blocks[0].norm1.eps == layer.layernorm_before.eps == 1e-9
        assert ours.blocks[0].norm2.eps == layer.layernorm_after.eps
        if pooling:
            assert ours.fc_norm.eps == hf.fc_norm.eps
        else:
            assert ours.norm.eps == hf.videomae.layernorm.eps


def test_transformers_config_with_an_inexact_mlp_ratio_loads_and_matches():
    hf = hf_model(hidden_size=28, intermediate_size=61)  # int(28 * (61 / 28)) == 60 in floating point
    model = VideoVisionTransformer(**videomae_config_from_transformers(hf.config)).eval()
    assert model.blocks[0].mlp.fc1.out_features == 61
    load_videomae(model, hf.state_dict())
    x = clip()
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max() < 1e-4


def test_transformers_config_without_qv_biases_loads_and_matches():
    transformers = pytest.importorskip("transformers")
    hf = hf_model(qv_bias=False) if "qv_bias" in transformers.VideoMAEConfig().to_dict() else hf_model(qkv_bias=False)
    model = VideoVisionTransformer(**videomae_config_from_transformers(hf.config)).eval()
    assert model.blocks[0].attn.qkv.bias is None
    result = load_videomae(model, hf.state_dict())  # strict: nothing missing
    assert not result.missing_keys and not result.unexpected_keys
    x = clip()
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max() < 1e-4


def test_a_stored_key_bias_is_kept():
    """The loader fills k's bias with zeros only when the checkpoint has none: a stored one
    (original names attn.k_bias) must land in the middle third, as the keys feed ToMe's metric."""
    source = small(num_classes=3)
    dim = source.embed_dim
    state = {}
    for key, value in source.state_dict().items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            stem = key.removesuffix("qkv.bias")
            state[stem + "q_bias"], state[stem + "v_bias"] = q + 1.0, v - 1.0
            state[stem + "k_bias"] = torch.arange(dim, dtype=value.dtype)
        else:
            state[key] = value
    target = small(num_classes=3)
    load_videomae(target, state)
    bias = target.blocks[1].attn.qkv.bias
    torch.testing.assert_close(bias[dim : 2 * dim], torch.arange(dim, dtype=bias.dtype), rtol=0, atol=0)
    torch.testing.assert_close(bias[:dim], state["blocks.1.attn.q_bias"], rtol=0, atol=0)
    torch.testing.assert_close(bias[2 * dim :], state["blocks.1.attn.v_bias"], rtol=0, atol=0)


def test_drop_path_rates_are_videomae_linspace():
    model = small(depth=4, drop_path_rate=0.3)
    expected = torch.linspace(0, 0.3, 4).tolist()  # VideoMAE: [x.item() for x in torch.linspace(0, rate, depth)]
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx(expected)
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in model.blocks] == pytest.approx(expected)

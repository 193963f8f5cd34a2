"""tokenprune's ToMe equals published ToMe (an independent reference) on the models it supports."""

from __future__ import annotations

import pytest
import timm
import torch

import tokenprune
from tests.tome_reference import tome_reference_forward, tome_schedule


def test_reference_schedule_is_tomes() -> None:
    # ToMe's decreasing schedule for 12 blocks, worked out by hand from its formula:
    # 32 − 32·i/11 truncated (so the last block's 0.0 stays 0).
    assert tome_schedule((16, -1), 12) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert tome_schedule((16, 0.5), 3) == [8, 16, 24] and tome_schedule(13, 2) == [13, 13]


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224", "deit_small_patch16_224"])
@pytest.mark.parametrize("r,prop_attn", [(8, True), (16, True), ((16, -1), True), (13, False)])
def test_matches_published_tome(name: str, r, prop_attn: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).eval()
    x = torch.randn(2, 3, 224, 224)
    expected = tome_reference_forward(model, x, tome_schedule(r, len(model.blocks)), prop_attn)
    tokenprune.patch(model, r=r, prop_attn=prop_attn)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_distilled_deit_keeps_its_distillation_token() -> None:
    """Published ToMe moves DeiT's distillation token out of position 1 after the first merge
    (its head then reads a patch token) and can merge it later. tokenprune keeps all prefix
    tokens first and unmerged: position 1 still holds the distillation token, alone."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_distilled_patch16_224").eval()
    tokenprune.patch(model, r=16, trace_source=True)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    source = tokenprune.source(model)
    assert torch.equal(source[:, :2, :2], torch.eye(2, dtype=source.dtype).expand(2, 2, 2))
    assert torch.equal(source[:, :2].sum(-1), torch.ones(2, 2, dtype=source.dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_model_matches_published_tome_to_float64_rounding(backend: str) -> None:
    """A float64 model keeps float64 through proportional attention: log s in float64, not a
    float32 log cast up (which left the logits ~4e-9 from the float64 reference)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = tome_reference_forward(model, x, [4] * 4, True)
    tokenprune.patch(model, r=4, backend=backend)
    with torch.no_grad():
        logits = model(x)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=0)

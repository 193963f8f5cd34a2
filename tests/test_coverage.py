"""evals/coverage.py: the survey of which timm architectures tokenprune patches, on two tiny ones."""

from __future__ import annotations

import json

import pytest

from evals import coverage


@pytest.fixture
def two_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    listed = {
        # (ConVit: another timm class, listed here under a surveyed module to be named unsupported)
        "vision_transformer": ["vit_tiny_patch16_224", "convit_tiny"],
        "cait": ["cait_xxs24_224"],  # its class token joins after the blocks: one more token than planned
        "vision_transformer_sam": ["samvit_base_patch16"],
    }
    monkeypatch.setattr(coverage, "architectures", lambda module: listed.get(module, []))


def test_survey_checks_what_it_patches_and_names_what_it_cannot(two_architectures, tmp_path) -> None:
    out = tmp_path / "coverage.json"
    modules = ["--module", "vision_transformer", "--module", "cait", "--module", "vision_transformer_sam"]
    assert coverage.main([*modules, "--depth", "1", "--out", str(out), "--quiet"]) == 0
    rows = {row["architecture"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["vit_tiny_patch16_224"]["status"] == "ok" and rows["vit_tiny_patch16_224"]["built"] == "1 blocks"
    assert rows["cait_xxs24_224"]["status"] == "ok"
    assert rows["samvit_base_patch16"]["status"] == "ok"  # by merge_unmerge, its blocks needing every patch
    assert rows["convit_tiny"]["status"] == "unsupported" and "ConVit" in rows["convit_tiny"]["detail"]
    assert "3 of 4 pretrained architectures" in out.with_suffix(".md").read_text()


def test_an_architecture_that_raises_is_a_failed_row(two_architectures, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(model, r):
        raise RuntimeError("shape mismatch in block 0")

    monkeypatch.setattr(coverage, "check", broken)
    out = tmp_path / "coverage.json"
    assert coverage.main(["--module", "vision_transformer", "--depth", "1", "--out", str(out), "--quiet"]) == 1
    rows = {row["architecture"]: row for row in json.loads(out.read_text())["rows"]}
    row = rows["vit_tiny_patch16_224"]
    assert row["status"] == "failed" and row["detail"] == "RuntimeError: shape mismatch in block 0"


def test_a_failed_check_fails_the_run(two_architectures, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coverage, "check", lambda model, r: ["r=0 is not bit-identical to the unpatched model"])
    out = tmp_path / "coverage.json"
    assert coverage.main(["--module", "vision_transformer", "--depth", "1", "--out", str(out), "--quiet"]) == 1
    assert "| vit_tiny_patch16_224 | failed | r=0 is not bit-identical" in out.with_suffix(".md").read_text()


def test_check_catches_a_patch_that_changes_the_unreduced_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    import torch

    import tokenprune

    model = timm.create_model("vit_tiny_patch16_224", depth=1).eval()
    assert coverage.check(model, r=4) == []
    original = tokenprune.patch

    def nudging_patch(model, *args, **kwargs):  # a patch whose r=0 is off by a rounding error
        patched = original(model, *args, **kwargs)
        with torch.no_grad():
            patched.norm.bias.add_(1e-6)
        return patched

    monkeypatch.setattr(tokenprune, "patch", nudging_patch)
    assert coverage.check(model, r=4)[0] == "r=0 is not bit-identical to the unpatched model"


def test_per_block_kv_heads_are_sampled_to_build_a_few_blocks() -> None:
    """Sapiens2's builder insists on one key/value head count per block of its full depth: the
    survey samples that list (block 0, full attention; the middle block, grouped-query)."""
    model, built = coverage.build("vit_huge_patch16_sapiens2", 2)
    assert built == "2 blocks (num_kv_heads=(16, 8), sampled from its per-block list)"
    assert [block.attn.num_kv_heads for block in model.blocks] == [16, 8]

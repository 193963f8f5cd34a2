"""evals.bench: run the benchmark in-process on a tiny model and check what it writes.

Nothing here asserts measured speed (CPU timings on a shared machine are noise); only the
structure of the results, the figures derived from tokenprune (FLOPs, plan) and agreement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import tokenprune
from evals import bench

MODEL = "vit_tiny_patch16_224"
IMG_SIZE = 64  # 4x4 patches + class token = 17 tokens: fast on 2 cores
R_VALUES = (1, 2)
ROW_FIELDS = {
    "model",
    "method",
    "r",
    "label",
    "attention",
    "backend",
    "images_per_s",
    "median_s",
    "times_s",
    "speedup",
    "gflops_per_image",
    "output_tokens",
    "tokens_per_block",
    "logits_cosine",
    "top1_agreement_pct",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        "--model", MODEL,
        "--img-size", str(IMG_SIZE),
        "--batch-size", "2",
        "--warmup", "1",
        "--runs", "2",
        "--device", "cpu",
        "--out", str(out),
        "--quiet",
    ]  # fmt: skip
    for r in R_VALUES:
        argv += ["--r", str(r)]
    # One thread: the run is tiny, and two OpenMP threads fighting other processes (e.g. a
    # parallel test run) for 2 cores make every small op wait a scheduler slice.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        returned = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    return returned, out


def _rows(run: tuple[dict[str, Any], Path]) -> list[dict[str, Any]]:
    return json.loads(run[1].read_text())["rows"]


def test_json_is_valid_and_complete(run: tuple[dict[str, Any], Path]) -> None:
    returned, out = run
    document = json.loads(out.read_text())
    assert document == json.loads(json.dumps(returned))  # the file holds what main returned
    assert document["config"]["model"] == MODEL
    assert document["config"]["img_size"] == [IMG_SIZE, IMG_SIZE]
    assert document["config"]["r"] == list(R_VALUES)
    env = document["environment"]
    for key in ("torch", "timm", "triton", "device_name", "torch_num_threads"):
        assert key in env
    assert env["torch_num_threads"] == 1  # recorded as it was during the run (see the fixture)
    assert set(env["loadavg_1_5_15min"]) == {"start", "end"}
    assert isinstance(document["warnings"], list)  # e.g. a busy machine; never asserted empty
    # The atomic write leaves no temp file behind.
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json", "bench.md"]

    rows = document["rows"]
    assert [(row["label"], row["attention"]) for row in rows] == [
        ("baseline", "fused"),
        ("tome r=1", "fused"),
        ("tome r=2", "fused"),
        ("baseline", "manual"),
        ("tome r=1", "manual"),  # the middle r of (1, 2)
    ]
    assert [row["backend"] for row in rows] == [None, "auto", "auto", None, "auto"]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["model"] == MODEL
        assert len(row["times_s"]) == 2
        assert row["images_per_s"] > 0 and row["median_s"] > 0


def test_markdown_table(run: tuple[dict[str, Any], Path]) -> None:
    text = run[1].with_suffix(".md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(_rows(run))  # header, alignment, one line per row
    assert "tome r=2" in text


def test_speedup_is_relative_to_fused_baseline(run: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(run)
    assert rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["speedup"] == pytest.approx(row["images_per_s"] / rows[0]["images_per_s"])


def test_flops_and_tokens_follow_tokenprune(run: tuple[dict[str, Any], Path]) -> None:
    fused = [row for row in _rows(run) if row["attention"] == "fused"]
    gflops = [row["gflops_per_image"] for row in fused]
    assert gflops == sorted(gflops, reverse=True) and len(set(gflops)) == len(gflops)  # strictly decreasing

    model = timm.create_model(MODEL, pretrained=False, img_size=IMG_SIZE)
    assert fused[0]["output_tokens"] == tokenprune.plan(model, IMG_SIZE).output_tokens == 17
    assert fused[0]["gflops_per_image"] == pytest.approx(tokenprune.flops(model, IMG_SIZE).total / 1e9)
    for row in fused[1:]:
        tokenprune.patch(model, r=row["r"])
        reduction = tokenprune.plan(model, IMG_SIZE)
        assert row["output_tokens"] == reduction.output_tokens
        assert row["tokens_per_block"] == list(reduction.tokens)
        assert row["gflops_per_image"] == pytest.approx(tokenprune.flops(model, IMG_SIZE).total / 1e9)


def test_agreement(run: tuple[dict[str, Any], Path]) -> None:
    rows = _rows(run)
    baseline, manual_baseline = rows[0], rows[3]
    assert baseline["logits_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert baseline["top1_agreement_pct"] == 100.0
    # Manual attention computes the same function as SDPA, up to rounding.
    assert manual_baseline["logits_cosine"] == pytest.approx(1.0, abs=1e-4)
    for row in rows:
        if row["method"] == "tome":
            assert -1.0 <= row["logits_cosine"] <= 1.0 + 1e-9
            assert 0.0 <= row["top1_agreement_pct"] <= 100.0
    # The manual-attention ToMe row merges the same tokens as its fused twin.
    assert rows[4]["logits_cosine"] == pytest.approx(rows[1]["logits_cosine"], abs=1e-4)


def test_measure_interleaved() -> None:
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)]
    results = bench.measure_interleaved(layers, torch.randn(2, 4), warmup=0, runs=3)
    assert [len(result["times"]) for result in results] == [3, 3]


def test_measure_throughput() -> None:
    layer = torch.nn.Linear(4, 4)
    result = bench.measure_throughput(layer, torch.randn(3, 4), warmup=1, runs=5)
    assert len(result["times"]) == 5
    assert result["median_s"] == sorted(result["times"])[2]
    assert result["images_per_s"] == pytest.approx(3 / result["median_s"])
    with pytest.raises(ValueError):
        bench.measure_throughput(layer, torch.randn(3, 4), warmup=0, runs=0)


def test_merge_step_bench(tmp_path: Path) -> None:
    from evals import bench_merge

    out = tmp_path / "merge.json"
    document = bench_merge.main(
        ["--model", "vit_tiny_patch16_224", "--r", "8", "--batch-size", "2", "--video-batch-size", "1",
         "--warmup", "0", "--runs", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(document, default=str))
    model_row, video_row = document["rows"][:2]
    assert model_row["blocks_merging"] == 12 and 0 < model_row["merge_share_pct"] < 100
    assert video_row["merge_ms_per_forward"] > 0
    assert out.with_suffix(".md").read_text().count("| torch |") == 2


def test_bench_attention_needs_a_gpu() -> None:
    import torch

    from evals import bench_attention

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the benchmark would run")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_attention.main(["--tokens", "21"])

"""evals.bench_kernels on tiny shapes, its kernels in the Triton interpreter (CPU): a row per
shape with both backends timed, JSON and markdown that agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kernels
from evals import bench_kernels

pytestmark = pytest.mark.skipif(not kernels.INTERPRET, reason="runs the kernels in the Triton interpreter (TRITON_INTERPRET=1)")


def test_bench_kernels_times_every_shape_on_both_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_kernels, "MATCH_SHAPES", (("match", 2, 5, 6, 20, torch.bfloat16),))
    monkeypatch.setattr(bench_kernels, "ASSIGNMENT_SHAPES", (("assignment", 2, 7),))
    monkeypatch.setattr(bench_kernels, "MEMBER_LIST_SHAPES", (("lists", 2, 7),))
    monkeypatch.setattr(bench_kernels, "MERGE_SHAPES", (("merge", 2, 9, 12, 4),))
    out = tmp_path / "k.json"
    document = bench_kernels.main(["--device", "cpu", "--warmup", "0", "--runs", "1", "--repeat", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(document, default=str))
    assert [(row["op"], row["shape"]) for row in document["rows"]] == [
        ("match", "match"), ("assignment", "assignment"), ("member lists", "lists"), ("merge", "merge")
    ]  # fmt: skip
    for row in document["rows"]:
        assert row["kernel_ms"] > 0 and row["reference_ms"] > 0
        assert row["kernel_speedup"] == pytest.approx(row["reference_ms"] / row["kernel_ms"])
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2:4] == ["| op | shape | Triton ms | reference ms | Triton speedup |", "| :--- | :--- | ---: | ---: | ---: |"]
    assert len(table) == 8 and table[4].startswith("| match | match | ")


def test_bench_kernels_needs_a_gpu_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        bench_kernels.main([])


def test_bench_kernels_on_cpu_needs_the_interpreter_and_writes_a_cpu_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TRITON_INTERPRET=1 the CPU run says how to start it; its default output is its own
    (bench_kernels_cpu.json), never the committed GPU figures."""
    monkeypatch.setattr(bench_kernels, "INTERPRET", False)
    with pytest.raises(SystemExit, match="start with TRITON_INTERPRET=1 set"):
        bench_kernels.main(["--device", "cpu"])
    written = []
    monkeypatch.setattr(bench_kernels, "INTERPRET", True)
    monkeypatch.setattr(bench_kernels, "write_atomic", lambda path, data: written.append(path))
    for shapes in ("MATCH_SHAPES", "ASSIGNMENT_SHAPES", "MEMBER_LIST_SHAPES", "MERGE_SHAPES"):
        monkeypatch.setattr(bench_kernels, shapes, ())
    bench_kernels.main(["--device", "cpu", "--warmup", "0", "--runs", "1", "--repeat", "1"])
    assert [path.name for path in written] == ["bench_kernels_cpu.json", "bench_kernels_cpu.md"]


@pytest.mark.parametrize("flags", [["--repeat", "0"], ["--repeat", "-2"], ["--runs", "0"], ["--warmup", "-1"]])
def test_bench_kernels_refuses_counts_below_one(flags: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``--repeat 0`` once ran no call at all and failed on its unset result (or divided by zero)."""
    monkeypatch.setattr(bench_kernels, "MATCH_SHAPES", (("match", 2, 5, 6, 20, torch.bfloat16),))
    with pytest.raises(SystemExit, match="must be at least 1"):
        bench_kernels.main(["--device", "cpu", *flags])

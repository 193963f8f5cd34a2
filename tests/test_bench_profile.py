"""evals.bench_profile on a tiny model (CPU): wall time per forward for the unreduced model and
each backend, operators ranked by self time, JSON and markdown that agree."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evals import bench_profile


def test_profile_writes_consistent_results(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        document = bench_profile.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "2",
                                       "--backend", "torch", "--batch-size", "2", "--device", "cpu", "--warmup", "1",
                                       "--runs", "2", "--top", "5", "--out", str(tmp_path / "p.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "p.json").read_text()) == document
    (row,) = document["backends"]
    assert row["backend"] == "torch" and row["wall_ms_per_forward"] > 0 and len(row["top_ops"]) == 5
    assert row["kernel_ms_per_forward"] is None and row["gpu_busy_pct"] is None  # CPU: no device timeline
    cpu_ms = [op["self_cpu_ms_per_forward"] for op in row["top_ops"]]
    assert cpu_ms == sorted(cpu_ms, reverse=True)  # ranked by self time
    assert document["setting"] == "r=2" and document["unreduced"]["wall_ms_per_forward"] > 0
    markdown = (tmp_path / "p.md").read_text()
    assert "| backend torch |" in markdown and "Top operators, backend torch" in markdown

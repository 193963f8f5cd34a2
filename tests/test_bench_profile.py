"""evals.bench_profile on a tiny model (CPU): wall time per forward for the unreduced model and
each backend, operators ranked by self time, JSON and markdown that agree."""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

from evals import bench_profile



def _profile_tiny_vit(tmp_path: Path, *options: str) -> dict:
    """bench_profile.main on ViT-Tiny at 64 px, batch 2, torch backend, on one CPU thread;
    writes tmp_path/p.json and p.md."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench_profile.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--backend", "torch",
                                   "--batch-size", "2", "--device", "cpu", *options, "--out", str(tmp_path / "p.json")])
    finally:
        torch.set_num_threads(threads)

def test_profile_writes_consistent_results(tmp_path: Path) -> None:
    document = _profile_tiny_vit(tmp_path, "--r", "2", "--warmup", "1", "--runs", "2", "--top", "5")
    assert json.loads((tmp_path / "p.json").read_text()) == document
    (row,) = document["backends"]
    assert row["backend"] == "torch" and row["wall_ms_per_forward"] > 0 and len(row["top_ops"]) == 5
    assert row["kernel_ms_per_forward"] is None and row["gpu_busy_pct"] is None  # CPU: no device timeline
    cpu_ms = [op["self_cpu_ms_per_forward"] for op in row["top_ops"]]
    assert cpu_ms == sorted(cpu_ms, reverse=True)  # ranked by self time
    assert document["setting"] == "r=2" and document["unreduced"]["wall_ms_per_forward"] > 0
    markdown = (tmp_path / "p.md").read_text()
    assert "| backend torch |" in markdown and "Top operators, backend torch" in markdown


def test_profile_arithmetic_on_a_simulated_gpu(monkeypatch) -> None:
    """CUDA path without a GPU: a fake clock that only moves at synchronisations (the queued work
    of each forward), a fake profiler with known kernel events."""
    clock, queued, calls = [0.0], [0.0], []
    warmup, runs = 2, 3
    seconds = iter([100.0, 100.0] + [0.002, 0.003, 0.010] + [0.0] * runs)  # warm-up, timed, profiled

    def model(inputs) -> None:  # launches work and returns at once, as on a GPU
        calls.append(inputs)
        queued[0] += next(seconds)

    def synchronize(device) -> None:
        assert device.type == "cuda"
        clock[0] += queued[0]
        queued[0] = 0.0

    def event(key: str, count: int, cpu_us: float, device_us: float) -> types.SimpleNamespace:
        return types.SimpleNamespace(key=key, count=count, self_cpu_time_total=cpu_us, self_device_time_total=device_us)

    events = [event("aten::linear", 2 * runs, 900.0, 0.0), event("gemm", 2 * runs, 60.0, 4500.0),
              event("softmax", runs, 0.0, 1500.0), event("aten::add", runs, 300.0, 0.0)]

    class Profile:
        def __init__(self, activities) -> None:
            assert ProfilerActivity.CUDA in activities

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def key_averages(self):
            return events

    monkeypatch.setattr(bench_profile, "profile", Profile)
    monkeypatch.setattr(bench_profile, "synchronize", synchronize)
    monkeypatch.setattr(bench_profile, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    inputs = types.SimpleNamespace(device=torch.device("cuda"))
    got = bench_profile.profile_forward(model, inputs, torch.float32, warmup, runs, top=2)
    assert len(calls) == warmup + 2 * runs
    assert abs(got["wall_ms_per_forward"] - 3.0) < 1e-9  # median of 2, 3 and 10 ms; warm-up untimed
    assert abs(got["kernel_ms_per_forward"] - (4500 + 1500) / runs / 1e3) < 1e-9
    assert abs(got["gpu_busy_pct"] - 100 * 2.0 / 3.0) < 1e-9
    assert got["kernels_per_forward"] == (2 * runs + runs) / runs  # the events with device time
    assert [op["op"] for op in got["top_ops"]] == ["gemm", "softmax"]  # ranked by device time
    gemm = got["top_ops"][0]
    assert gemm["calls_per_forward"] == 2 and abs(gemm["self_cpu_ms_per_forward"] - 60 / runs / 1e3) < 1e-12
    assert abs(gemm["self_device_ms_per_forward"] - 1.5) < 1e-9


def test_unreduced_row_profiles_the_unpatched_model(tmp_path: Path) -> None:
    document = _profile_tiny_vit(tmp_path, "--warmup", "0", "--runs", "3", "--top", "1000")
    assert document["setting"] == "r=16"  # ToMe's default r
    assert document["runs"] == 3 and document["warmup"] == 0
    unreduced = {op["op"]: op["calls_per_forward"] for op in document["unreduced"]["top_ops"]}
    patched = {op["op"]: op["calls_per_forward"] for op in document["backends"][0]["top_ops"]}
    # ToMe's bipartite matching sorts scores; the unpatched ViT never does
    assert "aten::argsort" in patched and "aten::argsort" not in unreduced
    # per forward, not per run: each of the 12 blocks' qkv, proj, fc1, fc2 and the head
    assert unreduced["aten::linear"] == 12 * 4 + 1 == patched["aten::linear"]
    markdown = (tmp_path / "p.md").read_text()  # operators listed for the backends only
    assert "Top operators, backend torch" in markdown and "Top operators, unreduced" not in markdown

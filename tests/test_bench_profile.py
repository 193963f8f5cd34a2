"""evals.bench_profile on a tiny model (CPU): wall time per forward for the unreduced model and
each backend, operators ranked by self time, JSON and markdown that agree."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType
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
    assert "| backend torch |" in markdown and "Top operators by host time, backend torch" in markdown
    assert row["top_kernels"] == [] and "Top kernels" not in markdown  # CPU: no kernels


def test_repeated_backend_profiles_once(tmp_path: Path) -> None:
    document = _profile_tiny_vit(tmp_path, "--backend", "torch", "--r", "2", "--warmup", "0", "--runs", "1", "--top", "1")
    assert [row["backend"] for row in document["backends"]] == ["torch"]


def test_methods_without_a_backend_option_profile(tmp_path: Path) -> None:
    """EViT and DynamicViT drop tokens with gathers, not the merge kernels: they take no backend."""
    document = _profile_tiny_vit(tmp_path, "--method", "evit", "--option", "keep_ratio=0.7", "--warmup", "1", "--runs", "1")
    assert document["setting"] == "keep_ratio=0.7" and document["backends"][0]["wall_ms_per_forward"] > 0


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

    def event(key: str, count: int, cpu_us: float, device_us: float, device_type=DeviceType.CPU):
        return types.SimpleNamespace(key=key, count=count, self_cpu_time_total=cpu_us, self_device_time_total=device_us,
                                     device_type=device_type)

    # As torch's profiler reports them: each operator carries the device time of the kernels it
    # launched, and each kernel is an event of its own.
    events = [event("aten::linear", 2 * runs, 900.0, 4500.0), event("gemm", 2 * runs, 0.0, 4500.0, DeviceType.CUDA),
              event("aten::softmax", runs, 200.0, 1500.0), event("softmax", runs, 0.0, 1500.0, DeviceType.CUDA),
              event("aten::add", runs, 300.0, 0.0)]
    merge_events = [event("_merge_wavg_kernel", runs, 0.0, 300.0, DeviceType.CUDA),
                    event("void at::native::bitonicSortKVInPlace<long>", runs, 0.0, 60.0, DeviceType.CUDA),
                    event("_best_match_kernel", runs, 0.0, 240.0, DeviceType.CUDA)]

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
    assert abs(got["kernel_ms_per_forward"] - (4500 + 1500) / runs / 1e3) < 1e-9  # kernels only, counted once
    assert abs(got["gpu_busy_pct"] - 100 * 2.0 / 3.0) < 1e-9
    assert got["kernels_per_forward"] == (2 * runs + runs) / runs  # kernel launches, not operators
    assert [op["op"] for op in got["top_ops"]] == ["aten::linear", "aten::add"]  # operators, ranked by host time
    linear = got["top_ops"][0]
    assert linear["calls_per_forward"] == 2 and abs(linear["self_cpu_ms_per_forward"] - 900 / runs / 1e3) < 1e-12
    assert abs(linear["self_device_ms_per_forward"] - 1.5) < 1e-9
    assert [k["kernel"] for k in got["top_kernels"]] == ["gemm", "softmax"]  # kernels, ranked by device time
    assert got["top_kernels"][1] == {"kernel": "softmax", "calls_per_forward": 1, "device_ms_per_forward": 0.5}
    assert got["merge_step_kernel_ms_per_forward"] is None and got["merge_step_kernel_pct"] is None  # no Triton step

    events += merge_events  # the Triton path: the merge step's kernels and the sort before the merge
    seconds = iter([0.002] * (warmup + 2 * runs))
    got = bench_profile.profile_forward(model, inputs, torch.float32, warmup, runs, top=2)
    assert abs(got["kernel_ms_per_forward"] - 6600 / runs / 1e3) < 1e-9
    assert abs(got["merge_step_kernel_ms_per_forward"] - 600 / runs / 1e3) < 1e-9
    assert abs(got["merge_step_kernel_pct"] - 100 * 600 / 6600) < 1e-9


def test_the_merge_step_kernels_are_the_ones_kernels_defines() -> None:
    defined = set(re.findall(r"def (_\w+_kernel)\(", "".join(p.read_text() for p in Path("kernels").glob("*.py"))))
    assert set(bench_profile.MERGE_STEP_KERNELS) == defined - {"_attention_kernel"}


def test_markdown_lists_operators_and_kernels_and_cuts_long_kernel_names() -> None:
    kernel = "void at::native::" + "x" * 300
    row = {"wall_ms_per_forward": 2.0, "kernel_ms_per_forward": 1.0, "gpu_busy_pct": 50.0, "kernels_per_forward": 4.0,
           "merge_step_kernel_ms_per_forward": 0.05, "merge_step_kernel_pct": 5.0,
           "top_ops": [{"op": "aten::cat", "calls_per_forward": 2.0, "self_cpu_ms_per_forward": 0.25,
                        "self_device_ms_per_forward": 0.125}],
           "top_kernels": [{"kernel": kernel, "calls_per_forward": 2.0, "device_ms_per_forward": 0.125}]}
    document = {"model": "m", "method": "tome", "setting": "r=16", "batch_size": 8, "dtype": "bfloat16", "runs": 3,
                "warmup": 1, "command": "c", "environment": {"device_name": "gpu", "torch": "2"},
                "unreduced": {**row, "top_ops": [], "top_kernels": [], "merge_step_kernel_ms_per_forward": None,
                              "merge_step_kernel_pct": None},
                "backends": [{"backend": "triton", **row}]}
    markdown = bench_profile.format_markdown(document)
    assert "| backend triton | 2.000 | 1.000 | 50 % | 4 | 0.050 (5.0 %) |" in markdown
    assert "| unreduced | 2.000 | 1.000 | 50 % | 4 | - |" in markdown
    assert "| `aten::cat` | 2 | 0.250 | 0.125 |" in markdown
    cut = next(line for line in markdown.splitlines() if "at::native" in line)
    assert cut == f"| `{kernel[:99]}…` | 2 | 0.125 |"


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
    assert "Top operators by host time, backend torch" in markdown and "Top operators by host time, unreduced" not in markdown


def test_every_wall_time_is_taken_before_the_first_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A profiler session leaves CUPTI attached after it ends (kernel launches slow down): each
    model's wall clock readings, the unreduced model's included, come before any profile."""
    events: list[str] = []
    real_profile, real_clock = bench_profile.profile, bench_profile.time.perf_counter

    def recording_profile(*args, **kwargs):
        events.append("profile")
        return real_profile(*args, **kwargs)

    def clock() -> float:
        events.append("clock")
        return real_clock()

    monkeypatch.setattr(bench_profile, "profile", recording_profile)
    monkeypatch.setattr(bench_profile, "time", types.SimpleNamespace(perf_counter=clock))
    document = _profile_tiny_vit(tmp_path, "--r", "2", "--backend", "auto", "--warmup", "0", "--runs", "2", "--top", "1")
    assert events.count("profile") == 3 and events.count("clock") == 3 * 2 * 2  # 3 models, 2 forwards, 2 readings
    assert events.index("profile") > max(i for i, event in enumerate(events) if event == "clock")
    assert [row["backend"] for row in document["backends"]] == ["torch", "auto"]
    assert all(row["wall_ms_per_forward"] > 0 for row in [document["unreduced"], *document["backends"]])


def test_profile_refuses_a_zero_batch(tmp_path: Path) -> None:
    """``--batch-size 0`` once profiled the default batch of 8 and recorded that, silently."""
    with pytest.raises(SystemExit, match="must be at least 1"):
        bench_profile.main(["--model", "vit_tiny_patch16_224", "--device", "cpu", "--batch-size", "0",
                            "--out", str(tmp_path / "p.json")])  # fmt: skip
    assert not (tmp_path / "p.json").exists()


def test_profile_refuses_what_cannot_run_here_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing GPU, Triton without one, and options the method does not take each raised a
    traceback (torch's "Found no NVIDIA driver", the kernels' RuntimeError, patch's TypeError);
    each is refused by name, as evals.bench refuses them, and nothing is written."""
    out = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "1", "--runs", "1", "--warmup", "0",
           "--out", str(tmp_path / "p.json")]  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(bench_profile, "create_model", lambda *args: pytest.fail("built a model"))
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible here"):
            bench_profile.main([*out, "--device", "cuda"])
    with monkeypatch.context() as patch:
        from evals import harness

        patch.setattr(harness, "triton_usable", lambda *tensors: False)  # (the tests' interpreter runs them on CPU)
        patch.setattr(bench_profile, "create_model", lambda *args: pytest.fail("built a model"))
        with pytest.raises(SystemExit, match="--backend triton: the Triton kernels do not run on cpu here"):
            bench_profile.main([*out, "--device", "cpu", "--backend", "torch", "--backend", "triton"])
    with pytest.raises(SystemExit, match="--method pitome: method 'pitome' needs r.*--r"):
        bench_profile.main([*out, "--device", "cpu", "--method", "pitome"])
    with pytest.raises(SystemExit, match="--method evit with r=8: method 'evit' has no option r"):
        bench_profile.main([*out, "--device", "cpu", "--method", "evit", "--r", "8"])
    assert not (tmp_path / "p.json").exists()

"""The prepared GPU run: every step's arguments are ones its script accepts, the steps fit the
device call, and the runner logs, limits, adapts and copies back what the steps write."""

from __future__ import annotations

import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from evals import bench, gpu_run
from evals.harness import RESULTS_DIR


def test_every_bench_step_parses_and_resolves() -> None:
    bench_steps = [step for step in gpu_run.STEPS if step.module == "evals.bench"]
    assert len(bench_steps) == 8
    for step in bench_steps:
        for triton_ok in (True, False):
            adapted = gpu_run.adapted(step, triton_ok=triton_ok, have_matplotlib=False)
            parsed = bench.build_parser().parse_args([*adapted.args, "--device", "cpu"])
            assert parsed.no_plot and (triton_ok or parsed.backend == ["torch"])
            assert bench._resolve_config(parsed)["settings"], step.name
    (merge,) = [step for step in gpu_run.STEPS if step.module == "evals.bench_merge"]
    assert gpu_run.adapted(merge, triton_ok=False, have_matplotlib=False).args[-2:] == ("--backend", "torch")
    from evals import bench_profile

    (profiled,) = [step for step in gpu_run.STEPS if step.module == "evals.bench_profile"]
    assert bench_profile.build_parser().parse_args(profiled.args).backend == ["torch", "triton"]
    without_triton = gpu_run.adapted(profiled, triton_ok=False, have_matplotlib=False)
    assert bench_profile.build_parser().parse_args(without_triton.args).backend == ["torch"]
    outs = [step.args[step.args.index("--out") + 1] for step in bench_steps]
    assert len(set(outs)) == len(outs) and all(out.endswith("_cuda.json") for out in outs)
    assert not any(Path(out).name == "bench_cuda.json" for out in outs)  # the committed H100 run stays


def test_the_pareto_afterwards_reads_what_the_run_writes_and_the_committed_fidelity() -> None:
    module, args = gpu_run.AFTERWARDS
    assert module == "evals.pareto"
    inputs = [arg for arg in args if arg.endswith(".json")]
    outs = [step.args[step.args.index("--out") + 1] for step in gpu_run.STEPS if "--out" in step.args]
    assert inputs[0] in outs
    assert (gpu_run.REPO / inputs[1]).is_file()
    assert (gpu_run.REPO / "tests/test_kernels.py").is_file()


def test_the_minimums_fit_one_device_call_and_limits_reserve_them() -> None:
    assert sum(step.min_s for step in gpu_run.STEPS) <= 540 < 600  # the device tool's per-call limit
    assert gpu_run.limits(gpu_run.STEPS, 540)[0] == gpu_run.STEPS[0].max_s  # plenty: its own maximum
    tight = gpu_run.limits(gpu_run.STEPS, sum(step.min_s for step in gpu_run.STEPS))
    assert tight[0] == gpu_run.STEPS[0].min_s  # tight: only its minimum, the rest stays reserved
    steps = (gpu_run.Step("a", "m", (), 10, 100), gpu_run.Step("b", "m", (), 20, 30))
    assert gpu_run.limits(steps, 50) == [30, 30] and gpu_run.limits(steps[1:], 25) == [25]
    # a short call: the first steps whose minimums fit run, no time is kept for the rest
    three = (*steps, gpu_run.Step("c", "m", (), 40, 60))
    assert gpu_run.limits(three, 45) == [25, 30, 0]


def _packed(out: Path) -> list[str]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return tar.getnames()


def test_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_run.main(["--out", str(tmp_path)])


def test_runner_logs_limits_skips_and_copies_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = RESULTS_DIR / "gpu_run_test_marker.txt"
    steps = (
        gpu_run.Step("more than the budget", "evals.gpu_run", ("--dry-run",), 10_000, 20_000),
        gpu_run.Step("writes a result", "evals.gpu_run", ("--dry-run",), 1, 60),
        gpu_run.Step("too slow", "timeit", ("-n", "1", "import time; time.sleep(30)"), 1, 2),
        gpu_run.Step("fails", "evals.no_such_module", (), 1, 60),
        gpu_run.Step("needs a missing module", "pytest", (), 1, 60, needs="no_such_module_here"),
    )
    monkeypatch.setattr(gpu_run, "STEPS", steps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_run, "precheck", lambda log, env: (True, True))
    real_run = gpu_run.subprocess.run
    copied_after_first_step = []

    def run(cmd, **kwargs):  # the first step also leaves a file in evals/results, as the benches do
        if "--dry-run" in cmd:
            marker.write_text("new\n")
        elif "timeit" in cmd:  # by then the first step's file is already in $OUT
            copied_after_first_step.append(_packed(tmp_path) == [f"evals/results/{marker.name}"])
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(gpu_run.subprocess, "run", run)
    try:
        assert gpu_run.main(["--out", str(tmp_path), "--budget-s", "100"]) == 1  # only one of five succeeded
        log = (tmp_path / "gpu_run.log").read_text()
        assert "$ python -m evals.gpu_run --dry-run\n" in log  # each step's command, then its output:
        assert "kernel tests on CUDA" in log  # the child's listing of the real steps
        assert log.count("== exit 0 after") == 1
        assert "== stopped at its 2 s limit" in log
        assert "No module named evals.no_such_module" in log and "== exit 1 after" in log
        assert "== needs a missing module\n== skipped: no_such_module_here is not installed" in log
        assert "under its 10000 s minimum" in log
        assert copied_after_first_step == [True]
        assert _packed(tmp_path) == [f"evals/results/{marker.name}"]  # nothing older than the run
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_run.log", "results.tar.gz"]
    finally:
        marker.unlink(missing_ok=True)


def test_sigterm_copies_back_what_was_written(tmp_path: Path) -> None:
    """The device call ends with SIGTERM: the runner stops the step, logs it and copies back."""
    marker = RESULTS_DIR / "gpu_run_sigterm_marker.txt"
    writes_then_sleeps = f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('x'); time.sleep(60)"
    driver = f"""
import sys, torch
from evals import gpu_run
torch.cuda.is_available = lambda: True
gpu_run.precheck = lambda log, env: (True, True)
gpu_run.STEPS = (gpu_run.Step("writes, then sleeps", "timeit", ("-n", "1", {writes_then_sleeps!r}), 1, 100),)
sys.exit(gpu_run.main(["--out", sys.argv[1]]))
"""
    process = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path)], cwd=gpu_run.REPO)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the step never started"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 1
        assert "== stopped by SIGTERM" in (tmp_path / "gpu_run.log").read_text()
        assert _packed(tmp_path) == [f"evals/results/{marker.name}"]
    finally:
        process.kill()
        marker.unlink(missing_ok=True)

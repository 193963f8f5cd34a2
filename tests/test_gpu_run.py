"""The prepared GPU run: every step's arguments are ones its script accepts, the steps fit the
device call, and the runner logs, limits and packs what the steps write."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from evals import bench, gpu_run
from evals.harness import RESULTS_DIR


def test_every_bench_step_parses_and_resolves() -> None:
    bench_steps = [step for step in gpu_run.STEPS if step.module == "evals.bench"]
    assert len(bench_steps) == 4
    for step in bench_steps:
        config = bench._resolve_config(bench.build_parser().parse_args([*step.args, "--device", "cpu"]))
        assert config["settings"], step.name


def test_the_pareto_step_reads_what_the_run_writes_and_the_committed_fidelity() -> None:
    (pareto,) = [step for step in gpu_run.STEPS if step.module == "evals.pareto"]
    inputs = [arg for arg in pareto.args if arg.endswith(".json")]
    outs = [step.args[step.args.index("--out") + 1] for step in gpu_run.STEPS if "--out" in step.args]
    writer = next(step for step in gpu_run.STEPS if "--out" in step.args and inputs[0] in step.args)
    assert inputs[0] in outs and gpu_run.STEPS.index(writer) < gpu_run.STEPS.index(pareto)
    assert (gpu_run.REPO / inputs[1]).is_file()
    assert (gpu_run.REPO / "tests/test_kernels.py").is_file()


def test_the_steps_fit_one_device_call() -> None:
    assert sum(step.limit_s for step in gpu_run.STEPS) <= 560 < 600  # the device tool's per-call limit


def test_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_run.main(["--out", str(tmp_path)])


def test_runner_logs_limits_and_packs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = RESULTS_DIR / "gpu_run_test_marker.txt"
    steps = (
        gpu_run.Step("writes a result", "evals.gpu_run", ("--dry-run",), 60),
        gpu_run.Step("too slow", "timeit", ("-n", "1", "import time; time.sleep(30)"), 1),
        gpu_run.Step("fails", "evals.no_such_module", (), 60),
    )
    monkeypatch.setattr(gpu_run, "STEPS", steps)
    monkeypatch.setattr(gpu_run.torch.cuda, "is_available", lambda: True)
    real_run = gpu_run.subprocess.run

    def run(cmd, **kwargs):  # the first step also leaves a file in evals/results, as the benches do
        if "--dry-run" in cmd:
            marker.write_text("new\n")
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(gpu_run.subprocess, "run", run)
    try:
        assert gpu_run.main(["--out", str(tmp_path)]) == 1  # two of three steps failed
        log = (tmp_path / "gpu_run.log").read_text()
        assert "$ python -m evals.gpu_run --dry-run\n" in log  # each step's command, then its output:
        assert "kernel tests on CUDA" in log  # the child's listing of the real steps
        assert log.count("== exit 0 after") == 1
        assert "== stopped at its 1 s limit" in log
        assert "No module named evals.no_such_module" in log and "== exit 1 after" in log
        with tarfile.open(tmp_path / "results.tar.gz") as tar:
            assert tar.getnames() == ["evals/results/gpu_run_test_marker.txt"]  # nothing older than the run
    finally:
        marker.unlink(missing_ok=True)

"""The prepared GPU run: every step's arguments are ones its script accepts, the steps fit the
device call, and the runner logs, limits, adapts and copies back what the steps write."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import types
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

    from evals.settings import method_options

    profiled = [step for step in gpu_run.STEPS if step.module == "evals.bench_profile"]
    assert len(profiled) == 4
    for step in profiled:
        parsed = bench_profile.build_parser().parse_args(step.args)
        assert parsed.backend == ["torch", "triton"]
        method_options(parsed.method, parsed.option, r=parsed.r)  # the options are the method's
        without_triton = gpu_run.adapted(step, triton_ok=False, have_matplotlib=False)
        assert bench_profile.build_parser().parse_args(without_triton.args).backend == ["torch"]
    (tests,) = [step for step in gpu_run.STEPS if step.module == "pytest"]
    assert gpu_run.adapted(tests, True, True, have_xdist=True).args == (*tests.args, "-n", "8")
    assert gpu_run.adapted(tests, True, True, have_xdist=False) == tests
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


def test_the_steps_fit_the_two_calls_the_docstring_gives_and_limits_reserve_them() -> None:
    # The docstring's recipe: --budget-s 535, then --only 15-16 with 250 s on the warm machine,
    # 785 s of the 900 s a session's device time holds.
    first = gpu_run.limits(gpu_run.STEPS, 535)
    assert [number for number, limit in enumerate(first, 1) if limit == 0] == [15, 16]  # the first call's leftovers
    rest = gpu_run.step_numbers("15-16")
    assert rest == (15, 16) and all(gpu_run.limits(tuple(gpu_run.STEPS[n - 1] for n in rest), 250))
    assert "--only 15-16" in gpu_run.__doc__ and "--budget-s 535" in gpu_run.__doc__
    plenty = sum(step.max_s for step in gpu_run.STEPS)
    assert gpu_run.limits(gpu_run.STEPS, plenty)[0] == gpu_run.STEPS[0].max_s  # plenty: its own maximum
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


def test_a_step_that_does_not_fit_leaves_room_for_later_smaller_ones() -> None:
    steps = (gpu_run.Step("a", "m", (), 10, 100), gpu_run.Step("big", "m", (), 100, 200),
             gpu_run.Step("c", "m", (), 5, 50))
    # 30 s: a (10) fits, big (10 + 100) does not, c (10 + 5) still does: a leaves c's 5 s reserved
    # (each limit is the step's own with all 30 s left: the runner asks again before each step)
    assert gpu_run.limits(steps, 30) == [25, 0, 30]


def _simulated_machine(monkeypatch: pytest.MonkeyPatch, steps: tuple, seconds: list[float],
                       codes: list[int] | None = None) -> list[dict]:
    """gpu_run.main on a fake clock: each step "takes" its seconds (or is stopped at its timeout)."""
    clock, calls = [0.0], []

    def run(cmd, *, timeout, env, **kwargs):
        i = len(calls)
        calls.append({"module": cmd[2], "timeout": timeout, "env": env})
        if seconds[i] > timeout:
            clock[0] += timeout
            raise subprocess.TimeoutExpired(cmd, timeout)
        clock[0] += seconds[i]
        return subprocess.CompletedProcess(cmd, codes[i] if codes else 0)

    monkeypatch.setattr(gpu_run, "STEPS", steps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_run, "precheck", lambda log, env: (True, True))
    monkeypatch.setattr(gpu_run.subprocess, "run", run)
    monkeypatch.setattr(gpu_run, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    return calls


def test_each_step_gets_what_is_left_of_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = (gpu_run.Step("a", "mod_a", (), 10, 100), gpu_run.Step("b", "mod_b", (), 20, 30),
             gpu_run.Step("c", "mod_c", (), 5, 50))
    calls = _simulated_machine(monkeypatch, steps, [25, 23, 40])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as under the test suite

    def handler(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert gpu_run.main(["--out", str(tmp_path), "--budget-s", "60"]) == 1  # c was stopped
        assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    # a: 60 s left, 20 + 5 reserved for b and c -> 35; after its 25 s, b: min(30, 35 - 5) = 30;
    # after b's 23 s, c: the 12 s left (more than its own minimum, though under a's)
    assert [call["timeout"] for call in calls] == [35, 30, 12]
    assert "== stopped at its 12 s limit" in (tmp_path / "gpu_run.log").read_text()
    # compiled kernels and unbuffered output in every step, whatever the caller's environment
    assert all(call["env"]["TRITON_INTERPRET"] == "0" and call["env"]["PYTHONUNBUFFERED"] == "1" for call in calls)
    assert all(call["env"]["PATH"] == os.environ["PATH"] for call in calls)


@pytest.mark.parametrize("case", ["all succeed", "fails", "killed", "missing module", "over the budget"])
def test_exit_status_counts_every_step_that_did_not_run_cleanly(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [gpu_run.Step("ok", "mod_ok", (), 1, 10)]
    codes = [0, 0]
    if case in ("fails", "killed"):
        steps.append(gpu_run.Step("fails", "mod_fails", (), 1, 10))
        codes[1] = 3 if case == "fails" else -signal.SIGKILL  # a step killed by a signal
    elif case == "missing module":
        steps.append(gpu_run.Step("needs", "mod_needs", (), 1, 10, needs="no_such_module_here"))
    elif case == "over the budget":
        steps.append(gpu_run.Step("big", "mod_big", (), 10_000, 20_000))
    calls = _simulated_machine(monkeypatch, tuple(steps), [1, 1], codes)
    assert gpu_run.main(["--out", str(tmp_path), "--budget-s", "60"]) == (0 if case == "all succeed" else 1)
    ran = ["mod_ok", "mod_fails"] if case in ("fails", "killed") else ["mod_ok"]  # skipped steps never start
    assert [call["module"] for call in calls] == ran


def test_sync_results_packs_only_new_visible_files(tmp_path: Path) -> None:
    since = time.time() - 1
    marker, hidden = RESULTS_DIR / "gpu_run_sync_marker.txt", RESULTS_DIR / ".gpu_run_sync_marker.tmp"
    try:
        marker.write_text("x")
        hidden.write_text("half-written")
        assert gpu_run.sync_results(tmp_path, since) == [marker.name]
        assert _packed(tmp_path) == [f"evals/results/{marker.name}"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tar.gz"]
    finally:
        marker.unlink(missing_ok=True)
        hidden.unlink(missing_ok=True)


def test_precheck_logs_the_machine_and_the_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Simulated GPU")
    find_spec = importlib.util.find_spec
    # a machine without matplotlib (pytest, which this test runs under, stays present)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    have_triton = find_spec("triton") is not None
    for smoke_code in (0, 1):
        smokes = []

        def run(cmd, smokes=smokes, smoke_code=smoke_code, **kwargs):
            smokes.append(kwargs["env"])
            return subprocess.CompletedProcess(cmd, smoke_code, stdout="smoke out\n", stderr="")

        monkeypatch.setattr(gpu_run.subprocess, "run", run)
        log = io.StringIO()
        env = {"TOKENPRUNE_GIT_COMMIT": "0123abcd", "TRITON_INTERPRET": "0"}
        triton_ok, matplotlib_ok = gpu_run.precheck(log, env)
        assert triton_ok == (have_triton and smoke_code == 0)
        assert matplotlib_ok is False
        text = log.getvalue()
        assert "device: Simulated GPU" in text and "git commit: 0123abcd\n" in text
        assert f"'torch': '{importlib.metadata.version('torch')}'" in text
        assert ("== Triton kernels run\n" in text) == triton_ok
        assert smokes == ([env] if have_triton else [])
    log = io.StringIO()
    gpu_run.precheck(log, {})
    assert "git commit: unknown" in log.getvalue()

    def import_module(name: str):
        raise ImportError("No module named 'timm.models.qwen3_vit'", name="timm.models.qwen3_vit")

    monkeypatch.setattr(gpu_run, "importlib", types.SimpleNamespace(
        import_module=import_module, util=importlib.util, metadata=importlib.metadata))
    log = io.StringIO()
    with pytest.raises(SystemExit, match="import tokenprune fails on this machine .*qwen3_vit"):
        gpu_run.precheck(log, {})
    assert "import tokenprune: No module named 'timm.models.qwen3_vit'" in log.getvalue()


def test_only_runs_the_numbered_steps_in_their_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = (gpu_run.Step("a", "mod_a", (), 10, 100), gpu_run.Step("b", "mod_b", (), 20, 30),
             gpu_run.Step("c", "mod_c", (), 5, 50))
    calls = _simulated_machine(monkeypatch, steps, [1, 1, 1])
    assert gpu_run.main(["--out", str(tmp_path), "--budget-s", "60", "--only", "3,1"]) == 0
    assert [call["module"] for call in calls] == ["mod_a", "mod_c"]
    assert [call["timeout"] for call in calls] == [55, 50]  # b's minimum is not reserved: it does not run
    assert gpu_run.step_numbers("1, 2-3,2") == (1, 2, 3)
    for wrong in ("0", "4", "3-2", "x", "1-"):
        with pytest.raises(SystemExit):
            gpu_run.main(["--dry-run", "--only", wrong])

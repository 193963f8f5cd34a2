"""Every GPU figure the project owes, in one command that fits the device tool's 10-minute call.

    PYTHONPATH=. TRITON_INTERPRET=0 python -m evals.gpu_run --out "$OUT"   # on the lent GPU
    python -m evals.gpu_run --dry-run                                      # the steps, anywhere

GPUs are lent rarely and briefly, so the steps are fixed here rather than retyped each time:
the kernel tests on CUDA; the merge step alone; ViT-B/16 at batch 256, torch against Triton
merging, the r values of ToMe's table (the kernels' throughput targets); the DINOv2 ViT-S/14
budget sweep and its Pareto plot against the committed fidelity (the headline plot); the video
ViT-B sweep; a torch.compile pair. Each step has its own time limit, cut to what is left of
``--budget-s``, so one slow step cannot take the rest with it. The scripts write into
``evals/results/`` as usual; ``--out`` receives ``gpu_run.log`` (each step's command, output,
exit status and seconds) and ``results.tar.gz`` (what the run wrote there), which the device
tool copies back.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from evals.harness import RESULTS_DIR

REPO = RESULTS_DIR.parents[1]
RESULTS = RESULTS_DIR.relative_to(REPO)  # the steps run in the repository root


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # run as ``python -m module *args``
    args: tuple[str, ...]
    limit_s: int


STEPS: tuple[Step, ...] = (
    Step("kernel tests on CUDA", "pytest", ("-q", "-p", "no:cacheprovider", "tests/test_kernels.py"), 130),
    Step("merge step alone, torch vs Triton", "evals.bench_merge", (), 60),
    Step(
        "ViT-B/16, batch 256, bfloat16: unpatched vs ToMe with torch and Triton merging",
        "evals.bench",
        ("--model", "vit_base_patch16_224", "--r", "8", "--r", "13", "--r", "16", "--r", "16,-1", "--quiet"),
        100,
    ),
    Step(
        "DINOv2 ViT-S/14 at the fidelity budgets (for the Pareto plot)",
        "evals.bench",
        ("--model", "vit_small_patch14_dinov2", "--img-size", "224", "--method", "tome", "--method", "local_global",
         "--method", "evit", "--budget", "0.9", "--budget", "0.8", "--budget", "0.7", "--budget", "0.6",
         "--budget", "0.5", "--backend", "auto", "--no-manual", "--quiet", "--out", f"{RESULTS}/bench_dinov2_cuda.json"),
        100,
    ),  # fmt: skip
    Step(
        "Pareto: DINOv2 speed on this GPU against the committed embedding fidelity",
        "evals.pareto",
        (f"{RESULTS}/bench_dinov2_cuda.json", f"{RESULTS}/fidelity_dinov2_budgets.json", "--out", f"{RESULTS}/pareto_dinov2_cuda.png"),
        20,
    ),
    Step(
        "video ViT-B, 16 frames at 224: joint ToMe, temporal and background merging",
        "evals.bench",
        ("--model", "video_vit_base_patch16_224", "--batch-size", "16", "--method", "tome", "--method", "temporal",
         "--method", "background", "--budget", "0.75", "--budget", "0.5", "--backend", "auto", "--no-manual",
         "--quiet", "--out", f"{RESULTS}/bench_video_cuda.json"),
        80,
    ),  # fmt: skip
    Step(
        "torch.compile: ViT-B/16 unpatched and ToMe r=16, compiled and not",
        "evals.bench",
        ("--model", "vit_base_patch16_224", "--r", "16", "--backend", "triton", "--compile", "both", "--no-manual",
         "--quiet", "--out", f"{RESULTS}/bench_compile_cuda.json"),
        70,
    ),  # fmt: skip
)


def command(step: Step) -> list[str]:
    return [sys.executable, "-m", step.module, *step.args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.gpu_run", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_run.log and results.tar.gz (the device tool's $OUT)")
    parser.add_argument("--budget-s", type=float, default=560, help="seconds for all steps together (default 560)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their limits, run nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        for step in STEPS:
            print(f"[{step.limit_s:4d} s] {step.name}\n         python -m {step.module} {' '.join(step.args)}")
        return 0
    if args.out is None:
        parser.error("--out is required unless --dry-run")
    if not torch.cuda.is_available():
        raise SystemExit("evals.gpu_run measures GPU figures and files them as *_cuda: it needs a CUDA GPU")

    args.out.mkdir(parents=True, exist_ok=True)
    # Compiled kernels, never the interpreter: its timings would be meaningless.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    started, wall_start = time.monotonic(), time.time()
    failures = 0
    with open(args.out / "gpu_run.log", "w") as log:
        for step in STEPS:
            left = args.budget_s - (time.monotonic() - started)
            limit = min(step.limit_s, left)
            header = f"== {step.name}\n$ python -m {step.module} {' '.join(step.args)}"
            if left < 5:
                log.write(f"{header}\n== skipped: {left:.0f} s of the budget left\n\n")
                failures += 1
                continue
            log.write(f"{header}\n")
            log.flush()
            begun = time.monotonic()
            try:
                result = subprocess.run(command(step), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
                status = f"exit {result.returncode}"
                failures += result.returncode != 0
            except subprocess.TimeoutExpired:
                status = f"stopped at its {limit:.0f} s limit"
                failures += 1
            log.write(f"== {status} after {time.monotonic() - begun:.0f} s\n\n")
            log.flush()
            print(f"{step.name}: {status}", flush=True)
    # What the steps wrote; results older than this run stay out.
    with tarfile.open(args.out / "results.tar.gz", "w:gz") as tar:
        for path in sorted(RESULTS_DIR.iterdir()):
            if path.is_file() and path.stat().st_mtime >= wall_start:
                tar.add(path, arcname=str(path.relative_to(REPO)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every GPU figure the project owes, fixed in advance, for the device tool's 10-minute calls.

    TOKENPRUNE_GIT_COMMIT=<sha> PYTHONPATH=. python -m evals.gpu_run --out "$OUT" --budget-s 535
    ... python -m evals.gpu_run --out "$OUT" --budget-s 250 --only 15-16   # the rest, machine still warm
    python -m evals.gpu_run --dry-run                  # the numbered steps and their time limits, anywhere

GPUs are lent rarely and briefly, so the steps are fixed here rather than retyped each time, in
the order the project needs them: the kernel tests on CUDA (is what the figures time correct?);
the profile of ToMe r=16 on ViT-B/16 at batch 256 (the merge step's share); ViT-B/16 at batch
256, torch against Triton merging, the r values of ToMe's table (the kernels' targets), and at
batch 1 (latency); each kernel alone against its reference (the shapes that set the "auto"
dispatch); RoPE and relative-position models (DINOv3, EVA-02, BEiT v2), and BEiT's profile;
the SAM encoder with merge_unmerge, and its profile; the video ViT-B sweep; the DINOv2
ViT-S/14 budget sweep; the merge step alone; attention with the size bias alone (as a mask,
folded into q and k, in the Triton kernel); the profile at batch 1 (is the GPU waiting on the
host?); SigLIP 2 NaFlex on packed sequences; CaiT, SigLIP 2 NaFlex and the Qwen3-VL vision
encoder; torch.compile with CUDA graphs, at batch 256 and 1.

**Time.** All the steps take more than one call (their minimums sum to more than 540 s), and a
session has 15 minutes of device time in all. ``--budget-s`` is what the steps may use
together; give the device call's limit minus ~60 s (start-up, copying back). Each step may use
what is left after reserving the minimum of every later one (``min_s``), up to its own
``max_s``; a step that would get less than its minimum is skipped and logged. The log names
what was skipped or stopped: run those at once with ``--only``, while the machine is warm (it
stays so for 30 s). **Nothing is lost to a cut:** the benches rewrite their results after
every model, and after every step (and on SIGTERM) what the steps wrote to
``evals/results/`` is packed into ``$OUT/results.tar.gz`` (one file: the device tool returns
only a few per call), and ``$OUT/gpu_run.log`` holds each step's command, output, exit status
and seconds, after a pre-check of the machine (versions, optional packages, a C compiler, one
Triton launch). Without a working Triton the benches measure the PyTorch backend alone;
without matplotlib they skip their PNGs; without pytest the kernel tests are skipped (with
pytest-xdist they run on 8 workers).

**Afterwards** (on any machine, no GPU needed): ``tar xzf results.tar.gz`` in the repository
root, and run the Pareto plot that :data:`AFTERWARDS` names.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path("evals/results")  # relative: the steps run in the repository root


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # run as ``python -m module *args``
    args: tuple[str, ...]
    min_s: int  # less than this left for it: skipped (kept for the later steps)
    max_s: int  # its limit when time is plentiful
    needs: str | None = None  # a module it cannot run without


# In order of what the project most needs measured; min_s and max_s from the H200 runs of
# 2026-11-30 and 2026-12-01 (the latest log: evals/results/gpu_run_h200.log). They add up to more than one 10-minute
# call: the first call runs them in order until its budget is spent, and its log names the
# steps it skipped or stopped, for a second call with --only on the still-warm machine.
STEPS: tuple[Step, ...] = (
    Step(
        "kernel tests on CUDA",
        "pytest",
        ("-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "--junitxml", f"{RESULTS}/test_kernels_cuda.xml"),
        50, 150, needs="pytest",  # 44 s and 63 s with 8 xdist workers; over 111 s without
    ),  # fmt: skip
    Step(
        "profile of ToMe r=16 on ViT-B (issue 3's setting): GPU kernel time against wall time, torch and Triton",
        "evals.bench_profile",
        ("--model", "vit_base_patch16_224", "--r", "16", "--backend", "torch", "--backend", "triton",
         "--out", f"{RESULTS}/profile_vitb_r16_cuda.json"),
        25, 60,  # 33 s and 29 s
    ),  # fmt: skip
    Step(
        "ViT-B/16, batch 256 and batch 1 (latency), bfloat16: unpatched vs ToMe with torch and Triton merging",
        "evals.bench",
        ("--model", "vit_base_patch16_224", "--r", "8", "--r", "13", "--r", "16", "--r", "16,-1",
         "--batch-size", "256", "--batch-size", "1", "--no-manual", "--out", f"{RESULTS}/bench_vitb_cuda.json"),
        45, 110,  # 41 s (2026-11-30), 50 s (2026-12-01)
    ),  # fmt: skip
    Step(
        "each kernel alone against its PyTorch reference, at ViT-B's, the video ViT's and SAM-B's shapes and across "
        "the widths and token counts that set the dispatch of backend='auto'",
        "evals.bench_kernels",
        ("--out", f"{RESULTS}/bench_kernels_cuda.json"),
        20, 60, needs="triton",  # 30 s
    ),  # fmt: skip
    Step(
        "RoPE and relative-position models: DINOv3 ViT-B/16, EVA-02 B/14 and BEiT v2 B/16, unpatched vs ToMe "
        "with torch and Triton merging",
        "evals.bench",
        ("--model", "vit_base_patch16_dinov3", "--model", "eva02_base_patch14_224", "--model", "beitv2_base_patch16_224",
         "--r", "8", "--r", "16", "--r", "16,-1", "--no-manual", "--out", f"{RESULTS}/bench_eva_beit_cuda.json"),
        90, 150,  # 82 s
    ),  # fmt: skip
    Step(
        "profile of ToMe r=8 on BEiT v2 B/16, batch 256: where its merged relative position bias goes (ToMe ran "
        "at 0.55-0.60x the unpatched model at 342d313; since then the bias is built without broadcast copies)",
        "evals.bench_profile",
        ("--model", "beitv2_base_patch16_224", "--r", "8", "--backend", "torch", "--backend", "triton",
         "--out", f"{RESULTS}/profile_beit_r8_cuda.json"),
        25, 60,
    ),  # fmt: skip
    Step(
        "SAM ViT-B image encoder at 1024² (64×64 patches), batch 8: unpatched vs merge_unmerge at ratio 0.25, "
        "0.4 and 0.5",
        "evals.bench",
        ("--model", "samvit_base_patch16", "--img-size", "1024", "--batch-size", "8", "--method", "merge_unmerge",
         "--ratio", "0.25", "--ratio", "0.4", "--ratio", "0.5", "--no-manual",
         "--out", f"{RESULTS}/bench_sam_cuda.json"),
        55, 90,  # 52 s, 66 s
    ),  # fmt: skip
    Step(
        "profile of merge_unmerge ratio 0.5 on the SAM ViT-B encoder, batch 8: why Triton merging ran slower than "
        "torch there (88.2 against 109.2 images/s at 342d313, likely host-bound; since then no sort on the Triton path)",
        "evals.bench_profile",
        ("--model", "samvit_base_patch16", "--img-size", "1024", "--batch-size", "8", "--method", "merge_unmerge",
         "--option", "ratio=0.5", "--backend", "torch", "--backend", "triton", "--runs", "5",
         "--out", f"{RESULTS}/profile_sam_merge_unmerge_cuda.json"),
        30, 60,
    ),  # fmt: skip
    Step(
        "video ViT-B, 16 frames at 224: joint ToMe, temporal and background merging",
        "evals.bench",
        # batch 32: at 16 the merged models were likely bound by the host on the H200 (ToMe: 1.07× at
        # 75 % and at 50 % of the GFLOPs alike). Budgets down to 35 %: at 45 % background merging
        # ran at 1.85×, under the 2× of issue 6.
        ("--model", "video_vit_base_patch16_224", "--batch-size", "32", "--method", "tome", "--method", "temporal",
         "--method", "background", "--budget", "0.75", "--budget", "0.5", "--budget", "0.45", "--budget", "0.4",
         "--budget", "0.35", "--backend", "auto", "--no-manual",
         "--warmup", "5", "--runs", "15", "--out", f"{RESULTS}/bench_video_cuda.json"),
        50, 150,  # 43-51 s with five budgets
    ),  # fmt: skip
    Step(
        "DINOv2 ViT-S/14 at the fidelity budgets (for the Pareto plot)",
        "evals.bench",
        ("--model", "vit_small_patch14_dinov2", "--img-size", "224", "--method", "tome", "--method", "local_global",
         "--method", "evit", "--budget", "0.9", "--budget", "0.8", "--budget", "0.7", "--budget", "0.6",
         "--budget", "0.5", "--backend", "auto", "--no-manual", "--out", f"{RESULTS}/bench_dinov2_cuda.json"),
        35, 150,  # 33 s
    ),  # fmt: skip
    Step("merge step alone, torch vs Triton", "evals.bench_merge", (), 30, 60),  # 31 s
    Step(
        "attention with the size bias alone: SDPA with a mask, SDPA with the bias folded into q/k, Triton; "
        "forward, and forward + backward",
        "evals.bench_attention",
        (),
        25, 60, needs="triton",  # 25 s
    ),  # fmt: skip
    Step(
        "profile of ToMe r=16 on ViT-B at batch 1: where the host time goes (ToMe ran at 0.27-0.45x the unpatched "
        "model's speed there)",
        "evals.bench_profile",
        ("--model", "vit_base_patch16_224", "--r", "16", "--batch-size", "1", "--backend", "torch", "--backend",
         "triton", "--out", f"{RESULTS}/profile_vitb_r16_batch1_cuda.json"),
        20, 45,
    ),  # fmt: skip
    Step(
        "SigLIP 2 NaFlex B/16 on packed sequences (576 positions, images of mixed shapes padded), batch 64: "
        "unpatched (timm's T×T padding mask) vs ToMe (padding as size-0 tokens) at 75 % and 50 % of the GFLOPs",
        "evals.bench",
        ("--model", "naflexvit_base_patch16_siglip", "--packed", "--batch-size", "64", "--budget", "0.75",
         "--budget", "0.5", "--no-manual", "--out", f"{RESULTS}/bench_naflexvit_packed_cuda.json"),
        15, 45,  # 14 s
    ),  # fmt: skip
    Step(
        "CaiT-S24 (talking heads, 24 blocks), SigLIP 2 NaFlex B/16 at 384² (576 patches) and the Qwen3-VL 88M "
        "vision encoder at 768² (2,304 patches, its VLM projector), batch 64, unpatched vs ToMe at 75 % and 50 % "
        "of the GFLOPs (each model's own r)",
        "evals.bench",
        ("--model", "cait_s24_224", "--model", "naflexvit_base_patch16_siglip", "--model", "qwen3_vit_88m_enc",
         "--batch-size", "64", "--budget", "0.75", "--budget", "0.5", "--no-manual",
         "--out", f"{RESULTS}/bench_cait_naflex_qwen3_cuda.json"),
        70, 150,  # stopped at 35 s, in its third model
    ),  # fmt: skip
    Step(
        "torch.compile with CUDA graphs: ViT-B/16 unpatched and ToMe r=16, both compiled, at batch 256 (issue 3's "
        "2x) and batch 1 (does removing launch costs undo merging's slowdown there?)",
        "evals.bench",
        ("--model", "vit_base_patch16_224", "--r", "16", "--batch-size", "256", "--batch-size", "1", "--backend",
         "triton", "--compile", "on", "--compile-mode", "reduce-overhead", "--no-manual",
         "--out", f"{RESULTS}/bench_compile_cuda.json"),
        170, 300,  # 174 s
    ),  # fmt: skip
)

# Run where the results were copied back: the DINOv2 speed against the committed fidelity.
AFTERWARDS = (
    "evals.pareto",
    (f"{RESULTS}/bench_dinov2_cuda.json", f"{RESULTS}/fidelity_dinov2_budgets.json",
     "--out", f"{RESULTS}/pareto_dinov2_cuda.png"),
)  # fmt: skip

OPTIONAL_MODULES = ("pytest", "matplotlib", "scipy", "tqdm", "safetensors", "einops", "timm", "triton")

# One Triton launch against the PyTorch reference: does this machine compile and run kernels?
TRITON_SMOKE = """
import torch
from kernels.merge import merge_wavg_reference, merge_wavg_triton
x = torch.randn(2, 9, 40, device="cuda")
size = torch.ones(2, 9, 1, device="cuda")
dest = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 3, 3]] * 2, device="cuda")
got, ref = merge_wavg_triton(x, size, dest, 4), merge_wavg_reference(x, size, dest, 4)
torch.testing.assert_close(got, ref)
print("triton ok")
"""


def step_numbers(text: str) -> tuple[int, ...]:
    """'12-14' or '3,9' (or both, '1,12-14') → the step numbers, 1-based as --dry-run lists them."""
    numbers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"steps are numbers or ranges like '12-14' or '3,9', got {text!r}")
        span = range(int(match[1]), int(match[2] or match[1]) + 1)
        if not span or span[0] < 1 or span[-1] > len(STEPS):
            raise argparse.ArgumentTypeError(f"no step {part.strip()!r}: the steps are 1-{len(STEPS)} (see --dry-run)")
        numbers += [n for n in span if n not in numbers]
    return tuple(numbers)


def command(step: Step) -> list[str]:
    return [sys.executable, "-m", step.module, *step.args]


def limits(steps: tuple[Step, ...], left: float) -> list[float]:
    """Each step's limit with ``left`` seconds for all. The steps whose minimums fit, in order
    (the headline ones come first), each get what remains after reserving the minimum of every
    later one that fits, at most their own maximum; a step that does not fit gets 0."""
    fits, total = [], 0.0
    for step in steps:
        fits.append(total + step.min_s <= left)
        total += step.min_s if fits[-1] else 0.0
    out = []
    for i, step in enumerate(steps):
        reserved = sum(later.min_s for later, fit in zip(steps[i + 1 :], fits[i + 1 :]) if fit)
        out.append(min(step.max_s, left - reserved) if fits[i] else 0.0)
    return out


def adapted(step: Step, triton_ok: bool, have_matplotlib: bool, have_xdist: bool = False) -> Step:
    """The step as this machine can run it: PyTorch merging alone without a working Triton, no
    PNG without matplotlib, the tests on 8 workers with pytest-xdist."""
    if step.module == "pytest":
        return replace(step, args=(*step.args, "-n", "8")) if have_xdist else step
    if step.module not in ("evals.bench", "evals.bench_merge", "evals.bench_profile"):
        return step
    args = list(step.args)
    if not triton_ok:
        while "--backend" in args:
            at = args.index("--backend")
            del args[at : at + 2]
        args += ["--backend", "torch"]
    if not have_matplotlib and step.module == "evals.bench":
        args.append("--no-plot")
    return replace(step, args=tuple(args))


def sync_results(out: Path, since: float) -> list[str]:
    """Pack what the steps wrote to evals/results (files newer than ``since``) into
    ``out/results.tar.gz``, rewritten whole: the device tool returns only a few files per call,
    so everything travels as one."""
    names = sorted(path.name for path in (REPO / RESULTS).iterdir()
                   if path.is_file() and path.stat().st_mtime >= since and not path.name.startswith("."))
    partial = out / "results.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for name in names:
            tar.add(REPO / RESULTS / name, arcname=str(RESULTS / name))
    os.replace(partial, out / "results.tar.gz")
    return names


def precheck(log: TextIO, env: dict[str, str]) -> tuple[bool, bool]:
    """Log the machine; return (Triton launches a kernel, matplotlib is installed)."""
    import torch

    present = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL_MODULES}
    versions = {}
    for name in ("torch", "triton", "timm", "torchvision", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    log.write(
        f"== pre-check\ndevice: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}\n"
        f"versions: {versions}\nmodules present: {present}\n"
        f"C compiler: {shutil.which('cc') or shutil.which('gcc') or 'none'}\n"
        f"git commit: {env.get('TOKENPRUNE_GIT_COMMIT', 'unknown (set TOKENPRUNE_GIT_COMMIT)')}\n"
    )
    log.flush()
    # Every step imports tokenprune: fail here, in seconds, rather than in each step in turn (the
    # H200's image had timm 1.0.29, which has no qwen3_vit).
    try:
        importlib.import_module("tokenprune")
    except ImportError as error:
        log.write(f"import tokenprune: {error}\n")
        raise SystemExit(f"import tokenprune fails on this machine ({error}): install the versions pyproject.toml "
                         "asks for (on the device machine, carry their wheels: see its README)") from error
    triton_ok = False
    if present["triton"]:
        try:
            smoke = subprocess.run([sys.executable, "-c", TRITON_SMOKE], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=90)
            triton_ok = smoke.returncode == 0
            log.write(smoke.stdout + smoke.stderr[-3000:])
        except subprocess.TimeoutExpired:
            log.write("triton smoke test: no answer in 90 s\n")
    log.write(f"== Triton kernels {'run' if triton_ok else 'do NOT run: the benches measure PyTorch merging only'}\n\n")
    log.flush()
    return triton_ok, present["matplotlib"]


class Stopped(Exception):
    """SIGTERM: the device call is ending."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.gpu_run", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_run.log and the results (the device tool's $OUT)")
    parser.add_argument("--budget-s", type=float, default=535,
                        help="seconds for all steps together: the device call's limit minus ~60 (default 535)")
    parser.add_argument("--only", type=step_numbers,
                        help="run these steps alone, by number as --dry-run lists them: '12-14', '3,9' "
                             "(a second call for what the first skipped or stopped)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their limits, run nothing")
    args = parser.parse_args(argv)
    chosen = tuple(step for number, step in enumerate(STEPS, 1) if not args.only or number in args.only)
    if args.dry_run:
        for step, limit in zip(chosen, limits(chosen, args.budget_s)):
            print(f"{STEPS.index(step) + 1:2d}. [up to {limit:3.0f} s, at least {step.min_s:3d}] {step.name}\n"
                  f"         python -m {step.module} {' '.join(step.args)}")
        print(f"afterwards, anywhere: python -m {AFTERWARDS[0]} {' '.join(AFTERWARDS[1])}")
        return 0
    if args.out is None:
        parser.error("--out is required unless --dry-run")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("evals.gpu_run measures GPU figures and files them as *_cuda: it needs a CUDA GPU")

    started, wall_start = time.monotonic(), time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    # Compiled kernels, never the interpreter: its timings would be meaningless.
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    failures = 0
    previous = signal.signal(signal.SIGTERM, _stop)
    log = open(args.out / "gpu_run.log", "w")
    try:
        triton_ok, have_matplotlib = precheck(log, env)
        steps = []
        have_xdist = importlib.util.find_spec("xdist") is not None
        for step in chosen:  # skipped first, so that no time is kept for them
            if step.needs and importlib.util.find_spec(step.needs) is None:
                log.write(f"== {step.name}\n== skipped: {step.needs} is not installed\n\n")
                failures += 1
            else:
                steps.append(adapted(step, triton_ok, have_matplotlib, have_xdist))
        for i, step in enumerate(steps):
            left = args.budget_s - (time.monotonic() - started)
            limit = limits(tuple(steps[i:]), left)[0]
            header = f"== {step.name}\n$ python -m {step.module} {' '.join(step.args)}"
            if limit < step.min_s:
                log.write(f"{header}\n== skipped: {limit:.0f} s for it, under its {step.min_s} s minimum\n\n")
                failures += 1
                continue
            log.write(f"{header}\n")
            log.flush()
            begun = time.monotonic()
            try:
                result = subprocess.run(command(step), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=limit)
                status = f"exit {result.returncode}"
                failures += result.returncode != 0
            except subprocess.TimeoutExpired:
                status = f"stopped at its {limit:.0f} s limit"
                failures += 1
            copied = sync_results(args.out, wall_start)
            log.write(f"== {status} after {time.monotonic() - begun:.0f} s; results so far: {', '.join(copied) or 'none'}\n\n")
            log.flush()
            print(f"{step.name}: {status}", flush=True)
        log.write(f"== afterwards, anywhere: python -m {AFTERWARDS[0]} {' '.join(AFTERWARDS[1])}\n")
    except Stopped:
        log.write(f"\n== stopped by SIGTERM after {time.monotonic() - started:.0f} s\n")
        failures += 1
    finally:
        sync_results(args.out, wall_start)
        log.close()
        signal.signal(signal.SIGTERM, previous)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput benchmark: an unpatched timm ViT against ToMe at several ``r``.

Run it with no arguments (``python -m evals.bench``); it needs no network and no weights.

What it measures, per row (one model configuration):

* **images/s** — batch size over the median of ``--runs`` timed forward passes of one batch,
  after ``--warmup`` untimed passes (first calls pay for allocator growth, kernel selection
  and, with ``--compile``, compilation). Only model time is timed: the input batch is created
  on the device beforehand, every pass runs under ``torch.inference_mode()``, and on a GPU the
  device is synchronised before and after each pass so the clock sees the kernels, not their
  launch. The rows are timed round-robin (each round times every row once), so a slow spell
  of the machine hits all rows alike; the median, not the mean, so a stray hiccup does not
  move the figure. CPU figures are only meaningful on an otherwise idle machine: the JSON
  records the load average before and after.
* **speedup** — images/s over that of the unpatched model with fused attention, measured in
  the same run on the same machine.
* **GFLOPs/img** — from :func:`tokenprune.flops` (2 FLOPs per multiply-add; halve for the
  "GFLOPs" that ViT papers quote) and **out tokens** from :func:`tokenprune.plan`.
* **agreement** — mean cosine similarity of the logits and top-1 agreement (%) with the
  unpatched fused model on the benchmark batch, from one extra untimed forward. Weights are
  random (``pretrained=False``) and so are the inputs, so this measures how far merging moves
  the outputs, not accuracy.

Rows: the baseline and ToMe at each ``r``, all with fused attention (SDPA, timm's default,
which tokenprune keeps); then, unless ``--no-manual``, the baseline and ToMe at the middle ``r``
with manual (non-fused) attention, to show what keeping the fused kernel is worth. Every row
uses a deep copy of the same randomly initialised baseline, so all rows share weights.

Defaults depend on the device: on CPU ``vit_small_patch16_224``, batch 8, float32 (under a
minute on an idle 2-core machine); on CUDA ``vit_base_patch16_224``, batch 256, bfloat16
autocast. The thread count is left at PyTorch's default and recorded. Results go to
``evals/results/bench_<device>.json`` (written atomically) and a markdown copy of the table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn
from tqdm import tqdm

import tokenprune
from kernels import BACKENDS
from tokenprune.schedule import RSchedule, format_schedule, parse_schedule

__all__ = [
    "DEFAULTS",
    "Row",
    "main",
    "measure_interleaved",
    "measure_throughput",
    "set_fused_attn",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Per device kind. CPU: sized to finish in about 45 s on an idle 2-core machine (7 rows ×
# 24 passes of ~0.1-0.4 s). CUDA: the setting ToMe reports (ViT-B/16, large batch, half precision).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": "vit_small_patch16_224",
        "batch_size": 8,
        "dtype": "float32",
        "r": [8, 13, 16, (16, -1)],
        "backend": ["auto"],  # the PyTorch merge: Triton kernels need a GPU
        "warmup": 3,
        "runs": 20,
    },
    "cuda": {
        "model": "vit_base_patch16_224",
        "batch_size": 256,
        "dtype": "bfloat16",
        "r": [8, 13, 16, (16, -1)],
        "backend": ["torch", "triton"],  # the merge step in PyTorch vs the Triton kernels
        "warmup": 10,
        "runs": 30,
    },
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    """One benchmarked configuration; serialised as one JSON record."""

    model: str
    method: str  # "baseline" or "tome"
    r: int | list[float] | None  # None for the baseline; a schedule tuple becomes a list in JSON
    label: str  # "baseline", "tome r=16", "tome r=(16,-1)"
    attention: str  # "fused" (SDPA) or "manual"
    backend: str | None  # where ToMe's match/merge ran: "auto", "torch" or "triton"; None for the baseline
    images_per_s: float
    median_s: float
    times_s: list[float]
    speedup: float  # images/s over the fused baseline's, same run
    gflops_per_image: float
    output_tokens: int
    tokens_per_block: list[int]
    logits_cosine: float
    top1_agreement_pct: float


# ---------------------------------------------------------------------------------------------
# Reusable pieces


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so host timers measure it (no-op on CPU)."""
    if device.type != "cpu":
        # torch.cuda / torch.mps / torch.xpu all expose synchronize().
        getattr(torch, device.type).synchronize()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype``, or nothing for float32/None (full precision, no cast overhead)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def measure_throughput(
    model: Callable[[Tensor], Any],
    inputs: Tensor,
    *,
    warmup: int,
    runs: int,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Time ``model(inputs)``: ``warmup`` untimed passes, then the median of ``runs`` timed ones.

    ``inputs`` must already be on the model's device, so that only model time is measured.
    ``dtype`` other than float32 runs the passes under autocast. Returns ``median_s`` (seconds
    per batch), ``images_per_s`` (batch size / median) and ``times`` (every timed pass, s).
    """
    return measure_interleaved([model], inputs, warmup=warmup, runs=runs, dtype=dtype)[0]


def measure_interleaved(
    models: Sequence[Callable[[Tensor], Any]],
    inputs: Tensor,
    *,
    warmup: int,
    runs: int,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """:func:`measure_throughput` for several models at once, timed round-robin.

    Every model gets its ``warmup`` passes first; then each of the ``runs`` rounds times every
    model once, in an order rotated from round to round. A slow spell of the machine (another
    process, clock or thermal changes) thus hits all models alike instead of whichever one
    happened to be timed then, and speedups between them stay fair. One dict per model.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    device = inputs.device
    times: list[list[float]] = [[] for _ in models]
    rounds = tqdm(range(runs), desc="timing", unit="round", disable=not progress, file=sys.stderr)
    with torch.inference_mode(), autocast(device, dtype):
        for model in models:
            for _ in range(warmup):
                model(inputs)
        for round_index in rounds:
            shift = round_index % len(models)
            for i in [*range(shift, len(models)), *range(shift)]:
                # Synchronising before starting the clock keeps earlier queued work out of this pass.
                synchronize(device)
                start = time.perf_counter()
                models[i](inputs)
                synchronize(device)
                times[i].append(time.perf_counter() - start)
    results = []
    for model_times in times:
        median = statistics.median(model_times)
        results.append({"median_s": median, "images_per_s": inputs.shape[0] / median, "times": model_times})
    return results


def set_fused_attn(model: nn.Module, fused: bool) -> nn.Module:
    """Switch every timm ``Attention`` of ``model`` between fused SDPA and the manual
    softmax(qkᵀ)v path, in place (tokenprune's patched attention honours the same flag)."""
    found = False
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused
            found = True
    if not found:
        raise ValueError("the model has no timm.layers.Attention module to switch")
    return model


def agreement(logits: Tensor, reference: Tensor) -> tuple[float, float]:
    """(mean cosine similarity, top-1 agreement in %) of ``logits`` against ``reference``."""
    # float64 so that identical logits give a cosine of 1 up to rounding of the last bit.
    a, b = logits.double(), reference.double()
    cosine = F.cosine_similarity(a, b, dim=-1).mean().item()
    top1 = (a.argmax(dim=-1) == b.argmax(dim=-1)).double().mean().item() * 100.0
    return cosine, top1


# ---------------------------------------------------------------------------------------------
# Environment


def _package_version(name: str) -> str | None:
    # Metadata only: importing triton just for its version would be slow and can fail on CPU.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures depend on besides the config: versions, hardware, threads, load."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "triton": _package_version("triton"),
        "tokenprune": tokenprune.__version__,
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_name"] = env["cpu"]
    return env


# ---------------------------------------------------------------------------------------------
# Output


COLUMNS = (
    ("model", "model", "<"),
    ("method", "label", "<"),
    ("attention", "attention", "<"),
    ("merge", "backend", "<"),
    ("images/s", "images_per_s", ">"),
    ("speedup", "speedup", ">"),
    ("GFLOPs/img", "gflops_per_image", ">"),
    ("out tokens", "output_tokens", ">"),
    ("logit cos", "logits_cosine", ">"),
    ("top-1 agr %", "top1_agreement_pct", ">"),
)


def _cells(row: Row) -> list[str]:
    return [
        row.model,
        row.label,
        row.attention,
        row.backend or "-",
        f"{row.images_per_s:.1f}",
        f"{row.speedup:.2f}x",
        f"{row.gflops_per_image:.2f}",
        str(row.output_tokens),
        f"{row.logits_cosine:.4f}",
        f"{row.top1_agreement_pct:.1f}",
    ]


def format_table(rows: Sequence[Row]) -> str:
    """Plain fixed-width table."""
    cells = [_cells(row) for row in rows]
    headers = [name for name, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{align}{w}}" for v, w, (_, _, align) in zip(values, widths, COLUMNS)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def format_markdown(rows: Sequence[Row]) -> str:
    headers = [name for name, _, _ in COLUMNS]
    aligns = ["---:" if align == ">" else ":---" for _, _, align in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# The benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.bench",
        description="Throughput of an unpatched timm ViT vs tokenprune ToMe at several r (random weights, offline).",
    )
    add = parser.add_argument
    add("--model", help="timm model name (default: vit_small_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")
    add("--batch-size", type=int, help="images per forward (default: 8 on CPU, 256 on CUDA)")
    add(
        "--r",
        action="append",
        type=parse_schedule,
        metavar="R",
        help="ToMe r, repeatable: 16, or r,inflection such as 16,-1 (default: 8 13 16 16,-1)",
    )
    add(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="ToMe merge backend, repeatable: one row per r and backend (default: auto on CPU, torch and triton on CUDA)",
    )
    add("--img-size", type=int, help="input resolution (default: the model's)")
    add(
        "--dtype",
        choices=sorted(DTYPES),
        help="float32, or autocast to bfloat16/float16 (default: float32 on CPU, bfloat16 on CUDA)",
    )
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--runs", type=int, help="timed passes per row; the median is reported (default: 20 on CPU, 30 on CUDA)")
    add("--warmup", type=int, help="untimed passes per row before timing (default: 3 on CPU, 10 on CUDA)")
    add("--no-manual", action="store_true", help="skip the manual (non-fused) attention rows")
    add("--compile", action="store_true", help="wrap every model in torch.compile")
    add("--seed", type=int, default=0, help="seed for the random weights and inputs")
    add("--out", type=Path, help="JSON path (default: evals/results/bench_<device>.json)")
    add("--markdown", type=Path, help="markdown table path (default: the JSON path with .md)")
    add("--quiet", action="store_true", help="no progress lines")
    return parser


def _resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = DEFAULTS.get(device.type, DEFAULTS["cpu"])

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    config = {
        "device": device,
        "model": pick("model"),
        "batch_size": pick("batch_size"),
        "img_size": args.img_size,
        "dtype": pick("dtype"),
        "r": list(pick("r")),
        "backend": list(pick("backend")),
        "warmup": pick("warmup"),
        "runs": pick("runs"),
        "manual": not args.no_manual,
        "compile": args.compile,
        "seed": args.seed,
    }
    if config["batch_size"] < 1 or config["runs"] < 1 or config["warmup"] < 0:
        raise SystemExit("--batch-size and --runs must be at least 1, --warmup at least 0")
    if not config["r"]:
        raise SystemExit("give at least one --r")
    out = args.out or RESULTS_DIR / f"bench_{device.type}.json"
    config["out"] = out
    config["markdown"] = args.markdown or out.with_suffix(".md")
    return config


def _create_model(name: str, img_size: int | None, device: torch.device, seed: int) -> nn.Module:
    kwargs: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    torch.manual_seed(seed)  # the same random weights on every run
    # pretrained=False: never touch the network; the throughput does not depend on the weights.
    return timm.create_model(name, pretrained=False, **kwargs).eval().to(device)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write JSON and markdown; returns the JSON document."""
    args = build_parser().parse_args(argv)
    cfg = _resolve_config(args)
    device: torch.device = cfg["device"]
    dtype = DTYPES[cfg["dtype"]]
    started = time.perf_counter()
    # Other processes competing for the cores slow every row (on CPU, badly: oversubscribed
    # OpenMP threads); the load average before and after tells readers whether that happened.
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    baseline = _create_model(cfg["model"], cfg["img_size"], device, cfg["seed"])
    img_size: tuple[int, int] = tuple(baseline.patch_embed.img_size)  # type: ignore[assignment]
    generator = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    # Built on the host with a seeded generator (same batch on every device), moved once: the
    # timed passes never include the copy.
    inputs = torch.randn(cfg["batch_size"], 3, *img_size, generator=generator).to(device)

    # (method, r, attention, backend) per row, fused rows first. The manual-attention ToMe row
    # uses the middle r of the list (13 with the defaults) and the first backend.
    rs: list[RSchedule] = cfg["r"]
    backends: list[str] = cfg["backend"]
    plan_rows: list[tuple[str, RSchedule | None, str, str | None]] = [("baseline", None, "fused", None)]
    plan_rows += [("tome", r, "fused", backend) for r in rs for backend in backends]
    if cfg["manual"]:
        plan_rows += [("baseline", None, "manual", None), ("tome", rs[(len(rs) - 1) // 2], "manual", backends[0])]

    # Build every row's model and take its agreement from its own untimed forward (which also
    # serves as a first warm-up pass, and compiles under --compile). A fresh deep copy per row:
    # identical weights, and no row's patching or compiled graph leaks into another.
    reference: Tensor | None = None
    prepared: list[dict[str, Any]] = []
    runners: list[Callable[[Tensor], Tensor]] = []
    for index, (method, r, attention, backend) in enumerate(plan_rows, 1):
        label = "baseline" if r is None else f"tome r={format_schedule(r)}"
        progress(f"[{index}/{len(plan_rows)}] preparing {label} ({attention} attention)")
        model = copy.deepcopy(baseline)
        set_fused_attn(model, attention == "fused")
        if r is not None:
            tokenprune.patch(model, r=r, backend=backend)
        reduction = tokenprune.plan(model, img_size)
        runner: Callable[[Tensor], Tensor] = torch.compile(model) if cfg["compile"] else model
        with torch.inference_mode(), autocast(device, dtype):
            logits = runner(inputs).float()
        if reference is None:
            reference = logits  # the first row is the fused baseline
        cosine, top1 = agreement(logits, reference)
        runners.append(runner)
        prepared.append(
            {
                "model": cfg["model"],
                "method": method,
                "r": list(r) if isinstance(r, tuple) else r,
                "label": label,
                "attention": attention,
                "backend": backend,
                "gflops_per_image": tokenprune.flops(model, img_size, batch_size=1).total / 1e9,
                "output_tokens": reduction.output_tokens,
                "tokens_per_block": list(reduction.tokens),
                "logits_cosine": cosine,
                "top1_agreement_pct": top1,
            }
        )

    progress(f"timing {len(runners)} models round-robin: {cfg['warmup']} warm-up passes each, {cfg['runs']} rounds")
    timings = measure_interleaved(
        runners, inputs, warmup=cfg["warmup"], runs=cfg["runs"], dtype=dtype, progress=not args.quiet
    )
    baseline_ips = timings[0]["images_per_s"]
    rows = [
        Row(
            **fields,
            images_per_s=timing["images_per_s"],
            median_s=timing["median_s"],
            times_s=timing["times"],
            speedup=timing["images_per_s"] / baseline_ips,
        )
        for fields, timing in zip(prepared, timings)
    ]
    del runners

    env = environment(device)
    warnings: list[str] = []
    if load_at_start is not None:
        load_at_end = list(os.getloadavg())
        env["loadavg_1_5_15min"] = {"start": load_at_start, "end": load_at_end}
        # Heuristic: alone, this run keeps about torch_num_threads cores busy, so a 1-minute
        # load well above that means other processes shared the cores during the timing.
        if device.type == "cpu" and load_at_end[0] > env["torch_num_threads"] + 1:
            warnings.append(
                f"the machine was busy (1-min load {load_at_end[0]:.1f} with {env['torch_num_threads']} "
                "threads of ours): other processes competed for the cores, so these CPU timings are "
                "unreliable; rerun on an idle machine"
            )
    wall = time.perf_counter() - started
    document: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            **{k: v for k, v in cfg.items() if k not in ("device", "out", "markdown", "r")},
            "device": str(device),
            "r": [list(r) if isinstance(r, tuple) else r for r in rs],
            "img_size": list(img_size),
            "input_tokens": tokenprune.plan(baseline, img_size).tokens[0],
            "inputs": "torch.randn with --seed; weights random (pretrained=False)",
            "timing": "median of runs after warmup; inference_mode; device synchronised around each run",
        },
        "environment": env,
        "wall_time_s": wall,
        "warnings": warnings,
        "rows": [asdict(row) for row in rows],
    }
    # allow_nan=False: a NaN (e.g. a zero-logit cosine) should fail loudly, not write invalid JSON.
    write_atomic(cfg["out"], json.dumps(document, indent=2, allow_nan=False) + "\n")
    header = (
        f"{cfg['model']} @ {img_size[0]}x{img_size[1]}, batch {cfg['batch_size']}, {cfg['dtype']}, "
        f"{env['device_name']}, {env['torch_num_threads']} threads"
        f"{', torch.compile' if cfg['compile'] else ''}; median of {cfg['runs']} runs after {cfg['warmup']} warm-up"
    )
    notes = "".join(f"\n**Warning:** {warning}\n" for warning in warnings)
    write_atomic(cfg["markdown"], f"{header}\n\n{format_markdown(rows)}{notes}")
    print(header)
    print(format_table(rows))
    print(f"wall time {wall:.1f} s; wrote {cfg['out']} and {cfg['markdown']}")
    for warning in warnings:
        print(f"WARNING: {warning}")
    return document


if __name__ == "__main__":
    main()

"""Throughput sweep: models × methods × settings or budgets × batch sizes × compile on/off.

Run it with no arguments (``python -m evals.bench``, or ``make bench``) for the headline
comparison — the unpatched timm ViT against ToMe at r = 8, 13, 16 and (16, −1) — or sweep::

    python -m evals.bench --model vit_base_patch16_224 --model deit_small_patch16_224 \\
        --method tome --method local_global --method evit \\
        --budget 0.75 --budget 0.5 --budget 2x --batch-size 1 --batch-size 256 --compile both

It needs no network and no weights (random weights, ``pretrained=False``; speed does not
depend on them). Per row (one configuration):

* **samples/s** — batch size over the median of ``--runs`` timed passes after ``--warmup``
  untimed ones, model time only (``evals.harness``: CUDA events on a GPU, inputs already on
  the device). The rows of one group (same model, batch size and compile mode) are timed
  round-robin, so a slow spell of the machine hits them alike. **speedup** is over the
  unpatched model with fused attention of the same group, measured in the same run.
* **GFLOPs/sample** from :func:`tokenprune.flops` (2 FLOPs per multiply-add; halve for the
  "GFLOPs" ViT papers quote), its **fraction** of the unreduced model's, the **output
  tokens** from :func:`tokenprune.plan`, and on CUDA the **peak memory** of one pass.
* **agreement** — mean cosine of the logits and top-1 agreement (%) with the unpatched
  model on the benchmark batch, from one extra untimed forward (which also compiles); for a
  model without a classifier (``num_classes=0``: SAM, SigLIP 2 NaFlex, bare encoders) the
  cosine of its features and no top-1 ("-"). With random weights this measures how far the
  reduction moves the outputs, not accuracy: for accuracy, run ``evals.imagenet`` and join
  the two with ``evals.pareto``.

**Packed inputs.** ``--packed`` times a NaFlexVit on NaFlex's packed sequences (timm's
collator's dict: one image of the input size, the others of random shapes, each padded to
that size's patch count) instead of image batches; GFLOPs count every position, padding too,
as the model computes them.

**Settings.** ``--r`` values apply to the merging methods, ``--keep-ratio`` to the dropping
methods, ``--budget`` to every method (:mod:`evals.settings`: ``0.5`` = the weakest setting
with at most half the GFLOPs, ``2x`` = the weakest measured to run at least twice as fast,
timed eagerly at the group's batch size and dtype with short runs), so methods are compared
at equal cost. ``--option [METHOD.]KEY=VALUE`` sets any other option.
``--backend`` gives one row per backend for methods that have one.

Unless ``--no-manual``, each group ends with the baseline and the first method's middle
setting under manual (non-fused) attention, to show what keeping the fused kernel is worth.

Outputs, written atomically: ``evals/results/bench_<device>.json`` (configuration, versions,
device, every row with its raw times), ``.csv`` (one line per row), ``.md`` (the table) and
``.png`` (speedup against GFLOPs fraction per method, with the line where speed would follow
FLOPs exactly).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import tokenprune
from evals import settings
from evals.harness import (
    DTYPES,
    RESULTS_DIR,
    Inputs,
    agreement,
    autocast,
    command_line,
    create_model,
    environment,
    jsonable,
    example_input,
    figure_png,
    input_size,
    leading_tensor,
    measure_interleaved,
    peak_memory_mib,
    pyplot,
    refuse_unavailable_device,
    refuse_unusable_triton,
    set_fused_attn,
    write_atomic,
)
from evals.settings import Budget, Setting, describe_setting
from kernels import BACKENDS, use_triton
from tokenprune.patch.vit import check_supported, reducing_model

__all__ = ["DEFAULTS", "Row", "build_parser", "main"]

# Per device kind. CPU: sized to finish in about a minute on an idle 2-core machine. CUDA: the
# setting ToMe reports (ViT-B/16, large batch, half precision).
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "model": ["vit_small_patch16_224"],
        "batch_size": [8],
        "dtype": "float32",
        "backend": ["auto"],  # the PyTorch merge: Triton kernels need a GPU
        "warmup": 3,
        "runs": 20,
    },
    "cuda": {
        "model": ["vit_base_patch16_224"],
        "batch_size": [256],
        "dtype": "bfloat16",
        "backend": ["torch", "triton"],  # the merge step in PyTorch vs the Triton kernels
        "warmup": 10,
        "runs": 30,
    },
}
# A speedup budget is searched with short eager timings (bisection: about 7 of them per row).
SEARCH_TIMING = {"cpu": {"warmup": 1, "runs": 5}, "cuda": {"warmup": 5, "runs": 10}}


@dataclass
class Row:
    """One benchmarked configuration; serialised as one JSON record and one CSV line."""

    model: str
    input_size: list[int]  # (H, W), or (T, H, W) for a video model
    packed_length: int | None  # positions per packed sequence (--packed; the patches of input_size), else None
    batch_size: int
    dtype: str
    compile: bool
    method: str  # "none" for the unpatched model
    setting: str  # the method's options as describe_setting writes them ("" for none)
    options: dict[str, Any]
    budget: str | None  # the budget the setting was searched for, else None
    attention: str  # "fused" (SDPA) or "manual"
    backend: str | None  # the match/merge backend option (auto, triton, torch), for methods that have it
    backend_used: str | None  # what that option ran here: "triton" or "torch"
    samples_per_s: float
    median_s: float
    times_s: list[float]
    speedup: float  # over the fused unpatched model of the same group, same run
    gflops: float  # per sample
    gflops_fraction: float  # of the unpatched model's
    output_tokens: int
    tokens_per_block: list[int]
    peak_memory_mib: float | None  # CUDA only
    logits_cosine: float
    top1_agreement_pct: float | None  # None without a classifier (num_classes=0: SAM, SigLIP 2 NaFlex, encoders)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evals.bench",
        description="Throughput of timm ViTs, unpatched vs tokenprune methods, over models, settings or budgets, "
        "batch sizes and compile modes (random weights, offline).",
    )
    add = parser.add_argument
    add("--model", action="append", help="timm (or tokenprune video) model, repeatable (default: "
        "vit_small_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")  # fmt: skip
    add("--img-size", type=int, help="input resolution (default: the model's)")
    add("--packed", action="store_true", help="NaFlexVit models: time NaFlex's packed sequences (images of random "
        "shapes padded to the input size's patch count, timm's collator layout) instead of image batches")  # fmt: skip
    add("--batch-size", action="append", type=int, help="samples per forward, repeatable (default: 8 on CPU, 256 on CUDA)")
    settings.add_arguments(parser, timed=True)
    add("--backend", action="append", choices=BACKENDS,
        help="match/merge backend, repeatable: one row per backend (default: auto on CPU, torch and triton on CUDA)")  # fmt: skip
    add("--dtype", choices=sorted(DTYPES), help="float32, or autocast to bfloat16/float16 (default: float32 on CPU, bfloat16 on CUDA)")
    add("--compile", choices=["off", "on", "both"], default="off", help="torch.compile every model: off (default), on, or both")
    add("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
        help="torch.compile's mode (reduce-overhead: CUDA graphs, for models that wait on kernel launches)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--runs", type=int, help="timed passes per row; the median is reported (default: 20 on CPU, 30 on CUDA)")
    add("--warmup", type=int, help="untimed passes per row before timing (default: 3 on CPU, 10 on CUDA)")
    add("--no-manual", action="store_true", help="skip the manual (non-fused) attention rows")
    add("--seed", type=int, default=0, help="seed for the random weights and inputs")
    add("--out", type=Path, help="JSON path (default: evals/results/bench_<device>.json); .csv, .md, .png beside it")
    add("--no-plot", action="store_true", help="do not write the PNG")
    add("--quiet", action="store_true", help="no progress lines")
    return parser


def _resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = DEFAULTS.get(device.type, DEFAULTS["cpu"])

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    if args.compile_mode != "default" and args.compile == "off":  # else every row runs eagerly, the mode unused
        raise SystemExit(f"--compile-mode {args.compile_mode} applies to compiled rows: add --compile on (or both)")
    if any(key == "backend" for _, key, _ in args.option):
        raise SystemExit("give the backend with --backend (repeatable: one row per backend), not --option backend=…")
    config = {
        "device": device,
        "models": list(dict.fromkeys(pick("model"))),
        "img_size": args.img_size,
        "packed": args.packed,
        "batch_sizes": list(dict.fromkeys(pick("batch_size"))),
        "dtype": pick("dtype"),
        "settings": settings.settings_from_args(args),
        "backends": list(dict.fromkeys(pick("backend"))),
        "compile": {"off": [False], "on": [True], "both": [False, True]}[args.compile],
        "compile_mode": args.compile_mode,
        "warmup": pick("warmup"),
        "runs": pick("runs"),
        "manual": not args.no_manual,
        "seed": args.seed,
    }
    if min(config["batch_sizes"]) < 1 or config["runs"] < 1 or config["warmup"] < 0:
        raise SystemExit("--batch-size and --runs must be at least 1, --warmup at least 0")
    # Up front, not after the groups before the one that would fail:
    if args.img_size is not None and args.img_size < 1:
        raise SystemExit(f"--img-size must be at least 1, got {args.img_size}")
    refuse_unavailable_device(device)
    refuse_unusable_triton(config["backends"], device)
    for name in config["models"]:
        _check_model(name, args.img_size)
    out = args.out or RESULTS_DIR / f"bench_{device.type}.json"
    config["paths"] = {suffix: out.with_suffix(f".{suffix}") for suffix in ("json", "csv", "md", "png")}
    return config


def _check_model(name: str, img_size: int | None) -> None:
    """Stop on a model tokenprune cannot patch, built without weights (on the meta device) so
    that checking every model costs nothing."""
    try:
        with torch.device("meta"):
            model = create_model(name, img_size, torch.device("meta"), seed=0)
    except TypeError as error:  # e.g. img_size for a model without that argument
        raise SystemExit(f"--model {name} cannot be built{' with --img-size' if img_size else ''}: {error}") from None
    except (RuntimeError, NotImplementedError, ValueError):  # a model meta tensors cannot build: checked when built
        return
    try:
        check_supported(reducing_model(model))
    except TypeError as error:
        raise SystemExit(f"--model {name}: {error}") from None


# ---------------------------------------------------------------------------------------------
# One group: a model at one batch size and compile mode


def _backend_ran(model: nn.Module, inputs: Inputs) -> str:
    """What a patched model's merging ran on: "auto" as its family resolves it (SAM's blocks: the
    PyTorch path), then each op's rule (Triton for CUDA tensors)."""
    resolved = reducing_model(model).blocks[0].backend
    return "triton" if use_triton(resolved, leading_tensor(inputs)) else "torch"


def _speedup_timer(
    baseline: nn.Module, inputs: Inputs, dtype: torch.dtype, device: torch.device
) -> Callable[[nn.Module], float]:
    timing = SEARCH_TIMING.get(device.type, SEARCH_TIMING["cpu"])

    def speedup_of(candidate: nn.Module) -> float:
        base, reduced = measure_interleaved([baseline, candidate], inputs, dtype=dtype, **timing)
        return reduced["images_per_s"] / base["images_per_s"]

    return speedup_of


def _group_rows(
    cfg: dict[str, Any],
    name: str,
    baseline: nn.Module,
    batch_size: int,
    compiled: bool,
    progress: Callable[[str], None],
    warnings: list[str],
) -> list[Row]:
    """The rows of one group, timed together; a budget a method cannot reach skips its rows
    with a line in ``warnings``."""
    device: torch.device = cfg["device"]
    dtype = DTYPES[cfg["dtype"]]
    size = input_size(baseline)
    try:
        inputs = example_input(baseline, batch_size, device, cfg["seed"], packed=cfg["packed"])
    except ValueError as error:  # --packed for a model that takes image batches only
        raise SystemExit(f"{name}: {error}") from None
    packed_length = leading_tensor(inputs).shape[1] if cfg["packed"] else None
    unreduced_flops = tokenprune.flops(baseline, size).total

    def backends(method: str) -> list[str | None]:
        return cfg["backends"] if settings.method_takes(method, "backend") else [None]

    # (setting, attention, backend) per row: the fused baseline first (the reference).
    rows_planned: list[tuple[Setting, str, str | None]] = [(Setting("none", {}), "fused", None)]
    for setting in cfg["settings"]:
        rows_planned += [(setting, "fused", backend) for backend in backends(setting.method)]
    if cfg["manual"] and cfg["settings"]:
        method = cfg["settings"][0].method
        first = [s for s in cfg["settings"] if s.method == method]
        middle = first[(len(first) - 1) // 2]
        rows_planned += [(Setting("none", {}), "manual", None), (middle, "manual", backends(method)[0])]

    reference: Tensor | None = None
    prepared: list[dict[str, Any]] = []
    runners: list[Callable[[Inputs], Any]] = []
    searched: dict[tuple[str, str, Budget, float | None], dict[str, Any] | None] = {}
    for index, (setting, attention, backend) in enumerate(rows_planned, 1):
        # The backend is one of the options, so a speed budget is searched on the backend it runs.
        options = setting.options if backend is None else {**setting.options, "backend": backend}
        if setting.budget is not None:
            key = (setting.method, repr(sorted(options.items())), setting.budget, setting.inflection)
            if key not in searched:
                progress(f"  searching {setting.method} for {setting.budget}")
                timer = _speedup_timer(baseline, inputs, dtype, device) if setting.budget.kind == "speedup" else None
                try:
                    searched[key] = settings.resolve(Setting(setting.method, options, setting.budget, setting.inflection), baseline, size, timer)
                except settings.BudgetUnreachable as error:
                    searched[key] = None
                    warnings.append(f"{name}, batch {batch_size}: row skipped: {error}")
            if searched[key] is None:
                continue
            options = searched[key]
        label = describe_setting(setting.method, options) or "unpatched"
        progress(f"[{index}/{len(rows_planned)}] {setting.method} {label} ({attention} attention, backend {backend})")
        model = copy.deepcopy(baseline)
        set_fused_attn(model, attention == "fused")
        if setting.method != "none":
            try:
                tokenprune.patch(model, setting.method, **options)
            except (TypeError, ValueError) as error:
                raise SystemExit(f"{setting.method} {label}: {error}") from None
        reduction = tokenprune.plan(model, size)
        mode = None if cfg["compile_mode"] == "default" else cfg["compile_mode"]
        runner: Callable[[Inputs], Any] = torch.compile(model, mode=mode) if compiled else model
        try:
            with torch.inference_mode(), autocast(device, dtype):
                # compiles, under torch.compile; a copy, as CUDA graphs reuse their output buffers
                logits = runner(inputs).float().clone()
        except ValueError as error:  # a setting the data cannot satisfy, e.g. temporal r too large
            raise SystemExit(f"{name} {setting.method} {label}: {error}") from None
        reference = logits if reference is None else reference
        cosine, top1 = agreement(logits, reference, classifier=getattr(baseline, "num_classes", 0) > 0)
        flops = tokenprune.flops(model, size).total
        runners.append(runner)
        prepared.append(
            {
                "model": name,
                "input_size": list(size),
                "packed_length": packed_length,
                "batch_size": batch_size,
                "dtype": cfg["dtype"],
                "compile": compiled,
                **settings.identity(setting, options),
                "options": jsonable({k: v for k, v in options.items() if k != "backend"}),
                "attention": attention,
                "backend": backend,
                "backend_used": None if backend is None else _backend_ran(model, inputs),
                "gflops": flops / 1e9,
                "gflops_fraction": flops / unreduced_flops,
                "output_tokens": reduction.output_tokens,
                "tokens_per_block": list(reduction.tokens),
                "peak_memory_mib": peak_memory_mib(model, runner, inputs, dtype),
                "logits_cosine": cosine,
                "top1_agreement_pct": top1,
            }
        )

    progress(f"timing {len(runners)} models round-robin: {cfg['warmup']} warm-up passes each, {cfg['runs']} rounds")
    timings = measure_interleaved(runners, inputs, warmup=cfg["warmup"], runs=cfg["runs"], dtype=dtype, progress=cfg["progress"])
    base = timings[0]["images_per_s"]
    rows = [
        Row(
            **fields,
            samples_per_s=timing["images_per_s"],
            median_s=timing["median_s"],
            times_s=timing["times"],
            speedup=timing["images_per_s"] / base,
        )
        for fields, timing in zip(prepared, timings)
    ]
    # A speed budget is searched with short eager timings; the row's speedup is this run's own.
    for row in rows:
        target = next((s.budget for s in cfg["settings"] if s.budget is not None and s.budget.label == row.budget), None)
        # Manual-attention rows are ToMe's original attention, slower by design: not the searched row.
        if target is not None and target.kind == "speedup" and row.attention == "fused" and row.speedup < target.value:
            warnings.append(
                f"{name}, batch {batch_size}{', compiled' if compiled else ''}: {row.method} {row.setting} was searched "
                f"for {target.label} but measured {row.speedup:.2f}x in the timed run: the budget is not met"
            )
    return rows


# ---------------------------------------------------------------------------------------------
# Output

# (header, field or function of the row, alignment). Columns whose value is the same on every
# row move to the table's caption, so a one-model run does not repeat the model on each line.
COLUMNS: list[tuple[str, Callable[[Row], str], str]] = [
    ("model", lambda row: row.model, "<"),
    ("input", lambda row: f"packed {row.packed_length}" if row.packed_length else "x".join(map(str, row.input_size)), "<"),
    ("batch", lambda row: str(row.batch_size), ">"),
    ("dtype", lambda row: row.dtype, "<"),
    ("compile", lambda row: "on" if row.compile else "off", "<"),
    ("method", lambda row: row.method, "<"),
    ("setting", lambda row: row.setting or "-", "<"),
    ("budget", lambda row: row.budget or "-", "<"),
    ("attention", lambda row: row.attention, "<"),
    # "auto" with what it ran, e.g. "auto (triton)" on a GPU
    ("backend", lambda row: "-" if row.backend is None else row.backend + (f" ({row.backend_used})" if row.backend == "auto" else ""), "<"),
    ("samples/s", lambda row: f"{row.samples_per_s:.1f}" if row.samples_per_s >= 10 else f"{row.samples_per_s:.3f}", ">"),
    ("speedup", lambda row: f"{row.speedup:.2f}x", ">"),
    ("GFLOPs", lambda row: f"{row.gflops:.2f}", ">"),
    ("FLOPs ratio", lambda row: f"{1 / row.gflops_fraction:.2f}x", ">"),
    ("out tokens", lambda row: str(row.output_tokens), ">"),
    ("peak MiB", lambda row: "-" if row.peak_memory_mib is None else f"{row.peak_memory_mib:.0f}", ">"),
    ("logit cos", lambda row: f"{row.logits_cosine:.4f}", ">"),
    ("top-1 agr %", lambda row: "-" if row.top1_agreement_pct is None else f"{row.top1_agreement_pct:.1f}", ">"),
]
# Always shown, even when constant: the figures the table is for.
MEASURES = {"samples/s", "speedup", "GFLOPs", "FLOPs ratio", "out tokens", "logit cos", "top-1 agr %", "method", "setting"}


# What a "compile on" row's backend column does not say.
COMPILED_ATTENTION_NOTE = (
    "Compiled rows: attention over merged tokens runs PyTorch's SDPA under torch.compile with backend auto, "
    "and the Triton kernel as one custom op with backend triton."
)


def _table(rows: Sequence[Row]) -> tuple[str, list[str], list[list[str]], list[str]]:
    """(caption of the constant columns, headers, cells, alignments) for the varying ones."""
    cells = [[cell(row) for _, cell, _ in COLUMNS] for row in rows]
    keep = [i for i, (name, _, _) in enumerate(COLUMNS) if name in MEASURES or len({c[i] for c in cells}) > 1]
    constant = [i for i in range(len(COLUMNS)) if i not in keep and cells and cells[0][i] != "-"]
    caption = ", ".join(f"{COLUMNS[i][0]} {cells[0][i]}" for i in constant)
    return caption, [COLUMNS[i][0] for i in keep], [[c[i] for i in keep] for c in cells], [COLUMNS[i][2] for i in keep]


def format_table(rows: Sequence[Row]) -> str:
    """Plain fixed-width table, for the terminal."""
    caption, headers, cells, aligns = _table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, w, a in zip(values, widths, aligns)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([caption, line(headers), rule, *(line(c) for c in cells)])


def format_markdown(rows: Sequence[Row]) -> str:
    caption, headers, cells, aligns = _table(rows)
    lines = [f"{caption}\n", "| " + " | ".join(headers) + " |"]
    lines.append("| " + " | ".join("---:" if a == ">" else ":---" for a in aligns) + " |")
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row]) -> str:
    """One line per row, every field; lists and dicts as JSON."""
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(Row)]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = asdict(row)
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record.items()})
    return buffer.getvalue()


def plot_png(rows: Sequence[Row], title: str) -> bytes:
    """Speedup against FLOPs reduction, one series per (model, batch, compile, method,
    backend), fused attention only, with the ideal (speed follows FLOPs) as a dashed line."""
    plt = pyplot()
    fused = [row for row in rows if row.attention == "fused"]
    figure, axes = plt.subplots(figsize=(7, 5), dpi=120)
    top = max(1 / row.gflops_fraction for row in fused)
    axes.plot([1, top], [1, top], "--", color="grey", linewidth=1, label="speed ∝ 1/FLOPs")
    series: dict[tuple[Any, ...], list[Row]] = {}
    for row in fused:
        if row.method == "none":
            continue
        series.setdefault((row.model, row.batch_size, row.compile, row.method, row.backend), []).append(row)
    varying = [len({key[i] for key in series}) > 1 for i in range(5)]
    for key, members in series.items():
        members.sort(key=lambda row: row.gflops_fraction, reverse=True)
        parts = [
            ("compiled" if value else "eager") if i == 2 else f"batch {value}" if i == 1 else str(value)
            for i, value in enumerate(key)
            if varying[i] and value is not None
        ]
        label = " ".join(parts) or key[3]
        axes.plot([1.0] + [1 / r.gflops_fraction for r in members], [1.0] + [r.speedup for r in members], "o-", label=label)
    axes.set_xlabel("FLOPs reduction (unreduced GFLOPs / GFLOPs)")
    axes.set_ylabel("speedup (measured throughput / unpatched)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure_png(figure)


# ---------------------------------------------------------------------------------------------
# The benchmark


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sweep, print the table, write JSON, CSV, markdown and PNG; returns the JSON document.

    The JSON, CSV and markdown are rewritten after every group of rows (model × batch size ×
    compile), marked incomplete until the last: a run stopped part-way (a GPU lent for minutes)
    keeps the groups it finished."""
    args = build_parser().parse_args(argv)
    cfg = _resolve_config(args)
    cfg["progress"] = not args.quiet
    device: torch.device = cfg["device"]
    started = time.perf_counter()
    # Other processes competing for the cores slow every row (on CPU, badly: oversubscribed
    # OpenMP threads); the load average before and after tells readers whether that happened.
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    rows: list[Row] = []
    warnings: list[str] = []
    groups = [(name, batch_size, compiled) for name in cfg["models"] for batch_size in cfg["batch_sizes"]
              for compiled in cfg["compile"]]
    # Patched models share their forward's code object, so each row's static guards (r, the
    # attention kind) add a dynamo cache entry: past torch's default limit of 8 a row would run
    # eagerly under a "compile on" label. Raise the limit for the sweep, and fail past it.
    compile_limits = {"recompile_limit": 1024, "fail_on_recompile_limit_hit": True}
    with torch._dynamo.config.patch({k: v for k, v in compile_limits.items() if hasattr(torch._dynamo.config, k)}):
        baseline, baseline_name = None, None
        for done, (name, batch_size, compiled) in enumerate(groups, 1):
            if name != baseline_name:
                baseline = None  # free the previous model before building the next
                baseline, baseline_name = create_model(name, cfg["img_size"], device, cfg["seed"]), name
            progress(f"== {name}, batch {batch_size}, compile {'on' if compiled else 'off'}")
            rows += _group_rows(cfg, name, baseline, batch_size, compiled, progress, warnings)
            if compiled:
                torch._dynamo.reset()  # free the compiled graphs before the next group
            if done < len(groups):
                _write_results(args, argv, cfg, rows, warnings, started, load_at_start, done, len(groups))
        del baseline
    document, header, written = _write_results(args, argv, cfg, rows, warnings, started, load_at_start,
                                               len(groups), len(groups))
    print(header)
    print(format_table(rows))
    print(f"wall time {document['wall_time_s']:.1f} s; wrote {', '.join(map(str, written))}")
    for warning in document["warnings"]:
        print(f"WARNING: {warning}")
    return document


def _write_results(args: argparse.Namespace, argv: Sequence[str] | None, cfg: dict[str, Any], rows: list[Row],
                   warnings: list[str], started: float, load_at_start: list[float] | None, groups_done: int,
                   groups_total: int) -> tuple[dict[str, Any], str, list[Path]]:
    """Write the rows so far (JSON, CSV, markdown; the PNG once complete); return the JSON
    document, the tables' header line and the paths written."""
    device: torch.device = cfg["device"]
    complete = groups_done == groups_total
    warnings = list(warnings)
    env = environment(device)
    if load_at_start is not None:
        load_at_end = list(os.getloadavg())
        env["loadavg_1_5_15min"] = {"start": load_at_start, "end": load_at_end}
        # Heuristic: alone, this run keeps about torch_num_threads cores busy, so a 1-minute
        # load well above that at the end means other processes shared the cores during the
        # timing; so does a load above it both before the run and after (others ran before and
        # went on: a run shorter than a minute barely moves the average).
        threads = env["torch_num_threads"]
        before_and_after = load_at_start[0] > threads and load_at_end[0] > threads
        if device.type == "cpu" and (load_at_end[0] > threads + 1 or before_and_after):
            warnings.append(
                f"the machine was busy (1-min load {load_at_start[0]:.1f} at the start, {load_at_end[0]:.1f} at the "
                f"end, with {threads} threads of ours): other processes competed for the cores, so these CPU "
                "timings are unreliable; rerun on an idle machine"
            )
    if not complete:
        warnings.append(f"incomplete: written after {groups_done} of {groups_total} groups (model × batch size × "
                        "compile); the run did not finish")
    config = {
        **{k: v for k, v in cfg.items() if k not in ("device", "paths", "settings", "progress", "compile")},
        "device": str(device),
        "compile": args.compile,
        "settings": [
            {"method": s.method, "options": jsonable(s.options), "budget": None if s.budget is None else str(s.budget)}
            for s in cfg["settings"]
        ],
        "command": command_line("evals.bench", argv),
        "inputs": "torch.randn with --seed; weights random (pretrained=False)",
        "timing": "median of runs after warmup; inference_mode; CUDA events on GPU, else host clock "
        "between device synchronisations; rows of a group timed round-robin",
    }
    document: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "environment": env,
        "wall_time_s": time.perf_counter() - started,
        "complete": complete,
        "warnings": warnings,
        "rows": [asdict(row) for row in rows],
    }
    paths = cfg["paths"]
    # allow_nan=False: a NaN (e.g. a zero-logit cosine) should fail loudly, not write invalid JSON.
    write_atomic(paths["json"], json.dumps(document, indent=2, allow_nan=False) + "\n")
    write_atomic(paths["csv"], format_csv(rows))
    header = (
        f"{env['device_name']}, {env['torch_num_threads']} threads, torch {env['torch']}, timm {env['timm']}; "
        f"median of {cfg['runs']} runs after {cfg['warmup']} warm-up; `{config['command']}`"
    )
    notes = "".join(f"\n**Warning:** {warning}\n" for warning in warnings)
    if True in cfg["compile"]:
        notes += f"\ntorch.compile mode: {cfg['compile_mode']}. {COMPILED_ATTENTION_NOTE}\n"
    write_atomic(paths["md"], f"{header}\n\n{format_markdown(rows)}{notes}")
    written = [paths["json"], paths["csv"], paths["md"]]
    if complete and not args.no_plot:
        write_atomic(paths["png"], plot_png(rows, f"{env['device_name']}, {cfg['dtype']}"))
        written.append(paths["png"])
    else:
        paths["png"].unlink(missing_ok=True)  # an earlier run's figure, beside rows it does not show
    return document, header, written


def cli() -> None:
    """The console script: ``main`` returns its results to Python callers, which
    ``sys.exit`` would print and turn into exit status 1."""
    main()


if __name__ == "__main__":
    cli()

"""Which of timm's pretrained ViT architectures tokenprune patches, each checked by running it.

For every architecture with pretrained weights in the given timm modules (random weights here:
nothing is downloaded), built with few blocks: the unpatched model, the model patched with
r=0 (must be bit-identical), and patched with ToMe at ``--r`` (must run, keep the output shape,
stay finite, leave as many tokens as ``tokenprune.plan`` says, and cost what
``tokenprune.flops`` says by torch's FlopCounterMode); SAM, whose blocks need every patch, with
``merge_unmerge`` at ratio 0 and 0.5 instead. An architecture
tokenprune does not support is listed with its ``TypeError``; one that fails a check is listed
with what failed, and the script exits non-zero.

    python -m evals.coverage [--module eva --module naflexvit] [--depth 2] [--r 4]

Writes ``evals/results/coverage.{json,md}`` by default. The default modules took 22 minutes on a
shared 2-core CPU VM (the README's run).
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from tqdm import tqdm

import tokenprune
from evals.harness import RESULTS_DIR, command_line, counted_flops, environment
from tokenprune._io import write_atomic
from tokenprune.patch.vit import check_supported, family, reducing_model

MODULES = (
    "vision_transformer",
    "vision_transformer_hybrid",
    "vision_transformer_relpos",
    "deit",
    "eva",
    "beit",
    "cait",
    "naflexvit",
    "vitamin",  # timm VisionTransformers behind a convolutional stem (HybridEmbed)
    "qwen3_vit",  # Qwen3-VL vision encoders, bare or in a classifier
    "vision_transformer_sam",
)
# Above this many parameters a model whose builder will not take a smaller depth is not built.
MAX_FULL_DEPTH_PARAMS = 500_000_000


def architectures(module: str) -> list[str]:
    """timm's architectures in ``module`` with at least one pretrained tag."""
    return sorted({name.split(".")[0] for name in timm.list_models(module=module, pretrained=True)})


def build(name: str, depth: int) -> tuple[nn.Module | None, str]:
    """The architecture with random weights and ``depth`` blocks; when its builder gives a
    per-block list of key/value heads (Sapiens2's grouped-query attention in the middle blocks
    only), ``depth`` blocks that sample that list; else at full depth, when small enough;
    (None, why) when it cannot be built here."""
    try:
        return timm.create_model(name, depth=depth).eval(), f"{depth} blocks"
    except (TypeError, AssertionError, ValueError) as error:
        reason = f"{type(error).__name__}: {error}"
    full = timm.create_model(name, device="meta")
    kv_heads = [getattr(block.attn, "num_kv_heads", None) for block in full.blocks]
    if None not in kv_heads:
        # blocks 0, L/depth, 2L/depth, ...: for 2 of Sapiens2's, block 0 (full attention) and the
        # middle one (grouped-query attention, in the sizes that have it)
        sampled = tuple(kv_heads[i * len(kv_heads) // depth] for i in range(depth))
        try:
            model = timm.create_model(name, depth=depth, num_kv_heads=sampled).eval()
            return model, f"{depth} blocks (num_kv_heads={sampled}, sampled from its per-block list)"
        except (TypeError, AssertionError, ValueError):
            pass  # another per-block option: full depth below
    size = sum(p.numel() for p in full.parameters())
    if size > MAX_FULL_DEPTH_PARAMS:
        return None, f"not built: depth={depth} refused ({reason}) and {size / 1e9:.1f}B parameters at full depth"
    model = timm.create_model(name).eval()
    return model, f"full depth ({len(reducing_model(model).blocks)} blocks; depth={depth} refused)"


@torch.no_grad()
def check(model: nn.Module, r: int) -> list[str]:
    """What goes wrong when ``model`` is patched: [] when nothing does. Families whose blocks
    need every patch (SAM) take ``merge_unmerge`` at ratio 0 and 0.5 instead of ToMe's r."""
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"][-2:])
    x = torch.randn(1, cfg["input_size"][0], *size, generator=torch.Generator().manual_seed(0))
    expected = model(x)
    method = family(reducing_model(model)).default_method
    # A method whose blocks give every token back (merge_unmerge): the saving shows in the FLOPs.
    unmerges = getattr(tokenprune.METHODS[method], "unmerges_in_blocks", False)
    unreduced, reduced = ({"ratio": 0.0}, {"ratio": 0.5}) if unmerges else ({"r": 0}, {"r": r})
    problems = []
    tokenprune.patch(model, method, **unreduced)
    if not torch.equal(model(x), expected):
        problems.append(f"{_setting(unreduced)} is not bit-identical to the unpatched model")
    unreduced_flops = tokenprune.flops(model, size).total
    tokenprune.patch(model, method, **reduced)
    out = model(x)
    reduction = tokenprune.plan(model, size)
    if out.shape != expected.shape:
        problems.append(f"output shape {tuple(out.shape)}, unpatched {tuple(expected.shape)}")
    if not torch.isfinite(out).all():
        problems.append("non-finite output")
    computed, counted = tokenprune.flops(model, size).total, counted_flops(model, x)
    if unmerges:  # every block gives back the whole grid: the saving is in the blocks' work
        if computed >= unreduced_flops:
            problems.append("nothing merged")
    else:
        state = reducing_model(model).forward_tokens(x)
        if state.num_tokens != reduction.head_tokens:
            problems.append(f"{state.num_tokens} tokens out, plan says {reduction.head_tokens}")
        if reduction.output_tokens >= reduction.tokens[0]:
            problems.append("nothing merged")
    if computed != counted:
        problems.append(f"tokenprune.flops gives {computed / 1e9:.4f} GFLOPs, FlopCounterMode counts {counted / 1e9:.4f}")
    tokenprune.unpatch(model)
    return problems


def _setting(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items())


def run(modules: list[str], depth: int, r: int, progress: bool = True) -> list[dict[str, Any]]:
    names = [(module, name) for module in modules for name in architectures(module)]
    rows = []
    for module, name in tqdm(names, desc="architectures", disable=not progress):
        row: dict[str, Any] = {"module": module, "architecture": name}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model, built = build(name, depth)
            except Exception as error:  # one architecture timm cannot build must not cost the survey
                model, built = None, f"not built: {type(error).__name__}: {error}"
        row["built"] = built
        if model is None:
            row.update(status="not checked", detail=built)
        else:
            row["class"] = type(model).__name__
            try:
                check_supported(reducing_model(model))
            except (TypeError, ValueError) as error:  # (ValueError: no blocks to patch)
                row.update(status="unsupported", detail=str(error).split("; supported:")[0])
            else:
                try:
                    problems = check(model, r)
                except Exception as error:  # one broken architecture must not cost the survey
                    problems = [f"{type(error).__name__}: {error}"]
                row.update(status="failed" if problems else "ok", detail="; ".join(problems))
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    counts = Counter(row["status"] for row in rows)
    per_module: dict[str, Counter] = {}
    for row in rows:
        per_module.setdefault(row["module"], Counter())[row["status"]] += 1
    statuses = ["ok", "failed", "unsupported", "not checked"]
    lines = [
        f"timm {env['timm']}, torch {env['torch']}, tokenprune {env['tokenprune']} (commit {env['git_commit']}); "
        f"`{command}`",
        "",
        f"{counts['ok']} of {len(rows)} pretrained architectures patched and checked "
        "(r=0 bit-identical; ToMe runs with the planned token count and FLOPs; SAM: merge_unmerge at ratio 0 "
        "bit-identical, at 0.5 with the counted FLOPs; random weights).",
        "",
        "| module | " + " | ".join(statuses) + " |",
        "|---|" + "---:|" * len(statuses),
    ]
    for module, counter in per_module.items():
        lines.append(f"| {module} | " + " | ".join(str(counter[s]) for s in statuses) + " |")
    others = [row for row in rows if row["status"] != "ok"]
    if others:
        lines += ["", "| architecture | status | why |", "|---|---|---|"]
        lines += [f"| {row['architecture']} | {row['status']} | {row['detail']} |" for row in others]
    full_depth = [row["architecture"] for row in rows if row.get("built", "").startswith("full depth")]
    if full_depth:
        lines += ["", "Built at full depth (their builders refuse another depth): " + ", ".join(full_depth) + "."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=MODULES,
                        help=f"timm module, repeatable (default: all of {', '.join(MODULES)})")  # fmt: skip
    parser.add_argument("--depth", type=int, default=2, help="blocks to build each model with (default 2)")
    parser.add_argument("--r", type=int, default=4, help="ToMe's r for the reducing check (default 4)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "coverage.json", help="JSON path; .md beside it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.depth < 1 or args.r < 1:
        raise SystemExit("--depth and --r must be at least 1")
    command = command_line("evals.coverage", argv)
    rows = run(args.module or list(MODULES), args.depth, args.r, progress=not args.quiet)
    env = environment(torch.device("cpu"))
    write_atomic(args.out, json.dumps({"environment": env, "command": command, "rows": rows}, indent=1))
    table = markdown(rows, env, command.strip())
    write_atomic(args.out.with_suffix(".md"), table)
    print(table)
    return 1 if any(row["status"] == "failed" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())

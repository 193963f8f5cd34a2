"""The merge step alone: ToMe's matching + size-weighted merge, PyTorch vs Triton.

For a whole-model setting (ViT-B/16 at 224², the ToMe benchmark) the step is timed at every
block's real token count and r (from ``tokenprune.plan``), summed over the blocks, and set
against the patched model's own forward time measured in the same run: the share of the
model's time that token merging costs. Two video-sized steps (1,568 tokens, 8 tubelet frames
of 14 × 14) are timed alone: joint ToMe's, and temporal merging's (its match under the frame
and window rule, then the merge).

    python -m evals.bench_merge [--batch-size 256] [--dtype bfloat16] [--r 16]

Triton runs only on a GPU; on CPU the table has the PyTorch rows alone. Timing as in
``evals.harness``: warm-up, device synchronisation, median of runs, inputs made beforehand.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch

import tokenprune
from evals.harness import (
    DTYPES,
    RESULTS_DIR,
    environment,
    measure_interleaved,
    refuse_unavailable_device,
    refuse_unusable_triton,
    write_atomic,
)
from kernels import HAS_TRITON
from tokenprune.merge import TokenState, grid_positions
from tokenprune.methods.temporal import TemporalMerge
from tokenprune.methods.tome import BipartiteMerge
from tokenprune.schedule import format_schedule, parse_schedule


def merge_step(
    x: torch.Tensor, metric: torch.Tensor, r: int, protected: int, backend: str, repeat: int
) -> Callable[[Any], Any]:
    """One block's ToMe step (the model's own, :class:`BipartiteMerge`) on fixed inputs, run
    ``repeat`` times back to back, as a callable for the timer (divide its time by ``repeat``).

    The step is ~30 small kernels on the torch path (3 kernels on the Triton path, and a sort
    beyond 256 A tokens), each of tens of µs at most. Timed alone between two device
    synchronisations, the host's launch latency is all the clock sees; repeats amortise the
    synchronisation. On a fast GPU the step is still bound by the host launching its kernels
    (seen on an H100: more time per step than the profiler's device time), whereas inside a
    model those launches are queued while the large matmuls run. So on a GPU this figure is
    an upper bound; the device-time share comes from a profile of the model."""
    state = TokenState(x, torch.ones(*x.shape[:2], 1, device=x.device))
    merge = BipartiteMerge(r, protected, backend)

    def step(_: Any) -> TokenState:
        for _ in range(repeat):
            merged = merge(state, metric)
        return merged

    return step


def temporal_step(
    x: torch.Tensor, metric: torch.Tensor, grid: tuple[int, int, int], r: int, backend: str, repeat: int
) -> Callable[[Any], Any]:
    """One block's temporal merging step (window 2) on fixed inputs on the ``grid`` (the first
    temporal block), run ``repeat`` times back to back, as :func:`merge_step`."""
    pos = grid_positions(grid, 0, x.device).expand(x.shape[0], -1, -1)
    state = TokenState(x, torch.ones(*x.shape[:2], 1, device=x.device), pos=pos, grid=grid)
    merge = TemporalMerge(r, window=2, num_protected=0, backend=backend)

    def step(_: Any) -> TokenState:
        for _ in range(repeat):
            merged = merge(state, metric)
        return merged

    return step


def step_inputs(
    batch: int, tokens: int, channels: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's inputs in the dtypes it meets inside the model under autocast: the residual
    stream ``x`` stays in the weights' float32 (adding a bfloat16 branch output to it promotes),
    the metric — keys from a linear layer — comes in the autocast ``dtype``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, tokens, channels, generator=generator).to(device, torch.float32)
    metric = torch.randn(batch, tokens, head_dim, generator=generator).to(device, dtype)
    return x, metric


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m evals.bench_merge", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--r", type=parse_schedule, default=16)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--video-batch-size", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--device")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeat", type=int, help="back-to-back steps per timed run (default: 20 on GPU, 1 on CPU)")
    parser.add_argument("--backend", action="append", choices=["torch", "triton"],
                        help="repeatable (default: torch and triton on CUDA with triton installed, else torch)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    refuse_unavailable_device(device)
    on_gpu = device.type == "cuda"
    # "is None", not "or": an explicit 0 is a mistake to refuse, not a request for the default.
    batch = (256 if on_gpu else 16) if args.batch_size is None else args.batch_size
    video_batch = (32 if on_gpu else 2) if args.video_batch_size is None else args.video_batch_size
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    # dict.fromkeys: a backend given twice is one row, not two timings of the same path.
    backends = list(dict.fromkeys(args.backend or (["torch", "triton"] if on_gpu and HAS_TRITON else ["torch"])))
    refuse_unusable_triton(backends, device)  # before the torch rows run
    repeat = (20 if on_gpu else 1) if args.repeat is None else args.repeat
    if min(batch, video_batch, args.runs, repeat) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --video-batch-size, --runs and --repeat must be at least 1, --warmup at least 0")

    torch.manual_seed(0)
    try:
        model = timm.create_model(args.model, pretrained=False).eval().to(device)
    except RuntimeError as error:  # timm's "Unknown model"
        raise SystemExit(f"--model {args.model}: {error}") from None
    try:  # the step's shapes, read off a ViT's patch embedding and first block
        img_size = tuple(model.patch_embed.img_size)
        channels, head_dim = model.embed_dim, model.blocks[0].attn.head_dim
        protected = model.num_prefix_tokens
    except AttributeError:
        raise SystemExit(f"--model {args.model}: {type(model).__name__} is not a ViT whose merge step this times "
                         "(patch_embed, blocks[i].attn.head_dim): give a timm VisionTransformer, e.g. "
                         "vit_base_patch16_224") from None
    images = torch.randn(batch, 3, *img_size, generator=torch.Generator().manual_seed(0)).to(device)

    rows: list[dict[str, Any]] = []
    for backend in backends:
        patched = tokenprune.patch(copy.deepcopy(model), r=args.r, backend=backend)
        reduction = tokenprune.plan(patched, img_size)
        steps = []
        for tokens, removed in zip(reduction.tokens, reduction.removed):
            if removed:
                x, metric = step_inputs(batch, tokens, channels, head_dim, dtype, device)
                steps.append(merge_step(x, metric, removed, protected, backend, repeat))
        # The model and all its steps are timed round-robin in one loop: same conditions.
        timings = measure_interleaved([patched, *steps], images, warmup=args.warmup, runs=args.runs, dtype=dtype)
        model_s = timings[0]["median_s"]
        merge_s = sum(t["median_s"] for t in timings[1:]) / repeat
        rows.append(
            {
                "setting": f"{args.model} r={format_schedule(args.r)}, batch {batch}",
                "backend": backend,
                "merge_ms_per_forward": merge_s * 1e3,
                "model_ms_per_forward": model_s * 1e3,
                "merge_share_pct": 100 * merge_s / model_s,
                "blocks_merging": len(steps),
            }
        )
        # Video-sized steps: 8 tubelet frames × 14 × 14 = 1568 tokens, no class token.
        video_r, grid = 65, (8, 14, 14)
        x, metric = step_inputs(video_batch, 1568, channels, head_dim, dtype, device)
        joint, temporal = measure_interleaved(
            [merge_step(x, metric, video_r, 0, backend, repeat), temporal_step(x, metric, grid, video_r, backend, repeat)],
            x, warmup=args.warmup, runs=args.runs,
        )  # fmt: skip
        for name, timing in (("one video step", joint), ("one temporal video step", temporal)):
            rows.append(
                {
                    "setting": f"{name}: 1568 tokens, r={video_r}, batch {video_batch}",
                    "backend": backend,
                    "merge_ms_per_forward": timing["median_s"] / repeat * 1e3,
                    "model_ms_per_forward": None,
                    "merge_share_pct": None,
                    "blocks_merging": 1,
                }
            )

    env = environment(device)
    header = f"match + merge step, {dtype}, {env['device_name']}; median of {args.runs} runs after {args.warmup} warm-up"
    lines = ["| setting | backend | merge ms | model ms | merge share |", "| :--- | :--- | ---: | ---: | ---: |"]
    for row in rows:
        model_ms = "-" if row["model_ms_per_forward"] is None else f"{row['model_ms_per_forward']:.2f}"
        share = "-" if row["merge_share_pct"] is None else f"{row['merge_share_pct']:.1f} %"
        lines.append(f"| {row['setting']} | {row['backend']} | {row['merge_ms_per_forward']:.3f} | {model_ms} | {share} |")
    table = "\n".join(lines)
    out = args.out or RESULTS_DIR / f"bench_merge_{device.type}.json"
    # a ramp as its label, "(16,-1)": a JSON list [16, -1] would read as a per-block schedule
    r = format_schedule(args.r) if isinstance(args.r, tuple) else args.r
    config = {"model": args.model, "r": r, "batch_size": batch, "video_batch_size": video_batch,
              "dtype": args.dtype or str(dtype).removeprefix("torch."), "warmup": args.warmup, "runs": args.runs,
              "repeat": repeat}
    document = {"config": config, "environment": env, "rows": rows}
    write_atomic(out, json.dumps(document, indent=2, default=str) + "\n")
    write_atomic(out.with_suffix(".md"), f"{header}\n\n{table}\n")
    print(header)
    print(table)
    print(f"wrote {out}")
    return document


if __name__ == "__main__":
    main()

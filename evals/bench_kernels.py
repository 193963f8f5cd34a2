"""Each Triton kernel against its PyTorch reference, alone, at the shapes the models give it.

    python -m evals.bench_kernels [--out evals/results/bench_kernels_cuda.json]

The rows are the shapes that decide the kernels' dispatch (``backend="auto"``): the match at
ViT-B's, the video ViT's and SAM-B's shapes, and float32 rows of growing width (the kernel's
IEEE float32 dot against cuBLAS's matmul: :data:`kernels.match.FP32_KERNEL_MAX_FLOPS`), the
assignment at growing A-token counts (:data:`kernels.bipartite.AUTO_MAX_A_TOKENS`), the
assignment kernel laying out the merge's member lists against the same kernel writing ``dest``
alone followed by torch's stable sort of it (:data:`kernels.bipartite.AUTO_MEMBERS_MAX_A_TOKENS`;
the "reference" column of those rows is that pair), and the merge on given member lists.
Each call is repeated back to back between two device synchronisations, so the GPU's
queue stays full and the clock reads device time wherever the device is the bottleneck (a
small shape's time is the host's launch time, which in a model overlaps the GPU's work).
Timing as in ``evals.harness``: warm-up, median of runs, both backends round-robin. For a GPU
(on the CPU the Triton interpreter runs the kernels, which only the tests want).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from evals.harness import RESULTS_DIR, command_line, environment, measure_interleaved, write_atomic
from kernels import (
    INTERPRET,
    MemberLists,
    best_match_reference,
    best_match_triton,
    bipartite_dest_reference,
    bipartite_dest_triton,
    bipartite_members,
    merge_wavg_reference,
    merge_wavg_triton,
)
from tokenprune.merge import bipartite_soft_matching

# (label, batch, A rows, B rows, D, dtype)
MATCH_SHAPES = (
    ("ViT-B/16 keys, first block, batch 256", 256, 98, 98, 64, torch.bfloat16),
    ("video ViT-B keys, first block, batch 32", 32, 784, 784, 64, torch.bfloat16),
    ("SAM-B windows (LayerNorm output + padding flag), batch 8", 200, 98, 98, 769, torch.float32),
    ("SAM-B global block, batch 8", 8, 2048, 2048, 769, torch.float32),
    ("SAM-B global block in bf16", 8, 2048, 2048, 769, torch.bfloat16),
    *((f"float32 rows of width {d}, 98 × 98, batch 256", 256, 98, 98, d, torch.float32) for d in (64, 128, 256, 512)),
    *((f"float32 rows of width {d}, 2048 × 2048, batch 8", 8, 2048, 2048, d, torch.float32) for d in (64, 128, 256)),
)  # fmt: skip
# (label, batch, A tokens): r = half of them, the cap
ASSIGNMENT_SHAPES = (
    ("ViT-B/16 first block, batch 256", 256, 98),
    ("SAM-B windows, batch 8", 200, 49),
    ("video ViT-B first block, batch 32", 32, 784),
    ("1,024 A tokens, batch 8", 8, 1024),
    ("SAM-B global block, batch 8", 8, 2048),
)
# (label, batch, A tokens): r = half of them
MEMBER_LIST_SHAPES = (
    ("ViT-B/16 first block, batch 256", 256, 98),
    ("ViT-B/16 at 384², first block, batch 64", 64, 288),
    ("video ViT-B first block, batch 32", 32, 784),
    ("1,024 A tokens, batch 8", 8, 1024),
)
# (label, batch, tokens, channels, r)
MERGE_SHAPES = (
    ("ViT-B/16 first block, r=16, batch 256", 256, 197, 768, 16),
    ("video ViT-B first block, r=65, batch 32", 32, 1568, 768, 65),
    ("SAM-B global block, ratio 0.5, batch 8", 8, 4096, 768, 2048),
)


def _repeated(fn: Callable[[], Any], repeat: int) -> Callable[[Any], Any]:
    def run(_: Any) -> Any:
        for _ in range(repeat):
            out = fn()
        return out

    return run


def _time_pair(label: str, op: str, kernel: Callable[[], Any], reference: Callable[[], Any], args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    timings = measure_interleaved(
        [_repeated(kernel, args.repeat), _repeated(reference, args.repeat)],
        torch.empty(1, device=device), warmup=args.warmup, runs=args.runs,
    )  # fmt: skip
    kernel_ms, reference_ms = (t["median_s"] / args.repeat * 1e3 for t in timings)
    return {"op": op, "shape": label, "kernel_ms": kernel_ms, "reference_ms": reference_ms,
            "kernel_speedup": reference_ms / kernel_ms}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m evals.bench_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=10, help="back-to-back calls per timed run")
    parser.add_argument("--device", default="cuda",
                        help="cuda; cpu runs the kernels in the Triton interpreter (tests; needs TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, help="JSON path (default: evals/results/bench_kernels_<device>.json); .md beside it")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeat < 1 or args.warmup < 0:
        raise SystemExit("--runs and --repeat must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels times the Triton kernels, which need a CUDA GPU")
    if device.type == "cpu" and not INTERPRET:
        raise SystemExit("--device cpu runs the kernels in Triton's interpreter: start with TRITON_INTERPRET=1 set")
    args.out = args.out or RESULTS_DIR / f"bench_kernels_{device.type}.json"
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    rows = []
    for label, batch, num_a, num_b, dim, dtype in MATCH_SHAPES:
        a, b = randn(batch, num_a, dim, dtype=dtype), randn(batch, num_b, dim, dtype=dtype)
        rows.append(_time_pair(label, "match", lambda: best_match_triton(a, b), lambda: best_match_reference(a, b),
                               args, device))  # fmt: skip
    def assignment_inputs(batch: int, num_a: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Scores, B partners, r (half the A tokens: the cap) and the token count (no prefix)."""
        best_b = torch.randint(0, num_a, (batch, num_a), generator=generator, device=device)
        return randn(batch, num_a), best_b, num_a // 2, 2 * num_a

    for label, batch, num_a in ASSIGNMENT_SHAPES:
        score, best_b, r, num_tokens = assignment_inputs(batch, num_a)
        rows.append(_time_pair(label, "assignment", lambda: bipartite_dest_triton(score, best_b, r, num_tokens, 0),
                               lambda: bipartite_dest_reference(score, best_b, r, num_tokens, 0), args, device))  # fmt: skip
    for label, batch, num_a in MEMBER_LIST_SHAPES:
        score, best_b, r, num_tokens = assignment_inputs(batch, num_a)
        # What the merges after the matching read: the lists the kernel lays out beside dest,
        # or the kernel's dest sorted (as MemberLists does when the merge kernel asks).
        rows.append(_time_pair(label, "member lists",
                               lambda: bipartite_members(score, best_b, r, num_tokens, 0, "triton"),
                               lambda: MemberLists(bipartite_dest_triton(score, best_b, r, num_tokens, 0)).sorted(),
                               args, device))  # fmt: skip
    for label, batch, tokens, channels, r in MERGE_SHAPES:
        x, size = randn(batch, tokens, channels), torch.ones(batch, tokens, 1, device=device)
        dest = bipartite_soft_matching(randn(batch, tokens, 64, dtype=torch.bfloat16), r, 0, "torch")
        members = MemberLists(dest)
        members.sorted()  # the kernel alone: the member lists come with the matching
        num_out = tokens - r
        rows.append(_time_pair(label, "merge", lambda: merge_wavg_triton(x, size, dest, num_out, members),
                               lambda: merge_wavg_reference(x, size, dest, num_out), args, device))  # fmt: skip

    env = environment(device)
    header = (f"{env.get('device_name', env['cpu'])}, torch {env['torch']}, triton {env['triton']}; each op {args.repeat}× back to "
              f"back per run, median of {args.runs} runs after {args.warmup} warm-up; `{command_line('evals.bench_kernels', argv)}`")  # fmt: skip
    lines = ["| op | shape | Triton ms | reference ms | Triton speedup |", "| :--- | :--- | ---: | ---: | ---: |"]
    lines += [f"| {r['op']} | {r['shape']} | {r['kernel_ms']:.4f} | {r['reference_ms']:.4f} | {r['kernel_speedup']:.2f}× |"
              for r in rows]  # fmt: skip
    document = {"environment": env, "config": vars(args) | {"out": str(args.out)}, "rows": rows}
    write_atomic(args.out, json.dumps(document, indent=2, default=str) + "\n")
    write_atomic(args.out.with_suffix(".md"), header + "\n\n" + "\n".join(lines) + "\n")
    print(header, *lines, f"wrote {args.out}", sep="\n")
    return document


if __name__ == "__main__":
    main()

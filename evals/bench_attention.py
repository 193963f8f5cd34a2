"""Attention over merged tokens: the Triton kernel (kernels/attention.py) vs PyTorch SDPA.

At every token count that ToMe r=16 leaves in ViT-B/16 (and a few more), times one attention
call with proportional attention (a log-size bias per key) on both, and SDPA without a bias as
the floor that an unmerged model pays. SDPA takes the bias two ways: as a mask, and folded into
two extra q/k channels (``kernels.attention_folded``, which lets flash attention run it); both
are also timed forward + backward, as in training. Needs a CUDA GPU.

    python -m evals.bench_attention [--batch-size 256] [--heads 12] [--head-dim 64]

Timing: ``triton.testing.do_bench`` (CUDA events, median) on inputs made beforehand.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from evals.harness import DTYPES, RESULTS_DIR, environment, write_atomic
from kernels import attention_folded, attention_reference, attention_triton

TOKENS = (197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m evals.bench_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_attention_cuda.json")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.heads, args.head_dim, *args.tokens) < 1:
        raise SystemExit("--batch-size, --heads, --head-dim and every --tokens must be at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU (the Triton kernel is compiled for it)")
    from triton.testing import do_bench

    def time_us(fn: Callable[[], Any]) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    dtype, scale = DTYPES[args.dtype], args.head_dim**-0.5
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for tokens in args.tokens:
        # q, k, v as the attention layer makes them: strided views of one qkv projection.
        shape = (args.batch_size, tokens, 3, args.heads, args.head_dim)
        qkv = torch.randn(shape, device="cuda", generator=generator).to(dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        log_size = torch.randint(1, 9, (args.batch_size, tokens), device="cuda", generator=generator).float().log()

        row = measure(q, k, v, log_size, scale, time_us)
        rows.append(row)
        print(row, flush=True)

    env = environment(torch.device("cuda"))
    header = (
        f"attention, batch {args.batch_size}, {args.heads} heads × {args.head_dim}, {args.dtype}, "
        f"{env['device_name']}; median of do_bench"
    )
    table = markdown_table(rows)
    document = {"config": {k: str(v) for k, v in vars(args).items()}, "environment": env, "rows": rows}
    write_atomic(args.out, json.dumps(document, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), f"{header}\n\n{table}\n")
    print(header)
    print(table)
    return document


def measure(
    q: Tensor, k: Tensor, v: Tensor, log_size: Tensor, scale: float, time_us: Callable[[Callable[[], Any]], float]
) -> dict[str, Any]:
    """One row: every variant timed by ``time_us`` (µs of one call), forward and forward +
    backward, and the kernel's error relative to the fp32 reference."""
    trained = [t.detach().requires_grad_(True) for t in (q, k, v)]
    upstream = torch.randn_like(q)

    def forward_backward(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def step() -> None:
            # torch.autograd.grad, not .backward(): backward adds every call's gradients into
            # q/k/v.grad, so each timed call after the first (every call of the second variant,
            # which starts from the first's) would also time a read-add-write of three
            # [B, H, T, D] gradients besides attention's own backward.
            torch.autograd.grad(fn(*trained, log_size, scale), trained, upstream)

        return step

    reference = attention_reference(q.float(), k.float(), v.float(), log_size, scale)
    error = (attention_triton(q, k, v, log_size, scale).float() - reference).norm() / reference.norm()
    return {
        "tokens": q.shape[2],
        "sdpa_no_bias_us": time_us(lambda: attention_reference(q, k, v, None, scale)),
        "sdpa_bias_us": time_us(lambda: attention_reference(q, k, v, log_size, scale)),
        "triton_bias_us": time_us(lambda: attention_triton(q, k, v, log_size, scale)),
        "triton_no_bias_us": time_us(lambda: attention_triton(q, k, v, None, scale)),
        "sdpa_folded_us": time_us(lambda: attention_folded(q, k, v, log_size, scale)),
        "sdpa_bias_fwd_bwd_us": time_us(forward_backward(attention_reference)),
        "sdpa_folded_fwd_bwd_us": time_us(forward_backward(attention_folded)),
        "triton_rel_error_vs_fp32": error.item(),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table; "bias speedup" is SDPA's time with the bias over the kernel's."""
    lines = [
        "| tokens | SDPA, no bias (µs) | SDPA + log-size bias (µs) | SDPA, bias folded (µs) | Triton + bias (µs) "
        "| Triton, no bias (µs) | bias speedup | training: SDPA + bias / folded (µs) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['sdpa_no_bias_us']:.0f} | {row['sdpa_bias_us']:.0f} | {row['sdpa_folded_us']:.0f} "
            f"| {row['triton_bias_us']:.0f} | {row['triton_no_bias_us']:.0f} "
            f"| {row['sdpa_bias_us'] / row['triton_bias_us']:.2f}× "
            f"| {row['sdpa_bias_fwd_bwd_us']:.0f} / {row['sdpa_folded_fwd_bwd_us']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

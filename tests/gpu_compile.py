"""Compile every Triton kernel for a real GPU, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) executes a kernel's Python
with numpy: it never type-checks the kernel as Triton's compiler does. A kernel can pass every
interpreter test and still fail to compile on the GPU: the member-list kernel did
(``kernels/bipartite.py``: a name re-bound in a loop to a value of another integer type).

This script runs each launcher (``kernels.*_triton``) on CPU tensors, with Triton's driver
replaced by one that names a GPU target and with every launch turned into Triton's own
``warmup`` (compile, do not run): so the launchers choose their tiles, dtypes and constexpr
flags exactly as on the GPU, and Triton compiles each of those kernels through PTX to a cubin
with its bundled ``ptxas``. Autotuned kernels compile every config they could pick. A kernel
that needs more shared memory than the GPU has compiles but would not load: that is checked too.

Run with ``TRITON_INTERPRET`` unset (the kernels must be compiled functions, not interpreted):
``python tests/gpu_compile.py 90`` (sm_90: H100/H200; 80: A100), or ``python tests/gpu_compile.py
86 attention`` for the attention kernel alone on a smaller GPU. It prints one line per
compiled kernel and exits non-zero on the first kernel that fails. ``tests/test_gpu_compile.py``
runs it.
"""

from __future__ import annotations

import importlib
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


class CompileOnlyDriver:
    """What a launch asks of Triton's driver when it only compiles: a device, a stream and the
    target. Anything else (loading the binary, benchmarking) fails loudly."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def __getattr__(self, name: str):
        raise AttributeError(f"compiling without a GPU: the driver has no {name!r}")


# Shared memory a block may opt into (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB;
# T4 (sm_75) 64 KiB, A10, L4 and the RTX 30/40 series (sm_86, sm_89) 99 KiB. A kernel over it
# compiles but fails to load ("out of resource"), so the check is done here.
SHARED_MEMORY_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_instead_of_launching(compiled: dict[str, None], arch: int) -> None:
    """Make every launch compile its kernel (Triton's ``warmup``) and record it in ``compiled``
    (once per specialisation); autotuned kernels compile each of their configs."""
    run = JITFunction.run

    def warmup(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
        name = f"{self.fn.__name__} {constexprs} warps={kernel.metadata.num_warps}"
        if kernel.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
            limit = SHARED_MEMORY_LIMIT[arch]
            raise RuntimeError(f"{name} needs {kernel.metadata.shared} bytes of shared memory; sm_{arch} has {limit}")
        compiled[f"{name} shared={kernel.metadata.shared}"] = None
        return kernel

    def every_config(self, *args, **kwargs):
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = warmup
    Autotuner.run = every_config


def launch_every_kernel() -> None:
    """Each launcher at the shapes and dtypes that reach each of its constexpr branches and
    tile sizes (the models' shapes: ViT-B's 197 tokens, video's 1,568, SAM's windows)."""
    # By module path: ``kernels.attention`` is also the name of the function it exports.
    attention, bipartite, match, merge, temporal_match = (
        importlib.import_module(f"kernels.{name}") for name in ("attention", "bipartite", "match", "merge", "temporal_match")
    )
    for module in (attention, bipartite, match, merge, temporal_match):
        module.check_device = lambda *tensors: None  # CPU tensors stand in: only dtypes and strides matter
    half = (torch.bfloat16, torch.float16)

    for dtype in (torch.float32, *half):  # float32 upcasts in the dot; half goes to the tensor cores
        for tokens, dim in ((197, 64), (9, 8), (1568, 64), (256, 769)):  # (SAM's windows: rows + a padding channel)
            body = torch.randn(2, tokens, dim).to(dtype)
            match.best_match_triton(body[:, ::2], body[:, 1::2])

    for dtype in (torch.float32, torch.bfloat16):
        metric = torch.randn(1, 1568, 64).to(dtype)
        temporal_match.temporal_best_match_triton(metric, torch.rand(1, 1568, 3) * 8, window=2.0)

    # 32- and 64-token tiles, and SigLIP's 72-wide heads (a 128-wide tile, masked); fp16 as bf16
    sizes = ((21, 64), (197, 64), (197, 72))
    shapes = [(dtype, tokens, head_dim) for dtype in (torch.float32, torch.bfloat16) for tokens, head_dim in sizes]
    for dtype, tokens, head_dim in [*shapes, (torch.float16, 197, 64)]:
        q, k, v = torch.randn(3, 2, 4, tokens, head_dim).to(dtype)
        attention.attention_triton(q, k, v, torch.rand(2, tokens), 0.125)
        attention.attention_triton(q, k, v, None, 0.125)

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 197, 768).to(dtype)
        dest = torch.randint(0, 181, (2, 197))
        merge.merge_wavg_triton(x, torch.ones(2, 197, 1), dest, 181)

    # 4 and 8 warps, up to the kernel's limit (MAX_A_TOKENS, where backend="triton" takes it)
    for num_a, emit_members in ((98, True), (98, False), (784, True), (1024, False), (bipartite.MAX_A_TOKENS, True)):
        num_tokens = 2 * num_a + 1
        best_b = torch.randint(0, num_a, (2, num_a))
        bipartite._launch(torch.rand(2, num_a), best_b, num_a // 2, num_tokens, 1, emit_members)


def launch_attention_heads() -> None:
    """The attention kernel at the head widths of timm's ViTs, 64 to 128 (SigLIP's 72, ViT-H's
    80), in float32 and bfloat16: its K and V tiles sit in shared memory, of which the smaller
    GPUs (sm_75, sm_86, sm_89) have less than the ones the whole run targets."""
    attention = importlib.import_module("kernels.attention")
    attention.check_device = lambda *tensors: None
    for dtype, head_dim in ((torch.float32, 64), (torch.float32, 72), (torch.float32, 128), (torch.bfloat16, 128)):
        q, k, v = torch.randn(3, 2, 4, 197, head_dim).to(dtype)
        attention.attention_triton(q, k, v, torch.rand(2, 197), head_dim**-0.5)


def main(arch: int, which: str = "all") -> None:
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    compiled: dict[str, None] = {}
    compile_instead_of_launching(compiled, arch)
    launch_attention_heads() if which == "attention" else launch_every_kernel()
    for line in compiled:
        print(line)
    print(f"compiled {len(compiled)} kernels for sm_{arch} with triton {triton.__version__}")


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])

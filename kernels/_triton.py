"""Whether the Triton kernels can run on given tensors.

Triton is an optional dependency (``pip install tokenprune[triton]``), so every kernel module
imports it through here and keeps a pure-PyTorch reference that works without it.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work; only the *_triton entry points need it
    triton = None
    tl = None

HAS_TRITON: bool = triton is not None


def _interpreting() -> bool:
    # triton.jit decides at decoration time (module import) whether a kernel is compiled or
    # interpreted, so this must be read at the same moment, not per call.
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET") == "1"  # triton < 3.4 had no knobs module


INTERPRET: bool = _interpreting()


def triton_usable(*tensors: Tensor) -> bool:
    """True when the kernels can run on ``tensors``: compiled on CUDA, or (for CPU testing)
    in the Triton interpreter, which takes CPU tensors when ``TRITON_INTERPRET=1`` was set
    before triton was imported."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True  # compiled; the interpreter also accepts CUDA tensors (it copies them)
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, *tensors: Tensor) -> bool:
    """The dispatch rule of every op: ``"auto"`` takes Triton for CUDA tensors when triton
    imports and the PyTorch reference otherwise (also on CPU under the interpreter, which is
    for testing the kernels, not for running models); ``"triton"`` and ``"torch"`` force one."""
    if backend == "torch":
        return False
    if backend == "triton":
        check_device(*tensors)
        if under_torch_func():
            raise RuntimeError(
                "the Triton kernels cannot run under torch.func transforms (grad, vmap, jacrev, ...): their "
                "launches read raw storage, which functorch's wrapped tensors do not have; use backend='auto' "
                "(the PyTorch reference there) or 'torch'"
            )
        return True
    check_backend(backend)
    return HAS_TRITON and all(t.is_cuda for t in tensors) and not under_torch_func()


def check_backend(backend: str) -> None:
    """Raise unless ``backend`` is one of :data:`BACKENDS`. The ops call it before any other
    dispatch test (dtype, gradients) can route them to the reference without ``use_triton``,
    so that a misspelt backend fails on every input, not only on the kernels' dtypes."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running. (Not asked while Dynamo
    traces: it would not know the function, and a compiled graph's kernels take real tensors.)"""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by a running ``torch.func.vmap``, at any level of nested
    transforms (``vmap(grad(...))`` wraps it for ``grad`` inside ``vmap``'s batching)."""
    if not under_torch_func():
        return False
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ n (≥ 1); Triton block shapes must be powers of two. (Not
    ``triton.next_power_of_2``, nor ``triton.cdiv`` below: Triton 3.8 makes both constexpr
    functions, 2-3 µs of host time per call from Python on this project's CPU VM, and the
    launchers call them in every block of every forward.)"""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(n: int, d: int) -> int:
    """⌈n / d⌉ for grid sizes."""
    return -(-n // d)


def block_size(n: int, lo: int, hi: int) -> int:
    """A power-of-two block covering ``n`` if possible, clamped to [lo, hi]. ``lo`` is 16 for
    ``tl.dot`` operands, whose every dimension must be at least 16."""
    return max(lo, min(hi, next_power_of_2(n)))


INT32_MAX = 2**31 - 1


def int32_offsets(t: Tensor, batch_dims: int = 1) -> Tensor:
    """``t``, or a contiguous copy of it where the kernels' int32 offsets would overflow.

    The kernels compute an element's offset inside one batch item (row × row stride + column ×
    column stride) in int32; only the offset of the batch item (the first ``batch_dims`` dims)
    is int64. A view whose rows are far apart in a large storage (a [B, N, D] transpose of a
    sequence-first [N, B, D] tensor of more than 2**31 elements) would wrap around and read
    other memory, silently. Such views are copied (a rare layout); an item that overflows even
    when contiguous is refused. (From sizes and strides alone, not the storage's size, which
    Dynamo cannot trace: torch.compile traces the match and merge launchers.)"""
    shape, span = t.shape, 0
    for size, stride in zip(shape[batch_dims:], t.stride()[batch_dims:]):
        span += (size - 1) * stride  # the farthest element from the item's first
    if span <= INT32_MAX:
        return t
    t = t.contiguous()
    if math.prod(shape[batch_dims:]) - 1 > INT32_MAX:
        raise ValueError(
            f"one batch item of {tuple(shape)} spans more than 2**31 elements, beyond the kernels' "
            "int32 offsets; use backend='torch'"
        )
    return t


def on_device(t: Tensor) -> contextlib.AbstractContextManager[object]:
    """The context every launch runs in: ``t``'s GPU made the current device.

    Triton launches a kernel on the *current* CUDA device and that device's current stream
    (``JITFunction.run`` asks ``driver.active.get_current_device()``, which is
    ``torch.cuda.current_device()``), never on its tensors' device. A model on ``cuda:1`` while
    ``cuda:0`` is current (``model.to("cuda:1")``, ``--device cuda:1``) would run its kernels on
    GPU 0 over GPU 1's memory: an illegal memory access, or, with peer access, reads and writes
    unordered against the ``cuda:1`` stream that produced the inputs and consumes the outputs.
    Nothing to do on CPU (the interpreter), nor while Dynamo traces the launch: Inductor's code
    sets the device around the kernels itself."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def require_triton() -> None:
    """Raise a helpful error when a *_triton entry point is called without triton."""
    if not HAS_TRITON:
        raise ImportError("triton is not installed: pip install 'tokenprune[triton]'")


def check_device(*tensors: Tensor) -> None:
    """Raise unless the kernels can run on ``tensors`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    require_triton()
    if not triton_usable(*tensors):
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got devices {sorted({str(t.device) for t in tensors})}"
        )

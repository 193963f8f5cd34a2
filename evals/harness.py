"""What every eval and benchmark shares: timing, memory, the environment, atomic output.

Timing rules (all benchmarks follow them): inputs are made on the device beforehand, so only
model time is measured; untimed warm-up passes first (allocator growth, kernel selection,
compilation); every pass under ``torch.inference_mode()``; the median of the timed passes, so
a stray hiccup does not move the figure. On CUDA each pass is timed by CUDA events recorded
around it (device time from its first kernel to its last, including the gaps where the GPU
waited for the host), after a synchronisation that empties the queue; elsewhere by the host
clock between two synchronisations.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data.naflex_transforms import patchify_image
from torch import Tensor, nn
from tqdm import tqdm

import tokenprune
from kernels import triton_usable
from tokenprune import models as video_models
from tokenprune._io import write_atomic
from tokenprune.patch.video import is_video_model
from tokenprune.patch.vit import QKV_PROJECTIONS
from tokenprune.schedule import format_schedule

__all__ = [
    "DTYPES",
    "RESULTS_DIR",
    "SOURCE_ROOT",
    "agreement",
    "autocast",
    "counted_flops",
    "create_model",
    "environment",
    "example_input",
    "figure_png",
    "input_size",
    "json_text",
    "leading_tensor",
    "measure_interleaved",
    "measure_throughput",
    "pack_images",
    "peak_memory_mib",
    "pyplot",
    "refuse_unavailable_device",
    "refuse_unusable_triton",
    "set_fused_attn",
    "synchronize",
    "write_atomic",
]

SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding ``evals/``: the repository root in a checkout (or a copy of one), the
environment's ``site-packages`` when tokenprune was installed from a wheel."""
# Results go beside the code only in a source tree, where evals/results is committed. Installed,
# that folder would be inside site-packages (read-only for a system install, left behind by
# ``pip uninstall``): they go to evals/results under the working directory, as --help says.
RESULTS_DIR = (
    SOURCE_ROOT / "evals" / "results" if (SOURCE_ROOT / "pyproject.toml").is_file() else Path("evals", "results")
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# tokenprune's video ViTs are not in timm's registry; benchmarks and evals take them by name too.
VIDEO_MODELS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(video_models, name)
    for name in ("video_vit_small_patch16_224", "video_vit_base_patch16_224", "video_vit_large_patch16_224")
}


# ---------------------------------------------------------------------------------------------
# Models and inputs


def files_under(root: Path) -> list[Path]:
    """Every file under ``root``, walked as timm's folder reader walks it: following symbolic
    links to folders (class folders linked in from elsewhere, as dataset subsets often are),
    which ``Path.rglob`` does not."""
    return [Path(folder, name) for folder, _, names in os.walk(root, followlinks=True) for name in names
            if Path(folder, name).is_file()]  # fmt: skip


def create_model(name: str, img_size: int | None, device: torch.device, seed: int) -> nn.Module:
    """A randomly initialised timm model (or tokenprune video ViT) in eval mode on ``device``.

    ``pretrained=False`` always: benchmarks never touch the network, and throughput does not
    depend on the weights. Seeded, so every run and every row gets the same weights."""
    kwargs: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    torch.manual_seed(seed)
    if name in VIDEO_MODELS:
        model = VIDEO_MODELS[name](**kwargs)
    else:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as error:  # timm's "Unknown model"
            raise SystemExit(f"{error}; tokenprune's video models: {sorted(VIDEO_MODELS)}") from None
        if img_size is not None and getattr(model, "patch_embed", None) is None:
            # A NaFlexVit takes any size: record the one asked for where timm's data config reads it.
            model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
    return model.eval().to(device)


def input_size(model: nn.Module) -> tuple[int, ...]:
    """(H, W) for an image model, (T, H, W) for a video model, from its patch embedding (a
    NaFlexVit takes any size: the one its pretrained configuration names, or the one
    :func:`create_model` was asked for)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return tuple(int(s) for s in model.pretrained_cfg["input_size"][-2:])
    size = tuple(int(s) for s in embed.img_size)
    return (int(embed.num_frames), *size) if is_video_model(model) else size


# What a model is timed on: an image or clip batch, or NaFlex's packed patches (a dict).
Inputs = Tensor | dict[str, Tensor]


def example_input(model: nn.Module, batch_size: int, device: torch.device, seed: int, packed: bool = False) -> Inputs:
    """A seeded random batch of the model's input shape ([B, 3, H, W], or [B, 3, T, H, W] for
    video), made on the host (the same batch on every device) and moved once.

    ``packed`` (a NaFlexVit): the batch as NaFlex's packed sequences instead, each padded to the
    patch count N of the model's input size, as timm's NaFlex collator lays them out: the first
    image of that size (no padding), the others of random shapes covering about 25-100 % of N
    patches at aspect ratios from 1:2 to 2:1."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if not packed:
        return torch.randn(batch_size, 3, *input_size(model), generator=generator).to(device)
    if not hasattr(model, "embeds"):
        raise ValueError(f"packed inputs are NaFlexVit's; {type(model).__name__} takes image batches: drop --packed")
    patch = tuple(int(p) for p in model.embeds.patch_size)
    grid = [side // step for side, step in zip(input_size(model), patch)]
    length = grid[0] * grid[1]
    images = []
    for index in range(batch_size):
        rows, cols = grid
        if index:
            area = length * (0.25 + 0.75 * torch.rand((), generator=generator).item())
            aspect = 2.0 ** (2.0 * torch.rand((), generator=generator).item() - 1.0)
            rows = max(1, min(length, round((area * aspect) ** 0.5)))
            cols = max(1, min(length // rows, round(area / rows)))
        images.append(torch.randn(3, rows * patch[0], cols * patch[1], generator=generator))
    return {name: t.to(device) for name, t in pack_images(images, patch, length).items()}


def pack_images(images: Sequence[Tensor], patch: tuple[int, int], length: int) -> dict[str, Tensor]:
    """Images [3, H, W] of different sizes as NaFlex packs them (timm's ``patchify_image``, the
    NaFlex collator's layout): ``patches``, ``patch_coord`` and ``patch_valid``, each sequence
    padded with zeros to ``length`` positions."""
    sequences = [patchify_image(image, patch) for image in images]

    def padded(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(length - t.shape[0], *t.shape[1:])])

    return {
        name: torch.stack([padded(sequence[i]) for sequence in sequences])
        for i, name in enumerate(("patches", "patch_coord", "patch_valid"))
    }


def refuse_unavailable_device(device: torch.device) -> None:
    """Stop on ``--device cuda`` where no CUDA device is visible, or on ``--device cuda:N`` past
    the visible ones, before any model is built (else the first tensor moved there raises torch's
    "Found no NVIDIA driver" or "CUDA error: invalid device ordinal" from deep inside)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is visible here; leave --device out to run on the CPU")
    visible = torch.cuda.device_count()
    if device.index is not None and device.index >= visible:
        raise SystemExit(f"--device {device}: {visible} CUDA device(s) are visible here, cuda:0 to cuda:{visible - 1} "
                         "(CUDA_VISIBLE_DEVICES renumbers them from 0): give one of those")


def refuse_unusable_triton(backends: Sequence[str], device: torch.device) -> None:
    """Stop on ``--backend triton`` where the kernels do not run, before any row is timed."""
    if "triton" in backends and not triton_usable(torch.empty(0, device=device)):
        raise SystemExit(f"--backend triton: the Triton kernels do not run on {device} here (they need a CUDA GPU)")


def leading_tensor(inputs: Inputs) -> Tensor:
    """The tensor that gives ``inputs``' device and batch size (a pack's patches)."""
    return inputs["patches"] if isinstance(inputs, dict) else inputs


def set_fused_attn(model: nn.Module, fused: bool) -> nn.Module:
    """Switch every block attention of ``model`` (timm ``Attention``, Eva's ``EvaAttention`` and
    ``AttentionRope``: the classes tokenprune patches) between fused SDPA and the manual
    softmax(qkᵀ)v path, in place (tokenprune's patched attention honours the same flag)."""
    found = False
    for module in model.modules():
        if isinstance(module, tuple(QKV_PROJECTIONS)):
            module.fused_attn = fused
            found = True
    if not found:
        raise ValueError(f"the model has no attention module to switch (one of {[c.__name__ for c in QKV_PROJECTIONS]})")
    return model


def agreement(logits: Tensor, reference: Tensor, classifier: bool = True) -> tuple[float, float | None]:
    """(mean cosine similarity, top-1 agreement in %) of ``logits`` against ``reference``, per
    sample. Outputs that are not class logits (``classifier=False``: SAM's or a bare encoder's
    pooled features, timm's ``num_classes=0``; or any output with more than one axis per
    sample) have no top-1: None, and the cosine is over each sample's whole output."""
    # float64 so that identical logits give a cosine of 1 up to rounding of the last bit.
    a, b = logits.double().flatten(1), reference.double().flatten(1)
    cosine = F.cosine_similarity(a, b, dim=-1).mean().item()
    if not classifier or logits.ndim != 2:
        return cosine, None
    top1 = (a.argmax(dim=-1) == b.argmax(dim=-1)).double().mean().item() * 100.0
    return cosine, top1


# ---------------------------------------------------------------------------------------------
# Timing and memory


def counted_flops(model: nn.Module, x: Inputs) -> int:
    """FLOPs of ``model(x)`` as torch's FlopCounterMode counts them: the independent count that
    :func:`tokenprune.flops` is checked against. Every attention with a ``fused_attn`` flag
    (blocks and attention pooling) runs its manual path, whose matmuls every torch version
    counts, whereas whether fused SDPA is counted depends on the version and device (torch 2.14
    on CPU does not count it); parameters are frozen for the count (with trainable ones, torch
    2.14's module tracker raised "Expected gradient function to be set" inside a NaFlexVit's
    attention pooling)."""
    from torch.utils.flop_counter import FlopCounterMode

    attentions = [m for m in model.modules() if hasattr(m, "fused_attn")]
    fused = [m.fused_attn for m in attentions]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for m in attentions:
            m.fused_attn = False
        model.requires_grad_(False)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        for m, flag in zip(attentions, fused):
            m.fused_attn = flag
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so host timers measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # that GPU, not the current one (cuda:1 while cuda:0 is current)
    elif device.type != "cpu":
        # torch.mps / torch.xpu expose synchronize() too.
        getattr(torch, device.type).synchronize()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to ``dtype``, or nothing for float32/None (full precision, no cast overhead)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _timed_pass(model: Callable[[Inputs], Any], inputs: Inputs) -> float:
    """Seconds one ``model(inputs)`` takes: CUDA events on CUDA, the host clock elsewhere."""
    device = leading_tensor(inputs).device
    # Synchronising first keeps earlier queued work out of this pass.
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # Events record on the current device's stream: make it the inputs' device.
        with torch.cuda.device(device):
            start.record()
            model(inputs)
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start_s = time.perf_counter()
    model(inputs)
    synchronize(device)
    return time.perf_counter() - start_s


def timer_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "perf_counter"


def measure_throughput(
    model: Callable[[Inputs], Any],
    inputs: Inputs,
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
    models: Sequence[Callable[[Inputs], Any]],
    inputs: Inputs,
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
    if not models:
        raise ValueError("measure_interleaved needs at least one model to time")
    times: list[list[float]] = [[] for _ in models]
    rounds = tqdm(range(runs), desc="timing", unit="round", disable=not progress, file=sys.stderr)
    with torch.inference_mode(), autocast(leading_tensor(inputs).device, dtype):
        for model in models:
            for _ in range(warmup):
                model(inputs)
        for round_index in rounds:
            shift = round_index % len(models)
            for i in [*range(shift, len(models)), *range(shift)]:
                times[i].append(_timed_pass(models[i], inputs))
    results = []
    for model_times in times:
        median = statistics.median(model_times)
        results.append({"median_s": median, "images_per_s": leading_tensor(inputs).shape[0] / median, "times": model_times})
    return results


def json_text(document: Any) -> str:
    """``document`` as standard JSON, indented, with a final newline. JSON has no infinity: a
    ±∞ (the interval of a single group, :func:`evals.stats.paired_difference`) is written as
    null; a NaN raises, since no measurement should be one."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and math.isinf(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(document), indent=2, allow_nan=False) + "\n"


def peak_memory_mib(
    model: nn.Module, runner: Callable[[Inputs], Any], inputs: Inputs, dtype: torch.dtype | None = None
) -> float | None:
    """Peak device memory of one inference pass of ``runner`` (``model``, or it compiled), in
    MiB: what the pass allocates at its peak, plus this model's weights and the inputs, as a
    process holding only this model would see it (other models alive on the device, such as
    a benchmark's other rows, are not counted). ``None`` off CUDA, where PyTorch keeps no
    allocator statistics."""
    device = leading_tensor(inputs).device
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), autocast(device, dtype):
        runner(inputs)
    synchronize(device)
    working = torch.cuda.max_memory_allocated(device) - before
    return (working + resident_bytes(model, inputs, device)) / 2**20


def resident_bytes(model: nn.Module, inputs: Inputs, device: torch.device) -> int:
    """Bytes that ``model``'s weights and buffers and the inputs (every tensor of a pack) hold
    on ``device``."""
    tensors = [*model.parameters(), *model.buffers(), *(inputs.values() if isinstance(inputs, dict) else [inputs])]
    return sum(t.numel() * t.element_size() for t in tensors if t.device == device)


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


def jsonable(value: Any) -> Any:
    """``value`` (a script's ``vars(args)``, a method's options) as JSON values: paths and other
    objects as their text (a Budget as "50% GFLOPs"), tuples as lists, keys as strings. An ``r``
    ramp is written as its label, ``"(16,-1)"``: as a JSON list it would read as a per-block
    schedule ``[16, -1]``, which is another setting."""
    if isinstance(value, dict):
        return {str(k): format_schedule(v) if k == "r" and isinstance(v, tuple) else jsonable(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _checkout() -> Path | None:
    """:data:`SOURCE_ROOT` when it is a git repository's root (``.git``: a folder, or a file in a
    worktree), else None. Git itself would search the parent folders: installed from a wheel,
    evals/ lies in site-packages, and a virtual environment inside the user's own repository
    recorded that repository's commit, and its state as clean, as tokenprune's."""
    return SOURCE_ROOT if (SOURCE_ROOT / ".git").exists() else None


def _git_dirty() -> bool | None:
    """Whether the checkout has uncommitted changes to tracked files (None: not a checkout, or the
    commit was given by ``TOKENPRUNE_GIT_COMMIT``), so that a figure measured on edited code does
    not pass for the commit's. Results are not code: new ones under evals/results, not yet
    committed, do not count."""
    if os.environ.get("TOKENPRUNE_GIT_COMMIT"):
        return None  # the commit was given, not read: a copy's .git, if any, says nothing of it
    if (root := _checkout()) is None:
        return None
    command = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":!{RESULTS_DIR.relative_to(root)}"]
    try:
        out = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How to run this again: ``python -m MODULE`` and the arguments, shell-quoted (``--r "16, -1"``
    stays one argument)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def _git_commit() -> str | None:
    """``TOKENPRUNE_GIT_COMMIT`` when set, else HEAD's hash. The variable comes first: in the copy
    of the working tree on a lent GPU machine, git named another commit than the one that ran
    (2026-11-29: de8c55e, an ancestor of eb97c93), or there is no ``.git`` at all."""
    if commit := os.environ.get("TOKENPRUNE_GIT_COMMIT"):
        return commit
    if (root := _checkout()) is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures depend on besides the config: versions, hardware, threads."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "triton": _package_version("triton"),
        "torchvision": _package_version("torchvision"),  # its resize (and antialias default) preprocesses images
        "pillow": _package_version("pillow"),
        "tokenprune": tokenprune.__version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "timer": timer_name(device),
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


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: figures render to files, never to a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any) -> bytes:
    """The figure laid out and rendered as PNG bytes (for :func:`write_atomic`), then closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()

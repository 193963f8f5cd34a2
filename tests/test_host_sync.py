"""A patched forward never reads device values back to the host.

On a GPU, an op whose result the host must see (``.item()``, ``bool(t)``, a data-dependent
output size, ``F.one_hot``'s range check) waits for every queued kernel: the GPU runs dry while
Python catches up, every block. The H200 profile of SAM merge_unmerge found 24 such waits per
forward (``F.one_hot`` in the merged relative position bias). These ops show on the CPU too,
below the dispatcher, so each method's forward is checked here, on the PyTorch path, against
the unpatched model's forward, which reads nothing back.
"""

from __future__ import annotations

import collections

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tokenprune
from tokenprune.models import video_vit_small_patch16_224

# Ops that hand a device value to the host (or size their output by one).
HOST_READS = {
    "_local_scalar_dense",  # .item(), bool(t), int(t), and every check built on them
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "equal",
    "is_nonzero",
}


class HostReads(TorchDispatchMode):
    """Counts the ops of :data:`HOST_READS` dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def host_reads(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, int]:
    with HostReads() as reads, torch.no_grad():
        model(inputs)
    return dict(reads.ops)


def _image_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _sam() -> torch.nn.Module:
    # 10×10 patches in 4×4 windows: the windows pad the grid, as SAM-B's 64×64 in 14×14 do.
    return _image_model(
        "samvit_base_patch16", img_size=160, window_size=4, depth=4, embed_dim=96, num_heads=4,
        global_attn_indexes=[1, 3], neck_chans=32,
    )  # fmt: skip


def _video() -> torch.nn.Module:
    torch.manual_seed(0)
    return video_vit_small_patch16_224(num_frames=8, img_size=64, depth=3, num_classes=10).eval()


IMAGE = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
CLIP = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))

# (model, input, method, options): every method on the family it is made for.
CASES = {
    "tome": (lambda: _image_model("vit_tiny_patch16_224", depth=4), IMAGE, "tome", {"r": 16, "trace_source": True}),
    "tome_registers": (
        lambda: _image_model("vit_small_patch14_reg4_dinov2", img_size=224, depth=3), IMAGE, "tome", {"r": 16},
    ),
    "local_global": (lambda: _image_model("vit_tiny_patch16_224", depth=4), IMAGE, "local_global", {"r": 16}),
    "pitome": (lambda: _image_model("vit_tiny_patch16_224", depth=4), IMAGE, "pitome", {"r": 16}),
    "evit": (lambda: _image_model("vit_tiny_patch16_224", depth=4), IMAGE, "evit", {"keep_ratio": 0.7}),
    "dynamicvit": (lambda: _image_model("vit_tiny_patch16_224", depth=4), IMAGE, "dynamicvit", {"keep_ratio": 0.7}),
    "merge_unmerge_vit": (lambda: _image_model("vit_tiny_patch16_224", depth=4), IMAGE, "merge_unmerge", {"ratio": 0.5}),
    "merge_unmerge_sam": (_sam, IMAGE[:, :, :160, :160], "merge_unmerge", {"ratio": 0.5}),
    "eva_rope": (lambda: _image_model("eva02_tiny_patch14_224", depth=3), IMAGE, "tome", {"r": 16}),
    "beit_relpos": (
        lambda: _image_model("beit_base_patch16_224", depth=3, embed_dim=192, num_heads=3), IMAGE, "tome", {"r": 16},
    ),
    "video_tome": (_video, CLIP, "tome", {"r": 6}),
    "video_background": (_video, CLIP, "background", {"early_blocks": 1, "early_r": 16, "r": 4}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_patched_forward_reads_nothing_back(case: str) -> None:
    make, inputs, method, options = CASES[case]
    model = make()
    assert host_reads(model, inputs) == {}, "the unpatched model reads back: the check would blame the patch"
    tokenprune.patch(model, method, **options)  # on the CPU "auto" is the PyTorch path
    assert host_reads(model, inputs) == {}


def test_temporal_merging_checks_its_window_on_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporal merging reads one value back (the lowest score merged: did a merge leave the
    window or have no partner?), only where that is free: on the CPU. Made to believe it runs
    on a GPU, it reads nothing."""
    model = tokenprune.patch(_video(), "temporal", r=6, window=1)
    assert host_reads(model, CLIP) == {"_local_scalar_dense": 3}  # one per merging block
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the other condition of the check
    assert host_reads(model, CLIP) == {}


def test_the_check_sees_what_it_looks_for() -> None:
    """The counter sees the reads this module is about, F.one_hot's among them."""
    index = torch.tensor([0, 2, 1])
    with HostReads() as reads:
        torch.nn.functional.one_hot(index, 3)
        bool(index.sum() > 0)
        index.nonzero()
    assert reads.ops["_local_scalar_dense"] >= 2 and reads.ops["nonzero"] == 1

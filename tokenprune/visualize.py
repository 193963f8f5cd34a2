"""Pictures of what merged: every group of patches that became one token, painted with the
group's mean colour, with its boundary drawn (as in ToMe's Fig. 4); patches a pruning method
dropped are painted one flat colour."""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

__all__ = ["merge_groups", "merge_map"]


def merge_groups(source_index: Tensor, grid: tuple[int, int], num_prefix: int | None = None) -> Tensor:
    """[rows, cols] id of the output token holding each patch, from one image's [T_in] source
    index (the prefix tokens, which come first, are dropped).

    ``num_prefix``: how many prefix tokens come first (``model.num_prefix_tokens``); the
    image's patches are the rows·cols entries after them. Needed where padding follows the
    patches (NaFlex's packed sequences, T_in = prefix + N); by default the patches are the last
    rows·cols entries, which holds only without padding. An index that cannot be that layout (a
    grid other than the model's, ``state.grid``) is refused: its prefix entries would hold
    patches."""
    if source_index.dim() != 1:
        raise ValueError(
            f"source_index must be one image's [T_in] map, got shape {list(source_index.shape)}: "
            "pass state.source_index[i] for image i of the batch"
        )
    rows, cols = _image_grid(grid)
    patches = rows * cols
    total = source_index.numel()
    start = total - patches if num_prefix is None else num_prefix
    if start < 0 or start + patches > total:
        prefix = "" if num_prefix is None else f" after {num_prefix} prefix tokens"
        raise ValueError(f"a {rows}x{cols} grid of patches{prefix} needs more than the {total} entries of source_index")
    # Prefix tokens never merge and stay first: each holds itself alone. A grid smaller than the
    # model's (e.g. 14x14 for a 16x16 one) would otherwise read patches as prefix tokens and paint
    # the wrong entries without a word.
    own = torch.arange(start, device=source_index.device)
    groups = source_index[start : start + patches]
    if bool((source_index[:start] != own).any() or ((groups >= 0) & (groups < start)).any()):
        raise ValueError(
            f"source_index does not fit a {rows}x{cols} grid of patches after {start} prefix tokens: a prefix token "
            "never merges (entry i holds token i, and no patch merges into it), and these entries would be patches. "
            "Pass the model's own grid (state.grid, or model.patch_embed.grid_size)"
            + ("" if num_prefix is not None else ", and num_prefix=model.num_prefix_tokens where padding follows the patches")
        )
    return groups.reshape(rows, cols)


def merge_map(
    image: Tensor,
    source_index: Tensor,
    grid: tuple[int, int],
    boundary: tuple[int, int, int] = (0, 0, 0),
    dropped: tuple[int, int, int] = (255, 255, 255),
    num_prefix: int | None = None,
) -> Image.Image:
    """Paint each merged group of patches with its mean colour and outline it.

    Args:
        image: [3, H, W] float RGB in [0, 1] (un-normalised), H and W multiples of the grid;
            any float dtype and device (painted in float32 on the CPU).
        source_index: [T_in] int64 for this image (``state.source_index[i]`` of
            ``state = model.forward_tokens(x, trace_source=True)``); -1 marks a dropped patch.
        grid: (rows, cols) of patches.
        boundary: RGB colour of the group outlines.
        dropped: RGB colour of the patches a pruning method dropped.
        num_prefix: the model's prefix tokens (``model.num_prefix_tokens``), which come first in
            ``source_index``; required for NaFlex's packed sequences, whose padding follows the
            patches (see :func:`merge_groups`).
    """
    rows, cols = _image_grid(grid)
    _check_rgb(image)
    image = image.detach().float().cpu()
    channels, height, width = image.shape
    if height % rows or width % cols:
        raise ValueError(f"image {height}x{width} is not a whole number of {rows}x{cols} patches")
    groups = merge_groups(source_index.cpu(), grid, num_prefix) + 1  # 0: dropped
    patch_colour = image.reshape(channels, rows, height // rows, cols, width // cols).mean(dim=(2, 4))
    patch_colour = patch_colour.flatten(1).T  # [patches, 3]
    ids = groups.flatten()
    count = torch.zeros(int(ids.max()) + 1).index_add_(0, ids, torch.ones(ids.numel()))
    group_colour = torch.zeros(count.numel(), channels).index_add_(0, ids, patch_colour) / count.clamp(min=1)[:, None]
    group_colour[0] = torch.tensor(dropped, dtype=group_colour.dtype) / 255
    pixel_groups = groups.repeat_interleave(height // rows, 0).repeat_interleave(width // cols, 1)
    painted = group_colour[pixel_groups].permute(2, 0, 1)  # [3, H, W]
    # A pixel is on a boundary when its right or lower neighbour belongs to another group.
    edge = torch.zeros(height, width, dtype=torch.bool)
    edge[:, :-1] |= pixel_groups[:, :-1] != pixel_groups[:, 1:]
    edge[:-1, :] |= pixel_groups[:-1, :] != pixel_groups[1:, :]
    painted[:, edge] = torch.tensor(boundary, dtype=painted.dtype)[:, None] / 255
    array = (painted.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _image_grid(grid: tuple[int, ...]) -> tuple[int, int]:
    """``grid`` as (rows, cols), or a ValueError naming the way for a clip's (frames, rows, cols)
    (a video model's ``state.grid``), which would fail to unpack with Python's words."""
    if len(grid) != 2:
        raise ValueError(
            f"grid must be one image's (rows, cols) of patches, got {tuple(grid)}: paint a clip's (frames, rows, cols) "
            "map one frame at a time, source_index[prefix + t*rows*cols : prefix + (t + 1)*rows*cols] for frame t"
        )
    rows, cols = grid
    return rows, cols


# Resampling (bicubic, antialiased) can overshoot [0, 1] a little; a normalised image is far out.
_RANGE_SLACK = 0.05


def _check_rgb(image: Tensor) -> None:
    """Raise for a picture :func:`merge_map` would paint wrongly (clamped white or black)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be one [3, H, W] RGB image, got shape {list(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be float RGB in [0, 1], got {image.dtype}: pass image.float() / 255")
    low, high = image.min().item(), image.max().item()
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(
            f"image values span [{low:.3g}, {high:.3g}], not RGB in [0, 1]: un-normalise a model input "
            "first (x * std + mean, per channel), or divide 0-255 values by 255"
        )

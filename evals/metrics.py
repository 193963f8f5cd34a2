"""Classification metrics from logits: top-k counts with ties broken at random, and ImageNet-ReaL.

Ties: a row whose label ties with other classes at the edge of the top k counts as the
*probability* that a uniformly random order of the tied classes puts the label within the top k
(e.g. ½ for a label tied with one other class for top-1), so counts can be fractional. Under
bfloat16 the logit step is 1/16 near 10, so top-1 ties are common: counting them all wrong
would bias a half-precision run low, counting them right would score a dead model (all logits
equal) 100 %; the expected count is unbiased and does not depend on how ``torch.topk`` happens
to order equal values (a dead model scores k / classes). NaN logits are treated as -inf: a NaN
label logit loses to every number (and a row that is NaN everywhere is a dead model's tie).

``k`` larger than the number of classes is an error (as in ``torch.topk``); callers that
report a fixed set of k for models with few classes should drop the k that do not apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["real_correct", "topk_correct"]


def _prepare(logits: Tensor, ks: Iterable[int]) -> tuple[Tensor, tuple[int, ...]]:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    ks = tuple(ks)
    num_classes = logits.shape[1]
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > num_classes:
            raise ValueError(f"top-{k} is undefined for {num_classes} classes (k > number of classes)")
    # float32 so comparisons behave the same for half-precision logits on every device.
    # (infinities stay infinite: nan_to_num's defaults would make them the largest finite floats)
    logits = logits.detach().float()
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")), ks


def _hit_probability(above: Tensor, tied: Tensor, k: int) -> Tensor:
    """P(a label is within the top ``k``) when ``above`` wrong classes score higher and ``tied``
    wrong classes score the same, their order random: the label's place among the tied is
    uniform, so it is in the top k with probability (k − above) / (tied + 1), clamped to [0, 1]."""
    return ((k - above).double() / (tied + 1).double()).clamp(0.0, 1.0)


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Expected number of rows whose label is among the top ``k`` logits, for each ``k`` in ``ks``
    (whole numbers unless the label ties at the edge of the top k: see the module docstring).

    ``logits`` [N, C], ``labels`` [N] integer class indices in ``[0, C)``. Raises
    ``ValueError`` for ``k > C`` or labels out of range.
    """
    logits, ks = _prepare(logits, ks)
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}), got [{labels.min().item()}, {labels.max().item()}]"
        )
    own = logits.gather(1, labels.view(-1, 1))
    above = (logits > own).sum(dim=1)
    tied = (logits == own).sum(dim=1) - 1
    return {k: float(_hit_probability(above, tied, k).sum().item()) for k in ks}


def real_correct(
    logits: Tensor, real_labels: Sequence[Sequence[int] | None], ks: Sequence[int] = (1, 5)
) -> tuple[dict[int, float], int]:
    """ImageNet-ReaL ("Are we done with ImageNet?", Beyer et al. 2020) counts.

    ``real_labels[i]`` is the list of acceptable classes of row ``i`` (empty or None: the image
    has no ReaL label and is left out, as in timm). A row is correct at ``k`` when any
    acceptable class is within its top ``k``. Ties are broken at random as in
    :func:`topk_correct`: with ``m`` acceptable and ``w`` wrong classes tied at the best
    acceptable logit and ``a`` wrong classes above it, the first ``j = k − a`` places of the
    tied group miss every acceptable class with probability C(w, j) / C(w + m, j).
    Returns ``({k: expected correct}, number of rows with a ReaL label)``.
    """
    logits, ks = _prepare(logits, ks)
    if len(real_labels) != logits.shape[0]:
        raise ValueError(f"got {len(real_labels)} ReaL label lists for {logits.shape[0]} rows")
    correct = dict.fromkeys(ks, 0.0)
    counted = 0
    for row, accepted in zip(logits, real_labels):
        if not accepted:
            continue
        counted += 1
        classes = torch.as_tensor(list(accepted), dtype=torch.long, device=logits.device)
        if classes.min() < 0 or classes.max() >= logits.shape[1]:
            raise ValueError(f"ReaL labels {list(accepted)} out of range for {logits.shape[1]} classes")
        accepted_mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        accepted_mask[classes] = True
        best = row[classes].max()
        above = int(((row > best) & ~accepted_mask).sum().item())
        wrong_tied = int(((row == best) & ~accepted_mask).sum().item())
        right_tied = int(((row == best) & accepted_mask).sum().item())
        for k in ks:
            places = k - above
            if places > wrong_tied:  # the tied group cannot fill the places with wrong classes
                correct[k] += 1.0
            elif places > 0:
                correct[k] += 1.0 - math.comb(wrong_tied, places) / math.comb(wrong_tied + right_tied, places)
    return correct, counted

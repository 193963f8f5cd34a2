"""Classification metrics from logits: top-k counts with a fixed rule for ties, and ImageNet-ReaL.

Ties: a class counts as within the top k only if fewer than k *other* classes have a logit
greater than **or equal to** its own ("pessimistic" ranking). The result therefore does not
depend on how ``torch.topk`` happens to order equal values, and degenerate outputs (all logits
equal, e.g. a model that returns zeros) score 0, not 100 %. NaN logits are treated as -inf, so
a NaN prediction never counts as correct (unless k covers every class).

``k`` larger than the number of classes is an error (as in ``torch.topk``); callers that
report a fixed set of k for models with few classes should drop the k that do not apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["class_ranks", "real_correct", "topk_correct"]


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
    return torch.nan_to_num(logits.detach().float(), nan=float("-inf")), ks


def class_ranks(logits: Tensor, classes: Tensor) -> Tensor:
    """0-based rank of ``classes[i]`` in row ``i`` of ``logits``: how many other classes score
    at least as high (ties count against it). NaN logits count as -inf."""
    logits = torch.nan_to_num(logits.detach().float(), nan=float("-inf"))
    classes = classes.to(device=logits.device, dtype=torch.long)
    own = logits.gather(1, classes.view(-1, 1))
    return (logits >= own).sum(dim=1) - 1


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the top ``k`` logits, for each ``k`` in ``ks``.

    ``logits`` [N, C], ``labels`` [N] integer class indices in ``[0, C)``. See the module
    docstring for ties and NaN. Raises ``ValueError`` for ``k > C`` or labels out of range.
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
    ranks = class_ranks(logits, labels)
    return {k: int((ranks < k).sum().item()) for k in ks}


def real_correct(
    logits: Tensor, real_labels: Sequence[Sequence[int] | None], ks: Sequence[int] = (1, 5)
) -> tuple[dict[int, int], int]:
    """ImageNet-ReaL ("Are we done with ImageNet?", Beyer et al. 2020) counts.

    ``real_labels[i]`` is the list of acceptable classes of row ``i`` (empty or None: the image
    has no ReaL label and is left out, as in timm). A row is correct at ``k`` when any
    acceptable class is within its top ``k``: its rank counts the *other* classes scoring at
    least as high as its best acceptable class (ties with another acceptable class are no
    miss: either prediction is right; ties with a wrong class count against it, as in
    :func:`topk_correct`).
    Returns ``({k: correct}, number of rows with a ReaL label)``.
    """
    logits, ks = _prepare(logits, ks)
    if len(real_labels) != logits.shape[0]:
        raise ValueError(f"got {len(real_labels)} ReaL label lists for {logits.shape[0]} rows")
    correct = dict.fromkeys(ks, 0)
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
        rank = int(((row >= row[classes].max()) & ~accepted_mask).sum().item())
        for k in ks:
            correct[k] += rank < k
    return correct, counted

"""Paired comparisons of two reductions measured on the same inputs.

A fidelity table compares methods whose means often differ in the fourth decimal; whether such a
difference is real depends on how consistently it holds input by input. Each eval therefore
takes the difference input by input and reports its mean with a 95 % percentile-bootstrap
interval: above zero is a **win**, below zero a **loss**, across zero a **tie** that these
inputs cannot settle.
"""

from __future__ import annotations

import torch

__all__ = ["format_difference", "paired_difference", "verdict"]


def paired_difference(ours: torch.Tensor, reference: torch.Tensor, group_size: int = 1, draws: int = 2000) -> dict[str, float]:
    """Mean of ``ours − reference`` (1-D, one value per input) with its 95 % percentile-bootstrap
    interval. Consecutive runs of ``group_size`` inputs form one group that is resampled whole
    (e.g. the views of one photo, which are correlated: resampling single views would understate
    the spread). Seeded, so a rerun gives the same interval."""
    if ours.shape != reference.shape or ours.ndim != 1:
        raise ValueError(f"expected two 1-D tensors of one shape, got {tuple(ours.shape)} and {tuple(reference.shape)}")
    if group_size < 1 or len(ours) % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {len(ours)} inputs")
    per_group = (ours - reference).reshape(-1, group_size).mean(dim=1)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(per_group), (draws, len(per_group)), generator=generator)
    means = per_group[index].mean(dim=1)
    low, high = means.quantile(torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return {"mean": per_group.mean().item(), "low": low, "high": high}


def verdict(difference: dict[str, float]) -> str:
    """"win", "loss" or "tie" for a :func:`paired_difference`."""
    return "win" if difference["low"] > 0 else "loss" if difference["high"] < 0 else "tie"


def format_difference(difference: dict[str, float] | None, digits: int = 4) -> str:
    """A table cell: ``+0.0012 [-0.0003, +0.0027] tie``; "-" where there was nothing to compare."""
    if not difference:
        return "-"
    d = difference
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] {verdict(d)}"

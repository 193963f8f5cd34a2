"""Paired comparisons of two reductions measured on the same inputs.

A fidelity table compares methods whose means often differ in the fourth decimal; whether such a
difference is real depends on how consistently it holds input by input. Each eval therefore
takes the difference input by input (or group by group: the views of one photo, the windows of
one video) and reports its mean with a 95 % Student-t interval over the groups: above zero is
a **win**, below zero a **loss**, across zero a **tie** that these inputs cannot settle.

Why t and not a bootstrap: a percentile bootstrap over n group means ignores how little n
groups say; with 3 videos its lower bound is the smallest video's mean, so any three
differences of one sign would be a "win" (26 % false calls at a nominal 5 %, 14 % with 6
groups). The t interval holds its level for normal group means and widens as n shrinks.
"""

from __future__ import annotations

import math

import torch
from scipy import stats

__all__ = ["format_difference", "paired_difference", "verdict"]


def paired_difference(ours: torch.Tensor, reference: torch.Tensor, group_size: int = 1) -> dict[str, float]:
    """Mean of ``ours − reference`` (1-D, one value per input) with its 95 % Student-t interval
    over groups: consecutive runs of ``group_size`` inputs form one group (e.g. the views of a
    photo, which are correlated: treating them as independent would understate the spread),
    and the interval is mean ± t(0.975, n − 1) · sd / √n over the n group means (a single
    group, or groups that all agree exactly, give an interval of ±∞ or 0 accordingly)."""
    if ours.shape != reference.shape or ours.ndim != 1:
        raise ValueError(f"expected two 1-D tensors of one shape, got {tuple(ours.shape)} and {tuple(reference.shape)}")
    if group_size < 1 or len(ours) % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {len(ours)} inputs")
    per_group = (ours.double() - reference.double()).reshape(-1, group_size).mean(dim=1)
    n, mean = len(per_group), per_group.mean().item()
    if n < 2:
        return {"mean": mean, "low": -math.inf, "high": math.inf}
    half = float(stats.t.ppf(0.975, n - 1)) * per_group.std(unbiased=True).item() / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half}


def verdict(difference: dict[str, float]) -> str:
    """"win", "loss" or "tie" for a :func:`paired_difference`."""
    return "win" if difference["low"] > 0 else "loss" if difference["high"] < 0 else "tie"


def format_difference(difference: dict[str, float] | None, digits: int = 4) -> str:
    """A table cell: ``+0.0012 [-0.0003, +0.0027] tie``; "-" where there was nothing to compare."""
    if not difference:
        return "-"
    d = difference
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] {verdict(d)}"

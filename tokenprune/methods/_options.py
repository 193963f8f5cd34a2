"""Checks shared by every method config: the options they have in common."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from kernels import BACKENDS

from ..schedule import check_count


def check_common_options(config: Any) -> None:
    """Raise a clear error for a bad ``backend`` or a non-bool flag, whichever of them the
    config has."""
    names = {f.name for f in fields(config)}
    if "backend" in names and config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    for name in ("prop_attn", "trace_source", "adaptive", "fuse", "merge_windows", "merge_mlp", "joint_after"):
        if name in names and not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(config, name)!r}")


def check_stages(stages: object) -> tuple[int, ...] | None:
    """``stages`` (pruning methods: the blocks that prune) as a tuple of block indices, None for
    the default; a TypeError naming the form for a single number or a string, which Python would
    otherwise fail to iterate or iterate by character."""
    if stages is None:
        return None
    form = (
        f"stages must be a tuple of block indices, e.g. stages=(3, 6, 9), or stages=(3,) for one stage; "
        f"got {stages!r} ({type(stages).__name__})"
    )
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Iterable):
        raise TypeError(form)
    try:
        blocks = tuple(stages)
    except TypeError:  # an Iterable that cannot iterate: a 0-d tensor
        raise TypeError(form) from None
    return tuple(check_count(block, "a stage (block index)") for block in blocks)


def check_stage_blocks(stages: tuple[int, ...], depth: int, first: int) -> tuple[int, ...]:
    """``stages`` if they are increasing block indices of a ``depth``-block model from ``first``
    (DynamicViT prunes before its stage's block, so from block 1; EViT after its attention, from
    block 0), else a ValueError naming the range."""
    if not stages or any(not first <= s < depth for s in stages) or list(stages) != sorted(set(stages)):
        raise ValueError(f"stages must be increasing block indices in [{first}, {depth - 1}], got {stages}")
    return stages


def check_keep_ratio(value: object, source: str = "") -> float:
    """A pruning keep ratio ρ in (0, 1] (a bool, a string or NaN refused by name); ``source``
    says where the value should come from, for the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1]{source}, got {value!r} ({type(value).__name__})")
    return float(value)


def check_real(value: object, what: str, valid: str) -> float:
    """``value`` as a float if it is a real number, else a TypeError naming ``what`` and
    ``valid`` (its range, for the error): a bool, a string, None or a tensor would otherwise
    pass a range check as 0/1, fail it with Python's words, or reach the forward."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number {valid}, got {value!r} ({type(value).__name__})")
    return float(value)

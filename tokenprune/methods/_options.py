"""Checks shared by every method config: the options they have in common."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from kernels import BACKENDS


def check_common_options(config: Any) -> None:
    """Raise a clear error for a bad ``backend`` or a non-bool flag, whichever of them the
    config has."""
    names = {f.name for f in fields(config)}
    if "backend" in names and config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    for name in ("prop_attn", "trace_source", "adaptive", "fuse"):
        if name in names and not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name} must be True or False, got {getattr(config, name)!r}")

"""Per-layer reduction schedules: how many tokens each block removes (ToMe Sec. 4.1, "r")."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Union

RSchedule = Union[int, tuple[int, float], list[int]]
"""``r`` as ToMe accepts it: a constant int; a tuple ``(r, inflection)`` for a linear ramp around
r (inflection -1 = ToMe's "decreasing schedule", +1 increasing, 0 constant) whose entries are
truncated to integers as ToMe's ``parse_r`` does, so the total can fall short of r·depth by up
to depth − 1 (ViT-B, (16, -1): 187, not 192); or an explicit per-block list (shorter lists are
padded with zeros)."""


def check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be a non-negative int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value}")
    return int(value)


def resolve_r(r: RSchedule, depth: int, blocks: str = "the model has") -> tuple[int, ...]:
    """Expand ``r`` into one requested count per block (before capping to what each block can
    merge, which depends on the token count and happens in the block). ``blocks`` names the
    blocks in errors (``"the model has"``, or e.g. ``"after local_block=2 come"``)."""
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(f"a tuple r must be (r, inflection), got {r!r}; give a per-block schedule as a list")
        base, inflection = r
        base = check_count(base, "r")
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real):
            raise TypeError(f"the inflection of (r, inflection) must be a number in [-1, 1], got {inflection!r}")
        if not -1.0 <= inflection <= 1.0:
            # ToMe reads every pair as (r, inflection), so a tuple meant as one r per block lands here.
            meant = f"; for one r per block give a list, r=[{base}, {int(inflection)}]" if _is_count(inflection) else ""
            raise ValueError(f"the inflection of (r, inflection) must be in [-1, 1], got {inflection}{meant}")
        # Linear ramp from r·(1 - inflection) to r·(1 + inflection); truncation as in ToMe so the
        # same schedule gives the same per-layer counts.
        if depth == 1:  # a ramp over one block is its middle (ToMe's formula divides by zero)
            return (base,)
        first = int(base * (1.0 - inflection))
        last = 2 * base - first
        step = (last - first) / (depth - 1)
        return tuple(int(first + step * i) for i in range(depth))
    if isinstance(r, Sequence) and not isinstance(r, str):
        try:
            counts = [check_count(v, f"r[{i}]") for i, v in enumerate(r)]
        except (TypeError, ValueError) as error:
            if len(r) == 2 and _is_inflection(r[1]):
                # A JSON or YAML config has no tuples: ToMe's (16, -1) arrives as [16, -1].
                raise type(error)(
                    f"{error}: a list gives one r per block; for ToMe's (r, inflection) schedule give a tuple, "
                    f"r=({r[0]!r}, {r[1]!r})"
                ) from None
            raise
        if len(counts) > depth:
            raise ValueError(
                f"the r schedule has {len(counts)} entries but {blocks} {depth} blocks; "
                f"give at most one entry per block"
            )
        return tuple(counts) + (0,) * (depth - len(counts))
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(
            f"r must be a non-negative int, a tuple (r, inflection) or a per-block list, got {r!r} ({type(r).__name__})"
            + _form_hint(r)
        )
    return (check_count(r, "r"),) * depth


def _is_count(value: object) -> bool:
    """Whether ``value`` is a whole number ≥ 0, which a per-block list could hold."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and value >= 0 and float(value).is_integer()


def _form_hint(r: object) -> str:
    """How to give an ``r`` of the wrong type in a form :func:`resolve_r` takes: a command line's
    text through :func:`parse_schedule`, an array or tensor as Python ints."""
    if isinstance(r, str):
        return f"; for a command line's text, tokenprune.schedule.parse_schedule({r!r}) reads it"
    values = getattr(r, "tolist", lambda: None)()  # (numpy arrays and torch tensors)
    if isinstance(values, list) and all(_is_count(v) for v in values):
        return f"; for one r per block give a list of ints, r={[int(v) for v in values]}"
    if _is_count(values):
        return f"; give it as an int, r={int(values)}"
    return ""


def _is_inflection(value: object) -> bool:
    """Whether ``value`` can only be meant as the inflection of ``(r, inflection)``: a number in
    [-1, 1] that no block could remove (negative, or not whole)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not -1.0 <= value <= 1.0:
        return False
    return value < 0 or not float(value).is_integer()


def keep_ratio_r(keep_ratio: float, num_tokens: int, depth: int) -> list[int]:
    """A per-block ``r`` that keeps ``keep_ratio`` of the mergeable tokens entering every block,
    the per-layer ratio of PiToMe's released code: r_l = ⌊N_l − N_l·keep_ratio⌋ and
    N_{l+1} = N_l − r_l, from ``num_tokens`` mergeable tokens (patches, no prefix) at block 0.
    E.g. ``keep_ratio_r(0.9, 196, 12)`` for ViT-B/16 at 224."""
    if not 0.5 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0.5, 1] (a block merges at most half its tokens), got {keep_ratio}")
    counts, tokens = [], check_count(num_tokens, "num_tokens")
    for _ in range(depth):
        counts.append(math.floor(tokens - tokens * keep_ratio))
        tokens -= counts[-1]
    return counts


def parse_schedule(text: str) -> RSchedule:
    """Parse a command-line schedule: ``"16"`` → 16, ``"16,-1"`` → (16, -1), ``"8,8,4,4"`` →
    [8, 8, 4, 4] (three or more entries: per block). The labels of :func:`format_schedule`
    parse back too: ``"(16,-1)"``, and ``"[8,8]"`` (brackets: per block, at any length)."""
    spec = text.strip()
    per_block = spec.startswith("[") and spec.endswith("]")
    ramp = spec.startswith("(") and spec.endswith(")")
    parts = [part.strip() for part in (spec[1:-1] if per_block or ramp else spec).split(",")]
    try:
        if per_block or (len(parts) > 2 and not ramp):
            return [int(part) for part in parts]
        if len(parts) == 2:
            inflection = float(parts[1])
            return (int(parts[0]), int(inflection) if inflection.is_integer() else inflection)
        if not ramp:
            return int(parts[0])
    except ValueError:
        pass
    raise ValueError(f"r must be an int (16), r,inflection (16,-1) or a per-block list (8,8,4), got {text!r}")


def format_schedule(r: RSchedule) -> str:
    """A label for ``r`` that :func:`parse_schedule` reads back: 16, (16,-1), [8,8,4]."""
    if isinstance(r, tuple):
        if len(r) == 2 and isinstance(r[0], numbers.Integral) and not isinstance(r[0], bool):
            return f"({int(r[0])},{_inflection_label(int(r[0]), r[1])})"
        return "(" + ",".join(f"{v:g}" for v in r) + ")"
    if isinstance(r, list):
        return "[" + ",".join(str(v) for v in r) + "]"
    return str(r)


def _inflection_label(base: int, inflection: object) -> str:
    """The shortest decimal for ``inflection`` whose ramp ``(base, ·)`` has this one's per-block
    counts at every depth up to 256 (0.1 + 0.2 gives 0.3), else its exact repr. Six significant
    digits (``:g``) are not enough: the ramp truncates to ints, so (6, −1/3) labelled (6,-0.333333)
    read back as a schedule whose first block removes 7 tokens, not 8."""
    if isinstance(inflection, numbers.Real) and float(short := f"{inflection:g}") == inflection:
        return short  # (-1, -0.5, 0.25: the label is the value itself, nothing to compare)
    try:
        exact = {depth: resolve_r((base, inflection), depth) for depth in range(2, 257)}  # type: ignore[arg-type]
    except (TypeError, ValueError):  # not a schedule patch would take: label it as given
        return f"{inflection:g}" if isinstance(inflection, numbers.Real) else str(inflection)
    for digits in range(1, 18):
        text = f"{inflection:.{digits}g}"
        if all(resolve_r((base, float(text)), depth) == counts for depth, counts in exact.items()):
            return text
    return repr(float(inflection))  # (unreachable: 17 digits give the float itself)

"""r schedules: the forms ToMe accepts, and clear errors for the rest."""

from __future__ import annotations

import pytest

from tests.tome_reference import tome_schedule
from tokenprune.schedule import format_schedule, parse_schedule, resolve_r


def test_constant() -> None:
    assert resolve_r(16, 12) == (16,) * 12


def test_decreasing_schedule_matches_linear_ramp() -> None:
    # (r, -1): from 2r down to 0 in a straight line, truncated to ints (ToMe's parse_r).
    expected = tuple(int(32 - 32 / 11 * i) for i in range(12))
    assert resolve_r((16, -1), 12) == expected == (32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0)
    assert resolve_r((16, 1.0), 12) == tuple(int(0 + 32 / 11 * i) for i in range(12))
    assert resolve_r((16, 0), 12) == (16,) * 12
    assert resolve_r((3, -1), 1) == resolve_r((3, 1), 1) == (3,)  # one block: the ramp's middle, keeping the total


def test_per_block_list_is_padded() -> None:
    assert resolve_r([4, 3, 2], 5) == (4, 3, 2, 0, 0)


@pytest.mark.parametrize(
    "r,error,match",
    [
        (-1, ValueError, "non-negative"),
        (2.5, TypeError, "non-negative int"),
        (True, TypeError, "non-negative int"),
        ([1, 2, 3, 4], ValueError, "4 entries but the model has 3 blocks"),
        ([1, -2], ValueError, r"r\[1\]"),
        ((16, -2), ValueError, r"\[-1, 1\]"),
        ((16, "x"), TypeError, "inflection"),
        ((1, 2, 3), TypeError, "give a per-block schedule as a list"),
        ((16,), TypeError, "give a per-block schedule as a list"),
        ("16", TypeError, "non-negative int"),
    ],
)
def test_bad_schedules(r, error, match) -> None:
    with pytest.raises(error, match=match):
        resolve_r(r, 3)


@pytest.mark.parametrize("inflection", [-1, -0.5, 0.5])
def test_a_two_entry_list_with_an_inflection_names_the_tuple_form(inflection: float) -> None:
    """A JSON or YAML config has no tuples, so ToMe's (16, -1) arrives as [16, -1]: a per-block
    list whose second entry no block can remove. The error names the tuple it was meant as, and
    that tuple is ToMe's ramp."""
    with pytest.raises((TypeError, ValueError), match=rf"r\[1\].*give a tuple, r=\(16, {inflection}\)"):
        resolve_r([16, inflection], 12)
    assert list(resolve_r((16, inflection), 12)) == tome_schedule((16, inflection), 12)
    with pytest.raises(ValueError) as error:  # not an inflection: no tuple suggested
        resolve_r([1, -2], 3)
    assert "tuple" not in str(error.value)


def test_command_line_schedules_round_trip() -> None:
    for text, value in [("16", 16), ("16,-1", (16, -1)), ("16, 0.5", (16, 0.5)), ("8,8,4", [8, 8, 4]), ("[8, 8]", [8, 8]), ("[4]", [4])]:
        assert parse_schedule(text) == value
        assert parse_schedule(format_schedule(value)) == value  # a results table's label is a valid --r
        assert parse_schedule(format_schedule(value).strip("()[]")) == value or isinstance(value, list)
    for bad in ("", "a", "1.5", "16,x", "(16)", "(8,8,4)", "[]", "[8,x]"):
        with pytest.raises(ValueError, match="r must be"):
            parse_schedule(bad)


def test_keep_ratio_r_keeps_the_ratio_at_every_block() -> None:
    from tokenprune.schedule import keep_ratio_r

    counts = keep_ratio_r(0.9, 256, 12)
    assert counts[:4] == [25, 23, 20, 18]  # 256 → 231 → 208 → 188 → 170
    tokens = 256
    for r in counts:  # the most a block can remove while keeping 90 % of what enters it
        assert tokens - r >= 0.9 * tokens - 1e-9 and tokens - r - 1 < 0.9 * tokens
        tokens -= r
    assert keep_ratio_r(1.0, 196, 3) == [0, 0, 0]
    assert keep_ratio_r(0.5, 8, 4) == [4, 2, 1, 0]
    for bad in (0.4, 1.1):
        with pytest.raises(ValueError, match="keep_ratio must be in"):
            keep_ratio_r(bad, 196, 12)


def test_ramp_matches_tomes_parse_r_at_fractional_inflections() -> None:
    """ToMe's parse_r ends the ramp at 2r − int(r·(1 − inflection)), not at int(r·(1 + inflection)):
    the two differ whenever r·inflection is fractional, which ±1 and 0 never are."""
    assert resolve_r((3, 0.5), 4) == (1, 2, 3, 5)  # by hand: first ⌊1.5⌋ = 1, last 6 − 1 = 5, step 4/3
    for base in (3, 5, 13, 16):
        for inflection in (-1, -0.7, -0.5, -0.3, 0.25, 0.5, 0.7, 1):
            for depth in (2, 4, 12):
                assert resolve_r((base, inflection), depth) == tuple(tome_schedule((base, inflection), depth))


def test_a_bool_inflection_is_refused() -> None:
    with pytest.raises(TypeError, match="inflection"):
        resolve_r((16, True), 3)


def test_command_line_inflections_are_ints_when_whole_and_labels_drop_trailing_zeros() -> None:
    """"16,-1" gives the int -1 (a results file records (16, -1), not (16, -1.0)), and a float
    inflection that is whole is labelled as ToMe writes it: (16,-1), not (16,-1.0)."""
    assert type(parse_schedule("16,-1")[1]) is int and type(parse_schedule("16,-1.0")[1]) is int
    assert type(parse_schedule("16,0.5")[1]) is float
    assert format_schedule((16, -1.0)) == "(16,-1)" and format_schedule((8, 0.1 + 0.2)) == "(8,0.3)"


@pytest.mark.parametrize(
    "given,meant",
    [((8, 4), [8, 4]), ((8, 2.0), [8, 2]), ("numpy", [8, 8, 4]), ("torch", [8, 8, 4]), ("numpy0d", 5), ("8,8,4", [8, 8, 4])],
)
def test_an_r_in_another_form_names_the_form_that_works(given, meant) -> None:
    """A pair meant as one r per block (ToMe reads every tuple as (r, inflection)), a numpy array
    or a tensor of counts, and a command line's text are refused, naming the r that gives what was
    meant; that r resolves to the per-block counts of ``meant``."""
    import ast
    import re

    import numpy as np
    import torch

    given = {"numpy": np.array([8, 8, 4]), "torch": torch.tensor([8, 8, 4]), "numpy0d": np.array(5)}.get(given, given)
    with pytest.raises((TypeError, ValueError)) as error:
        resolve_r(given, 3)
    message = str(error.value)
    if isinstance(given, str):
        hinted = parse_schedule(re.search(r"parse_schedule\('([^']*)'\) reads it$", message).group(1))
    else:
        hinted = ast.literal_eval(re.search(r"r=(\[[^\]]*\]|\d+)$", message).group(1))
    assert hinted == meant and resolve_r(hinted, 3) == resolve_r(meant, 3)


@pytest.mark.parametrize("r", [(6, -1 / 3), (3, 2 / 3), (1234567, -1)])
def test_a_label_reads_back_as_the_same_per_block_counts(r) -> None:
    """A results table's label is a valid --r that runs the schedule it names: with six
    significant digits (6, −1/3) read back as (6, −0.333333), whose first block removes
    int(6 · 1.333333) = 7 tokens where the schedule removes 8; and an r of seven digits was
    labelled 1.23457e+06, which parse_schedule refused."""
    back = parse_schedule(format_schedule(r))
    for depth in (2, 12, 24, 40):
        assert resolve_r(back, depth) == tuple(tome_schedule(r, depth))  # ToMe's parse_r of the schedule itself
    assert resolve_r(back, 1) == resolve_r(r, 1)

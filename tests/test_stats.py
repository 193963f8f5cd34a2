"""evals.stats: paired differences with a Student-t interval over groups, on hand-built inputs."""

import json
import math

import pytest
import torch

from evals.stats import paired_difference, verdict


def test_paired_difference_treats_groups_as_the_units() -> None:
    # 4 photos × 3 views. The views of a photo move together, so the interval must reflect 4
    # photo means, not 12 images: mean ± t(0.975, 3) · sd / √4 of the photo means.
    photo_shift = torch.tensor([0.01, 0.03, 0.02, 0.04]).repeat_interleave(3)
    difference = paired_difference(photo_shift + 1.0, torch.ones(12), group_size=3)
    means = torch.tensor([0.01, 0.03, 0.02, 0.04], dtype=torch.float64)
    half = 3.182446305284263 * means.std().item() / 2  # t(0.975, 3): a printed table's 3.182
    assert difference["mean"] == pytest.approx(0.025)
    assert difference["low"] == pytest.approx(0.025 - half) and difference["high"] == pytest.approx(0.025 + half)
    assert verdict(difference) == "win"
    assert verdict(paired_difference(torch.ones(12) - photo_shift, torch.ones(12), 3)) == "loss"
    tie = paired_difference(torch.tensor([0.02, -0.03, 0.01, -0.01]).repeat_interleave(3), torch.zeros(12), 3)
    assert tie["low"] < 0 < tie["high"] and verdict(tie) == "tie"
    # the same inputs taken as 12 independent values would claim a narrower interval
    ungrouped = paired_difference(photo_shift, torch.zeros(12))
    assert ungrouped["high"] - ungrouped["low"] < difference["high"] - difference["low"]


def test_few_groups_are_not_overconfident() -> None:
    """With no real difference, 3 groups of normal noise must be called win or loss about 5 % of
    the time (a percentile bootstrap over the 3 means did so about 26 % of the time)."""
    generator = torch.Generator().manual_seed(0)
    calls = [verdict(paired_difference(torch.randn(3, generator=generator), torch.zeros(3))) for _ in range(2000)]
    rate = sum(call != "tie" for call in calls) / len(calls)
    assert 0.03 < rate < 0.07
    one_group = paired_difference(torch.ones(4), torch.zeros(4), group_size=4)
    assert verdict(one_group) == "tie"  # one group says nothing about the spread


def test_paired_difference_of_single_inputs_and_bad_groups() -> None:
    shifts = torch.linspace(0.0, 0.011, 12)
    single = paired_difference(shifts, torch.zeros(12))
    assert single["mean"] == pytest.approx(shifts.mean().item())
    assert 0.0 <= single["low"] < single["mean"] < single["high"] <= 0.011
    with pytest.raises(ValueError, match="does not divide"):
        paired_difference(shifts, torch.zeros(12), group_size=5)
    with pytest.raises(ValueError, match="1-D"):
        paired_difference(shifts, torch.zeros(11))


def test_format_difference_shows_the_interval_and_verdict() -> None:
    from evals.stats import format_difference

    assert format_difference({"mean": 0.0012, "low": -0.0003, "high": 0.00271}) == "+0.0012 [-0.0003, +0.0027] tie"
    assert format_difference({"mean": -2.66, "low": -3.25, "high": -2.1}, digits=2) == "-2.66 [-3.25, -2.10] loss"
    assert format_difference(None) == format_difference({}) == "-"


def test_one_group_is_unbounded_and_no_difference_is_a_tie() -> None:
    """One group: the interval is ±∞ (not NaN). Identical inputs: a zero-width interval at 0,
    which is a tie, neither a win nor a loss."""
    one_group = paired_difference(torch.ones(4), torch.zeros(4), group_size=4)
    assert one_group == {"mean": 1.0, "low": -math.inf, "high": math.inf}
    same = torch.linspace(0.0, 1.0, 6)
    nothing = paired_difference(same, same, group_size=2)
    assert nothing == {"mean": 0.0, "low": 0.0, "high": 0.0} and verdict(nothing) == "tie"


def test_results_json_is_standard_json() -> None:
    """A single group's ±∞ interval is written as null (Python's json wrote Infinity, which JSON
    has not, and strict readers such as JavaScript's JSON.parse refuse); a NaN raises."""
    from evals.harness import json_text

    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    record = {"runs": [{"cosine": paired_difference(torch.ones(4), torch.zeros(4), group_size=4), "n": 4}]}
    assert json.loads(json_text(record), parse_constant=strict) == {"runs": [{"cosine": {"mean": 1.0, "low": None, "high": None}, "n": 4}]}
    with pytest.raises(ValueError):
        json_text({"mean": math.nan})

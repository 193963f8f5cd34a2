"""evals.stats: paired differences with a bootstrap interval, on hand-built inputs."""

import pytest
import torch

from evals.stats import paired_difference, verdict


def test_paired_difference_resamples_groups() -> None:
    # 4 photos × 3 views. The views of a photo move together, so the interval must reflect 4
    # photo means (spread 0.02), not 12 images.
    photo_shift = torch.tensor([0.01, 0.03, 0.02, 0.04]).repeat_interleave(3)
    difference = paired_difference(photo_shift + 1.0, torch.ones(12), group_size=3)
    assert difference["mean"] == pytest.approx(0.025)
    assert 0.01 <= difference["low"] < 0.025 < difference["high"] <= 0.04
    assert verdict(difference) == "win"
    assert verdict(paired_difference(torch.ones(12) - photo_shift, torch.ones(12), 3)) == "loss"
    tie = paired_difference(torch.tensor([0.02, -0.03, 0.01, -0.01]).repeat_interleave(3), torch.zeros(12), 3)
    assert tie["low"] < 0 < tie["high"] and verdict(tie) == "tie"
    assert paired_difference(photo_shift, torch.zeros(12), 3) == paired_difference(photo_shift, torch.zeros(12), 3)


def test_paired_difference_of_single_inputs_and_bad_groups() -> None:
    # Independent inputs (group_size 1): every input is resampled on its own.
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

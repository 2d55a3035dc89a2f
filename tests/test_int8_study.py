"""The scores benchmarks/int8_study.py (the experiments of benchmarks/INT8.md) reports."""

from __future__ import annotations

import numpy as np
import pytest

from resunetpp.bench.int8_study import score


def test_sure_pixels_cost_nothing_and_near_threshold_pixels_are_scored_alone():
    ref = np.array([[-30.0, 40.0, 0.5, -0.5]])
    far = np.array([[-9.0, 12.0, 0.5, -0.5]])  # both sure of the first two: beyond the 1e-3 clip
    s = score([far], [ref])
    assert s["logit_error"] == pytest.approx(0.0, abs=1e-12) and s["near_threshold_error"] == 0.0
    assert s["dice_mean"] == s["dice_min"] == 1.0 and s["below_0.90"] == 0

    flipped = np.array([[-30.0, 40.0, -0.5, -0.5]])  # one near-threshold pixel moves by 1 and flips
    s = score([flipped], [ref])
    assert s["near_threshold_error"] == pytest.approx(np.sqrt(1 / 2))  # RMS over the two |logit| < 2 pixels
    assert s["logit_error"] == pytest.approx(np.sqrt(1 / 4))
    assert s["dices"] == [pytest.approx(2 * 1 / 3)] and s["below_0.90"] == 1


def test_empty_masks_agree_and_lengths_must_match():
    neg = np.full((1, 4), -5.0)
    assert score([neg], [neg])["dices"] == [1.0]
    with pytest.raises(ValueError):
        score([neg, neg], [neg])

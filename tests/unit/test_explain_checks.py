"""mlsd_ray/explain's sanity-check arithmetic, on functions whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from mlsd_ray import explain
from mlsd_ray.explain import SanityChecks


def test_deleting_the_pixels_a_model_reads_drops_its_probability_first():
    """A 'model' whose class-0 probability is the mean of the top row: attributions on that row
    delete it first (the curve falls at once), a random order later."""
    def probability(batch: np.ndarray) -> np.ndarray:
        top = batch[:, 0, 0, :].mean(axis=1)
        return np.stack([top, 1 - top], axis=1)

    inputs = np.ones((3, 1, 4, 4))
    attributions = np.zeros_like(inputs)
    attributions[:, :, 0, :] = 1.0
    targets = np.zeros(3, dtype=int)
    ordered = explain.deletion_curve(probability, inputs, explain.deletion_order(attributions),
                                     targets)
    shuffled = np.stack([np.random.default_rng(i).permutation(16) for i in range(3)])
    at_random = explain.deletion_curve(probability, inputs, shuffled, targets)
    assert ordered.shape == (3, explain.DELETION_STEPS)
    assert (ordered[:, 0] == 1.0).all() and (ordered[:, 3:] == 0).all()  # 4 of 16 by 30 %
    assert ordered.mean() < at_random.mean()


def test_rank_correlation_tells_a_copy_from_an_unrelated_map():
    rng = np.random.default_rng(0)
    maps = rng.random((4, 1, 8, 8))
    assert explain.rank_correlation(maps, maps * 3) == pytest.approx(1.0)
    assert abs(explain.rank_correlation(maps, rng.random((4, 1, 8, 8)))) < 0.3
    assert explain.rank_correlation(maps, np.zeros_like(maps)) == 0.0  # a constant map


def test_a_check_fails_when_either_half_fails():
    checks = SanityChecks(randomised_correlation={"a": 0.1, "b": 0.9, "c": 0.1},
                          deletion_auc={"a": 0.2, "b": 0.2, "c": 0.6}, random_deletion_auc=0.5)
    assert checks.passed() == {"a": True, "b": False, "c": False}
    assert "FAILED" in checks.describe()[1]

"""Normality pass rates of whitened features (pipeline.whitening.diagnostics)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.whitening.diagnostics import MIN_SAMPLES, feature_subset, normality_pass_rates


def test_gaussian_features_mostly_pass():
    Z = np.random.default_rng(0).standard_normal((1000, 60))
    r = normality_pass_rates(Z)
    assert r["n_features"] == 60 and r["n_samples"] == 1000
    # at alpha = 0.05 about 95% of truly normal features pass
    assert 0.85 <= r["anderson_darling"] <= 1.0
    assert 0.85 <= r["dagostino_pearson"] <= 1.0


def test_skewed_features_fail():
    Z = np.random.default_rng(1).exponential(size=(1000, 40))
    r = normality_pass_rates(Z)
    assert r["anderson_darling"] == 0.0 and r["dagostino_pearson"] == 0.0


def test_rates_are_fractions_of_the_tested_features():
    rng = np.random.default_rng(2)
    Z = np.hstack([rng.standard_normal((2000, 10)), rng.exponential(size=(2000, 10)),
                   np.ones((2000, 5))])                  # constant features count as failing
    r = normality_pass_rates(Z)
    assert r["n_features"] == 25
    assert 7 / 25 <= r["anderson_darling"] <= 10 / 25
    assert 7 / 25 <= r["dagostino_pearson"] <= 10 / 25


def test_max_features_spreads_over_all_features():
    np.testing.assert_array_equal(feature_subset(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(feature_subset(5, None), np.arange(5))
    np.testing.assert_array_equal(feature_subset(3, 10), np.arange(3))
    Z = np.random.default_rng(3).standard_normal((200, 100))
    assert normality_pass_rates(Z, max_features=7)["n_features"] == 7


def test_too_few_samples_gives_none():
    r = normality_pass_rates(np.zeros((MIN_SAMPLES - 1, 3)))
    assert r == {"anderson_darling": None, "dagostino_pearson": None,
                 "n_features": 3, "n_samples": MIN_SAMPLES - 1}
    assert normality_pass_rates(np.zeros((50, 0)))["anderson_darling"] is None


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        normality_pass_rates(np.zeros(30))
    with pytest.raises(ValueError, match="alpha"):
        normality_pass_rates(np.zeros((30, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="max_features"):
        feature_subset(10, 0)
    Z = np.random.default_rng(4).standard_normal((30, 2))
    Z[5, 1] = np.inf
    with pytest.raises(ValueError, match="row 5"):
        normality_pass_rates(Z)

"""Normality diagnostics for whitened embeddings.

Under the Whitened CLIP model every whitened coordinate is a standard normal variable.
:func:`normality_pass_rates` reports, per test, the fraction of coordinates (features)
whose marginal distribution is *not* rejected as normal at level ``alpha``. It is a
diagnostic to read next to the held-out ``sqnorm/m``, not part of the scoring.
"""

from __future__ import annotations

import inspect

import numpy as np

__all__ = ["MIN_SAMPLES", "normality_pass_rates", "feature_subset"]

#: Fewest samples for which the tests are computed (scipy's normaltest needs >= 8,
#: and neither test says much with fewer than ~20).
MIN_SAMPLES = 20


def _scipy_stats():
    # SciPy is imported when a fit runs its tests, not by every command that loads a stats file (0.7 s)
    from scipy import stats

    return stats


def feature_subset(n_features: int, max_features: int | None) -> np.ndarray:
    """Indices of at most ``max_features`` features, evenly spread over ``range(n_features)``.

    The spread keeps both leading and trailing whitened components in the sample
    (trailing components are where an over-fitted covariance shows).
    """
    if max_features is None or max_features >= n_features:
        return np.arange(n_features)
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1 or None; got {max_features!r}")
    return np.unique(np.linspace(0, n_features - 1, max_features).round().astype(np.intp))


def _anderson_passes(column: np.ndarray, alpha: float) -> bool:
    """Whether scipy's Anderson-Darling test for normality does not reject at ``alpha``."""
    stats = _scipy_stats()
    if "method" in inspect.signature(stats.anderson).parameters:  # SciPy >= 1.17: interpolated p-value
        return bool(stats.anderson(column, dist="norm", method="interpolate").pvalue > alpha)
    result = stats.anderson(column, dist="norm")
    levels = np.asarray(result.significance_level, dtype=float) / 100.0
    hit = np.flatnonzero(np.isclose(levels, alpha))
    if hit.size == 0:
        raise ValueError(f"this SciPy's Anderson-Darling test only has the levels {levels.tolist()}; "
                         f"got alpha={alpha}")
    return bool(result.statistic < result.critical_values[hit[0]])


def normality_pass_rates(Z, alpha: float = 0.05, max_features: int | None = None) -> dict:
    """Fraction of features (columns of ``Z``) that pass two normality tests at level ``alpha``.

    ``Z`` is an ``(n_samples, n_features)`` array of whitened coordinates. Tests:
    ``anderson_darling`` (:func:`scipy.stats.anderson`, normal with estimated mean and
    scale, passes when its p-value exceeds ``alpha``) and ``dagostino_pearson``
    (:func:`scipy.stats.normaltest`, passes when ``p > alpha``). ``max_features`` caps the
    number of features tested (evenly spread, see :func:`feature_subset`).

    Returns ``{"anderson_darling": frac, "dagostino_pearson": frac, "n_features": k,
    "n_samples": n}``; the two fractions are ``None`` when there are fewer than
    :data:`MIN_SAMPLES` samples or no features. Constant features count as failing.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2:
        raise ValueError(f"Z must be a 2-D array (n_samples, n_features); got shape {Z.shape}")
    n, d = Z.shape
    cols = feature_subset(d, max_features)
    result = {"anderson_darling": None, "dagostino_pearson": None,
              "n_features": int(cols.size), "n_samples": int(n)}
    if n < MIN_SAMPLES or cols.size == 0:
        return result
    Z = Z[:, cols]
    if not np.isfinite(Z).all():
        bad = int(np.flatnonzero(~np.isfinite(Z).all(axis=1))[0])
        raise ValueError(f"Z has NaN or infinite values (first in row {bad})")
    usable = Z.std(axis=0) > 0
    ad = sum(_anderson_passes(Z[:, j], alpha) for j in np.flatnonzero(usable))
    dp = 0
    if usable.any():
        pvalues = _scipy_stats().normaltest(Z[:, usable], axis=0).pvalue
        dp = int(np.count_nonzero(pvalues > alpha))
    k = cols.size
    result["anderson_darling"] = float(ad) / k
    result["dagostino_pearson"] = float(dp) / k
    return result

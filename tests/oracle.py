"""Independent float64 references the tests compare wclip's scores with."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps
from scipy.special import logsumexp


def local_loglik(stats, X: np.ndarray) -> np.ndarray:
    """The local (mixture) log-likelihood of rows ``X`` from SciPy: each cluster's ``multivariate_normal``
    log-density in the kept PCA coordinates (not whitened), log-sum-exp with the weights, minus the global
    ``log_det`` (so that it is in the units of the global log-likelihood)."""
    cw = stats.clusters
    lam = stats.eigenvalues[:stats.components]
    P = (np.asarray(X, dtype=np.float64) - stats.mean) @ (stats.whitening * np.sqrt(lam))  # V_m^T (x - mu)
    terms = [np.log(cw.weights[k]) + sps.multivariate_normal(cw.means[k] * np.sqrt(lam),
                                                             np.diag(cw.variances[k] * lam)).logpdf(P)
             for k in range(cw.k)]
    return logsumexp(np.stack(terms), axis=0) - stats.log_det


def most_likely_cluster(stats, X: np.ndarray) -> tuple:
    """``(cluster, margin)``: each row's most likely component and the log-posterior gap to the runner-up."""
    cw = stats.clusters
    z = (np.asarray(X, dtype=np.float64) - stats.mean) @ stats.whitening
    s = np.stack([np.sum((z - cw.means[k]) ** 2 / cw.variances[k], axis=1) for k in range(cw.k)], axis=1)
    post = np.log(cw.weights) - 0.5 * np.sum(np.log(cw.variances), axis=1) - 0.5 * s
    order = np.sort(post, axis=1)
    return post.argmax(axis=1), (order[:, -1] - order[:, -2]) if cw.k > 1 else np.full(len(z), np.inf)

"""Independent float64 references the tests compare wclip's scores with."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps
from scipy.special import logsumexp


def cluster_covariances(cw) -> np.ndarray:
    """Each cluster's covariance in the whitened coordinates, ``diag(v_k) + U_k U_k^T`` (K, m, m), written out."""
    cov = np.stack([np.diag(v) for v in cw.variances])
    if cw.factors is not None:
        cov = cov + np.stack([U @ U.T for U in cw.factors])
    return cov


def local_loglik(stats, X: np.ndarray) -> np.ndarray:
    """The local (mixture) log-likelihood of rows ``X`` from SciPy: each cluster's ``multivariate_normal``
    log-density in the kept PCA coordinates (not whitened; a full covariance when the clusters have their own
    directions), log-sum-exp with the weights, minus the global ``log_det`` (so that it is in the units of the
    global log-likelihood)."""
    cw = stats.clusters
    root = np.sqrt(stats.eigenvalues[:stats.components])
    P = (np.asarray(X, dtype=np.float64) - stats.mean) @ (stats.whitening * root)  # V_m^T (x - mu)
    terms = [np.log(cw.weights[k]) + sps.multivariate_normal(cw.means[k] * root,
                                                             cov * np.outer(root, root)).logpdf(P)
             for k, cov in enumerate(cluster_covariances(cw))]
    return logsumexp(np.stack(terms), axis=0) - stats.log_det


def cluster_sqnorms(stats, X: np.ndarray) -> np.ndarray:
    """``s_k``: each row's squared Mahalanobis norm in every cluster (n, K), by solving with the full covariance."""
    cw = stats.clusters
    z = (np.asarray(X, dtype=np.float64) - stats.mean) @ stats.whitening
    return np.stack([np.einsum("ij,ij->i", z - c, np.linalg.solve(cov, (z - c).T).T)
                     for c, cov in zip(cw.means, cluster_covariances(cw))], axis=1)


def most_likely_cluster(stats, X: np.ndarray) -> tuple:
    """``(cluster, margin)``: each row's most likely component and the log-posterior gap to the runner-up."""
    cw = stats.clusters
    logdet = np.linalg.slogdet(cluster_covariances(cw))[1]
    post = np.log(cw.weights) - 0.5 * logdet - 0.5 * cluster_sqnorms(stats, X)
    order = np.sort(post, axis=1)
    return post.argmax(axis=1), (order[:, -1] - order[:, -2]) if cw.k > 1 else np.full(len(post), np.inf)

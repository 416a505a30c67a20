"""The NumPy backend: the embeddings path's float32 whitener and the local likelihood's mixture, no torch.

* :class:`NumpyWhitener`: ``w = (x - mu) @ W`` as one float32 GEMM and ``sqnorm = ||w||^2`` (float32), the
  log-likelihood from :func:`~pipeline.whitening.formulas.loglik_from_sqnorm` (float64).
* :class:`NumpyMixture`: every row against every cluster in two GEMMs (``z*z @ P[:m]`` and ``z @ P[m:2m]``) plus,
  with per-cluster directions, one more (``z @ B``): the matrices of :mod:`pipeline.whitening.gaussians`; a
  row-wise max and a log-sum-exp, in the whitened rows' own precision (float32 on the embeddings path, float64 in
  the fit).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.whitening.formulas import half_m_log_2pi, loglik_from_sqnorm
from pipeline.whitening.kernels.reference import check_parameters

__all__ = ["NumpyWhitener", "NumpyMixture", "component_logp", "mixture_terms"]


class NumpyWhitener:
    """Float32 whitening of NumPy rows: ``mean`` (d,) and ``whitening`` (d, m) kept as float32 copies."""

    def __init__(self, mean, whitening):
        mu, W = check_parameters(mean, whitening)
        self.d, self.m = W.shape
        self.mean = mu.astype(np.float32)
        self.whitening = np.ascontiguousarray(W, dtype=np.float32)

    def _input(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise TypeError(f"x must be a float32 numpy array; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (B, {self.d}); got {x.shape}")
        return x

    def whiten(self, x: np.ndarray, out: Optional[np.ndarray] = None, overwrite_x: bool = False) -> np.ndarray:
        """``(x - mean) @ whitening`` in float32 (B, m), into ``out`` if given; ``overwrite_x``: centre ``x`` in
        place (a scratch copy the caller no longer needs) instead of in a new array. A NaN or inf anywhere in a
        row reaches every value of its whitened row."""
        x = self._input(x)
        if overwrite_x:
            x -= self.mean
        else:
            x = x - self.mean
        return np.matmul(x, self.whitening, out=out)

    def sqnorm_and_whiten(self, x: np.ndarray, out: Optional[np.ndarray] = None, overwrite_x: bool = False):
        """``(sqnorm float32, whitened float32)`` (see :meth:`whiten`): the embeddings path's arithmetic."""
        w = self.whiten(x, out, overwrite_x)
        return np.vecdot(w, w), w

    def score_and_whiten(self, x: np.ndarray, out: Optional[np.ndarray] = None, overwrite_x: bool = False):
        """``(sqnorm float32, loglik float64, whitened float32)`` (see :meth:`whiten`)."""
        sq, w = self.sqnorm_and_whiten(x, out, overwrite_x)
        return sq, loglik_from_sqnorm(sq, self.m), w

    def score(self, x: np.ndarray) -> tuple:
        """``(sqnorm float32, loglik float64)``, each (B,)."""
        return self.score_and_whiten(x)[:2]

    def __repr__(self) -> str:
        return f"NumpyWhitener(d={self.d}, m={self.m})"


def component_logp(params, z: np.ndarray, work: Optional[tuple] = None) -> np.ndarray:
    """``log pi_k + log N_k(z) + 0.5 m log 2pi`` of whitened rows ``z`` (n, m) under every cluster, (n, K) in
    ``z``'s dtype (``params``: :class:`~pipeline.whitening.gaussians.MixtureParameters` in that dtype); ``work``:
    arrays to compute in (``(n, m)``, ``(n, K)``, ``(n, K)``), the second one returned."""
    n, m = z.shape
    P = params.P
    k = P.shape[1]
    squares, logp, linear = (np.empty(shape, z.dtype) for shape in ((n, m), (n, k), (n, k))) if work is None \
        else (w[:n] for w in work)
    np.multiply(z, z, out=squares)
    np.matmul(squares, P[:m], out=logp)  # two GEMMs: stacking [z*z, z] first costs more at large m
    logp += np.matmul(z, P[m:2 * m], out=linear)
    logp += P[2 * m]
    if params.rank:  # the clusters' own directions: + 0.5 ||z B_k - b_k||^2, one GEMM for all clusters
        g = np.matmul(z, params.directions)
        g -= params.offsets
        g *= g
        logp += np.matmul(g, params.halves, out=linear)
    return logp


def mixture_terms(params, z: np.ndarray, work: Optional[tuple] = None) -> tuple:
    """``(local loglik float64, own cluster, s_own float64)`` of finite whitened rows ``z`` (float32 or float64,
    as given; ``params`` in that dtype) against every cluster (see :func:`component_logp`)."""
    m = z.shape[1]
    logp = component_logp(params, z, work)
    own = np.argmax(logp, axis=1)
    top = np.take_along_axis(logp, own[:, None], axis=1)
    s_own = np.maximum(2.0 * (params.log_norm[own].astype(np.float64) - top[:, 0]), 0.0)  # rounding: never < 0
    logp -= top
    np.exp(logp, out=logp)  # terms in (0, 1]: the largest is 1
    total = logp.sum(axis=1)
    loglik = top[:, 0].astype(np.float64) + np.log(total, dtype=np.float64) - half_m_log_2pi(m)
    return loglik, own, s_own


class NumpyMixture:
    """Scores whitened NumPy rows against one tower's clusters, in the rows' own dtype."""

    def __init__(self, clusters):
        self.clusters = clusters
        self.k, self.m = clusters.k, clusters.components

    def work_shapes(self, rows: int) -> tuple:
        """The shapes of the work arrays :meth:`mixture` computes ``rows`` rows in."""
        return (rows, self.m), (rows, self.k), (rows, self.k)

    def terms(self, z: np.ndarray, work: Optional[tuple] = None) -> tuple:
        """:func:`mixture_terms` of finite rows ``z`` with this mixture's parameters in ``z``'s dtype."""
        return mixture_terms(self.clusters.parameters(z.dtype), z, work)

    def mixture(self, z: np.ndarray, sqnorm: np.ndarray, work: Optional[tuple] = None) -> tuple:
        """``(cluster, loglik, s_own)`` of whitened rows ``z`` (n, m; float32 or float64) whose global squared
        norms are ``sqnorm``. Rows whose ``sqnorm`` is not finite get NaN (cluster -1). One cluster scores
        exactly as the global fit: ``loglik`` is that of ``sqnorm``."""
        sqnorm = np.asarray(sqnorm)
        bad = ~np.isfinite(sqnorm)
        if self.k == 1:
            return (np.where(bad, -1, 0), loglik_from_sqnorm(sqnorm, self.m), np.asarray(sqnorm, dtype=np.float64))
        loglik, own, s_own = self.terms(np.where(bad[:, None], 0, z) if bad.any() else z, work)
        if bad.any():
            own = np.where(bad, -1, own)
            loglik[bad], s_own[bad] = np.nan, np.nan
        return own, loglik, s_own

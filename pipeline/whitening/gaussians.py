"""The local likelihood's Gaussians as GEMM matrices: one definition of how a mixture of low-rank-plus-diagonal
Gaussians in the whitened coordinates becomes the few matrices every scoring backend multiplies by.

Cluster ``k`` has weight ``pi_k``, mean ``c_k`` and covariance ``C_k = diag(v_k) + U_k U_k^T`` (``U_k``: ``m x r``
factors, ``r = 0`` a diagonal covariance). By Woodbury, with ``M_k = I + U_k^T diag(1/v_k) U_k = L_k L_k^T`` and
``B_k = diag(1/v_k) U_k L_k^-T`` (``m x r``)::

    s_k(z) = (z - c_k)^T C_k^-1 (z - c_k) = sum_j (z_j - c_kj)^2 / v_kj - ||B_k^T z - B_k^T c_k||^2
    log N_k(z) + 0.5 m log 2pi = -0.5 sum_j log v_kj - sum_i log L_k,ii - 0.5 s_k(z)

so every row's ``log pi_k + log N_k + 0.5 m log 2pi`` under every cluster is ``[z*z, z, 1] @ P`` plus
``0.5 ||z @ B - b||^2`` summed per cluster over its ``r`` columns: two GEMMs of ``m x K``, one of ``m x K r`` and
a small one (``K r x K``) for the per-cluster sums.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


class MixtureParameters(NamedTuple):
    """The matrices a backend scores with, in one dtype."""

    P: np.ndarray  # (2m + 1, K): [z*z, z, 1] @ P = log pi_k - 0.5 log|C_k| - 0.5 (diagonal part of s_k)
    log_norm: np.ndarray  # (K,): log pi_k - 0.5 log|C_k|, so that s_own = 2 (log_norm[own] - logp[own])
    directions: np.ndarray  # (m, K r): B_1 .. B_K side by side (no columns when r = 0)
    offsets: np.ndarray  # (K r,): B_k^T c_k
    halves: np.ndarray  # (K r, K): 0.5 where column k's r rows are, so that (g * g) @ halves sums each cluster's r
    rank: int  # r


def shrunk(variances: np.ndarray, factors: Optional[np.ndarray], a) -> tuple:
    """``(v, U)`` of ``(1 - a) C + a I`` (the covariance shrunk toward the global one, ``I`` in these coordinates):
    ``v' = (1 - a) v + a``, ``U' = sqrt(1 - a) U``; ``a`` a number or one value per cluster (K,)."""
    a = np.asarray(a, dtype=np.float64)
    col = a[:, None] if a.ndim else a
    v = (1.0 - col) * variances + col
    if factors is None or not factors.shape[2]:
        return v, factors
    scale = np.sqrt(1.0 - col)
    return v, factors * (scale[..., None] if a.ndim else scale)


def mixture_parameters(weights: np.ndarray, means: np.ndarray, variances: np.ndarray,
                       factors: Optional[np.ndarray] = None, dtype=np.float64) -> MixtureParameters:
    """:class:`MixtureParameters` of the mixture (float64 arithmetic, the result in ``dtype``). Without factors
    (or with ``r = 0``) ``P`` and ``log_norm`` are the diagonal model's, bit for bit as before factors existed."""
    k, m = means.shape
    inv = 1.0 / variances
    log_norm = np.log(weights) - 0.5 * np.sum(np.log(variances), axis=1)
    rank = 0 if factors is None else int(factors.shape[2])
    directions, offsets = np.zeros((m, 0)), np.zeros(0)
    if rank:
        scaled = factors * inv[:, :, None]  # diag(1/v) U, (K, m, r)
        inner = np.eye(rank) + np.einsum("kmr,kms->krs", factors, scaled)
        chol = np.linalg.cholesky(inner)
        B = np.linalg.solve(chol, scaled.transpose(0, 2, 1)).transpose(0, 2, 1)  # diag(1/v) U L^-T
        log_norm = log_norm - np.sum(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
        offsets = np.einsum("km,kmr->kr", means, B).reshape(k * rank)
        directions = B.transpose(1, 0, 2).reshape(m, k * rank)
    P = np.concatenate([-0.5 * inv.T, (means * inv).T, (log_norm - 0.5 * np.sum(means ** 2 * inv, axis=1))[None, :]])
    halves = np.kron(np.eye(k), np.full((rank, 1), 0.5))
    return MixtureParameters(*(np.ascontiguousarray(x, dtype=dtype) for x in (P, log_norm, directions, offsets,
                                                                             halves)), rank)


def covariances(variances: np.ndarray, factors: Optional[np.ndarray]) -> np.ndarray:
    """Every cluster's full covariance ``diag(v_k) + U_k U_k^T`` (K, m, m): for oracles and diagnostics only."""
    full = np.stack([np.diag(v) for v in variances])
    if factors is not None and factors.shape[2]:
        full = full + np.einsum("kmr,knr->kmn", factors, factors)
    return full

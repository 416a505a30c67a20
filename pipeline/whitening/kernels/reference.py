"""The float64 oracle every scoring backend is compared with, and its error bounds (no torch at import).

* :func:`reference_scores` / :func:`reference_whiten`: float64 NumPy, the oracle every fast
  path is compared with.
* :func:`whiten_error_bound` / :func:`sqnorm_error_bound`: worst-case errors of a fast path
  whose inputs were rounded to a narrower format and whose arithmetic is fp32 (docs/gpu.md
  derives them); :func:`sqnorm_error_sigma`: the typical size of the input-rounding part.
* :func:`check_parameters`: the one check of a whitener's ``mean`` and ``whitening``, shared by every backend.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.whitening.formulas import loglik_from_sqnorm

__all__ = ["reference_scores", "reference_whiten", "whiten_error_bound", "sqnorm_error_bound",
           "sqnorm_error_sigma", "INPUT_ROUNDING", "check_parameters"]

#: Per input format: (unit roundoff u, underflow floor eta) with |round(x) - x| <= u|x| + eta.
INPUT_ROUNDING = {
    "float32": (2.0 ** -24, 2.0 ** -150),
    "float16": (2.0 ** -11, 2.0 ** -25),
    "bfloat16": (2.0 ** -8, 2.0 ** -134),
}
_FP32_EPS = 2.0 ** -24


def check_parameters(mean, whitening) -> tuple[np.ndarray, np.ndarray]:
    """``mean`` (d,) and ``whitening`` (d, m) as finite float64 arrays, or a ValueError naming the problem."""
    mu = np.asarray(mean, dtype=np.float64)
    W = np.asarray(whitening, dtype=np.float64)
    if mu.ndim != 1 or mu.size == 0:
        raise ValueError(f"mean must be a non-empty 1-D array (d,); got shape {mu.shape}")
    if W.ndim != 2 or W.shape[0] != mu.size or W.shape[1] == 0:
        raise ValueError(f"whitening must have shape (d, m) = ({mu.size}, m>=1) to match the "
                         f"mean; got {W.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(W).all()):
        raise ValueError("mean and whitening must be finite (NaN or inf found)")
    return np.ascontiguousarray(mu), np.ascontiguousarray(W)


def _rows64(x, d: int) -> np.ndarray:
    """``x`` (array or tensor of any float dtype) as a float64 (B, d) array."""
    if type(x).__module__.startswith("torch"):  # a tensor (torch is imported by whoever made one)
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x must have shape (B, {d}); got {x.shape}")
    return x


def reference_whiten(x, mean, whitening) -> np.ndarray:
    """Whitened rows ``(x - mean) @ whitening`` in float64, shape (B, m)."""
    mu, W = check_parameters(mean, whitening)
    return (_rows64(x, mu.size) - mu) @ W


def reference_scores(x, mean, whitening) -> tuple[np.ndarray, np.ndarray]:
    """``(sqnorm, loglik)`` in float64, each (B,): the oracle for every fast path."""
    w = reference_whiten(x, mean, whitening)
    sqnorm = np.einsum("ij,ij->i", w, w)
    return sqnorm, loglik_from_sqnorm(sqnorm, w.shape[1])


def whiten_error_bound(x, mean, whitening, unit_roundoff: float = 0.0, underflow: float = 0.0,
                       work_eps: float = _FP32_EPS) -> np.ndarray:
    """Worst-case ``|w_computed - w_exact|`` per element (B, m).

    ``x`` holds the exact embeddings; the computation sees them rounded with
    ``|x~ - x| <= unit_roundoff |x| + underflow`` (see :data:`INPUT_ROUNDING`), stores
    ``mean`` and ``whitening`` with relative error ``work_eps`` and accumulates ``d`` terms
    with unit roundoff ``work_eps``: ``E_j = 1.01 * sum_k |W_kj| (u |x_k| + eta
    + (d + 3) eps (|x_k| + |mu_k|))``. The factor 1.01 covers second-order terms while
    ``u`` and ``(d + 3) eps`` stay below 2^-7.
    """
    mu, W = check_parameters(mean, whitening)
    x = _rows64(x, mu.size)
    d = W.shape[0]
    if max(unit_roundoff, (d + 3) * work_eps) > 2.0 ** -7:
        raise ValueError("the first-order bound needs u and (d+3)*eps <= 2^-7")
    absW = np.abs(W)
    return 1.01 * ((unit_roundoff * np.abs(x) + underflow) @ absW
                   + (d + 3) * work_eps * ((np.abs(x) + np.abs(mu)) @ absW))


def sqnorm_error_bound(x, mean, whitening, unit_roundoff: float = 0.0, underflow: float = 0.0,
                       work_eps: float = _FP32_EPS) -> np.ndarray:
    """Worst-case ``|sqnorm_computed - sqnorm_exact|`` per row (B,).

    With ``E`` from :func:`whiten_error_bound` (same arguments) and ``gamma_m = m eps /
    (1 - m eps)`` for the final sum of squares:
    ``|ds| <= 2 ||w|| ||E|| + ||E||^2 + gamma_m (||w|| + ||E||)^2``.
    """
    mu, W = check_parameters(mean, whitening)
    m = W.shape[1]
    if m * work_eps > 2.0 ** -7:
        raise ValueError("the first-order bound needs m*eps <= 2^-7")
    enorm = np.linalg.norm(whiten_error_bound(x, mu, W, unit_roundoff, underflow, work_eps), axis=1)
    wnorm = np.linalg.norm(reference_whiten(x, mu, W), axis=1)
    gamma_m = m * work_eps / (1.0 - m * work_eps)
    return 2.0 * wnorm * enorm + enorm ** 2 + gamma_m * (wnorm + enorm) ** 2


def sqnorm_error_sigma(x, mean, whitening, unit_roundoff: float) -> np.ndarray:
    """Typical size (standard deviation) of the sqnorm error caused by rounding ``x``, per row.

    Model: independent relative rounding errors uniform in ``[-u, u]``, so to first order
    ``ds = 2 w . (delta W)`` with ``sigma^2 = (4 u^2 / 3) sum_j w_j^2 sum_k x_k^2 W_kj^2``.
    Real rounding errors are on average somewhat smaller than the uniform model.
    """
    mu, W = check_parameters(mean, whitening)
    x = _rows64(x, mu.size)
    w = (x - mu) @ W
    return (2.0 * unit_roundoff / math.sqrt(3.0)) * np.sqrt(
        np.einsum("ij,ij->i", w * w, (x * x) @ (W * W)))

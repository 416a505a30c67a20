"""Reference scoring paths: the float64 NumPy oracle, its error bounds, and the torch whiteners.

* :func:`reference_scores` / :func:`reference_whiten`: float64 NumPy, the oracle every fast
  path is compared with.
* :func:`whiten_error_bound` / :func:`sqnorm_error_bound`: worst-case errors of a fast path
  whose inputs were rounded to a narrower format and whose arithmetic is fp32 (docs/gpu.md
  derives them); :func:`sqnorm_error_sigma`: the typical size of the input-rounding part.
* :class:`TorchWhitener`: float64 torch on any device; the CPU fallback of
  :func:`pipeline.whitening.kernels.make_whitener`.
* :class:`GemmWhitener`: the unfused torch expression (one fp32 GEMM plus a norm
  reduction), the GPU competitor of the fused kernel.

All whiteners share ``d``, ``m``, ``score(x) -> (sqnorm, loglik)`` (float32 tensors of shape
``(B,)`` on ``x``'s device), ``whiten(x) -> (B, m)`` float32 and ``score_and_whiten(x)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.whitening.formulas import LOG_2PI

__all__ = ["reference_scores", "reference_whiten", "whiten_error_bound", "sqnorm_error_bound",
           "sqnorm_error_sigma",
           "INPUT_ROUNDING", "TorchWhitener", "GemmWhitener", "check_parameters", "LOG_2PI"]

#: Per input format: (unit roundoff u, underflow floor eta) with |round(x) - x| <= u|x| + eta.
INPUT_ROUNDING = {
    "float32": (2.0 ** -24, 2.0 ** -150),
    "float16": (2.0 ** -11, 2.0 ** -25),
    "bfloat16": (2.0 ** -8, 2.0 ** -134),
}
_FP32_EPS = 2.0 ** -24
_TORCH_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    if isinstance(x, torch.Tensor):
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
    loglik = -0.5 * (w.shape[1] * LOG_2PI + sqnorm)
    return sqnorm, loglik


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


class _TorchBase:
    """Parameters on one device and input checks shared by the torch whiteners."""

    def __init__(self, mean, whitening, device=None, dtype=torch.float64):
        mu, W = check_parameters(mean, whitening)
        self.d, self.m = W.shape
        self.device = torch.device(device if device is not None else "cpu")
        self._dtype = dtype
        # copies: the arrays may be read-only (Ray's object store, a memory-mapped stats file)
        self._mean = torch.tensor(mu, device=self.device, dtype=dtype)
        self._proj = torch.tensor(W, device=self.device, dtype=dtype)
        self._half_m_log2pi = 0.5 * self.m * LOG_2PI

    def _input(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor or numpy array; got {type(x).__name__}")
        if x.dtype not in _TORCH_FLOATS:
            raise TypeError(f"x must be float64/32/16 or bfloat16; got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (B, {self.d}); got {tuple(x.shape)}")
        return x.to(self.device)

    def _whitened(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self._dtype) - self._mean) @ self._proj

    def _scores(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sq = torch.linalg.vecdot(w, w) if self._dtype == torch.float64 else \
            torch.linalg.vector_norm(w, dim=1).square()
        loglik = -(self._half_m_log2pi + 0.5 * sq)
        return sq.to(torch.float32), loglik.to(torch.float32)

    def score(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqnorm, loglik)``, float32 tensors of shape (B,) on this whitener's device."""
        return self._scores(self._whitened(self._input(x)))

    def whiten(self, x) -> torch.Tensor:
        """Whitened rows, float32 (B, m)."""
        return self._whitened(self._input(x)).to(torch.float32)

    def score_and_whiten(self, x):
        """``(sqnorm, loglik, whitened)`` from one pass."""
        w = self._whitened(self._input(x))
        return (*self._scores(w), w.to(torch.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, m={self.m}, device={self.device})"


class TorchWhitener(_TorchBase):
    """Float64 torch whitener on any device: the reference-quality fallback path."""

    def __init__(self, mean, whitening, device=None):
        super().__init__(mean, whitening, device, dtype=torch.float64)


class GemmWhitener(_TorchBase):
    """Unfused fp32 torch path: ``w = (x - mu) @ W`` by cuBLAS, then a norm reduction.

    The GEMM follows torch's fp32 matmul setting: IEEE fp32 by default, TF32 after
    ``torch.set_float32_matmul_precision("high")`` or
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (faster, but then sqnorm has
    relative errors around 1e-3 instead of 1e-6).
    """

    def __init__(self, mean, whitening, device=None):
        super().__init__(mean, whitening, device, dtype=torch.float32)

"""The torch backend: whiteners and the local likelihood's mixture on any torch device.

* :class:`TorchWhitener`: float64 torch on any device; the tar path's whitener on CPUs (and on GPUs without CuPy).
* :class:`GemmWhitener`: the unfused torch expression (one fp32 GEMM plus a norm reduction), the GPU competitor
  of the fused kernel.
* :class:`TorchMixture`: the mixture of :meth:`pipeline.whitening.clusters.ClusterWhitening.mixture` on the
  whitened rows a whitener already made (:meth:`score_and_whiten`), so that on a GPU nothing goes back to the
  host but three numbers a row: one GEMM against every cluster at once (``[w*w, w, 1] @ P``, ``(2m + 1) x K``),
  one more for the clusters' own directions (``w @ B``, ``m x K r``), a row-wise max and a log-sum-exp; float32
  on CUDA, float64 elsewhere.

The whiteners share ``d``, ``m``, ``score(x) -> (sqnorm, loglik)`` (float32 tensors of shape ``(B,)`` on the
whitener's device), ``whiten(x) -> (B, m)`` float32 and ``score_and_whiten(x)``; every log-likelihood comes from
:mod:`pipeline.whitening.formulas`.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.whitening.formulas import gaussian_loglik, half_m_log_2pi
from pipeline.whitening.kernels.reference import check_parameters

__all__ = ["TorchWhitener", "GemmWhitener", "TorchMixture"]

_TORCH_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
        return sq.to(torch.float32), gaussian_loglik(sq, self.m).to(torch.float32)

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


class TorchMixture:
    """Scores whitened rows against one tower's clusters on ``device`` (float32 on CUDA, float64 elsewhere)."""

    def __init__(self, clusters, device):
        self.device = torch.device(device)
        self.k, self.m = clusters.k, clusters.components
        self.dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        params = clusters.parameters(np.float64)
        self.rank = params.rank
        self._P, self._log_norm, self._directions, self._offsets, self._halves = (
            torch.tensor(a, dtype=self.dtype, device=self.device) for a in params[:5])

    def mixture(self, w: torch.Tensor, sqnorm: torch.Tensor, loglik: torch.Tensor) -> tuple:
        """``(cluster int64, local loglik, s_own)`` tensors for whitened rows ``w`` (B, m) whose global squared
        norms and log-likelihoods are ``sqnorm`` and ``loglik``; cluster -1 and NaN where ``sqnorm`` is not
        finite. One cluster is the global Gaussian: its log-likelihood is ``loglik`` itself."""
        bad = ~torch.isfinite(sqnorm)
        if self.k == 1:
            return torch.where(bad, -1, 0), loglik, sqnorm
        z = torch.where(bad[:, None], 0.0, w.to(self.dtype))
        ones = torch.ones((z.shape[0], 1), dtype=self.dtype, device=self.device)
        logp = torch.cat([z * z, z, ones], dim=1) @ self._P  # log pi_k + log N_k + 0.5 m log 2pi, every cluster
        if self.rank:  # the clusters' own directions (pipeline.whitening.gaussians)
            g = z @ self._directions - self._offsets
            logp = logp + (g * g) @ self._halves
        top, own = logp.max(dim=1)
        s_own = (2.0 * (self._log_norm[own] - top)).clamp_(min=0.0)
        local = top + torch.log(torch.exp(logp - top[:, None]).sum(dim=1)) - half_m_log_2pi(self.m)
        nan = torch.tensor(float("nan"), dtype=self.dtype, device=self.device)
        return torch.where(bad, -1, own), torch.where(bad, nan, local), torch.where(bad, nan, s_own)

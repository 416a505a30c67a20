"""The local likelihood's mixture on the encoder's device (torch): the same computation as
:meth:`pipeline.whitening.clusters.ClusterWhitening.mixture`, on the whitened rows a whitener already made
(:meth:`score_and_whiten`), so that on a GPU nothing goes back to the host but three numbers a row.

One GEMM against every cluster at once (``[w*w, w, 1] @ P``, ``(2m + 1) x K``), a row-wise max and a log-sum-exp;
float32 on CUDA, float64 elsewhere.
"""

from __future__ import annotations

import torch

from pipeline.whitening.formulas import LOG_2PI


class TorchMixture:
    """Scores whitened rows against one tower's clusters on ``device``."""

    def __init__(self, clusters, device):
        import numpy as np

        self.device = torch.device(device)
        self.k, self.m = clusters.k, clusters.components
        self.dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        P, log_norm = clusters.parameters(np.float64)
        self._P, self._log_norm = (torch.tensor(a, dtype=self.dtype, device=self.device) for a in (P, log_norm))

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
        top, own = logp.max(dim=1)
        s_own = (2.0 * (self._log_norm[own] - top)).clamp_(min=0.0)
        local = top + torch.log(torch.exp(logp - top[:, None]).sum(dim=1)) - 0.5 * self.m * LOG_2PI
        nan = torch.tensor(float("nan"), dtype=self.dtype, device=self.device)
        return torch.where(bad, -1, own), torch.where(bad, nan, local), torch.where(bad, nan, s_own)

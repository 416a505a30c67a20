"""The embeddings path's per-block scoring through a backend: float32 rows in, NumPy scores out.

``BlockScorer(tower_stats, device, backend).score(x32)`` whitens a block of float32 rows of one tower and, when the
tower has clusters, scores them against its mixture. On the NumPy backend (the default on the CPU) this is the
embeddings path's arithmetic bit for bit: a float32 GEMM ``(x - mu) @ W`` (the parameters rounded to float32
once), ``sqnorm`` its float32 row-wise squared norm, the mixture in float32 with float64 log-sum-exp. On a torch
device (``backend`` ``torch``, ``gemm`` or, on CUDA, ``fused``/``auto``) the block goes to the device and the same
scores come back as NumPy arrays: the tar path's whiteners and mixture, to float32 rounding.

A scorer holds no per-call state: threads may share one, each passing its own ``out``/``work`` buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.whitening.kernels import make_mixture, make_whitener, resolve_backend

__all__ = ["BlockScorer", "BlockScores"]


@dataclass(frozen=True, eq=False)
class BlockScores:
    """One block's scores, NumPy arrays on the host."""

    sqnorm: np.ndarray  # float32 (n,): ||(x - mu) W||^2, NaN/inf where a row is not finite
    whitened: Optional[np.ndarray] = None  # float32 (n, m), when asked for (on NumPy: ``out``, or a new array)
    cluster: Optional[np.ndarray] = None  # int64 (n,): most likely cluster, -1 where sqnorm is not finite
    local_loglik: Optional[np.ndarray] = None  # float64 (n,): the mixture's log-likelihood, NaN where cluster -1
    s_own: Optional[np.ndarray] = None  # float64 (n,): the own cluster's squared norm, NaN where cluster -1


class BlockScorer:
    """Scores blocks of one tower's float32 rows: ``stats`` has ``.mean`` (d,), ``.whitening`` (d, m) and
    ``.clusters`` (a :class:`~pipeline.whitening.clusters.ClusterWhitening` or None), e.g. a
    :class:`~pipeline.whitening.stats.WhiteningStats`. ``backend``: ``auto`` is NumPy on the CPU and
    :func:`~pipeline.whitening.kernels.make_whitener`'s choice elsewhere; any of
    :data:`~pipeline.whitening.kernels.BACKENDS` otherwise."""

    def __init__(self, stats, device="cpu", backend: str = "auto"):
        if backend == "auto" and str(device).split(":", 1)[0] == "cpu":
            backend = "numpy"
        self.backend = resolve_backend(device, backend)
        self.device = device
        self.whitener = make_whitener(stats, device, self.backend)
        self.d, self.m = self.whitener.d, self.whitener.m
        clusters = getattr(stats, "clusters", None)
        self.mixture = None if clusters is None else make_mixture(clusters, device, self.backend)

    def work_shapes(self, rows: int) -> tuple:
        """Shapes of the float32 ``work`` arrays :meth:`score` may compute a ``rows``-row block's mixture in (on
        the NumPy backend; empty otherwise)."""
        return self.mixture.work_shapes(rows) if self.backend == "numpy" and self.mixture is not None else ()

    def score(self, x32: np.ndarray, overwrite_x: bool = False, out: Optional[np.ndarray] = None,
              work: Optional[tuple] = None, whitened: bool = False) -> BlockScores:
        """The scores of ``x32`` (float32, (n, d)). NumPy backend: ``overwrite_x`` centres ``x32`` in place (a
        scratch copy), ``out`` (float32 (n, m)) receives the whitened rows, ``work`` (:meth:`work_shapes`) holds
        the mixture's intermediates; other backends ignore them. ``whitened``: also return the whitened rows."""
        if self.backend == "numpy":
            sq, w = self.whitener.sqnorm_and_whiten(x32, out, overwrite_x)
            local = (None,) * 3 if self.mixture is None else self.mixture.mixture(w, sq, work)
            return BlockScores(sq, w if whitened else None, *local)
        return self._score_on_device(x32, whitened)

    def _score_on_device(self, x32: np.ndarray, whitened: bool) -> BlockScores:
        import torch

        if not isinstance(x32, np.ndarray) or x32.dtype != np.float32:
            raise TypeError(f"x must be a float32 numpy array; got {getattr(x32, 'dtype', type(x32).__name__)}")
        with torch.inference_mode():
            x = torch.from_numpy(x32).to(self.whitener.device)
            sq, ll, w = self.whitener.score_and_whiten(x)
            local = (None,) * 3
            if self.mixture is not None:
                cluster, loglik, s_own = (t.cpu().numpy() for t in self.mixture.mixture(w, sq, ll))
                local = (cluster.astype(np.int64, copy=False), loglik.astype(np.float64, copy=False),
                         s_own.astype(np.float64, copy=False))
            return BlockScores(sq.cpu().numpy(), w.cpu().numpy() if whitened else None, *local)

"""The local (cluster-conditional) likelihood: a Gaussian mixture in the global whitened space.

The global fit whitens ``x`` to ``z = (x - mu) W`` (``m`` coordinates), where the reference looks like
``N(0, I)``. A web corpus is a mixture of modes, so the fit also partitions the reference into ``K``
clusters and gives each its own Gaussian in those coordinates:

* **clusters**: spherical k-means (cosine; k-means++ seeding, Lloyd iterations, exact NumPy) of a sample
  of fit rows, centred on the global mean (every CLIP embedding shares one large direction, which would
  otherwise dominate every cosine). Exact NumPy rather than faiss: a sample of 10^5 rows
  clusters in seconds, the result is deterministic for a seed, and no native dependency is added.
* **per-cluster whitening**: mean ``c_k`` and per-coordinate variance of the cluster's ``z`` rows, shrunk
  toward the global covariance (``I`` in these coordinates): ``v_k = (1 - a) var_k + a``. The covariance is
  diagonal in the global eigenbasis, which is what makes every row's likelihood under *all* clusters one
  GEMM (``[z*z, z] @ [1/v; -2c/v]``, ``2m x K``) instead of ``K`` whitenings.
* **shrinkage ``a``**: chosen on the held-out rows, the value of :data:`SHRINKAGE_GRID` that maximises
  their mean mixture log-likelihood (small clusters get noisy variances; the held-out rows say how much
  to trust them).
* **weights** ``pi_k``: the clusters' shares of the sample.
* **calibration**: the held-out rows' ``s_k`` (squared norm in their most likely cluster's whitening),
  sorted per cluster: a row's local p-value is the share of its cluster's held-out rows that were less likely.

Scores of a row (:meth:`ClusterWhitening.score`): ``s_k = sum_j (z_j - c_kj)^2 / v_kj``,
``log N_k = -0.5 (m log 2pi + s_k) - 0.5 sum_j log v_kj``; ``cluster`` = the most likely component,
``local_loglik = log sum_k pi_k N_k(z)`` (log-sum-exp), in the units of the global log-likelihood: add the
global ``log_det`` for the density of ``x`` in the kept subspace. One cluster *is* the global Gaussian
(``c = 0``, ``v = 1``, the global calibration), and scores exactly as the global fit does.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from pipeline.whitening.formulas import loglik_from_sqnorm, pvalue_from_sqnorm
from pipeline.whitening.kernels.numpy_backend import NumpyMixture

#: Shrinkage values tried on the held-out rows (1.0: every cluster keeps the global covariance).
SHRINKAGE_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
#: Lloyd iterations of the spherical k-means at most (it stops when no assignment changes).
KMEANS_MAX_ITER = 100
#: Held-out rows a cluster needs before its local p-values are worth a warning-free fit (p >= 1/(n + 1)).
MIN_HELDOUT_PER_CLUSTER = 100
#: Cosine gap below which two unit rows count as one direction: k-means stops seeding when every row is this
#: close to a chosen centre (there are no more distinct directions to make clusters of).
SAME_DIRECTION = 1e-6
#: Tensors of a clustered tower in a stats file, under ``{tower}.clusters.``.
CLUSTER_TENSORS = ("means", "variances", "weights", "calibration", "calibration_counts")


def check_clusters(k) -> int:
    """``k`` as a cluster count (an int >= 1), or a ValueError naming the bad value."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"clusters must be an integer >= 1; got {k!r}")
    return int(k)


def spherical_kmeans(X: np.ndarray, k: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER) -> np.ndarray:
    """Cluster labels (int64, one per row) of the rows of ``X`` by cosine: k-means++ seeding on ``1 - cos``,
    then Lloyd iterations on the unit sphere until no label changes; an emptied cluster is reseeded with the
    row farthest from its centre. Rows with fewer than ``k`` distinct directions (duplicates) get fewer
    clusters: seeding stops when every row is a chosen centre (within :data:`SAME_DIRECTION`), so the labels
    are ``0 .. j - 1`` with ``j`` the number of distinct directions."""
    U = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(U, axis=1, keepdims=True)
    U = (U / np.where(norms > 0, norms, 1.0)).astype(np.float32)  # cosines need no more; half the GEMMs' time
    n = U.shape[0]
    if n < k:
        raise ValueError(f"cannot make {k} clusters of {n} rows: pass fewer clusters or more reference rows")
    rng = np.random.default_rng(seed)
    centres = np.empty((k, U.shape[1]), dtype=np.float32)
    centres[0] = U[rng.integers(n)]
    dist = np.maximum(1.0 - (U @ centres[0]).astype(np.float64), 0.0)
    for j in range(1, k):
        if dist.max() < SAME_DIRECTION:  # every row is one of the j centres: no distinct row left to seed
            k, centres = j, centres[:j]
            break
        total = dist.sum()
        pick = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centres[j] = U[pick]
        dist = np.minimum(dist, np.maximum(1.0 - (U @ centres[j]).astype(np.float64), 0.0))
    labels = None
    for _ in range(max_iter):
        cos = U @ centres.T
        new = np.argmax(cos, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        members = np.zeros((k, n), dtype=np.float32)
        members[labels, np.arange(n)] = 1.0
        sums = members @ U  # a GEMM: np.add.at takes seconds per iteration at 50k x 768
        counts = np.bincount(labels, minlength=k)
        for j in np.flatnonzero(counts == 0):  # reseed: the row least like its own centre
            far = int(np.argmin(cos[np.arange(n), labels]))
            sums[j], labels[far] = U[far], j
            cos[far, :] = np.inf
        lengths = np.linalg.norm(sums, axis=1, keepdims=True)
        centres = sums / np.where(lengths > 0, lengths, 1.0)
    return labels


def _used_labels(labels: np.ndarray, k: int) -> tuple:
    """``(labels, clusters)``: the labels renumbered ``0 .. j - 1`` over the ``j`` of ``0 .. k - 1`` that have
    rows (k-means of fewer distinct rows than ``k`` leaves some without any)."""
    used = np.flatnonzero(np.bincount(labels, minlength=k))
    if used.size == k:
        return labels, k
    renumber = np.zeros(k, dtype=np.int64)
    renumber[used] = np.arange(used.size)
    return renumber[labels], int(used.size)


@dataclass(frozen=True, eq=False)
class LocalScores:
    """A block of rows scored against the mixture: float64 except ``cluster``."""

    cluster: np.ndarray  # int64 most likely component
    loglik: np.ndarray  # log sum_k pi_k N_k(z), in the global log-likelihood's units
    sqnorm: np.ndarray  # s_k of the row's own cluster
    pvalue: np.ndarray  # share of that cluster's held-out rows that were less likely (NaN: none held out)


@dataclass(frozen=True, eq=False)
class ClusterWhitening:
    """Per-cluster Gaussians in the global whitened coordinates (see the module's docstring)."""

    means: np.ndarray  # (K, m) cluster means c_k
    variances: np.ndarray  # (K, m) per-coordinate variances v_k, after shrinkage
    weights: np.ndarray  # (K,) mixture weights, summing to 1
    calibration: np.ndarray  # sorted held-out s_k of cluster 0, then cluster 1, ...
    calibration_counts: np.ndarray  # (K,) held-out rows per cluster
    shrinkage: float = 1.0  # a in v_k = (1 - a) var_k + a
    diagnostics: dict = field(default_factory=dict)  # fit-time numbers (sizes, held-out log-likelihoods)

    def __post_init__(self):
        for name in CLUSTER_TENSORS:
            arr = np.array(getattr(self, name), dtype=np.float64, order="C")
            if not np.isfinite(arr).all():
                raise ValueError(f"clusters.{name} contains NaN or infinite values")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        k = self.weights.size
        if self.means.ndim != 2 or self.means.shape[0] != k or self.variances.shape != self.means.shape \
                or self.calibration_counts.shape != (k,) or self.calibration.ndim != 1 or k < 1:
            raise ValueError(f"inconsistent cluster shapes: means {self.means.shape}, variances "
                             f"{self.variances.shape}, weights {self.weights.shape}, calibration counts "
                             f"{self.calibration_counts.shape}")
        if np.any(self.variances <= 0) or np.any(self.weights <= 0) or abs(self.weights.sum() - 1.0) > 1e-9:
            raise ValueError("cluster variances and weights must be positive, and the weights sum to 1")
        counts = self.calibration_counts
        if np.any(counts < 0) or np.any(counts != np.round(counts)) or counts.sum() != self.calibration.size:
            raise ValueError("clusters.calibration_counts must be whole numbers adding up to the calibration size")
        for table in self.tables():
            if np.any(np.diff(table) < 0) or np.any(table < 0):
                raise ValueError("each cluster's calibration must be sorted non-negative sqnorms")
        object.__setattr__(self, "shrinkage", float(self.shrinkage))
        object.__setattr__(self, "diagnostics", dict(self.diagnostics))
        object.__setattr__(self, "_cache", {})

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def single(cls, components: int, calibration: np.ndarray) -> "ClusterWhitening":
        """One cluster: the global Gaussian itself (``c = 0``, ``v = 1``, the global calibration)."""
        return cls(means=np.zeros((1, components)), variances=np.ones((1, components)), weights=np.ones(1),
                   calibration=calibration, calibration_counts=np.array([calibration.size]), shrinkage=1.0,
                   diagnostics={"sizes": None})

    @classmethod
    def fit(cls, z_sample: np.ndarray, z_heldout: np.ndarray, labels: np.ndarray, k: int,
            global_calibration: np.ndarray) -> "ClusterWhitening":
        """Per-cluster Gaussians of whitened sample rows ``z_sample`` grouped by ``labels`` (from
        :func:`spherical_kmeans`), with the shrinkage chosen and the calibration taken on ``z_heldout``.
        Labels without rows (fewer distinct sample rows than ``k``) are dropped: the fit has fewer clusters,
        and ``diagnostics["k_requested"]`` keeps ``k`` for :meth:`warnings`."""
        requested = check_clusters(k)
        m = z_sample.shape[1]
        labels, k = _used_labels(np.asarray(labels), requested)
        if k == 1:
            single = cls.single(m, global_calibration)
            return single if requested == 1 else replace(single, diagnostics={"sizes": None,
                                                                              "k_requested": requested})
        if z_heldout.shape[0] == 0:
            raise ValueError("clusters choose their shrinkage on held-out rows, but there are none: use "
                             "holdout > 0 (e.g. 0.1)")
        sizes = np.bincount(labels, minlength=k)
        means = np.zeros((k, m))
        raw = np.ones((k, m))
        for j in range(k):
            rows = z_sample[labels == j]
            means[j] = rows.mean(axis=0)
            if rows.shape[0] > 1:
                raw[j] = rows.var(axis=0, ddof=1)
        weights = sizes / sizes.sum()
        heldout_loglik = {}
        for a in SHRINKAGE_GRID:
            trial = cls(means=means, variances=(1.0 - a) * raw + a, weights=weights, calibration=np.zeros(0),
                        calibration_counts=np.zeros(k), shrinkage=a)
            heldout_loglik[a] = float(np.mean(NumpyMixture(trial).terms(z_heldout)[0]))
        best = max(SHRINKAGE_GRID, key=lambda a: (heldout_loglik[a], a))
        variances = (1.0 - best) * raw + best
        chosen = cls(means=means, variances=variances, weights=weights, calibration=np.zeros(0),
                     calibration_counts=np.zeros(k), shrinkage=best)
        _, own, s_own = NumpyMixture(chosen).terms(z_heldout)
        tables = [np.sort(s_own[own == j]) for j in range(k)]
        diagnostics = {"sizes": sizes.tolist(), "heldout_sizes": [t.size for t in tables],
                       **({"k_requested": requested} if requested != k else {}),
                       "heldout_local_loglik": {str(a): v for a, v in heldout_loglik.items()},
                       "heldout_global_loglik": float(np.mean(loglik_from_sqnorm(np.sum(z_heldout ** 2, 1), m)))}
        return cls(means=means, variances=variances, weights=weights, calibration=np.concatenate(tables),
                   calibration_counts=np.array([t.size for t in tables]), shrinkage=best, diagnostics=diagnostics)

    # ---- shape ----------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.weights.size

    @property
    def components(self) -> int:
        return self.means.shape[1]

    def work_shapes(self, rows: int) -> tuple:
        """The shapes of the work arrays :meth:`mixture` computes ``rows`` rows in."""
        return NumpyMixture(self).work_shapes(rows)

    def tables(self) -> list:
        """Each cluster's sorted held-out ``s_k``."""
        ends = np.cumsum(self.calibration_counts.astype(np.int64))
        return np.split(self.calibration, ends[:-1])

    def parameters(self, dtype) -> tuple:
        """``(P (2m + 1, K), log_norm (K,))`` in ``dtype``: ``[z*z, z, 1] @ P`` is every cluster's
        ``log pi_k + log N_k(z) + 0.5 m log 2pi = log_norm_k - 0.5 s_k`` at once (one GEMM), where ``log_norm_k
        = log pi_k - 0.5 sum_j log v_kj``."""
        key = np.dtype(dtype).str
        if key not in self._cache:
            inv = 1.0 / self.variances
            log_norm = np.log(self.weights) - 0.5 * np.sum(np.log(self.variances), axis=1)
            P = np.concatenate([-0.5 * inv.T, (self.means * inv).T,
                                (log_norm - 0.5 * np.sum(self.means ** 2 * inv, axis=1))[None, :]])
            self._cache[key] = (np.ascontiguousarray(P, dtype=dtype), np.ascontiguousarray(log_norm, dtype=dtype))
        return self._cache[key]

    # ---- scores ---------------------------------------------------------------------------
    def mixture(self, z: np.ndarray, sqnorm: np.ndarray, work: Optional[tuple] = None) -> tuple:
        """``(cluster, loglik, s_own)`` of whitened rows ``z`` (n, m; float32 or float64) whose global squared
        norms are ``sqnorm``: :meth:`score` without the p-values, by the NumPy backend
        (:class:`~pipeline.whitening.kernels.numpy_backend.NumpyMixture`). Rows whose ``sqnorm`` is not finite get
        NaN (cluster -1). One cluster scores exactly as the global fit: ``loglik`` is that of ``sqnorm``.
        ``work``: arrays to compute in (see :meth:`work_shapes`), reused by a caller that scores many blocks."""
        return NumpyMixture(self).mixture(z, sqnorm, work)

    def score(self, z: np.ndarray, sqnorm: np.ndarray) -> LocalScores:
        """Local scores of whitened rows ``z`` (n, m) whose global squared norms are ``sqnorm`` (see
        :meth:`mixture`); one cluster's ``loglik`` and ``pvalue`` are exactly the global ones."""
        cluster, loglik, s_own = self.mixture(z, sqnorm)
        return LocalScores(cluster=cluster, loglik=loglik, sqnorm=s_own, pvalue=self.pvalue(cluster, s_own))

    def pooled_table(self) -> np.ndarray:
        """Every cluster's held-out ``s_own`` in one sorted table: the calibration of a cluster that has no
        held-out row of its own (a row's ``s_own`` against all held-out rows' ``s_own`` in their clusters)."""
        if "pooled" not in self._cache:
            self._cache["pooled"] = np.sort(self.calibration)
        return self._cache["pooled"]

    def pvalue(self, cluster: np.ndarray, s_own: np.ndarray) -> np.ndarray:
        """Empirical p-value of each row's ``s_own`` against its cluster's held-out table (NaN for cluster -1;
        a cluster with no held-out row uses :meth:`pooled_table`): rows grouped by cluster, each group looked
        up in order."""
        cluster = np.asarray(cluster)
        s_own = np.asarray(s_own, dtype=np.float64)
        out = np.full(cluster.shape, np.nan)
        order = np.argsort(cluster, kind="stable")
        starts = np.searchsorted(cluster[order], np.arange(self.k + 1))
        for j, table in enumerate(self.tables()):
            rows = order[starts[j]:starts[j + 1]]
            table = table if table.size else self.pooled_table()
            if table.size and rows.size:
                out[rows] = pvalue_from_sqnorm(s_own[rows], table)
        return out

    def warnings(self, tower: str) -> list:
        """Lines worth a user's attention: fewer clusters than asked for (too few distinct reference rows),
        clusters without held-out rows (their p-values use the pooled table) and clusters whose held-out rows
        are too few for fine p-values (a cluster with n held-out rows gives no local p-value below 1 / (n + 1))."""
        lines = []
        requested = self.diagnostics.get("k_requested")
        if requested and requested != self.k:
            lines.append(f"{tower}: asked for {requested} clusters, fitted {self.k}: the reference sample has only "
                         f"{self.k} distinct direction(s), and a cluster of copies of one row cannot be calibrated")
        counts = self.calibration_counts.astype(int)
        empty = int(np.sum(counts == 0))
        if self.k > 1 and empty:
            lines.append(f"{tower}: {empty} of {self.k} clusters have no held-out row: their rows' local p-values "
                         f"are taken against all clusters' held-out rows (pooled); use fewer --clusters, a larger "
                         f"--holdout or more reference rows")
        coarse = np.flatnonzero((counts > 0) & (counts < MIN_HELDOUT_PER_CLUSTER))
        if self.k == 1 or not coarse.size:
            return lines
        fewest = counts[coarse].min()
        return lines + [f"{tower}: {coarse.size} of {self.k} clusters have fewer than {MIN_HELDOUT_PER_CLUSTER} "
                        f"held-out rows (the fewest: {fewest}), so their local p-values cannot go below "
                        f"{1 / (fewest + 1):.3f}: use fewer --clusters, a larger --holdout or more reference rows "
                        f"for finer ones"]

    def summary(self) -> dict:
        """JSON-able numbers describing the clusters (for the stats file and the card)."""
        return {"k": self.k, "shrinkage": self.shrinkage, "weights": self.weights.tolist(),
                "calibration_counts": [int(c) for c in self.calibration_counts], **self.diagnostics}

    def tensors(self) -> dict:
        """The arrays a stats file stores (:data:`CLUSTER_TENSORS`)."""
        return {name: getattr(self, name) for name in CLUSTER_TENSORS}

"""The local (cluster-conditional) likelihood: a Gaussian mixture in the global whitened space.

The global fit whitens ``x`` to ``z = (x - mu) W`` (``m`` coordinates), where the reference looks like
``N(0, I)``. A web corpus is a mixture of modes, so the fit also partitions the reference into ``K``
clusters and gives each its own Gaussian in those coordinates:

* **clusters**: spherical k-means with restarts (:mod:`pipeline.whitening.kmeans`) of a sample of fit rows,
  centred on the global mean (every CLIP embedding shares one large direction, which would otherwise dominate
  every cosine), then **EM of the mixture itself** on the sample (:mod:`pipeline.whitening.em`): soft
  assignments, weights, means, variances and each cluster's own directions.
* **per-cluster covariance**: ``C_k = diag(v_k) + U_k U_k^T`` in the global eigenbasis, ``U_k`` the cluster's
  ``r`` leading directions (``r`` chosen on held-out rows over :data:`~pipeline.whitening.em.RANK_GRID`;
  ``r = 0``: a diagonal covariance, the model of stats files before ``wclip-stats/4``), so that clusters
  oriented differently from the global eigenbasis are modelled. Every row's likelihood under *all* clusters
  stays a few GEMMs (:mod:`pipeline.whitening.gaussians`) instead of ``K`` whitenings.
* **shrinkage per cluster** ``a_k``: ``(1 - a_k) C_k + a_k I`` (toward the global covariance), chosen on the
  held-out rows (:func:`~pipeline.whitening.em.choose_shrinkage`); ``shrinkage`` is the best single value.
* **weights** ``pi_k``: EM's; **K**: given, or ``auto`` (:data:`AUTO`): the K of :data:`AUTO_GRID` whose
  mixture has the largest held-out mean log-likelihood (K = 1, the global Gaussian, included), the curve kept.
* **calibration**: the held-out rows' ``s_k`` (squared Mahalanobis norm in their most likely cluster), sorted
  per cluster: a row's local p-value is the share of its cluster's held-out rows that were less likely.

Scores of a row (:meth:`ClusterWhitening.score`): ``s_k = (z - c_k)^T C_k^-1 (z - c_k)``,
``log N_k = -0.5 (m log 2pi + s_k) - 0.5 log|C_k|``; ``cluster`` = the most likely component,
``local_loglik = log sum_k pi_k N_k(z)`` (log-sum-exp), in the units of the global log-likelihood: add the
global ``log_det`` for the density of ``x`` in the kept subspace. One cluster *is* the global Gaussian
(``c = 0``, ``v = 1``, the global calibration), and scores exactly as the global fit does.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from pipeline.whitening.em import SHRINKAGE_GRID, fit_mixture
from pipeline.whitening.formulas import loglik_from_sqnorm, pvalue_from_sqnorm
from pipeline.whitening.gaussians import MixtureParameters, mixture_parameters, shrunk
from pipeline.whitening.kernels.numpy_backend import NumpyMixture
from pipeline.whitening.kmeans import KMEANS_MAX_ITER, SAME_DIRECTION, spherical_kmeans

__all__ = ["ClusterWhitening", "LocalScores", "AUTO", "AUTO_GRID", "check_clusters", "spherical_kmeans",
           "SHRINKAGE_GRID", "KMEANS_MAX_ITER", "SAME_DIRECTION", "CLUSTER_TENSORS", "OPTIONAL_TENSORS"]

#: Held-out rows a cluster needs before its local p-values are worth a warning-free fit (p >= 1/(n + 1)).
MIN_HELDOUT_PER_CLUSTER = 100
#: Tensors of a clustered tower in a stats file, under ``{tower}.clusters.``.
CLUSTER_TENSORS = ("means", "variances", "weights", "calibration", "calibration_counts")
#: ... and those only a fit with per-cluster directions writes (``wclip-stats/4``).
OPTIONAL_TENSORS = ("factors",)
#: The K ``--clusters auto`` tries (those with at least :data:`AUTO_MIN_ROWS` sampled rows per cluster).
AUTO_GRID = (1, 2, 4, 8, 16, 32, 64)
AUTO_MIN_ROWS = 20


class AutoClusters(int):
    """``--clusters auto``: K chosen on held-out rows over :data:`AUTO_GRID`. An int (2, the smallest K above one
    it can choose) so that every check of a requested cluster count treats it as clusters (held-out rows and a
    fit sample are needed); it prints, and compares equal only, as ``auto``."""

    def __new__(cls, _value=2):
        return super().__new__(cls, 2)

    def __repr__(self) -> str:
        return "'auto'"

    def __str__(self) -> str:
        return "auto"

    def __format__(self, spec: str) -> str:
        return format("auto", spec)

    def __eq__(self, other) -> bool:
        return isinstance(other, AutoClusters) or other == "auto"

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash("auto")


#: The one ``--clusters auto`` request.
AUTO = AutoClusters()


def check_clusters(k) -> int:
    """``k`` as a cluster count (an int >= 1) or :data:`AUTO` (for ``"auto"``), or a ValueError naming the bad
    value."""
    if isinstance(k, AutoClusters) or (isinstance(k, str) and k == "auto"):
        return AUTO
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"clusters must be an integer >= 1 or 'auto'; got {k!r}")
    return int(k)


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
    variances: np.ndarray  # (K, m) the diagonal v_k of each covariance, after shrinkage
    weights: np.ndarray  # (K,) mixture weights, summing to 1
    calibration: np.ndarray  # sorted held-out s_k of cluster 0, then cluster 1, ...
    calibration_counts: np.ndarray  # (K,) held-out rows per cluster
    shrinkage: float = 1.0  # the best single a in (1 - a) C_k + a I (each cluster's own: diagnostics["shrinkages"])
    diagnostics: dict = field(default_factory=dict)  # fit-time numbers (sizes, held-out log-likelihoods)
    factors: Optional[np.ndarray] = None  # (K, m, r) each cluster's own directions U_k, after shrinkage (None: r = 0)

    def __post_init__(self):
        for name in CLUSTER_TENSORS + (("factors",) if self.factors is not None else ()):
            arr = np.array(getattr(self, name), dtype=np.float64, order="C")
            if not np.isfinite(arr).all():
                raise ValueError(f"clusters.{name} contains NaN or infinite values")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        self._check_shapes()
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

    def _check_shapes(self) -> None:
        k, factors = self.weights.size, self.factors
        if self.means.ndim != 2 or self.means.shape[0] != k or self.variances.shape != self.means.shape \
                or self.calibration_counts.shape != (k,) or self.calibration.ndim != 1 or k < 1 \
                or (factors is not None and (factors.ndim != 3 or factors.shape[:2] != self.means.shape
                                             or factors.shape[2] < 1)):
            raise ValueError(f"inconsistent cluster shapes: means {self.means.shape}, variances "
                             f"{self.variances.shape}, weights {self.weights.shape}, calibration counts "
                             f"{self.calibration_counts.shape}" + (f", factors {factors.shape}" if factors is not None
                                                                    else ""))

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def single(cls, components: int, calibration: np.ndarray) -> "ClusterWhitening":
        """One cluster: the global Gaussian itself (``c = 0``, ``v = 1``, the global calibration)."""
        return cls(means=np.zeros((1, components)), variances=np.ones((1, components)), weights=np.ones(1),
                   calibration=calibration, calibration_counts=np.array([calibration.size]), shrinkage=1.0,
                   diagnostics={"sizes": None})

    @classmethod
    def fit(cls, z_sample: np.ndarray, z_heldout: np.ndarray, labels: np.ndarray, k: int,
            global_calibration: np.ndarray, seed: int = 0, ranks: Optional[tuple] = None) -> "ClusterWhitening":
        """The mixture of whitened sample rows ``z_sample`` by EM from ``labels`` (from :func:`spherical_kmeans`),
        with its rank (over ``ranks``, default :data:`~pipeline.whitening.em.RANK_GRID`) and shrinkages chosen and
        the calibration taken on ``z_heldout``. Labels without rows (fewer distinct sample rows than ``k``) and
        clusters EM empties are dropped: the fit has fewer clusters, and ``diagnostics["k_requested"]`` keeps
        ``k`` for :meth:`warnings`."""
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
        fitted = fit_mixture(z_sample, z_heldout, labels, seed, **({"ranks": ranks} if ranks is not None else {}))
        mix, choice = fitted.mixture, fitted.shrinkage
        variances, factors = shrunk(mix.variances, mix.factors, choice.per_cluster)
        chosen = cls(means=mix.means, variances=variances, weights=mix.weights, calibration=np.zeros(0),
                     calibration_counts=np.zeros(mix.weights.size), shrinkage=choice.shared, factors=factors)
        return chosen._calibrated(z_sample, z_heldout, requested, fitted)

    def _calibrated(self, z_sample: np.ndarray, z_heldout: np.ndarray, requested: int, fitted) -> "ClusterWhitening":
        """This mixture with its held-out calibration tables and the fit's diagnostics."""
        k, m = self.k, self.components
        local, own, s_own = NumpyMixture(self).terms(z_heldout)
        tables = [np.sort(s_own[own == j]) for j in range(k)]
        global_ll = loglik_from_sqnorm(np.sum(z_heldout ** 2, 1), m)
        per_cluster = [(float(np.mean(local[own == j])), float(np.mean(global_ll[own == j]))) if t.size else
                       (None, None) for j, t in enumerate(tables)]
        diagnostics = {"sizes": np.bincount(NumpyMixture(self).terms(z_sample)[1], minlength=k).tolist(),
                       "heldout_sizes": [t.size for t in tables],
                       **({"k_requested": requested} if requested != k else {}),
                       **({"k_distinct": fitted.clusters} if fitted.clusters != k else {}),
                       "rank": fitted.rank, "shrinkages": fitted.shrinkage.per_cluster.tolist(),
                       "heldout_local_loglik": {str(a): v for a, v in fitted.shrinkage.curve.items()},
                       "heldout_loglik": float(np.mean(local)),
                       "heldout_global_loglik": float(np.mean(global_ll)),
                       "heldout_cluster_loglik": [p[0] for p in per_cluster],
                       "heldout_cluster_global_loglik": [p[1] for p in per_cluster],
                       "rank_curve": {str(r): v for r, v in fitted.rank_curve.items()},
                       "em_iterations": {str(r): v for r, v in fitted.em_iterations.items()},
                       "split_merge_moves": fitted.split_merge_moves, "fit_seconds": fitted.seconds}
        return replace(self, calibration=np.concatenate(tables), calibration_counts=np.array([t.size for t in tables]),
                       diagnostics=diagnostics)

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

    @property
    def rank(self) -> int:
        """``r``: each cluster's own directions (0: diagonal covariances)."""
        return 0 if self.factors is None else self.factors.shape[2]

    def parameters(self, dtype) -> MixtureParameters:
        """:func:`~pipeline.whitening.gaussians.mixture_parameters` in ``dtype`` (cached): ``[z*z, z, 1] @ P`` plus
        the directions' term is every cluster's ``log pi_k + log N_k(z) + 0.5 m log 2pi = log_norm_k - 0.5 s_k``."""
        key = np.dtype(dtype).str
        if key not in self._cache:
            self._cache[key] = mixture_parameters(self.weights, self.means, self.variances, self.factors, dtype)
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
        distinct = self.diagnostics.get("k_distinct", self.k)  # k-means' clusters, before EM emptied any
        if requested and requested != "auto" and requested != distinct:
            lines.append(f"{tower}: asked for {requested} clusters, fitted {self.k}: the reference sample has only "
                         f"{distinct} distinct direction(s), and a cluster of copies of one row cannot be calibrated")
        if distinct != self.k:
            lines.append(f"{tower}: {distinct - self.k} of {distinct} clusters were left with (almost) no sample rows "
                         f"by EM and dropped: the reference has fewer modes than clusters; --clusters auto chooses "
                         f"K by the held-out rows")
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
        """The arrays a stats file stores (:data:`CLUSTER_TENSORS`, and ``factors`` with per-cluster directions)."""
        return {name: getattr(self, name) for name in CLUSTER_TENSORS + OPTIONAL_TENSORS
                if getattr(self, name) is not None}

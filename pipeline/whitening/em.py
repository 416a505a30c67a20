"""Fitting the local likelihood's mixture in the global whitened coordinates: EM from the k-means labels, a
low-rank-plus-diagonal covariance per cluster with the rank chosen on held-out rows, a shrinkage per cluster.

* **EM** (:func:`run_em`): soft assignments, weights, means, per-coordinate variances and, for rank ``r > 0``,
  each cluster's ``r`` leading directions (the top eigenvectors of its weighted covariance; the diagonal keeps the
  rest, so that ``diag(v) + U U^T`` has the cluster's variances on its diagonal), so that the fitted Gaussians, not
  only the Voronoi cells of k-means, fit the sample. Deterministic: no randomness but seeded subspace iterations.
* **rank** (:func:`fit_mixture`): ``r`` over :data:`RANK_GRID`, each EM warm-started from the last one's
  assignments, kept by the held-out mean log-likelihood (the climb stops at the first rank that does worse).
* **shrinkage per cluster** (:func:`choose_shrinkage`): ``(1 - a_k) C_k + a_k I`` with ``a_k`` over
  :data:`SHRINKAGE_GRID` maximising the cluster's responsibility-weighted held-out log-density; kept only if the
  mixture's held-out log-likelihood is at least that of the best single ``a`` for every cluster (today's rule).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.whitening.formulas import half_m_log_2pi
from pipeline.whitening.gaussians import mixture_parameters, shrunk
from pipeline.whitening.kernels.numpy_backend import component_logp

#: Shrinkage values tried on the held-out rows (1.0: the cluster keeps the global covariance).
SHRINKAGE_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
#: Ranks of the per-cluster directions tried on the held-out rows (0: a diagonal covariance), below ``m`` and
#: within the scoring budget of :func:`max_rank`.
RANK_GRID = (0, 1, 2, 4, 8, 16, 32, 64)
#: Columns of the scoring GEMMs a mixture may have, ``K (2 + r)``, when ``m`` is smaller: at ``m = 768`` the
#: mixture then costs at most one more whitening (the score at most twice the global one's); at smaller ``m``
#: it may cost more than the whitening there, never more than a 768-column GEMM per row.
MAX_MIXTURE_WIDTH = 768
#: EM iterations at most from the k-means labels and in each split-and-merge trial, at most per rank after that
#: (warm-started from the last rank's assignments, which rarely move), and the gain of mean log-likelihood per row
#: and coordinate below which EM stops.
EM_MAX_ITER = 25
RANK_EM_MAX_ITER = 5
EM_TOL = 1e-4
#: Smallest per-coordinate variance of a cluster during EM (the global variance is 1 in these coordinates).
VARIANCE_FLOOR = 1e-3
#: A split-and-merge move is kept only if every cluster keeps this many rows of mass and the held-out rows gain
#: this many nats in all (less is within what choosing among moves on the same held-out rows can fake).
SPLIT_MERGE_MIN_ROWS = 10.0
SPLIT_MERGE_MIN_GAIN = 10.0
#: A cluster whose EM mass falls below this many rows is dropped (it has nothing left to model).
MIN_CLUSTER_MASS = 2.0
#: Held-out mass a cluster needs for a shrinkage of its own (else it takes the shared one).
MIN_HELDOUT_MASS = 1.0
#: Above this many coordinates a cluster's leading directions come from seeded subspace iterations, not eigh.
EXACT_EIGH_DIM = 128
_OVERSAMPLE, _POWER_ITER, _MIN_RESPONSIBILITY = 8, 4, 1e-4


@dataclass(frozen=True, eq=False)
class Mixture:
    """A fitted mixture before shrinkage and calibration."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, m)
    variances: np.ndarray  # (K, m)
    factors: Optional[np.ndarray]  # (K, m, r) or None (r = 0)

    def logp(self, z: np.ndarray, a=0.0) -> np.ndarray:
        """:func:`~pipeline.whitening.kernels.numpy_backend.component_logp` of ``z`` with shrinkage ``a``."""
        v, U = shrunk(self.variances, self.factors, a)
        return component_logp(mixture_parameters(self.weights, self.means, v, U), z)


def log_sum_exp(logp: np.ndarray) -> np.ndarray:
    top = logp.max(axis=1)
    return top + np.log(np.exp(logp - top[:, None]).sum(axis=1))


def responsibilities(logp: np.ndarray) -> tuple:
    """``(R, per-row log-sum-exp)``: each row's posterior over the clusters."""
    lse = log_sum_exp(logp)
    return np.exp(logp - lse[:, None]), lse


def _top_directions(Y: np.ndarray, rank: int, rng) -> tuple:
    """``(eigenvalues, vectors)``: the ``rank`` leading eigenpairs of ``Y^T Y`` (exact up to
    :data:`EXACT_EIGH_DIM` coordinates, seeded subspace iterations above)."""
    m = Y.shape[1]
    if m <= EXACT_EIGH_DIM:
        lam, V = np.linalg.eigh(Y.T @ Y)
        return lam[::-1][:rank], V[:, ::-1][:, :rank]
    Q = np.linalg.qr(Y.T @ (Y @ rng.standard_normal((m, min(m, rank + _OVERSAMPLE)))))[0]
    for _ in range(_POWER_ITER):
        Q = np.linalg.qr(Y.T @ (Y @ Q))[0]
    small = Y @ Q
    lam, V = np.linalg.eigh(small.T @ small)
    return lam[::-1][:rank], (Q @ V[:, ::-1])[:, :rank]


def m_step(z: np.ndarray, R: np.ndarray, rank: int, seed: int) -> Mixture:
    """The mixture that maximises the expected log-likelihood of ``z`` under the assignments ``R`` (n, K)."""
    mass = R.sum(axis=0)
    means = (R.T @ z) / mass[:, None]
    variances = np.maximum((R.T @ (z * z)) / mass[:, None] - means ** 2, 0.0)
    factors = None
    if rank:
        k, m = means.shape
        factors = np.zeros((k, m, rank))
        for j in range(k):
            rows = np.flatnonzero(R[:, j] > _MIN_RESPONSIBILITY)
            Y = (z[rows] - means[j]) * np.sqrt(R[rows, j] / mass[j])[:, None]
            lam, V = _top_directions(Y, rank, np.random.default_rng([seed, j, rank]))
            rest = max(float(variances[j].sum() - lam.sum()) / max(m - rank, 1), 0.0)  # the average other variance
            factors[j] = V * np.sqrt(np.maximum(lam - rest, 0.0))
            variances[j] = variances[j] - np.sum(factors[j] ** 2, axis=1)  # the diagonal keeps what they leave
    return Mixture(weights=mass / mass.sum(), means=means, variances=np.maximum(variances, VARIANCE_FLOOR),
                   factors=factors)


def run_em(z: np.ndarray, R: np.ndarray, rank: int, seed: int, max_iter: int = EM_MAX_ITER) -> tuple:
    """``(mixture, R, iterations)``: EM from the assignments ``R`` until the mean log-likelihood gains less than
    :data:`EM_TOL` per row and coordinate; clusters whose mass falls below :data:`MIN_CLUSTER_MASS` rows are
    dropped."""
    previous, iterations, tol = -np.inf, 0, EM_TOL * z.shape[1]
    while True:
        keep = R.sum(axis=0) >= MIN_CLUSTER_MASS
        if not keep.all():  # the others' rows go where the next E-step puts them
            R = R[:, keep]
        mix = m_step(z, R, rank, seed)
        if iterations == max_iter:
            return mix, R, iterations
        R, lse = responsibilities(mix.logp(z))
        iterations += 1
        current = float(np.mean(lse))
        if current - previous < tol:
            return mix, R, iterations
        previous = current


def _bimodality(t: np.ndarray) -> tuple:
    """``(gain, threshold)``: how much better two 1-D Gaussians (split at the 2-means threshold) fit the values
    ``t`` than one, in log-likelihood per value."""
    lo, hi = np.percentile(t, [25, 75])
    for _ in range(20):  # 1-D 2-means
        cut = 0.5 * (lo + hi)
        left, right = t[t <= cut], t[t > cut]
        if not (left.size > 1 and right.size > 1):
            return 0.0, cut
        lo, hi = left.mean(), right.mean()
    one = -0.5 * np.log(t.var() + 1e-12)
    two = sum(p * (np.log(p) - 0.5 * np.log(part.var() + 1e-12))
              for part, p in ((left, left.size / t.size), (right, right.size / t.size)))
    return float(two - one), cut


def _split_merge_moves(z: np.ndarray, R: np.ndarray, mix: Mixture, seed: int, tries: int) -> list:
    """Candidate assignments for :func:`split_merge`: merge the two clusters whose responsibilities overlap most,
    split the cluster most bimodal along its leading direction (at the 2-means threshold) into the freed slot."""
    k = R.shape[1]
    own = np.argmax(R, axis=1)
    splits = []
    for j in range(k):
        rows = np.flatnonzero(own == j)
        if rows.size < 4 * MIN_CLUSTER_MASS:
            continue
        y = z[rows] - mix.means[j]
        _, v = _top_directions(y, 1, np.random.default_rng([seed, j, 1 << 20]))
        t = y @ v[:, 0]
        gain, cut = _bimodality(t)
        splits.append((gain * rows.size, j, rows[t > cut]))
    splits.sort(key=lambda s: -s[0])
    G = R.T @ R
    norms = np.sqrt(np.diag(G)) + 1e-12
    overlap = np.triu(G / np.outer(norms, norms), 1)
    pairs = [np.unravel_index(i, overlap.shape) for i in np.argsort(-overlap, axis=None)[:tries]]
    moves = []
    for (gain, j, upper), (a, b) in ((s, p) for s in splits[:tries] for p in pairs):
        if j in (a, b) or len(moves) >= tries:
            continue
        trial = R.copy()
        trial[:, a] += trial[:, b]
        trial[:, b] = 0.0
        trial[upper, b], trial[upper, j] = trial[upper, j], 0.0
        moves.append(trial)
    return moves


@dataclass(frozen=True)
class Shrinkage:
    """The shrinkage chosen for a mixture on held-out rows."""

    per_cluster: np.ndarray  # (K,) a_k
    shared: float  # the best single a for every cluster
    curve: dict  # a -> held-out mean log-likelihood with that a for every cluster
    loglik: float  # held-out mean log-likelihood with per_cluster


def choose_shrinkage(mix: Mixture, zh: np.ndarray) -> Shrinkage:
    """Each cluster's shrinkage by its responsibility-weighted held-out log-density (clusters with less than
    :data:`MIN_HELDOUT_MASS` held-out rows take the shared one), kept if the mixture does no worse on the held-out
    rows than with the best shared value (see the module's docstring)."""
    half = half_m_log_2pi(zh.shape[1])
    Rh, _ = responsibilities(mix.logp(zh))
    curve, per = {}, np.empty((len(SHRINKAGE_GRID), mix.weights.size))
    for i, a in enumerate(SHRINKAGE_GRID):
        logp = mix.logp(zh, a)
        curve[a] = float(np.mean(log_sum_exp(logp))) - half
        per[i] = np.sum(Rh * logp, axis=0)
    shared = max(SHRINKAGE_GRID, key=lambda a: (curve[a], a))
    best = len(SHRINKAGE_GRID) - 1 - np.argmax(per[::-1], axis=0)  # ties: the larger shrinkage
    own = np.where(Rh.sum(axis=0) >= MIN_HELDOUT_MASS, np.asarray(SHRINKAGE_GRID)[best], shared)
    own_loglik = float(np.mean(log_sum_exp(mix.logp(zh, own)))) - half
    if own_loglik < curve[shared]:
        return Shrinkage(np.full(mix.weights.size, shared), shared, curve, curve[shared])
    return Shrinkage(own, shared, curve, own_loglik)


def split_merge(z: np.ndarray, zh: np.ndarray, R: np.ndarray, seed: int, tries: int = 4, rounds: int = 8) -> tuple:
    """``(mixture, R, moves)``: split-and-merge EM (after Ueda et al., 2000) at rank 0 from the converged
    assignments ``R``: k-means and EM keep a cluster that covers two modes (its mean between them, where anomalies
    lie) when another mode is covered by two clusters; a move merges such a pair and splits such a cluster, and is
    kept when EM from it fits the held-out rows ``zh`` better (by :data:`SPLIT_MERGE_MIN_GAIN` nats in all; mean
    log-likelihood, shrinkage chosen on them: in the sample, splitting a small cluster always looks better) and
    leaves every cluster :data:`SPLIT_MERGE_MIN_ROWS` rows. At most ``rounds`` moves kept, each the first of
    ``tries`` candidates that gains."""
    mix, R, _ = run_em(z, R, 0, seed)
    best = choose_shrinkage(mix, zh).loglik
    moves, min_gain = 0, SPLIT_MERGE_MIN_GAIN / max(zh.shape[0], 1)
    for _ in range(rounds):
        for trial in _split_merge_moves(z, R, mix, seed, tries):
            cand, cand_R, _ = run_em(z, trial, 0, seed)
            if cand.weights.size != R.shape[1] or cand_R.sum(axis=0).min() < SPLIT_MERGE_MIN_ROWS:
                continue
            value = choose_shrinkage(cand, zh).loglik
            if value > best + min_gain:
                mix, R, best, moves = cand, cand_R, value, moves + 1
                break
        else:
            break
    return mix, R, moves


@dataclass(frozen=True)
class FittedMixture:
    """:func:`fit_mixture`'s answer: the mixture, its shrinkage and how they were chosen."""

    mixture: Mixture  # before shrinkage
    shrinkage: Shrinkage
    rank: int
    rank_curve: dict  # r -> held-out mean log-likelihood
    em_iterations: dict  # r -> EM iterations
    clusters: int  # the k-means labels' clusters EM started from (more than the mixture's when EM emptied some)
    split_merge_moves: int  # split-and-merge moves kept (:func:`split_merge`)
    seconds: dict  # wall time of each stage: split_merge (EM at rank 0 included), ranks


def max_rank(k: int, m: int) -> int:
    """The largest rank ``r < m`` with ``K (2 + r) <= max(m, MAX_MIXTURE_WIDTH)`` (0 if none)."""
    return max(0, min(m - 1, max(m, MAX_MIXTURE_WIDTH) // k - 2))


def fit_mixture(z: np.ndarray, zh: np.ndarray, labels: np.ndarray, seed: int = 0,
                ranks: tuple = RANK_GRID) -> FittedMixture:
    """EM of the mixture on whitened sample rows ``z`` from the k-means ``labels`` (``0 .. K - 1``, each used),
    improved by :func:`split_merge`, then for each rank of ``ranks`` up to :func:`max_rank` in turn until one does
    worse on the held-out rows ``zh``."""
    k = int(labels.max()) + 1
    R = np.zeros((z.shape[0], k))
    R[np.arange(z.shape[0]), labels] = 1.0
    started = time.perf_counter()
    _, R, moves = split_merge(z, zh, R, seed) if k > 2 else (None, R, 0)
    seconds = {"split_merge": time.perf_counter() - started}
    best, curve, iterations = None, {}, {}
    for rank in (r for r in ranks if r <= max_rank(k, z.shape[1])):
        mix, R, iterations[rank] = run_em(z, R, rank, seed, EM_MAX_ITER if rank == 0 else RANK_EM_MAX_ITER)
        choice = choose_shrinkage(mix, zh)
        curve[rank] = choice.loglik
        if best is not None and choice.loglik <= best[1].loglik:
            break
        best = (mix, choice, rank)
    seconds["ranks"] = time.perf_counter() - started - seconds["split_merge"]
    return FittedMixture(mixture=best[0], shrinkage=best[1], rank=best[2], rank_curve=curve,
                         em_iterations=iterations, clusters=k, split_merge_moves=moves,
                         seconds={name: round(v, 3) for name, v in seconds.items()})

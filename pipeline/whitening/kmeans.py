"""Spherical k-means (cosine) with k-means++ seeding and restarts: the local likelihood's first guess of the modes,
which the mixture's EM (:mod:`pipeline.whitening.em`) then refines.

Exact NumPy rather than faiss: a sample of 10^5 rows clusters in seconds, the result is deterministic for a seed
on every machine, and no native dependency is added. One k-means++ run can land in a local optimum that merges two
modes (the merged centre sits where the anomalies between them lie), so :func:`spherical_kmeans` runs
:data:`KMEANS_RESTARTS` seeds and keeps the labels with the best objective (the sum of every row's cosine to its
centre).
"""

from __future__ import annotations

import numpy as np

#: Lloyd iterations of one k-means run at most (it stops when no assignment changes).
KMEANS_MAX_ITER = 100
#: k-means++ restarts, the best objective kept.
KMEANS_RESTARTS = 4
#: Cosine gap below which two unit rows count as one direction: k-means stops seeding when every row is this
#: close to a chosen centre (there are no more distinct directions to make clusters of).
SAME_DIRECTION = 1e-6


def _unit_rows(X: np.ndarray) -> np.ndarray:
    U = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(U, axis=1, keepdims=True)
    return (U / np.where(norms > 0, norms, 1.0)).astype(np.float32)  # cosines need no more; half the GEMMs' time


def _seed_centres(U: np.ndarray, k: int, rng) -> np.ndarray:
    """k-means++ on ``1 - cos``; fewer centres when every row is already one of them (duplicates)."""
    n = U.shape[0]
    centres = np.empty((k, U.shape[1]), dtype=np.float32)
    centres[0] = U[rng.integers(n)]
    dist = np.maximum(1.0 - (U @ centres[0]).astype(np.float64), 0.0)
    for j in range(1, k):
        if dist.max() < SAME_DIRECTION:  # every row is one of the j centres: no distinct row left to seed
            return centres[:j]
        total = dist.sum()
        pick = rng.choice(n, p=dist / total) if total > 0 else rng.integers(n)
        centres[j] = U[pick]
        dist = np.minimum(dist, np.maximum(1.0 - (U @ centres[j]).astype(np.float64), 0.0))
    return centres


def _lloyd(U: np.ndarray, centres: np.ndarray, max_iter: int) -> tuple:
    """``(labels, objective)``: Lloyd iterations on the unit sphere until no label changes; an emptied cluster is
    reseeded with the row least like its own centre."""
    n, k = U.shape[0], centres.shape[0]
    labels, cos = None, None
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
    objective = float(np.sum(np.take_along_axis(U @ centres.T, labels[:, None], axis=1), dtype=np.float64))
    return labels, objective


def spherical_kmeans(X: np.ndarray, k: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER,
                     restarts: int = KMEANS_RESTARTS) -> np.ndarray:
    """Cluster labels (int64, one per row) of the rows of ``X`` by cosine: ``restarts`` runs of k-means++ seeding
    then Lloyd iterations, the run with the largest sum of cosines kept (ties: the earliest). Rows with fewer
    than ``k`` distinct directions (duplicates) get fewer clusters: seeding stops when every row is a chosen
    centre (within :data:`SAME_DIRECTION`), so the labels are ``0 .. j - 1`` with ``j`` the number of distinct
    directions. Deterministic for a seed."""
    U = _unit_rows(X)
    n = U.shape[0]
    if n < k:
        raise ValueError(f"cannot make {k} clusters of {n} rows: pass fewer clusters or more reference rows")
    best = None
    for run in range(max(1, int(restarts))):
        rng = np.random.default_rng(seed if run == 0 else [seed, run])
        labels, objective = _lloyd(U, _seed_centres(U, k, rng), max_iter)
        if best is None or objective > best[1]:
            best = (labels, objective)
    return best[0]

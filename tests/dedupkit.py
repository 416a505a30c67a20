"""Generators and the all-pairs float64 oracle of the dedup tests: random embeddings with planted near-duplicates
at known cosines on either side of the threshold."""

from __future__ import annotations

import numpy as np


def planted(n_base: int, d: int, cosines, seed: int = 0, norms: bool = True) -> tuple[np.ndarray, list]:
    """``n_base`` random rows, then per base row ``i < len(cosines)`` one copy at cosine ``cosines[i]`` to it
    (its own random direction orthogonal to the base, scaled by a random norm when ``norms``). Returns the
    float32 rows and ``[(base, copy, cosine)]``."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_base, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies, planted_pairs = [], []
    for i, c in enumerate(cosines):
        v = rng.standard_normal(d)
        v -= (v @ base[i]) * base[i]
        v /= np.linalg.norm(v)
        copies.append(c * base[i] + np.sqrt(max(0.0, 1 - c * c)) * v)
        planted_pairs.append((i, n_base + i, float(c)))
    X = np.vstack([base] + ([np.asarray(copies)] if copies else []))
    if norms:
        X *= rng.uniform(0.5, 3.0, size=(len(X), 1))
    return X.astype(np.float32), planted_pairs


def oracle_pairs(X: np.ndarray, eps: float, block: int = 1024) -> set:
    """Every pair ``(i, j)``, ``i < j``, with float64 cosine >= 1 - eps: all pairs, no clustering."""
    X64 = np.asarray(X, dtype=np.float64)
    U = X64 / np.linalg.norm(X64, axis=1, keepdims=True)
    found = set()
    for a in range(0, len(U), block):
        cos = U[a:a + block] @ U.T
        i, j = np.nonzero(cos >= 1 - eps)
        i = i + a
        found.update((int(p), int(q)) for p, q in zip(i, j) if p < q)
    return found


def oracle_groups(n: int, pairs) -> np.ndarray:
    """Per row the smallest row of its connected component under ``pairs``."""
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)], dtype=np.int64)

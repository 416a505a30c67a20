"""The method of ``wclip dedup`` inside one cluster: every pair with cosine >= 1 - eps, the duplicate groups
they form, and the one row each group keeps.

* **pair search** (:func:`find_groups`): the cluster's rows, L2-normalised, multiplied block by block
  (``block`` x ``block`` float32 products in torch, on the CPU or a CUDA device): memory is bounded by a block,
  not by the cluster. A product only *proposes* pairs (cosine >= 1 - eps - :data:`MARGIN`); each is then
  decided in float64 from the stored float32 embeddings (``x.y / (|x| |y|)``, summed without BLAS), so the
  answer does not depend on the device, the block size, the thread count or the executor, and equals an
  all-pairs float64 computation's.
* **groups**: the pairs joined transitively (connected components, merged block by block), each group named
  by its smallest member.
* **representative** (:class:`Rule`): per group the member that is best by the rule; ties broken by
  ``(key, shard, index)``; deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Rows per side of one block product (a 4096 x 4096 float32 block is 64 MiB).
DEFAULT_BLOCK = 4096
#: Candidates come from float32 products; those within this of the threshold are decided in float64. A
#: float32 dot of two unit vectors errs by at most ~d * 2^-24 (5e-5 at d = 768), far below it.
MARGIN = 1e-3
#: Candidate pairs decided in float64 at once (bounds the gathered rows: 65536 x 2 x d float64).
VERIFY_ROWS = 65_536
SCORE_DIRECTIONS = ("highest", "lowest")
CENTROID_DIRECTIONS = ("nearest", "farthest")


@dataclass(frozen=True)
class Rule:
    """Which member of a duplicate group is kept: ``COLUMN:highest|lowest`` (a score column of the scores),
    ``centroid:nearest|farthest`` (SemDeDup: cosine to the cluster's centroid) or ``random`` (by a seeded hash
    of the key)."""

    kind: str  # "column", "centroid" or "random"
    column: str = ""  # kind "column": the score column
    direction: str = ""  # highest / lowest (column), nearest / farthest (centroid)
    seed: int = 0  # kind "random"

    @classmethod
    def parse(cls, text: str, seed: int = 0, columns: tuple = ()) -> "Rule":
        """``--keep TEXT``; ``columns``: the score columns a rule may name (empty: any)."""
        name, _, direction = text.strip().partition(":")
        if name == "random":
            if direction:
                raise ValueError(f"--keep random takes no direction (got {text!r}); its seed is --seed")
            return cls("random", seed=seed)
        if name == "centroid":
            if direction not in CENTROID_DIRECTIONS:
                raise ValueError(f"--keep centroid needs :nearest or :farthest (got {text!r})")
            return cls("centroid", direction=direction)
        if columns and name not in columns:
            raise ValueError(f"--keep {text!r}: {name!r} is not a score column; use one of {', '.join(columns)}, "
                             f"centroid:nearest, centroid:farthest or random")
        direction = direction or ("lowest" if name.endswith("_sqnorm") else "highest")
        if direction not in SCORE_DIRECTIONS:
            raise ValueError(f"--keep {text!r}: the direction must be highest or lowest")
        return cls("column", column=name, direction=direction)

    @property
    def spec(self) -> str:
        if self.kind == "random":
            return f"random (seed {self.seed})"
        return f"{self.column or 'centroid'}:{self.direction}"

    def order(self, values: Optional[np.ndarray], vectors: np.ndarray, keys) -> np.ndarray:
        """Per row a sort key, smaller = better: ``values`` are the rule column's values (NaN always loses)."""
        if self.kind == "random":
            from pipeline.whitening.moments import key_hashes

            return key_hashes([str(k) for k in keys], self.seed)
        if self.kind == "centroid":
            values = centroid_cosines(vectors)
        values = np.asarray(values, dtype=np.float64)
        best_first = -values if self.direction in ("highest", "nearest") else values
        return np.where(np.isnan(best_first), np.inf, best_first)


def centroid_cosines(vectors: np.ndarray) -> np.ndarray:
    """Cosine of each row to the cluster's centroid: the normalised mean of its L2-normalised rows (float64)."""
    X = np.asarray(vectors, dtype=np.float64)
    units = X / np.linalg.norm(X, axis=1, keepdims=True)
    centre = units.sum(axis=0)
    length = np.linalg.norm(centre)
    return units @ (centre / length) if length > 0 else np.zeros(len(X))


def tie_ranks(keys, shards, indices) -> np.ndarray:
    """The rank of each row in ``(key, shard, index)`` order: how ties between equally good rows are broken."""
    keys = np.asarray([str(k) for k in keys])
    shards = np.asarray([str(s) for s in shards])
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[np.lexsort((np.asarray(indices, dtype=np.int64), shards, keys))] = np.arange(len(keys))
    return ranks


def _unit32(X64: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X64, axis=1, keepdims=True)
    return (X64 / norms).astype(np.float32)


def exact_cosines(X64: np.ndarray, norms: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """``cos(x_i, x_j)`` in float64 for each pair, summed by einsum's own loop (no BLAS: the same bits on every
    machine and thread count)."""
    out = np.empty(len(i), dtype=np.float64)
    for s in range(0, len(i), VERIFY_ROWS):
        a, b = i[s:s + VERIFY_ROWS], j[s:s + VERIFY_ROWS]
        out[s:s + VERIFY_ROWS] = np.einsum("ij,ij->i", X64[a], X64[b]) / (norms[a] * norms[b])
    return out


def _merge(labels: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union of the groups of each pair's rows (connected components over the current labels)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(labels)
    graph = coo_matrix((np.ones(len(i), np.int8), (labels[i], labels[j])), shape=(n, n))
    _, components = connected_components(graph, directed=False)
    return components[labels]


@dataclass
class Groups:
    """What :func:`find_groups` found in one cluster: per row its group (the smallest member's row number)."""

    group: np.ndarray  # int64 (n,)
    pairs: int  # pairs with cosine >= 1 - eps
    candidates: int  # pairs the float32 products proposed

    @property
    def sizes(self) -> np.ndarray:
        """Per row the size of its group."""
        _, inverse, counts = np.unique(self.group, return_inverse=True, return_counts=True)
        return counts[inverse]


def find_groups(vectors: np.ndarray, eps: float, block: int = DEFAULT_BLOCK, device: str = "cpu") -> Groups:
    """Duplicate groups of the rows of ``vectors`` (n, d): rows joined by a chain of pairs with float64 cosine
    >= ``1 - eps``. Blocked float32 products on ``device`` propose candidates; float64 decides."""
    import torch

    X64 = np.asarray(vectors, dtype=np.float64)
    n = len(X64)
    labels = np.arange(n, dtype=np.int64)
    if n < 2:
        return Groups(labels, 0, 0)
    norms = np.linalg.norm(X64, axis=1)
    units = torch.from_numpy(_unit32(X64)).to(device)
    threshold, propose = 1.0 - eps, 1.0 - eps - MARGIN
    pairs = candidates = 0
    for a in range(0, n, block):
        rows = units[a:a + block]
        for b in range(a, n, block):
            hit = torch.nonzero(rows @ units[b:b + block].T >= propose).cpu().numpy()
            i, j = hit[:, 0].astype(np.int64) + a, hit[:, 1].astype(np.int64) + b
            if a == b:
                i, j = i[i < j], j[i < j]
            candidates += len(i)
            sure = exact_cosines(X64, norms, i, j) >= threshold
            i, j = i[sure], j[sure]
            pairs += len(i)
            if len(i):
                labels = _merge(labels, i, j)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return Groups(first[inverse].astype(np.int64), pairs, candidates)


def representatives(group: np.ndarray, order: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Per row the row number of its group's representative: the member with the smallest ``order``, then the
    smallest ``ties`` (:func:`tie_ranks`)."""
    ranked = np.lexsort((ties, order, group))
    sorted_groups = group[ranked]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    best = ranked[starts]  # the first member of each group in rule order
    rep = np.empty(len(group), dtype=np.int64)
    rep[ranked] = np.repeat(best, np.diff(np.r_[starts, len(group)]))
    return rep

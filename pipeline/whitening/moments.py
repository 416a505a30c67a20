"""Float64 streaming moments of embedding rows (exactly mergeable) and the held-out split by key hash."""

from __future__ import annotations

import hashlib
import numbers

import numpy as np


def as_rows(X, name: str = "X", dim: int | None = None) -> np.ndarray:
    """``X`` as a finite float64 C-contiguous ``(n, d)`` array, or a ValueError naming the problem."""
    arr = np.asarray(X)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                   or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a numeric array; got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = " (for one row use X[None, :])" if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be a 2-D array of shape (n, d){hint}; got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has {arr.shape[1]} columns but these statistics are for "
                         f"{dim}-dimensional embeddings (wrong model or wrong tower?)")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name} has {bad.size} row(s) with NaN or infinite values; the first is "
                         f"row {int(bad[0])}. Drop or repair those rows first.")
    return arr


class Moments:
    """Float64 count, mean and centered scatter matrix of a stream of rows; mergeable.

    Chunks are combined with Chan et al.'s pairwise update, so merging the moments of
    several chunks equals one pass over all rows up to float64 rounding.
    """

    __slots__ = ("count", "mean", "scatter")

    def __init__(self, count: int, mean: np.ndarray, scatter: np.ndarray):
        mean = np.array(mean, dtype=np.float64)
        scatter = np.array(scatter, dtype=np.float64)
        if mean.ndim != 1 or scatter.shape != (mean.size, mean.size) or int(count) < 0:
            raise ValueError(f"inconsistent moments: count={count}, mean {mean.shape}, "
                             f"scatter {scatter.shape}")
        self.count, self.mean, self.scatter = int(count), mean, scatter

    @classmethod
    def empty(cls, dim: int) -> "Moments":
        """Moments of zero rows of dimension ``dim``."""
        if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive integer; got {dim!r}")
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @property
    def dim(self) -> int:
        return self.mean.size

    def update(self, X) -> "Moments":
        """Add the rows of ``X`` (n, dim) in place; returns ``self``."""
        X = as_rows(X, dim=self.dim)
        if X.shape[0]:
            mean = X.mean(axis=0)
            centered = X - mean
            self._absorb(X.shape[0], mean, centered.T @ centered)
        return self

    def merge(self, other: "Moments") -> "Moments":
        """New moments of the rows of ``self`` and ``other`` together."""
        if not isinstance(other, Moments) or other.dim != self.dim:
            raise ValueError(f"can only merge Moments of the same dimension ({self.dim}); "
                             f"got {other!r}")
        out = Moments(self.count, self.mean, self.scatter)
        out._absorb(other.count, other.mean, other.scatter)
        return out

    def _absorb(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        n_a, n = self.count, self.count + n_b
        if n_b == 0:
            return
        delta = mean_b - self.mean
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """Covariance matrix, ``scatter / (count - ddof)`` (default: unbiased, like numpy.cov)."""
        if self.count - ddof <= 0:
            raise ValueError(f"need more than {ddof} row(s) for a covariance; have {self.count}")
        return self.scatter / (self.count - ddof)

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, dim={self.dim})"


def key_hashes(keys, seed: int = 0) -> np.ndarray:
    """The 64-bit hash of each key (uint64): the first 8 bytes of ``blake2b(f"{seed}:{key}")``, big-endian."""
    out = np.empty(len(keys), dtype=np.uint64)
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise ValueError(f"keys must be strings; key {i} is {key!r}")
        out[i] = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest(), "big")
    return out


def holdout_mask(keys, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask, True for keys in the held-out split; stable across runs and machines.

    A key is held out when its :func:`key_hashes` value, read as a fraction of 2**64, is below
    ``fraction``: each key decides alone, so distributed workers agree without coordination.
    """
    return held_out(key_hashes(keys, seed), fraction)


def held_out(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """:func:`holdout_mask` of keys whose :func:`key_hashes` are ``hashes`` (compared exactly, as integers)."""
    limit = check_fraction(fraction) * 2.0**64
    return np.array([int(h) < limit for h in hashes], dtype=bool)


class HashSample:
    """A bounded sample of rows that does not depend on their order or on how they were split between
    workers: the ``size`` rows whose key hashes are smallest. Samples of parts merge into the sample of
    the whole; memory stays below twice ``size`` rows (parts are pruned together once they reach it)."""

    def __init__(self, size: int, dim: int):
        self.size, self.dim = int(size), int(dim)
        self._hashes: list = []
        self._rows: list = []
        self._count = 0

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> "HashSample":
        """Offer ``rows`` (n, dim) with their key ``hashes`` (n,); returns ``self``."""
        if len(hashes):
            self._hashes.append(np.asarray(hashes, dtype=np.uint64))
            self._rows.append(np.asarray(rows, dtype=np.float32))
            self._count += len(hashes)
            if self._count >= 2 * self.size:
                self._prune()
        return self

    def _prune(self) -> None:
        hashes = np.concatenate(self._hashes) if self._hashes else np.zeros(0, np.uint64)
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, self.dim), np.float32)
        keep = np.sort(np.argsort(hashes, kind="stable")[: self.size])
        self._hashes, self._rows, self._count = [hashes[keep]], [rows[keep]], keep.size

    @property
    def hashes(self) -> np.ndarray:
        """The sample's key hashes, in the order their rows were offered."""
        self._prune()
        return self._hashes[0]

    @property
    def rows(self) -> np.ndarray:
        """The sample's rows (float32), in the order they were offered."""
        self._prune()
        return self._rows[0]


def check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"holdout fraction must be a number in [0, 1); got {fraction!r}")
    return float(fraction)

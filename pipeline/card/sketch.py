"""Bounded-memory summaries of a column streamed in batches.

- :class:`QuantileSketch` is a mergeable log-bucket sketch (DDSketch-like). Error bound: for
  any ``q``, ``quantile(q)`` is within a relative error ``rel_err`` of the exact order
  statistic of rank ``floor(q * (n - 1))``: ``|est - x_r| <= rel_err * |x_r|``; values with
  ``|x| < min_value`` count as zero (absolute error below ``min_value``).
- :class:`Histogram` and :class:`Histogram2D` count into fixed bins with outside counts.
- :class:`Extremes` keeps the K rows with the smallest and largest value of one column.
- :class:`GroupedLowest` counts the rows of each group and keeps the K with the smallest value in each.
"""

from __future__ import annotations

import math

import numpy as np


class QuantileSketch:
    """Mergeable quantile sketch with relative error ``rel_err`` (see module docstring)."""

    def __init__(self, rel_err: float = 0.005, min_value: float = 1e-12):
        self.rel_err = rel_err
        self.min_value = min_value
        self.gamma = (1 + rel_err) / (1 - rel_err)
        self._log_gamma = math.log(self.gamma)
        self.zeros = 0
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._stores = {1: (0, np.zeros(0, np.int64)), -1: (0, np.zeros(0, np.int64))}

    def _index(self, magnitude: np.ndarray) -> np.ndarray:
        return np.ceil(np.log(magnitude) / self._log_gamma).astype(np.int64)

    def _add(self, sign: int, index: np.ndarray, weights=None) -> None:
        if index.size == 0:
            return
        offset, counts = self._stores[sign]
        lo, hi = int(index.min()), int(index.max())
        if counts.size:
            lo, hi = min(lo, offset), max(hi, offset + counts.size - 1)
        grown = np.zeros(hi - lo + 1, np.int64)
        grown[offset - lo: offset - lo + counts.size] += counts
        grown += np.bincount(index - lo, weights=weights, minlength=grown.size).astype(np.int64)
        self._stores[sign] = (lo, grown)

    def update(self, values) -> None:
        """Add a batch of values; NaN and infinities are ignored."""
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        self.count += x.size
        self.total += float(x.sum())
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        small = np.abs(x) < self.min_value
        self.zeros += int(small.sum())
        for sign, part in ((1, x[(x > 0) & ~small]), (-1, -x[(x < 0) & ~small])):
            self._add(sign, self._index(part))

    def merge(self, other: "QuantileSketch") -> None:
        """Add the contents of another sketch built with the same parameters."""
        if other.gamma != self.gamma or other.min_value != self.min_value:
            raise ValueError("can only merge sketches with the same rel_err and min_value")
        self.count += other.count
        self.total += other.total
        self.zeros += other.zeros
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        for sign, (offset, counts) in other._stores.items():
            nz = np.nonzero(counts)[0]
            self._add(sign, nz + offset, weights=counts[nz])

    def _value(self, sign: int, index: int) -> float:
        return sign * 2 * self.gamma ** index / (self.gamma + 1)

    def quantile(self, q: float) -> float:
        """Value at rank ``floor(q * (n - 1))``, within the stated relative error; NaN if empty."""
        if self.count == 0:
            return math.nan
        if q <= 0:
            return self.min
        if q >= 1:
            return self.max
        rank = math.floor(q * (self.count - 1))
        offset, counts = self._stores[-1]                # negatives: largest magnitude first
        cum = np.cumsum(counts[::-1])
        if rank < (cum[-1] if cum.size else 0):
            i = int(np.searchsorted(cum, rank, side="right"))
            return min(max(self._value(-1, offset + counts.size - 1 - i), self.min), self.max)
        rank -= int(cum[-1]) if cum.size else 0
        if rank < self.zeros:
            return 0.0
        rank -= self.zeros
        offset, counts = self._stores[1]
        i = int(np.searchsorted(np.cumsum(counts), rank, side="right"))
        return min(max(self._value(1, offset + i), self.min), self.max)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


class Histogram:
    """Counts of a streamed column in ``bins`` equal bins over ``[lo, hi]``, plus outside counts."""

    def __init__(self, lo: float, hi: float, bins: int = 80):
        if not hi > lo:
            hi = lo + 1.0
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins, np.int64)
        self.below = self.above = 0

    def update(self, values) -> None:
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        self.below += int((x < self.edges[0]).sum())
        self.above += int((x > self.edges[-1]).sum())
        self.counts += np.histogram(x, bins=self.edges)[0]


class Histogram2D:
    """Joint counts of two streamed columns over fixed bins (pairs outside the box are counted)."""

    def __init__(self, x_range, y_range, bins: int = 60):
        self.x_edges = np.linspace(*_widen(x_range), bins + 1)
        self.y_edges = np.linspace(*_widen(y_range), bins + 1)
        self.counts = np.zeros((bins, bins), np.int64)
        self.outside = 0

    def update(self, x, y) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        counts = np.histogram2d(x, y, bins=(self.x_edges, self.y_edges))[0].astype(np.int64)
        self.counts += counts
        self.outside += int(x.size - counts.sum())


def _widen(bounds):
    lo, hi = float(bounds[0]), float(bounds[1])
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


class Extremes:
    """The ``k`` rows with the smallest and with the largest value of a streamed column."""

    def __init__(self, k: int = 8):
        self.k = k
        self.low: list[tuple[float, dict]] = []
        self.high: list[tuple[float, dict]] = []

    def update(self, values, rows) -> None:
        """``values``: float array; ``rows(i)``: the payload dict of batch row ``i``."""
        x = np.asarray(values, dtype=np.float64)
        finite = np.nonzero(np.isfinite(x))[0]
        if finite.size == 0:
            return
        order = finite[np.argsort(x[finite], kind="stable")]
        self.low = sorted(self.low + [(float(x[i]), rows(int(i))) for i in order[: self.k]],
                          key=lambda t: t[0])[: self.k]
        self.high = sorted(self.high + [(float(x[i]), rows(int(i))) for i in order[-self.k:]],
                           key=lambda t: -t[0])[: self.k]


class GroupedLowest:
    """Per group (numbered ``0 .. groups - 1``) of a streamed column: its row count and the ``k`` rows with
    the smallest values (ties: the row seen first). Rows whose group is outside that range are counted in
    :attr:`outside`. Memory: ``groups * k`` rows, whatever the number streamed."""

    def __init__(self, groups: int, k: int = 3):
        self.k = k
        self.counts = np.zeros(groups, np.int64)
        self.outside = 0
        self.low: list[list[tuple[float, dict]]] = [[] for _ in range(groups)]
        self._bound = np.full(groups, np.inf)   # a group's k-th smallest value so far (inf while it has fewer)

    def update(self, groups, values, rows) -> None:
        """``groups``: the group of each row (float, NaN = none: not counted); ``values``: float array (a
        non-finite value is counted, never listed); ``rows(i)``: the payload dict of batch row ``i``."""
        g, x = np.asarray(groups, np.float64), np.asarray(values, np.float64)
        known = np.isfinite(g)
        inside = known & (g >= 0) & (g < self.counts.size) & (g == np.floor(g))
        self.outside += int((known & ~inside).sum())
        self.counts += np.bincount(g[inside].astype(np.int64), minlength=self.counts.size)
        idx = np.flatnonzero(inside & np.isfinite(x))
        if self.k == 0 or idx.size == 0:
            return
        group = g[idx].astype(np.int64)
        better = x[idx] < self._bound[group]
        idx, group = idx[better], group[better]
        order = np.lexsort((x[idx], group))            # by group, then value; stable: row order on ties
        idx, group = idx[order], group[order]
        first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        rank = np.arange(idx.size) - np.repeat(first, np.diff(np.r_[first, idx.size]))
        take = rank < self.k
        for i, j in zip(idx[take].tolist(), group[take].tolist()):
            self.low[j].append((float(x[i]), rows(i)))
        for j in np.unique(group[take]).tolist():
            self.low[j] = sorted(self.low[j], key=lambda t: t[0])[: self.k]
            if len(self.low[j]) == self.k:
                self._bound[j] = self.low[j][-1][0]

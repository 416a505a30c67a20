"""Exact streaming selection: the k-th largest value of a float column in a few passes over the data
(16 bits of an order-preserving 64-bit key per pass, then one pass that collects the last few
candidates), holding one 65,536-bin histogram."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

_SIGN = np.uint64(1 << 63)
_DIGIT_BITS = 16
_DIGITS = 1 << _DIGIT_BITS


def float_keys(values) -> np.ndarray:
    """Order-preserving uint64 keys of finite float values (-0.0 and 0.0 share a key)."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_to_float(key: int) -> float:
    """Inverse of :func:`float_keys` for one key."""
    key = np.uint64(key)
    bits = key & ~_SIGN if key & _SIGN else ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


class RadixSelect:
    """Exact k-th largest of a streamed float column, with k = ceil(fraction * n) (decimal fraction).

    Call :meth:`update` with every batch of finite values, then :meth:`finish_pass`; repeat
    the pass until :attr:`done`. :attr:`threshold` is then the k-th largest value (``+inf``
    when k is 0), :attr:`n` the number of values seen and :attr:`k` the rank.
    """

    def __init__(self, fraction: float, collect_limit: int = 1 << 20, rank: int | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.wanted = rank  # k itself (capped at n) instead of ceil(fraction * n): a per-cluster quota
        self.collect_limit = collect_limit
        self.n: int | None = None
        self.k: int | None = None
        self.threshold: float | None = None
        self.passes = 0
        self._shift = 64 - _DIGIT_BITS   # bit position of the digit histogrammed this pass
        self._prefix = 0                 # key bits above the digit, fixed by earlier passes
        self._rank = 0                   # rank (1 = largest) still wanted inside the prefix
        self._collect = False
        self._hist = np.zeros(_DIGITS, dtype=np.int64)
        self._kept: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return self.threshold is not None

    def _in_prefix(self, keys: np.ndarray) -> np.ndarray:
        top = self._shift + _DIGIT_BITS
        if top >= 64:
            return keys
        return keys[(keys >> np.uint64(top)) == np.uint64(self._prefix >> top)]

    def update(self, values) -> None:
        if self.done:
            return
        keys = self._in_prefix(float_keys(values))
        if self._collect:
            self._kept.append(keys)
        else:
            digits = ((keys >> np.uint64(self._shift)) & np.uint64(_DIGITS - 1)).astype(np.int64)
            self._hist += np.bincount(digits, minlength=_DIGITS)

    def finish_pass(self) -> None:
        if self.done:
            return
        self.passes += 1
        if self._collect:
            keys = np.concatenate(self._kept) if self._kept else np.zeros(0, np.uint64)
            keys = np.sort(keys)[::-1]
            self._set(int(keys[self._rank - 1]))
            return
        if self.n is None:
            self.n = int(self._hist.sum())
            self.k = math.ceil(Fraction(repr(self.fraction)) * self.n) if self.wanted is None \
                else min(self.wanted, self.n)   # exact: 0.3 is 3/10
            self._rank = self.k
            if self.k == 0:
                self.threshold = math.inf
                return
        above = np.cumsum(self._hist[::-1])           # counts of digits >= d, from the top
        top_index = int(np.searchsorted(above, self._rank))
        digit = _DIGITS - 1 - top_index
        self._rank -= int(above[top_index - 1]) if top_index else 0
        self._prefix |= digit << self._shift
        count = int(self._hist[digit])
        self._hist[:] = 0
        if self._shift == 0:
            self._set(self._prefix)
            return
        self._collect = count <= self.collect_limit   # few left: gather them in the next pass
        self._shift -= _DIGIT_BITS

    def _set(self, key: int) -> None:
        self.threshold = key_to_float(key)
        self._kept = []


def quotas(counts: dict, k: int, alpha: float) -> dict:
    """Split ``k`` kept rows between groups of ``counts[g]`` rows in proportion to ``counts[g] ** alpha``, no
    group above its size (a group that would be is kept whole and the rest split again: water-filling), rounded
    by largest remainder (ties to the smaller group id). ``alpha`` 1: every group keeps the same fraction;
    0: every group the same number; between: small groups keep more of themselves than large ones."""
    sizes = {g: int(n) for g, n in counts.items() if n > 0}
    k = min(int(k), sum(sizes.values()))
    whole: dict = {}
    while True:
        free = {g: n for g, n in sizes.items() if g not in whole}
        budget = k - sum(whole.values())
        weights = {g: float(n) ** alpha for g, n in free.items()}
        total = sum(weights.values())
        share = {g: budget * w / total for g, w in weights.items()} if total else {}
        over = {g: free[g] for g in free if share[g] >= free[g]}
        if not over:
            break
        whole.update(over)
    out = {**whole, **{g: math.floor(v) for g, v in share.items()}}
    left = k - sum(out.values())
    for g in sorted(share, key=lambda g: (-(share[g] - math.floor(share[g])), g))[:max(left, 0)]:
        out[g] += 1
    return {g: out.get(g, 0) for g in counts}

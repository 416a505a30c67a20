"""The fit's reference, written once for every source: what one input unit (a tar shard, an embedding file)
contributes (:class:`ReferencePart`, made by :meth:`ReferencePart.add` from key hashes and rows), and the
merge of those parts in input order into the whitening statistics (:class:`Reference`).

A unit's rows are split into fit and held-out rows by key hash (:func:`~pipeline.whitening.moments.held_out`).
Fit rows go into float64 :class:`~pipeline.whitening.moments.Moments` (a part's moments merged into the
running total are bit-identical to updating the total with the same rows); held-out rows into a bounded
:class:`~pipeline.whitening.moments.HashSample` (the ``max_heldout`` rows with the smallest key hashes, in
the order offered: the calibration needs no more, and memory stays bounded whatever the corpus size); with
``--clusters``, the fit rows with the smallest key hashes into another (the sample the clusters are found on).
"""

from __future__ import annotations

import numpy as np

from pipeline.whitening import WhiteningStats
from pipeline.whitening.moments import HashSample, Moments, held_out


class ReferencePart:
    """Per tower: moments of the fit rows, the held-out sample, the clusters' sample of fit rows, and the
    smallest and largest L2 norm of the rows (whether the vectors are L2-normalised). Parts merge
    (:meth:`merge`) in input order; the merged part of a whole reference is what :class:`Reference` keeps."""

    def __init__(self, holdout: float, max_heldout: int, max_sample: int = 0):
        self.holdout, self.max_heldout, self.max_sample = holdout, int(max_heldout), int(max_sample)
        self.moments: dict = {}
        self.held: dict = {}
        self.sample: dict = {}
        self.norms: dict = {}

    def add(self, tower: str, hashes: np.ndarray, rows: np.ndarray) -> "ReferencePart":
        """Add usable ``rows`` (n, d; finite) of ``tower`` whose key hashes are ``hashes`` (n,); returns self."""
        held = held_out(hashes, self.holdout)
        dim = rows.shape[1]
        self.moments.setdefault(tower, Moments.empty(dim)).update(rows[~held])
        self.held.setdefault(tower, HashSample(self.max_heldout, dim)).add(hashes[held], rows[held])
        if self.max_sample:
            self.sample.setdefault(tower, HashSample(self.max_sample, dim)).add(hashes[~held], rows[~held])
        if len(rows):
            r = np.linalg.norm(rows.astype(np.float64), axis=1)
            lo, hi = self.norms.get(tower, (np.inf, 0.0))
            self.norms[tower] = (min(lo, float(r.min())), max(hi, float(r.max())))
        return self

    def merge(self, part: "ReferencePart") -> None:
        """Add a later part of the reference (in input order) to this one."""
        for tower, moments in part.moments.items():
            self.moments[tower] = self.moments[tower].merge(moments) if tower in self.moments else moments
        for mine, theirs, size in ((self.held, part.held, self.max_heldout), (self.sample, part.sample,
                                                                             self.max_sample)):
            for tower, sample in theirs.items():
                mine.setdefault(tower, HashSample(size, sample.dim)).add(sample.hashes, sample.rows)
        for tower, (lo, hi) in part.norms.items():
            old_lo, old_hi = self.norms.get(tower, (np.inf, 0.0))
            self.norms[tower] = (min(old_lo, lo), max(old_hi, hi))


class Reference:
    """The fit's running totals: the merged :class:`ReferencePart`, the units that made it, the rows read and
    usable, and the units that failed (a fit on part of its input is no fit: nothing is written then)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.total = ReferencePart(cfg.holdout, cfg.max_heldout,
                                   cfg.cluster_sample if (cfg.clusters or 1) > 1 else 0)
        self.used: list = []  # URLs of the units with rows in the reference, in input order
        self.failed: list = []  # {"shard": url, "error": ...} of units that failed
        self.rows = self.usable = 0

    def new_part(self) -> ReferencePart:
        """An empty part with this fit's hold-out, bounds and clusters' sample size."""
        return ReferencePart(self.total.holdout, self.total.max_heldout, self.total.max_sample)

    def add(self, url: str, part: ReferencePart, rows: int, usable: int) -> None:
        """Merge unit ``url``'s part (``rows`` read, ``usable`` of them in it), in input order."""
        self.used.append(url)
        self.rows += rows
        self.usable += usable
        self.total.merge(part)

    def whiten(self, towers, units: str) -> dict:
        """``{tower: WhiteningStats}`` of the reference, for each of ``towers`` (a ValueError naming a tower
        without rows in the reference ``units``)."""
        cfg, out = self.cfg, {}
        for tower in towers:
            if tower not in self.total.moments:
                raise ValueError(f"no usable {tower} embeddings in the reference {units}")
            held = self.total.held[tower].rows
            sample = self.total.sample.get(tower)
            out[tower] = WhiteningStats.from_moments(
                self.total.moments[tower], heldout=held.astype(np.float64) if len(held) else None,
                components=cfg.components, shrinkage=cfg.shrinkage, seed=cfg.seed, clusters=cfg.clusters,
                fit_sample=None if sample is None else sample.rows)
        return out

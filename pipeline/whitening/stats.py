"""Whitened CLIP likelihood: the PCA-whitening fit, scores and calibration of one tower.

The method (Betser, Levi, Gilboa, ICML 2025): fit the mean ``mu`` and covariance ``S`` of
reference embeddings, eigendecompose ``S = V diag(lam) V^T`` (float64, descending), keep
``m`` components, ``W = V[:, :m] diag(lam[:m])^-1/2``. For a row ``x``:
``sqnorm = ||(x - mu) W||^2`` and ``loglik = -0.5 * (m log(2 pi) + sqnorm)``; the Jacobian
``log_det = -0.5 * sum(log lam[:m])`` is one constant per fit.

Conventions fixed here:

* ``S`` is the **unbiased covariance** (divisor ``n - 1``, like ``numpy.cov``). With
  ``components=None, shrinkage=0, holdout=0``, ``loglik(X) + log_det`` equals
  ``scipy.stats.multivariate_normal(mu, S).logpdf(X)``.
* Shrinkage ``a`` in ``[0, 1)`` adds ``a * trace(S) / d`` to every eigenvalue
  (``S + a tr(S)/d I``, docs/design.md). Eigenvalues below zero (rounding) are clipped to 0.
* The held-out split is deterministic: a seeded permutation, or :func:`holdout_mask` of
  the sample keys. Held-out rows are not used in ``mu``/``S``; their sorted sqnorms are the
  calibration table behind :meth:`WhiteningStats.pvalue`.

``clusters=K`` adds the local likelihood: a Gaussian mixture in the whitened coordinates
(:mod:`pipeline.whitening.clusters`), stored with the tower.

Stats files are safetensors (never pickle): :func:`write_towers` / :func:`read_towers` here, the bytes in
:mod:`pipeline.whitening.fileformat`, the multi-tower container in :mod:`pipeline.whitening.statsfile`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.errors import StatsFileError
from pipeline.whitening import fileformat
from pipeline.whitening.clusters import (
    AUTO,
    AUTO_GRID,
    AUTO_MIN_ROWS,
    CLUSTER_TENSORS,
    OPTIONAL_TENSORS,
    ClusterWhitening,
    LocalScores,
    check_clusters,
    spherical_kmeans,
)
from pipeline.whitening.diagnostics import normality_pass_rates
from pipeline.whitening.formulas import loglik_from_sqnorm, pvalue_from_sqnorm
from pipeline.whitening.moments import Moments, as_rows, check_fraction, holdout_mask

__all__ = ["WhiteningStats", "DEFAULT_TOL", "SINGULAR_RTOL", "TENSORS", "read_towers", "write_towers"]

#: Default tolerance of the "auto" rules: accept held-out ``sqnorm/m <= 1 + DEFAULT_TOL``.
DEFAULT_TOL = 0.1
#: A kept eigenvalue must exceed ``SINGULAR_RTOL * largest eigenvalue``.
SINGULAR_RTOL = 1e-12
#: Caps on the rows/features used by the fit-time normality diagnostics.
DIAG_MAX_SAMPLES = 5000
DIAG_MAX_FEATURES = 256
TENSORS = ("mean", "whitening", "eigenvalues", "calibration")


def _check_shrinkage(shrinkage):
    if shrinkage == "auto":
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real) \
            or not 0.0 <= float(shrinkage) < 1.0:
        raise ValueError(f"shrinkage must be a number in [0, 1) or 'auto'; got {shrinkage!r}")
    return float(shrinkage)


def _eigh_descending(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors, each column's largest entry > 0."""
    lam, V = np.linalg.eigh(S)
    lam, V = np.maximum(lam[::-1], 0.0), V[:, ::-1]
    signs = np.sign(V[np.abs(V).argmax(axis=0), np.arange(V.shape[1])])
    return lam, np.ascontiguousarray(V * np.where(signs == 0, 1.0, signs))


def _usable(lam: np.ndarray, n_fit: int, shrinkage: float) -> int:
    """How many leading components can be whitened (non-singular, estimable)."""
    if lam[0] <= 0:
        return 0
    k = int(np.count_nonzero(lam > SINGULAR_RTOL * lam[0]))
    return k if shrinkage > 0 else min(k, n_fit - 1)


def _auto_shrinkage(proj_sq: np.ndarray, lam: np.ndarray, base: float, tol: float) -> float:
    """Smallest ``a`` in [0, 1) with mean held-out sqnorm/d <= 1 + tol (all d components)."""
    def excess(a):
        with np.errstate(divide="ignore"):
            return float(np.mean(proj_sq / (lam + a * base))) - (1.0 + tol)
    if lam[-1] > SINGULAR_RTOL * lam[0] and excess(0.0) <= 0:
        return 0.0
    lo, hi = 1e-12, 1.0 - 1e-9
    if excess(lo) <= 0:
        return lo
    if excess(hi) > 0:
        raise ValueError("shrinkage='auto' found no shrinkage in [0, 1) that brings the held-out "
                         f"sqnorm/m below {1 + tol}: the held-out rows do not look like the fit "
                         "rows. Check the reference data or pass an explicit shrinkage.")
    from scipy import optimize  # imported by fits only: loading a stats file does not need SciPy

    return float(optimize.brentq(excess, lo, hi, xtol=1e-10))


def _auto_components(z_sq_mean: np.ndarray, tol: float) -> int:
    """Largest m with r(m) = sum_{j<=m} mean_i z_ij^2 / m <= 1 + tol (else the m nearest 1)."""
    r = np.cumsum(z_sq_mean) / np.arange(1, z_sq_mean.size + 1)
    ok = np.flatnonzero(r <= 1.0 + tol)
    return int(ok[-1] + 1) if ok.size else int(np.argmin(np.abs(r - 1.0)) + 1)


def _jsonable(value):
    """Plain-Python copy of a summary value (non-finite floats become None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, str):
        return bool(value) if isinstance(value, np.bool_) else value
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _fit_clusters(k: int, fit_sample, held: np.ndarray, mean: np.ndarray, W: np.ndarray, cal: np.ndarray,
                  seed: int) -> ClusterWhitening:
    """The local likelihood's mixture: spherical k-means of the centred fit sample (the direction every CLIP
    embedding shares removed, so that cosine separates the modes), then EM of the Gaussians in the whitened space;
    for ``k`` = :data:`~pipeline.whitening.clusters.AUTO` the K of the grid with the best held-out log-likelihood
    (the grid is climbed until a K does worse than the best so far)."""
    if k == 1:
        return ClusterWhitening.single(W.shape[1], cal)
    centred = as_rows(fit_sample, "fit rows", dim=mean.size) - mean
    z, zh = centred @ W, (held - mean) @ W
    if k != AUTO:
        return ClusterWhitening.fit(z, zh, spherical_kmeans(centred, k, seed), k, cal, seed=seed)
    if zh.shape[0] == 0:
        raise ValueError("--clusters auto chooses K on held-out rows, but there are none: use holdout > 0 (e.g. 0.1)")
    fits = {1: ClusterWhitening.single(W.shape[1], cal)}
    curve = {1: float(np.mean(loglik_from_sqnorm(np.sum(zh ** 2, axis=1), W.shape[1])))}
    for K in (K for K in AUTO_GRID if 1 < K and K * AUTO_MIN_ROWS <= z.shape[0]):
        fits[K] = ClusterWhitening.fit(z, zh, spherical_kmeans(centred, K, seed), K, cal, seed=seed)
        curve[K] = fits[K].diagnostics.get("heldout_loglik", curve[1]) if fits[K].k > 1 else curve[1]
        if curve[K] < max(curve.values()):  # past the best K: larger ones only cost more
            break
    best = max(curve, key=lambda K: (curve[K], -K))
    return replace(fits[best], diagnostics={**fits[best].diagnostics, "k_requested": "auto", "k_chosen": best,
                                            "k_curve": {str(K): v for K, v in curve.items()}})


@dataclass(frozen=True, eq=False)
class WhiteningStats:
    """A fitted whitening: mean, whitening matrix, eigenvalues and held-out calibration.

    Build with :meth:`fit` or :meth:`from_moments`; arrays are float64 and read-only.
    """

    mean: np.ndarray         # (d,) fit-split mean
    whitening: np.ndarray    # (d, m) W = V[:, :m] / sqrt(lam[:m])
    eigenvalues: np.ndarray  # (d,) all eigenvalues, descending, after shrinkage
    calibration: np.ndarray  # (n_heldout,) sorted held-out sqnorms; empty without a hold-out
    n_fit: int               # rows in the fit split
    shrinkage: float = 0.0   # a in S + a tr(S)/d I
    diagnostics: dict = field(default_factory=dict)  # fit-time numbers reported by summary()
    clusters: Optional[ClusterWhitening] = None  # the local likelihood's mixture (``fit(clusters=K)``)

    def __post_init__(self):
        arrays = {}
        for name in TENSORS:
            arr = np.array(getattr(self, name), dtype=np.float64, order="C")
            if not np.isfinite(arr).all():
                raise ValueError(f"{name} contains NaN or infinite values")
            arr.setflags(write=False)
            arrays[name] = arr
            object.__setattr__(self, name, arr)
        d = arrays["mean"].size
        W, lam, cal = arrays["whitening"], arrays["eigenvalues"], arrays["calibration"]
        if arrays["mean"].ndim != 1 or W.ndim != 2 or W.shape[0] != d or not 1 <= W.shape[1] <= d \
                or lam.shape != (d,) or cal.ndim != 1:
            raise ValueError(f"inconsistent shapes: mean {arrays['mean'].shape}, whitening "
                             f"{W.shape}, eigenvalues {lam.shape}, calibration {cal.shape}")
        if np.any(np.diff(lam) > 0) or lam[W.shape[1] - 1] <= 0 or np.any(lam < 0):
            raise ValueError("eigenvalues must be non-negative, descending, and positive for "
                             "the kept components")
        if np.any(np.diff(cal) < 0) or np.any(cal < 0):
            raise ValueError("calibration must be sorted non-negative sqnorms")
        if int(self.n_fit) < 2:
            raise ValueError(f"n_fit must be >= 2; got {self.n_fit}")
        object.__setattr__(self, "n_fit", int(self.n_fit))
        object.__setattr__(self, "shrinkage", _check_shrinkage(self.shrinkage))
        object.__setattr__(self, "diagnostics", _jsonable(dict(self.diagnostics)))
        if self.clusters is not None and (not isinstance(self.clusters, ClusterWhitening)
                                          or self.clusters.components != W.shape[1]):
            raise ValueError(f"clusters must be a ClusterWhitening over the {W.shape[1]} kept components")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def fit(cls, X, components=None, shrinkage=0.0, holdout: float = 0.1, seed: int = 0,
            keys=None, tol: float = DEFAULT_TOL, clusters: Optional[int] = None) -> "WhiteningStats":
        """Fit on the rows of ``X`` (n, d), holding out a fraction ``holdout`` for calibration.

        ``components``: ``None`` (all d), an int ``m``, or ``"auto"``: the largest ``m`` whose
        held-out mean ``sqnorm/m`` is at most ``1 + tol`` (cumulative over the leading
        components; needs a hold-out). ``shrinkage``: a float in [0, 1) or ``"auto"``: the
        smallest one giving held-out ``sqnorm/d <= 1 + tol``. The split is a permutation
        seeded by ``seed``, or :func:`holdout_mask` of ``keys`` (one string per row).
        ``clusters``: ``K`` adds the local likelihood's mixture, fitted on the fit rows
        (:mod:`pipeline.whitening.clusters`); ``None`` (the default) fits the global Gaussian only.
        """
        X = as_rows(X)
        n = X.shape[0]
        fraction = check_fraction(holdout)
        if keys is not None:
            if len(keys) != n:
                raise ValueError(f"got {len(keys)} keys for {n} rows")
            mask = holdout_mask(keys, fraction, seed)
        else:
            mask = np.zeros(n, dtype=bool)
            mask[np.random.default_rng(seed).permutation(n)[:int(round(fraction * n))]] = True
        fit_rows = X[~mask]
        moments = Moments.empty(X.shape[1]).update(fit_rows)
        return cls.from_moments(moments, heldout=X[mask], components=components,
                                shrinkage=shrinkage, tol=tol, fit_sample=fit_rows, seed=seed, clusters=clusters)

    @classmethod
    def from_moments(cls, moments: Moments, heldout=None, components=None, shrinkage=0.0,
                     tol: float = DEFAULT_TOL, fit_sample=None, seed: int = 0,
                     clusters: Optional[int] = None) -> "WhiteningStats":
        """Fit from accumulated :class:`Moments` of the fit split plus the held-out rows.

        Same options as :meth:`fit`. ``fit_sample`` (optional rows of the fit split) feeds the
        in-sample normality diagnostics of :meth:`summary` and, with ``clusters`` > 1, is the sample
        the clusters are found and fitted on (required then).
        """
        if not isinstance(moments, Moments):
            raise ValueError(f"moments must be a Moments instance; got {type(moments).__name__}")
        d, n = moments.dim, moments.count
        if n < 2:
            raise ValueError(f"need at least 2 fit rows to estimate a covariance; have {n}")
        held = np.empty((0, d)) if heldout is None else as_rows(heldout, "heldout", dim=d)
        shrinkage = _check_shrinkage(shrinkage)
        if not (isinstance(tol, numbers.Real) and tol >= 0):
            raise ValueError(f"tol must be a non-negative number; got {tol!r}")
        clusters = None if clusters is None else check_clusters(clusters)
        if clusters is not None and clusters > 1 and (fit_sample is None or len(fit_sample) < clusters):
            rows = 0 if fit_sample is None else len(fit_sample)
            raise ValueError(f"cannot make {clusters} clusters of {rows} sampled fit rows: pass fewer clusters "
                             "or more reference rows")
        if "auto" in (components, shrinkage) and held.shape[0] == 0:
            raise ValueError("components='auto' and shrinkage='auto' choose by the held-out rows, "
                             "but there are none: use holdout > 0 (e.g. 0.1) or fixed values")
        S = moments.covariance(ddof=1)
        lam, V = _eigh_descending(S)
        base = float(np.trace(S)) / d
        proj = (held - moments.mean) @ V
        if shrinkage == "auto":
            shrinkage = _auto_shrinkage(np.mean(proj**2, axis=0), lam, base, float(tol))
        lam = lam + shrinkage * base
        usable = _usable(lam, n, shrinkage)
        m = _components(components, proj, lam, usable, n, float(tol))
        W = V[:, :m] / np.sqrt(lam[:m])
        cal = np.sort(np.sum((proj[:, :m] / np.sqrt(lam[:m]))**2, axis=1))
        diagnostics = _diagnostics(moments, W, fit_sample, held, seed)
        local = None if clusters is None else _fit_clusters(clusters, fit_sample, held, moments.mean, W, cal, seed)
        return cls(mean=moments.mean, whitening=W, eigenvalues=lam, calibration=cal, n_fit=n,
                   shrinkage=shrinkage, diagnostics=diagnostics, clusters=local)

    # ---- shape ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.mean.size

    @property
    def components(self) -> int:
        return self.whitening.shape[1]

    @property
    def n_heldout(self) -> int:
        return self.calibration.size

    @property
    def log_det(self) -> float:
        """``log|det W| = -0.5 * sum(log lam[:m])``: add to :meth:`loglik` for the density of x."""
        return float(-0.5 * np.sum(np.log(self.eigenvalues[:self.components])))

    # ---- scores ---------------------------------------------------------------------------
    def sqnorm(self, X) -> np.ndarray:
        """Squared norm of the whitened rows, ``||(x - mu) W||^2``, float64 (n,)."""
        Y = (as_rows(X, dim=self.dim) - self.mean) @ self.whitening
        return np.einsum("ij,ij->i", Y, Y)

    def loglik_from_sqnorm(self, s) -> np.ndarray:
        """The paper's log-likelihood ``-0.5 * (m log(2 pi) + sqnorm)``."""
        return loglik_from_sqnorm(s, self.components)

    def loglik(self, X) -> np.ndarray:
        """Log-likelihood of each row of ``X`` in the whitened space (without ``log_det``)."""
        return self.loglik_from_sqnorm(self.sqnorm(X))

    def pvalue_from_sqnorm(self, s) -> np.ndarray:
        """Empirical upper tail ``(1 + #{cal >= s}) / (n_cal + 1)``: the share of held-out
        reference rows that were less likely. NaN stays NaN."""
        if self.calibration.size == 0:
            raise ValueError("these statistics have no calibration table (fitted with holdout=0), "
                             "so there are no empirical p-values; refit with holdout > 0 "
                             "(e.g. 0.1), or use chi2_pvalue as a rough diagnostic")
        return pvalue_from_sqnorm(np.asarray(s, dtype=np.float64), self.calibration)

    def pvalue(self, X) -> np.ndarray:
        """Empirical p-value of each row of ``X`` against the held-out calibration table."""
        return self.pvalue_from_sqnorm(self.sqnorm(X))

    def local_scores(self, X) -> LocalScores:
        """The local likelihood of each row of ``X`` (float64): most likely cluster, mixture log-likelihood
        (in :meth:`loglik`'s units), the own cluster's sqnorm and p-value. Needs ``fit(clusters=K)``."""
        if self.clusters is None:
            raise ValueError("these statistics have no clusters: fit with clusters=K (wclip fit --clusters K) "
                             "for the local likelihood")
        Y = (as_rows(X, dim=self.dim) - self.mean) @ self.whitening
        return self.clusters.score(Y, np.einsum("ij,ij->i", Y, Y))

    def chi2_pvalue_from_sqnorm(self, s) -> np.ndarray:
        """Diagnostic: ``chi2(m).sf(sqnorm)``, exact only if the embeddings were Gaussian."""
        from scipy import stats

        return stats.chi2(self.components).sf(np.asarray(s, dtype=np.float64))

    def chi2_pvalue(self, X) -> np.ndarray:
        """Diagnostic chi-square p-value of each row of ``X`` (see :meth:`chi2_pvalue_from_sqnorm`)."""
        return self.chi2_pvalue_from_sqnorm(self.sqnorm(X))

    def summary(self) -> dict:
        """JSON-able numbers describing the fit (sizes, held-out and in-sample sqnorm/m,
        log_det, normality pass rates)."""
        m = self.components
        return _jsonable({
            "dim": self.dim, "components": m, "shrinkage": self.shrinkage,
            "n_fit": self.n_fit, "n_heldout": self.n_heldout,
            "heldout_sqnorm_over_m": float(self.calibration.mean()) / m if self.n_heldout else None,
            "fit_sqnorm_over_m": self.diagnostics.get("fit_sqnorm_over_m"),
            "log_det": self.log_det,
            "normality_fit": self.diagnostics.get("normality_fit"),
            "normality_heldout": self.diagnostics.get("normality_heldout"),
            **({"clusters": self.clusters.summary()} if self.clusters is not None else {}),
        })

    def tensors(self) -> dict:
        """The arrays a stats file stores for this tower: :data:`TENSORS`, and ``clusters.*`` when clustered."""
        out = {name: getattr(self, name) for name in TENSORS}
        if self.clusters is not None:
            out.update({f"clusters.{name}": a for name, a in self.clusters.tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, arrays: dict, summary: dict) -> "WhiteningStats":
        """The tower stored as ``arrays`` (:meth:`tensors`) with its recorded ``summary``; a ValueError, KeyError
        or TypeError names what does not fit."""
        if any(a.dtype != np.float64 for a in arrays.values()):
            raise ValueError("tensors must be float64")
        clusters = None
        if any(name.startswith("clusters.") for name in arrays):
            info = summary["clusters"]
            clusters = ClusterWhitening(**{n: arrays[f"clusters.{n}"] for n in CLUSTER_TENSORS},
                                        factors=arrays.get("clusters.factors"), shrinkage=info["shrinkage"],
                                        diagnostics={k: v for k, v in info.items()
                                                     if k not in ("k", "shrinkage", "weights", "calibration_counts")})
        ws = cls(**{n: arrays[n] for n in TENSORS}, n_fit=summary["n_fit"], shrinkage=summary["shrinkage"],
                 diagnostics={k: summary.get(k) for k in ("fit_sqnorm_over_m", "normality_fit", "normality_heldout")},
                 clusters=clusters)
        if (summary["dim"], summary["components"], summary["n_heldout"]) != (ws.dim, ws.components, ws.n_heldout):
            raise ValueError("recorded dim/components/n_heldout do not match the tensors")
        return ws

    # ---- files ------------------------------------------------------------------------------
    def save(self, path, metadata: dict | None = None, tower: str = "default") -> Path:
        """Write a one-tower stats file (see :func:`write_towers`)."""
        return write_towers(path, {tower: self}, metadata or {})

    @classmethod
    def load(cls, path, tower: str | None = None, dim: int | None = None) -> "WhiteningStats":
        """Read one tower of a stats file (the only one when ``tower`` is None)."""
        towers, _ = read_towers(path, dim=dim)
        if tower is None:
            if len(towers) != 1:
                raise StatsFileError(f"{path} holds towers {sorted(towers)}; pass tower=NAME")
            tower = next(iter(towers))
        if tower not in towers:
            raise StatsFileError(f"{path} has no tower {tower!r} (it has {sorted(towers)}); "
                                 "re-run `wclip fit` for that tower")
        return towers[tower]


def write_towers(path, towers: dict, metadata: dict) -> Path:
    """Write ``towers`` ({name: WhiteningStats}) and ``metadata`` as a stats file: tensors ``{tower}.{name}``
    (:meth:`WhiteningStats.tensors`), metadata plus ``towers`` and a ``summary`` per tower."""
    tensors = {f"{t}.{name}": a for t, ws in towers.items() for name, a in ws.tensors().items()}
    meta = {**metadata, "towers": list(towers), "summary": {t: ws.summary() for t, ws in towers.items()}}
    return fileformat.write(path, tensors, meta)


def read_towers(path, dim: int | None = None) -> tuple[dict, dict]:
    """``({tower: WhiteningStats}, metadata)`` of a stats file, every tower validated; ``dim`` (optional) is
    the embedding size expected. Anything wrong raises :class:`StatsFileError`."""
    def expected(meta):
        towers = meta["towers"]
        return ({f"{t}.{n}" for t in towers for n in TENSORS},
                {f"{t}.clusters.{n}" for t in towers for n in CLUSTER_TENSORS + OPTIONAL_TENSORS})

    arrays, meta = fileformat.read(path, expected)
    towers = meta["towers"]
    out = {}
    for t in towers:
        prefix = f"{t}."
        try:
            ws = WhiteningStats.from_tensors({n[len(prefix):]: a for n, a in arrays.items() if n.startswith(prefix)},
                                             meta["summary"][t])
        except (ValueError, KeyError, TypeError) as exc:
            raise fileformat.invalid(path, f"tower {t!r}: {exc}") from exc
        if dim is not None and ws.dim != dim:
            raise StatsFileError(f"{path}: tower {t!r} was fitted on {ws.dim}-dimensional "
                                 f"embeddings, but this model produces {dim}. Fit stats for "
                                 "this model with `wclip fit`.")
        out[t] = ws
    return out, meta


def _components(components, proj: np.ndarray, lam: np.ndarray, usable: int, n: int, tol: float) -> int:
    """The components ``m`` a fit keeps: all, ``auto`` (chosen on the held-out rows' projections ``proj``), or
    the int asked for; a ValueError when the covariance has fewer usable directions."""
    d = lam.size
    if components == "auto":
        m = _auto_components(np.mean(proj[:, :usable]**2, axis=0) / lam[:usable], tol) if usable else 1
    elif components is None:
        m = d
    elif isinstance(components, numbers.Integral) and not isinstance(components, bool) and 1 <= components <= d:
        m = int(components)
    else:
        raise ValueError(f"components must be None, 'auto' or an int in [1, {d}]; got {components!r}")
    if m > usable:
        raise ValueError(f"cannot whiten {m} components: the covariance of the {n} fit rows has "
                         f"only {usable} usable direction(s) (without shrinkage n_fit must exceed "
                         f"m, and kept eigenvalues must exceed {SINGULAR_RTOL:g} x the largest). "
                         f"Request components <= {usable}, add shrinkage (e.g. 0.1), or add "
                         "reference rows.")
    return m


def _diagnostics(moments: Moments, W: np.ndarray, fit_sample, held: np.ndarray, seed: int) -> dict:
    """In-sample ``sqnorm / m`` and the normality pass rates of (a sample of) the fit and held-out rows."""
    n, m = moments.count, W.shape[1]
    diagnostics = {"fit_sqnorm_over_m": float(np.sum((moments.scatter @ W) * W)) / n / m}
    rng = np.random.default_rng(seed)
    for label, rows in (("fit", fit_sample), ("heldout", held)):
        if rows is not None:
            rows = as_rows(rows, f"{label} rows", dim=moments.dim)
            if rows.shape[0] > DIAG_MAX_SAMPLES:
                rows = rows[np.sort(rng.choice(rows.shape[0], DIAG_MAX_SAMPLES, replace=False))]
            diagnostics[f"normality_{label}"] = normality_pass_rates(
                (rows - moments.mean) @ W, max_features=DIAG_MAX_FEATURES)
    return diagnostics

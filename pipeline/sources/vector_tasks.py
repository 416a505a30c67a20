"""The per-file work of the embeddings jobs (one task per :class:`~pipeline.sources.vectors.EmbeddingFile`):
score a file into its Parquet table, or sum its reference moments. No model: row blocks, whitened (and scored
against the mixture) by the tar path's backends through :class:`~pipeline.whitening.kernels.blocks.BlockScorer`:
NumPy on the CPU by default (float32, like ``((x - mu) @ W) ** 2``, no torch), torch on ``--device cuda`` or
``--backend torch``; float64 for the fit's moments.

Tasks know nothing about where they run (:mod:`pipeline.executors`: threads of one process, or Ray tasks);
their memory is bounded by ``block_rows`` plus the file's metadata and scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.runs.reference import ReferencePart
from pipeline.scores.table import score_array, scores_schema
from pipeline.sources.vectors import (
    NORM_STATE,
    EmbeddingFile,
    array_name,
    as_float32,
    read_blocks,
    read_metadata,
    unit_norms,
)
from pipeline.whitening.clusters import ClusterWhitening
from pipeline.whitening.formulas import loglik_from_sqnorm, pvalue_from_sqnorm
from pipeline.whitening.kernels.blocks import BlockScorer
from pipeline.whitening.moments import key_hashes

BAD_ROW = "encode"  # status of a row whose embedding is NaN/inf: its encoding failed upstream


def _bad_rows(finite: dict, n: int) -> tuple:
    """Rows with a non-finite embedding, and their error messages (None elsewhere)."""
    bad = np.zeros(n, dtype=bool)
    errors = np.full(n, None, dtype=object)
    for tower, ok in finite.items():
        if ok.all():
            continue
        for i in np.flatnonzero(~ok):
            message = f"{tower} embedding is not finite (NaN/inf)"
            errors[i] = message if errors[i] is None else f"{errors[i]}; {message}"
        bad |= ~ok
    return bad, errors


def _counts(ok: int, bad: int) -> dict:
    return {k: v for k, v in ((BAD_ROW, bad), ("ok", ok)) if v}


def cosine(a: np.ndarray, b: np.ndarray, aa: Optional[np.ndarray] = None,
           bb: Optional[np.ndarray] = None) -> np.ndarray:
    """Row-wise cosine of two float32 arrays, float32 (NaN or inf where a row is not finite or is zero: the
    caller keeps only finite values); ``aa``, ``bb``: the rows' squared norms, when already at hand."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dot = np.vecdot(a, b)
        norms = np.vecdot(a, a) if aa is None else aa.copy()
        norms *= np.vecdot(b, b) if bb is None else bb
        np.sqrt(norms, out=norms)
        dot /= norms
    return dot


class NormRange:
    """The smallest and largest squared L2 norm of each tower's finite rows, over a file's blocks: whether the
    whole file is L2-normalised (:func:`~pipeline.sources.vectors.unit_norms`, the rule the probe and the fit
    apply too)."""

    def __init__(self):
        self.ranges: dict = {}

    def add(self, tower: str, sq: np.ndarray) -> None:
        finite = sq[np.isfinite(sq)]
        if finite.size:
            lo, hi = self.ranges.get(tower, (np.inf, 0.0))
            self.ranges[tower] = (min(lo, float(finite.min())), max(hi, float(finite.max())))

    def normalized(self, tower: str) -> Optional[bool]:
        """None: no finite row to tell."""
        if tower not in self.ranges:
            return None
        lo, hi = self.ranges[tower]
        return unit_norms(float(np.sqrt(lo)), float(np.sqrt(hi)))

    def check(self, file: EmbeddingFile, towers, normalized: bool) -> None:
        """A ValueError naming the first of ``towers`` whose rows are not ``normalized`` as the stats' are."""
        for tower, url, member in file.towers:
            got = self.normalized(tower) if tower in towers else None
            if got is not None and got != normalized:
                raise ValueError(f"{array_name(url, member)}: these {tower} embeddings are {NORM_STATE[got]}, but "
                                 f"the stats were fitted on {NORM_STATE[normalized]} vectors: a file of another kind "
                                 f"among the inputs (its rows are not scored)")


class Scratch:
    """Float32 arrays a task's blocks pass through, allocated once per file and reused: fresh ones for every
    block were given back to the operating system and page-faulted in again (CPU per 100k x 64 file 113 vs
    93 ms, measured with glibc told to keep them)."""

    def __init__(self, rows: int):
        self.rows, self.arrays = rows, {}

    def get(self, name: str, n: int, width: int) -> np.ndarray:
        """The first ``n`` rows of array ``name`` (``rows`` x ``width``)."""
        array = self.arrays.get(name)
        if array is None or array.shape[1] != width:
            array = self.arrays[name] = np.empty((self.rows, width), dtype=np.float32)
        return array[:n]


# -- scoring ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TowerScorer:
    """What a scoring task needs of one tower's stats: its :class:`~pipeline.whitening.kernels.blocks.BlockScorer`
    (the whitening and the mixture on the run's device and backend; NumPy on the CPU by default) and the
    calibration, with :mod:`pipeline.whitening.formulas` for the log-likelihood and the p-value."""

    scorer: BlockScorer
    calibration: np.ndarray  # float64 sorted held-out sqnorms (empty: no p-values)
    clusters: Optional[ClusterWhitening] = None  # the local likelihood's mixture (its p-values), when fitted

    @classmethod
    def of(cls, ws, device: str = "cpu", backend: str = "auto") -> "TowerScorer":
        return cls(scorer=BlockScorer(ws, device, backend), calibration=np.asarray(ws.calibration, dtype=np.float64),
                   clusters=ws.clusters)

    @property
    def dim(self) -> int:
        return self.scorer.d

    def loglik(self, s: np.ndarray) -> np.ndarray:
        return loglik_from_sqnorm(s, self.scorer.m)

    def pvalue(self, s: np.ndarray) -> np.ndarray:
        """Share of held-out reference rows that were less likely (NaN without a calibration table)."""
        if not self.calibration.size:
            return np.full(s.shape, np.nan)
        return pvalue_from_sqnorm(s, self.calibration)


@dataclass(frozen=True)
class ScoreFile:
    """One file to score: the job's stats towers and where the outputs go."""

    file: EmbeddingFile
    kind: str  # CLIP_RETRIEVAL or DATACOMP (which metadata columns hold what)
    stats: dict  # {tower: TowerScorer}
    sink: object  # pipeline.scores.sinks.ScoreSink
    block_rows: int  # pipeline.config.EmbeddingRunConfig.block_rows
    normalized: Optional[bool] = None  # the stats' normalisation, which every file must have (None: unchecked)


class _Columns:
    """A file's score arrays, filled block by block."""

    def __init__(self, task: ScoreFile, n: int):
        self.scorers = {t: ts.scorer for t, ts in task.stats.items()}
        self.sqnorm = {t: np.full(n, np.nan, dtype=np.float32) for t in self.scorers}
        self.mixtures = {t: ts.clusters for t, ts in task.stats.items() if ts.clusters is not None}
        self.local = {t: (np.full(n, -1, np.int64), np.full(n, np.nan), np.full(n, np.nan)) for t in self.mixtures}
        self.unscored = {t: np.ones(n, dtype=bool) for t, _, _ in task.file.towers if t not in self.scorers}
        self.clip = np.full(n, np.nan, dtype=np.float32)
        self.norms = NormRange()
        self.scratch = Scratch(task.block_rows)

    def add(self, start: int, blocks: dict) -> None:
        k = len(next(iter(blocks.values())))
        rows, scratch = slice(start, start + k), self.scratch
        x32 = {t: as_float32(b, scratch.get(t, k, b.shape[1])) for t, b in blocks.items()}
        sq = {t: np.vecdot(x, x) for t, x in x32.items()}  # before the whitening centres x in place
        if "image" in x32 and "text" in x32:
            self.clip[rows] = cosine(x32["image"], x32["text"], sq["image"], sq["text"])
        for tower, x in x32.items():
            if tower not in self.scorers:
                self.unscored[tower][rows] = np.isfinite(x).all(axis=1)
                continue
            self.norms.add(tower, sq[tower])
            scorer = self.scorers[tower]  # x is the block's scratch copy: centred in place
            work = [scratch.get(f"{tower}.mix{i}", k, shape[1]) for i, shape in enumerate(scorer.work_shapes(k))]
            got = scorer.score(x, overwrite_x=True, out=scratch.get(f"{tower}.w", k, scorer.m), work=work)
            self.sqnorm[tower][rows] = got.sqnorm
            if tower in self.mixtures:
                for out, values in zip(self.local[tower], (got.cluster, got.local_loglik, got.s_own)):
                    out[rows] = values


def score_file(task: ScoreFile) -> dict:
    """Score every row of one file and write its Parquet file and marker; returns ``{"summary": ...}``. A file
    whose width or normalisation is not the stats' fails (a ValueError naming it) and writes nothing."""
    started = time.time()
    file = task.file
    meta = read_metadata(file, task.kind)
    n = meta.num_rows
    cols = _Columns(task, n)
    widths = {t: (ws.dim, "the stats were fitted on") for t, ws in task.stats.items()}
    with np.errstate(invalid="ignore", over="ignore"):
        for start, blocks in read_blocks(file, n, task.block_rows, reuse=True, widths=widths):
            cols.add(start, blocks)
    if task.normalized is not None:
        cols.norms.check(file, task.stats, task.normalized)
    finite = {t: cols.unscored[t] if t in cols.unscored else np.isfinite(cols.sqnorm[t]) for t, _, _ in file.towers}
    for tower, s in cols.sqnorm.items():
        s[~finite[tower]] = np.nan  # a NaN p-value, not the one of an infinite sqnorm
    bad, errors = _bad_rows(finite, n)
    scores = {"clip_score": cols.clip}
    for tower, ws in task.stats.items():
        s = cols.sqnorm[tower]
        scores.update({f"{tower}_sqnorm": s, f"{tower}_loglik": ws.loglik(s), f"{tower}_pvalue": ws.pvalue(s)})
    for tower, (cluster, loglik, s_own) in cols.local.items():  # a row without a finite sqnorm: cluster -1, NaN
        scores.update({f"{tower}_cluster": np.where(cluster >= 0, cluster, np.nan), f"{tower}_local_loglik": loglik,
                       f"{tower}_local_pvalue": cols.mixtures[tower].pvalue(cluster, s_own)})
    table = scores_table(meta, file.url, bad, errors, scores, local=bool(cols.mixtures))
    elapsed = time.time() - started
    n_bad = int(bad.sum())
    summary = {"shard": file.url, "name": file.name, "rows": n, "status_counts": _counts(n - n_bad, n_bad),
               "ok": n - n_bad, "damage": None, "duration_s": round(elapsed, 3),
               "samples_per_s": round(n / elapsed, 2) if elapsed > 0 else None}
    return task.sink.write(file.name, file.url, table, summary)


def scores_table(meta: pa.Table, url: str, bad: np.ndarray, errors: np.ndarray, scores: dict,
                 local: bool = False) -> pa.Table:
    """The scores table (:func:`pipeline.scores.table.scores_schema`, ``local``: with the local likelihood's columns)
    of a file's rows, built column by column (a null where a score is not finite). ``shard`` is ``url``, or the
    metadata's ``shard`` where it has one (embeddings wclip saved: the tar shard each row came from)."""
    n = meta.num_rows
    any_bad = bool(bad.any())
    columns = {"key": meta["key"], "url": meta["url"], "uid": meta["uid"], "caption": meta["caption"],
               "shard": meta["shard"] if "shard" in meta.column_names else pa.repeat(pa.scalar(url, pa.string()), n),
               "index": pa.array(np.arange(n, dtype=np.int32)),
               "status": pc.if_else(pa.array(bad), BAD_ROW, "ok").cast(pa.string()) if any_bad
               else pa.repeat(pa.scalar("ok", pa.string()), n),
               "error": pa.array(errors, pa.string()) if any_bad else pa.nulls(n, pa.string())}
    schema = scores_schema(local)
    for f in schema:
        if f.name not in columns:
            columns[f.name] = score_array(scores[f.name] if f.name in scores else np.full(n, np.nan, np.float32),
                                          f.type)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def warm_up() -> None:
    """Build and serialise an empty scores table, once, before the files start: pyarrow imports pandas on its
    first conversion (0.3 s here) and sets up its Parquet writer, and on threads the first file of every thread
    would wait for that."""
    from pipeline.scores.table import table_bytes

    meta = pa.table({c: pa.nulls(0, pa.string()) for c in ("key", "url", "uid", "caption")})
    table_bytes(scores_table(meta, "", np.zeros(0, dtype=bool), np.zeros(0, dtype=object), {}))


# -- fitting ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitFile:
    """One reference file: its rows (the first ``rows``, or all) split into fit and held-out by key hash."""

    file: EmbeddingFile
    kind: str
    holdout: float
    seed: int
    max_heldout: int  # held-out rows kept: those with the smallest key hashes
    block_rows: int  # pipeline.config.EmbeddingRunConfig.block_rows
    rows: Optional[int] = None  # read only the first rows (--max-samples)
    max_sample: int = 0  # fit rows kept for the clusters (--clusters): those with the smallest key hashes
    widths: Optional[dict] = None  # {tower: (width, whose)} every file must have (read_blocks' widths)


def fit_file(task: FitFile) -> dict:
    """The file's :class:`~pipeline.runs.reference.ReferencePart` of its usable rows (finite in every tower)
    and a summary (rows read, usable)."""
    started = time.time()
    file = task.file
    meta = read_metadata(file, task.kind)
    n = meta.num_rows if task.rows is None else min(task.rows, meta.num_rows)
    keys = [f"{file.name}/{k if k is not None else '#' + str(i)}"
            for i, k in enumerate(meta.column("key").slice(0, n).to_pylist())]
    hashes = key_hashes(keys, task.seed)
    part = ReferencePart(task.holdout, task.max_heldout, task.max_sample)
    usable = 0
    for start, blocks in read_blocks(file, meta.num_rows, task.block_rows, rows=n, reuse=True, widths=task.widths):
        rows = slice(start, start + len(next(iter(blocks.values()))))
        ok = np.logical_and.reduce([np.isfinite(b).all(axis=1) for b in blocks.values()])
        usable += int(ok.sum())
        for tower, block in blocks.items():
            part.add(tower, hashes[rows][ok], block[ok])
    summary = {"shard": file.url, "name": file.name, "rows": n, "usable": usable,
               "status_counts": _counts(usable, n - usable), "duration_s": round(time.time() - started, 3)}
    return {"summary": summary, "part": part}

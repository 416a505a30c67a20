"""What a dataset card measures: the scores streamed in two passes, and the fit read from the stats file.

The first pass fills a quantile sketch per score column (:class:`pipeline.card.sketch.QuantileSketch`; the
local likelihood's columns too when the score files have them), status and error counts, the K least and
most likely rows and, for each tower whose clusters the card shows, the rows per cluster and each
cluster's lowest local log-likelihoods (:class:`pipeline.card.sketch.GroupedLowest`); the second fills
fixed-bin histograms whose ranges come from the first. Memory stays bounded whatever the number of rows.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.card.sketch import Extremes, GroupedLowest, Histogram, Histogram2D, QuantileSketch
from pipeline.scores.table import (
    LOCAL_SCORE_COLUMNS,
    SCORE_COLUMNS,
    file_schema,
    float_values,
    iter_batches,
    named_errors,
    ok_mask,
)
from pipeline.storage import jsonable

MAX_ERROR_KINDS = 200
PAYLOAD = ("key", "shard", "index", "caption")       # what the card keeps of an extreme row
HISTOGRAM_COLUMNS = ("image_loglik", "text_loglik", "clip_score")
LOCAL_HISTOGRAM_COLUMNS = tuple(c for c in LOCAL_SCORE_COLUMNS if c.endswith("_loglik"))  # beside the global
CLUSTER_PAYLOAD = ("key", "url", "caption")          # what the card keeps of a cluster's lowest rows
CLUSTER_EXAMPLES = 3                                 # lowest-local-likelihood rows kept per cluster
NORMALITY_TESTS = ("anderson_darling", "dagostino_pearson")
FIT_METADATA = ("model", "model_identity", "pretrained", "checkpoint_sha256", "normalize", "precision",
                "reference_digest", "reference_shards", "n_reference", "components_requested", "shrinkage",
                "holdout", "wclip_version", "created")


def error_kind(message) -> str:
    """A short, stable label for an error message (exception name or its first words)."""
    if not message:
        return "(no message)"
    first = str(message).strip().splitlines()[0]
    head = first.split(":", 1)[0] if ":" in first[:80] else first
    return re.sub(r"\d+", "#", re.sub(r"0x[0-9a-fA-F]+", "0x#", head))[:80].strip() or "(no message)"


@dataclass
class CorpusSummary:
    """What the streaming passes measured."""

    rows: int
    status: Counter
    errors: Counter                   # (status, kind) -> count
    sketches: dict                    # column -> QuantileSketch
    extremes: Extremes
    histograms: dict                  # column -> Histogram
    density: Histogram2D | None       # (image_loglik, clip_score)
    clusters: dict = field(default_factory=dict)  # tower -> GroupedLowest of <tower>_local_loglik by cluster


def measured_columns(files) -> tuple:
    """The score columns a card measures: :data:`pipeline.scores.table.SCORE_COLUMNS`, then the local likelihood's
    float columns that the score files have (one fit per folder: the first file tells)."""
    present = set(file_schema(files[0]).names)
    return SCORE_COLUMNS + tuple(c for c in LOCAL_SCORE_COLUMNS if c in present)


def cluster_columns(tower: str) -> tuple:
    """A tower's cluster number and local log-likelihood and p-value columns."""
    return f"{tower}_cluster", f"{tower}_local_loglik", f"{tower}_local_pvalue"


def summarize(files, rel_err: float = 0.001, k: int = 8, clusters: dict | None = None) -> CorpusSummary:
    """Stream the score files twice and measure everything the card shows; ``clusters``: ``{tower: K}`` of
    the towers whose clusters are tallied (their cluster columns must be in the files)."""
    columns = measured_columns(files)
    summary = CorpusSummary(0, Counter(), Counter(), {c: QuantileSketch(rel_err) for c in columns},
                            Extremes(k), {}, None,
                            {t: GroupedLowest(n, CLUSTER_EXAMPLES) for t, n in (clusters or {}).items()})
    read = ["status", "error", *PAYLOAD, *columns]
    if summary.clusters:
        read += [*CLUSTER_PAYLOAD, *(c for t in summary.clusters for c in cluster_columns(t))]
    read = list(dict.fromkeys(read))
    for path in files:
        with named_errors(path):
            for batch in iter_batches(path, read):
                _first_pass(summary, batch)
    summary.histograms, summary.density = _bins(summary.sketches)
    if summary.histograms:
        for path in files:
            with named_errors(path):
                for batch in iter_batches(path, ["status", *summary.histograms]):
                    _second_pass(summary, batch)
    return summary


def _first_pass(summary: CorpusSummary, batch: pa.RecordBatch) -> None:
    summary.rows += batch.num_rows
    status = pc.fill_null(batch.column("status"), "(null)")
    for item in pc.value_counts(status).to_pylist():
        summary.status[item["values"]] += item["counts"]
    ok = ok_mask(batch)
    if not ok.all():
        bad = pa.array(~ok)
        _count_errors(summary.errors, status.filter(bad).to_pylist(), batch.column("error").filter(bad).to_pylist())
    for c, sketch in summary.sketches.items():
        sketch.update(float_values(batch, c)[ok])
    loglik = np.where(ok, float_values(batch, "image_loglik"), np.nan)
    summary.extremes.update(loglik, lambda i, b=batch: {p: b.column(p)[i].as_py() for p in PAYLOAD})
    for tower, tally in summary.clusters.items():
        _tally_clusters(tally, batch, ok, *cluster_columns(tower))


def _tally_clusters(tally: GroupedLowest, batch: pa.RecordBatch, ok: np.ndarray, cluster: str, loglik: str,
                    pvalue: str) -> None:
    """Rows with status ok per cluster, and each cluster's lowest local log-likelihoods."""
    pvalues = float_values(batch, pvalue)

    def row(i: int) -> dict:
        found = {p: batch.column(p)[i].as_py() for p in CLUSTER_PAYLOAD}
        return dict(found, local_pvalue=float(pvalues[i]) if np.isfinite(pvalues[i]) else None)

    tally.update(np.where(ok, float_values(batch, cluster), np.nan), float_values(batch, loglik), row)


def _count_errors(errors: Counter, statuses: list, messages: list) -> None:
    """Count failed rows by (status, error kind); past MAX_ERROR_KINDS kinds, new ones go to "(other kinds)"."""
    for status, message in zip(statuses, messages):
        kind = (status, error_kind(message))
        if kind in errors or len(errors) < MAX_ERROR_KINDS:
            errors[kind] += 1
        else:
            errors[(status, "(other kinds)")] += 1


def _bins(sketches: dict) -> tuple[dict, Histogram2D | None]:
    """Histograms over the 0.1%..99.9% range of each column (padded 5%), and the 2-D density box."""
    histograms = {}
    for c in HISTOGRAM_COLUMNS + tuple(c for c in LOCAL_HISTOGRAM_COLUMNS if c in sketches):
        s = sketches[c]
        if s.count:
            lo, hi = s.quantile(0.001), s.quantile(0.999)
            pad = 0.05 * (hi - lo) or 1.0
            histograms[c] = Histogram(max(s.min, lo - pad), min(s.max, hi + pad), 80)
    density = None
    if sketches["image_loglik"].count and sketches["clip_score"].count:
        density = Histogram2D(_box(histograms["image_loglik"]), _box(histograms["clip_score"]), 60)
    return histograms, density


def _second_pass(summary: CorpusSummary, batch: pa.RecordBatch) -> None:
    ok = ok_mask(batch)
    values = {c: float_values(batch, c)[ok] for c in summary.histograms}
    for c, h in summary.histograms.items():
        h.update(values[c])
    if summary.density is not None:
        summary.density.update(values["image_loglik"], values["clip_score"])


def _box(h: Histogram):
    return float(h.edges[0]), float(h.edges[-1])


def provenance(sf) -> dict:
    """Model, reference set and fit settings of a stats file (:class:`pipeline.whitening.StatsFile`)."""
    towers = {}
    for name, ws in sf.towers.items():
        towers[name] = {k: jsonable(getattr(ws, k)) for k in
                        ("dim", "components", "shrinkage", "n_fit", "n_heldout", "log_det")}
        towers[name]["heldout_sqnorm_over_m"] = jsonable(ws.summary()["heldout_sqnorm_over_m"])
    return {"metadata": {k: sf.metadata[k] for k in FIT_METADATA if k in sf.metadata}, "towers": towers}


def normality(sf) -> dict:
    """Per tower: Anderson-Darling and D'Agostino-Pearson pass rates, in-sample and held-out."""
    result = {}
    for name, ws in sf.towers.items():
        summary, entry = ws.summary(), {}
        for split, key in (("in_sample", "normality_fit"), ("heldout", "normality_heldout")):
            found = summary.get(key) if isinstance(summary.get(key), dict) else {}
            entry[split] = {test: jsonable(found.get(test)) for test in NORMALITY_TESTS}
            entry[split]["n_samples"] = found.get("n_samples")
            entry[split]["n_features"] = found.get("n_features")
        result[name] = entry
    return result


def clustered_towers(sf, files) -> tuple[dict, list]:
    """``({tower: K}, notes)``: the towers with clusters in the stats whose cluster column the score files
    have (those the card tallies), and a note for each clustered tower whose scores lack it."""
    present, towers, notes = set(file_schema(files[0]).names), {}, []
    for tower, ws in sf.towers.items():
        if ws.clusters is None:
            continue
        column = cluster_columns(tower)[0]
        if column in present:
            towers[tower] = ws.clusters.k
        else:
            notes.append(f"{tower} tower: the stats have {ws.clusters.k} clusters, but the score files have no "
                         f"{column} column, so the clusters' corpus sizes and lowest rows are not shown")
    return towers, notes


def clusters(sf, corpus: CorpusSummary) -> tuple[dict, list]:
    """``({tower: section}, notes)`` for every tower with clusters in the stats: K (with ``--clusters auto`` the
    held-out log-likelihood of every K tried), the rank of the clusters' own directions, the chosen shrinkage and,
    per cluster, its weight, rows and held-out rows in the reference (the stats; ``n`` held-out rows make
    ``1 / (n + 1)`` the smallest local p-value it can give; one without uses all clusters' held-out rows), how well
    it fits (the mean local and global log-likelihood of its held-out rows, its shrinkage; None for stats fitted
    before these were recorded) and its rows with status ok in the scored corpus, with its
    lowest-local-likelihood rows (``{}`` without clusters)."""
    section, notes = {}, []
    for tower, ws in sf.towers.items():
        if ws.clusters is None:
            continue
        info, tally = ws.clusters.summary(), corpus.clusters.get(tower)
        k = info["k"]
        sizes = info.get("sizes") or [None] * k
        total = int(tally.counts.sum()) if tally is not None else None
        pooled = int(sum(info["calibration_counts"]))  # a cluster without held-out rows uses all of them
        fit = {name: info.get(key) or [None] * k for name, key in (
            ("heldout_loglik", "heldout_cluster_loglik"), ("heldout_global_loglik", "heldout_cluster_global_loglik"),
            ("shrinkage", "shrinkages"))}
        rows = []
        for j, weight in enumerate(info["weights"]):
            n = int(tally.counts[j]) if tally is not None else None
            share = n / total if total else None
            heldout = info["calibration_counts"][j]
            rows.append({"cluster": j, "reference_weight": weight, "reference_rows": sizes[j],
                         "heldout_rows": heldout, "pvalue_floor": 1.0 / ((heldout or pooled) + 1) if pooled else None,
                         **{name: values[j] for name, values in fit.items()},
                         "corpus_rows": n, "corpus_share": share,
                         "corpus_over_reference": None if share is None else share / weight,
                         "lowest": [dict(r, local_loglik=v) for v, r in tally.low[j]] if tally is not None else []})
        section[tower] = {"k": k, "shrinkage": info["shrinkage"], "rank": info.get("rank", 0),
                          "k_curve": info.get("k_curve"), "heldout_loglik": info.get("heldout_loglik"),
                          "heldout_global_loglik": info.get("heldout_global_loglik"),
                          "reference_rows": None if None in sizes else int(sum(sizes)),
                          "corpus_rows": total, "outside": tally.outside if tally is not None else None,
                          "examples_per_cluster": CLUSTER_EXAMPLES, "clusters": rows}
        if tally is not None and tally.outside:
            notes.append(f"{tower} tower: {tally.outside} rows have a cluster number outside 0..{k - 1}: the scores "
                         f"were not made by these stats")
    return section, notes

"""What a dataset card measures: the scores streamed in two passes, and the fit read from the stats file.

The first pass fills a quantile sketch per score column (:class:`pipeline.card.sketch.QuantileSketch`),
status and error counts, and the K least and most likely rows; the second fills fixed-bin histograms
whose ranges come from the first. Memory stays bounded whatever the number of rows.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.card.sketch import Extremes, Histogram, Histogram2D, QuantileSketch
from pipeline.storage import jsonable
from pipeline.table import SCORE_COLUMNS, float_values, iter_batches, named_errors, ok_mask

MAX_ERROR_KINDS = 200
PAYLOAD = ("key", "shard", "index", "caption")       # what the card keeps of an extreme row
HISTOGRAM_COLUMNS = ("image_loglik", "text_loglik", "clip_score")
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


def summarize(files, rel_err: float = 0.001, k: int = 8) -> CorpusSummary:
    """Stream the score files twice and measure everything the card shows."""
    summary = CorpusSummary(0, Counter(), Counter(), {c: QuantileSketch(rel_err) for c in SCORE_COLUMNS},
                            Extremes(k), {}, None)
    for path in files:
        with named_errors(path):
            for batch in iter_batches(path, ["status", "error", *PAYLOAD, *SCORE_COLUMNS]):
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
    for c in SCORE_COLUMNS:
        summary.sketches[c].update(float_values(batch, c)[ok])
    loglik = np.where(ok, float_values(batch, "image_loglik"), np.nan)
    summary.extremes.update(loglik, lambda i, b=batch: {p: b.column(p)[i].as_py() for p in PAYLOAD})


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
    for c in HISTOGRAM_COLUMNS:
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

"""A dataset card for a scored corpus: ``README.md`` (Hugging Face YAML header), PNG plots and
``card.json`` with the same numbers.

Two streaming passes over the scores keep memory bounded: the first fills a quantile sketch per
score column (:class:`pipeline.card.sketch.QuantileSketch`), status and error counts, and the K least
and most likely rows; the second fills fixed-bin histograms whose ranges come from the first.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.card.render import CITATION, render_readme
from pipeline.card.sketch import Extremes, Histogram, Histogram2D, QuantileSketch
from pipeline.config import CardConfig
from pipeline.table import SCORE_COLUMNS, float_values, iter_batches, list_score_files, ok_mask

QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)
MAX_ERROR_KINDS = 200





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
    status, errors = Counter(), Counter()
    sketches = {c: QuantileSketch(rel_err) for c in SCORE_COLUMNS}
    extremes, rows = Extremes(k), 0
    payload = ["key", "shard", "index", "caption"]
    for path in files:
        for batch in iter_batches(path, ["status", "error", *payload, *SCORE_COLUMNS]):
            rows += batch.num_rows
            st = pc.fill_null(batch.column("status"), "(null)")
            for item in pc.value_counts(st).to_pylist():
                status[item["values"]] += item["counts"]
            ok = ok_mask(batch)
            if not ok.all():
                bad = pa.array(~ok)
                for s, e in zip(st.filter(bad).to_pylist(), batch.column("error").filter(bad).to_pylist()):
                    kind = (s, error_kind(e))
                    if kind in errors or len(errors) < MAX_ERROR_KINDS:
                        errors[kind] += 1
                    else:
                        errors[(s, "(other kinds)")] += 1
            for c in SCORE_COLUMNS:
                sketches[c].update(float_values(batch, c)[ok])
            ll = np.where(ok, float_values(batch, "image_loglik"), np.nan)
            extremes.update(ll, lambda i, b=batch: {p: b.column(p)[i].as_py() for p in payload})
    histograms = {}
    for c in ("image_loglik", "text_loglik", "clip_score"):
        s = sketches[c]
        if s.count:
            lo, hi = s.quantile(0.001), s.quantile(0.999)
            pad = 0.05 * (hi - lo) or 1.0
            histograms[c] = Histogram(max(s.min, lo - pad), min(s.max, hi + pad), 80)
    density = None
    if sketches["image_loglik"].count and sketches["clip_score"].count:
        density = Histogram2D(_box(histograms["image_loglik"]), _box(histograms["clip_score"]), 60)
    if histograms:
        for path in files:
            for batch in iter_batches(path, ["status", *histograms]):
                ok = ok_mask(batch)
                values = {c: float_values(batch, c)[ok] for c in histograms}
                for c, h in histograms.items():
                    h.update(values[c])
                if density is not None:
                    density.update(values["image_loglik"], values["clip_score"])
    return CorpusSummary(rows, status, errors, sketches, extremes, histograms, density)


def _box(h: Histogram):
    return float(h.edges[0]), float(h.edges[-1])


def _clean(x):
    """JSON-safe number (None for NaN, strings for infinities)."""
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if math.isnan(x) else (x if math.isfinite(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def provenance(sf) -> dict:
    """Model, reference set and fit settings, read defensively from a stats file."""
    meta = dict(getattr(sf, "metadata", {}) or {})
    towers = {}
    for name, ws in sf.towers.items():
        towers[name] = {k: _clean(getattr(ws, k, None)) for k in
                        ("dim", "components", "shrinkage", "n_fit", "n_heldout", "log_det")}
        summary = _summary(ws)
        towers[name]["heldout_sqnorm_over_m"] = _clean(summary.get("heldout_sqnorm_over_m"))
    keys = ("model", "model_identity", "pretrained", "checkpoint_sha256", "normalize", "precision", "reference_digest",
            "reference_shards", "n_reference", "components_requested", "shrinkage", "holdout",
            "wclip_version", "created")
    return {"metadata": {k: meta.get(k) for k in keys if k in meta}, "towers": towers}


def _summary(ws) -> dict:
    try:
        return dict(ws.summary() or {})
    except Exception:  # a summary is informative only; never fail the card on it
        return {}


def normality(sf) -> dict:
    """Per tower: Anderson-Darling and D'Agostino-Pearson pass rates, in-sample and held-out."""
    result = {}
    for name, ws in sf.towers.items():
        summary, entry = _summary(ws), {}
        for split, candidates in (("in_sample", ("normality_fit", "normality_in_sample", "normality")),
                                  ("heldout", ("normality_heldout", "normality_held_out"))):
            found = next((summary[c] for c in candidates if isinstance(summary.get(c), dict)), {})
            entry[split] = {test: _clean(_find(found, test)) for test in
                            ("anderson_darling", "dagostino_pearson")}
            entry[split]["n_samples"] = found.get("n_samples")
            entry[split]["n_features"] = found.get("n_features")
        result[name] = entry
    return result


def _find(d: dict, test: str):
    aliases = {"anderson_darling": ("anderson_darling", "ad", "anderson"),
               "dagostino_pearson": ("dagostino_pearson", "dagostino", "normaltest", "dp")}[test]
    return next((d[a] for a in aliases if a in d), None)


def build_card(cfg: CardConfig) -> dict:
    """Measure the scores, draw the plots, write README.md and card.json; returns card.json."""
    from pipeline import __version__
    from pipeline.card.plots import draw_all
    from pipeline.whitening import StatsFile

    files = list_score_files(cfg.scores)
    if not files:
        raise ValueError(f"no score files (*.parquet) in {cfg.scores}; run `wclip score` first")
    sf = StatsFile.load(cfg.stats)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    corpus = summarize(files, cfg.rel_err, cfg.extremes)
    card = {
        "version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "scores": str(cfg.scores), "score_files": len(files), "stats": str(cfg.stats),
        "rows": corpus.rows, "status_counts": dict(corpus.status.most_common()),
        "error_kinds": [{"status": s, "kind": k, "count": n} for (s, k), n in corpus.errors.most_common()],
        "provenance": provenance(sf), "normality": normality(sf),
        "quantiles": {c: _quantile_row(s) for c, s in corpus.sketches.items()},
        "quantile_error": {"rel_err": cfg.rel_err, "rank": "floor(q * (n - 1))",
                           "bound": "|reported - exact| <= rel_err * |exact|"},
        "histograms": {c: {"edges": h.edges.tolist(), "counts": h.counts.tolist(),
                           "below": h.below, "above": h.above} for c, h in corpus.histograms.items()},
        "extremes": {"by": "image_loglik",
                     "least_likely": [dict(r, image_loglik=v) for v, r in corpus.extremes.low],
                     "most_likely": [dict(r, image_loglik=v) for v, r in corpus.extremes.high]},
        "filter": _filter_section(cfg.filter_dir), "citation": CITATION,
    }
    card["plots"], card["notes"] = draw_all(out, sf, corpus, card, cfg)
    card = json.loads(json.dumps(card, default=_clean))
    _write(out / "card.json", json.dumps(card, indent=1, allow_nan=False))
    _write(out / "README.md", render_readme(card))
    return card


def _quantile_row(s: QuantileSketch) -> dict:
    return {"count": s.count, "mean": _clean(s.mean), "min": _clean(s.min if s.count else math.nan),
            "max": _clean(s.max if s.count else math.nan),
            "q": {f"{round(q * 100)}%": _clean(s.quantile(q)) for q in QUANTILES}}


def _filter_section(filter_dir):
    if not filter_dir:
        return None
    path = Path(filter_dir) / "filter.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the --output folder of `wclip filter`")
    report = json.loads(path.read_text())
    keys = ("rows", "eligible", "kept", "kept_fraction_of_rows", "kept_fraction_of_eligible",
            "include_failed", "conditions", "uids")
    section = {k: report.get(k) for k in keys}
    shards = report.get("shards") or {}
    section["shards"] = {k: shards.get(k) for k in ("shards", "samples", "samples_per_shard")} \
        if shards else None
    return section


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

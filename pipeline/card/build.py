"""A dataset card for a scored corpus: ``README.md`` (Hugging Face YAML header), PNG plots and
``card.json`` with the same numbers, written to a local folder or URL.

The numbers come from :mod:`pipeline.card.measure`, the plots from :mod:`pipeline.card.plots` and the
Markdown from :mod:`pipeline.card.render`; this module puts them together.
"""

from __future__ import annotations

import datetime
import math

from pipeline import storage
from pipeline.card.duplicates import duplicates_section
from pipeline.card.hub import HubOptions, hub_section, plan_copies
from pipeline.card.measure import clustered_towers, clusters, normality, provenance, summarize
from pipeline.card.render import CITATION, render_readme
from pipeline.card.sketch import QuantileSketch
from pipeline.config import CardConfig
from pipeline.errors import ConfigError
from pipeline.scores.layout import list_score_files
from pipeline.scores.provenance import check_scores, describe_provenance

QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)
FILTER_KEYS = ("rows", "eligible", "kept", "kept_fraction_of_rows", "kept_fraction_of_eligible",
               "include_failed", "conditions", "uids")


def build_card(cfg: CardConfig, hub: HubOptions | None = None) -> dict:
    """Measure the scores, draw the plots, write README.md and card.json; returns card.json. With the local
    likelihood (stats fitted with clusters) the card also covers its columns and has a section on the clusters.

    Refused before any work: unreadable score files, files made by different fits or models, and a stats
    file that did not make the scores (files without provenance are accepted with a note)."""
    from pipeline import __version__
    from pipeline.card.plots import draw_all

    hub = hub or HubOptions()
    files = list_score_files(cfg.scores)
    if not files:
        raise ValueError(f"no score files (*.parquet) in {cfg.scores}; run `wclip score` first")
    if _same_folder(cfg.scores, cfg.output):
        raise ValueError("--output must be a folder of its own, not the scores folder (it holds only score files)")
    sf = load_stats(cfg.stats)
    checked = check_scores(files)
    check_stats_made_scores(cfg.stats, checked)
    filter_section = _filter_section(cfg.filter_dir)
    out = str(cfg.output)
    copies = plan_copies(files, cfg.scores, out, hub)   # score files from elsewhere go into the card folder
    storage.makedirs(out)
    towers, cluster_notes = clustered_towers(sf, files)
    corpus = summarize(files, cfg.rel_err, cfg.extremes, towers)
    cluster_section, more = clusters(sf, corpus)   # the local likelihood's clusters ({} without)
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
        **({"clusters": cluster_section} if cluster_section else {}),
        "filter": filter_section, "hub": None, "citation": CITATION,   # hub: once the score files are copied
    }
    card["plots"], notes = draw_all(out, sf, corpus, cfg, cluster_section)
    duplicates = duplicates_section(cfg.filter_dir, out, cfg.inputs, cfg.thumbnails)
    if duplicates:  # a card without dedup or balance is as before
        card["duplicates"] = duplicates
    copied = copies.run() if copies else []
    card["hub"] = hub_section(cfg.scores, out, hub, copied)
    if copied:
        notes.append(f"copied the {len(copied)} score files to {copies.folder} (the Hub's data_files resolve inside "
                     f"the card folder); --data-files GLOB copies none")
    card["notes"] = checked.warnings() + cluster_notes + more + notes
    card = storage.jsonable(card)
    storage.write_json(storage.join(out, "card.json"), card, sort_keys=False)
    storage.write_atomic(storage.join(out, "README.md"), render_readme(card).encode("utf-8"))
    return card


def check_stats_made_scores(stats, checked) -> None:
    """Refuse a stats file whose sha256 is not the ``stats_digest`` the score files record."""
    made = checked.provenance
    if made is None:
        return
    digest = storage.sha256(stats)
    if digest != made.get("stats_digest"):
        raise ConfigError(f"--stats {stats} (sha256 {digest[:12]}) did not make these scores: {checked.example} "
                          f"was made by {describe_provenance(made)}; pass that stats file as --stats")


def _same_folder(a, b) -> bool:
    import os

    if storage.is_url(a) or storage.is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def load_stats(path):
    """The stats file at ``path`` (local, or a URL read through a temporary local copy)."""
    from pipeline.whitening import StatsFile

    if storage.is_url(path):
        with storage.local_path(path) as local:
            return StatsFile.load(local)
    return StatsFile.load(path)


def _quantile_row(s: QuantileSketch) -> dict:
    return {"count": s.count, "mean": s.mean, "min": s.min if s.count else math.nan,
            "max": s.max if s.count else math.nan,
            "q": {f"{round(q * 100)}%": s.quantile(q) for q in QUANTILES}}


def _filter_section(filter_dir):
    """What ``wclip filter`` recorded in ``filter_dir/filter.json`` (None without a filter)."""
    if not filter_dir:
        return None
    path = storage.join(filter_dir, "filter.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist; pass the --output folder of `wclip filter`")
    report = storage.read_json(path)
    section = {k: report.get(k) for k in FILTER_KEYS}
    shards = report.get("shards") or {}
    section["shards"] = {k: shards.get(k) for k in ("shards", "samples", "samples_per_shard", "copied",
                                                    "unreadable_count")} if shards else None
    return section

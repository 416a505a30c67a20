"""The Markdown of a dataset card (``README.md`` with a Hugging Face YAML header) from ``card.json``."""

from __future__ import annotations

import textwrap

import yaml

from pipeline.card.duplicates import duplicates_lines
from pipeline.card.hub import DEFAULT_LICENSE, data_section, header_fields
from pipeline.card.markdown import code, text

CITATION = ('Betser, Levi, Gilboa, "Whitened CLIP as a Likelihood Surrogate of Images and '
            'Captions", ICML 2025, arXiv:2505.06934')


def size_category(n: int) -> str:
    """Hugging Face ``size_categories`` label for ``n`` rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
              (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
              (1_000_000_000, "100M<n<1B"), (10_000_000_000, "1B<n<10B"),
              (100_000_000_000, "10B<n<100B"), (1_000_000_000_000, "100B<n<1T")]
    return next((label for bound, label in bounds if n < bound), "n>1T")


METHOD = (
    "Each CLIP embedding (image and caption separately) is whitened with the mean and covariance of "
    "a reference set, `w = (x - mu) W` over the top `m` principal components, so that under a "
    "Gaussian model `||w||^2` follows chi2(m) and `loglik = -0.5 * (m * log(2*pi) + ||w||^2)` is a "
    "log-likelihood surrogate of the sample. Low log-likelihood marks atypical samples; `*_pvalue` "
    "is the fraction of held-out reference samples that were less likely, and `clip_score` the "
    "image-caption cosine similarity.")


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    if isinstance(x, int):
        return f"{x:,}"
    return text(x)   # statuses, error kinds, keys, captions, names from files: shown as text, never markup


def _table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _pct(a, b) -> str:
    return f"{100 * a / b:.2f}%" if b else "–"


def yaml_header(card: dict) -> str:
    meta = card["provenance"]["metadata"]
    hub = card.get("hub") or {"license": DEFAULT_LICENSE, "data_files": "*.parquet"}
    fields = header_fields(hub)
    header = {
        "license": fields["license"],
        "task_categories": ["image-to-text", "text-to-image", "zero-shot-image-classification"],
        "tags": ["wclip", "whitened-clip", "clip", "likelihood", "data-curation"],
        "size_categories": [size_category(card["rows"])],
        "pretty_name": f"Whitened CLIP scores ({meta.get('model', 'unknown model')})",
        "configs": fields["configs"],
    }
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n"


def render_readme(card: dict) -> str:
    rows = card["rows"]
    out = [yaml_header(card), "# Whitened CLIP likelihood card", "",
           f"{rows:,} rows in {card['score_files']} score files ({code(card['scores'])}), scored with "
           f"the statistics in {code(card['stats'])}. Numbers for machines: `card.json`.", ""]
    if card.get("hub"):
        out += ["## Data files", ""] + data_section(card["hub"])
    out += _provenance_lines(card["provenance"]) + _count_lines(card) + _quantile_lines(card)
    if card.get("clusters"):
        out += _cluster_lines(card["clusters"])
    out += ["## Filter", ""]
    out += _filter_lines(card.get("filter"))
    out += duplicates_lines(card.get("duplicates"), _table, _pct)
    out += _normality_lines(card) + _plot_lines(card) + _method_lines()
    return "\n".join(out)


def _provenance_lines(prov: dict) -> list:
    meta = prov["metadata"]
    out = ["## Provenance", ""]
    checkpoint = f"checkpoint sha256 {meta['checkpoint_sha256']}" if meta.get("checkpoint_sha256") else None
    weights = (meta.get("model_identity") or {}).get("weights") or meta.get("pretrained") or checkpoint
    out += _table(["item", "value"], [
        ["model", meta.get("model")], ["weights", weights],
        ["embeddings", None if meta.get("normalize") is None else
         ("L2-normalised" if meta["normalize"] else "raw (not normalised)")],
        ["reference set digest", meta.get("reference_digest")],
        ["reference samples", meta.get("n_reference")], ["reference shards", meta.get("reference_shards")],
        ["fitted with", f"wclip {meta.get('wclip_version', '?')} on {meta.get('created', '?')}"]])
    out += _table(["tower", "dim", "components m", "shrinkage", "fit rows", "held-out rows",
                   "held-out sqnorm/m", "log det W"],
                  [[t, v["dim"], v["components"], v["shrinkage"], v["n_fit"], v["n_heldout"],
                    v["heldout_sqnorm_over_m"], v["log_det"]] for t, v in prov["towers"].items()])
    return out


def _count_lines(card: dict) -> list:
    rows = card["rows"]
    out = ["## Counts", "", "By status:", ""]
    out += _table(["status", "rows", "share"],
                  [[s, n, _pct(n, rows)] for s, n in card["status_counts"].items()])
    if card["error_kinds"]:
        out += ["By error kind:", ""]
        out += _table(["status", "error kind", "rows"],
                      [[e["status"], e["kind"], e["count"]] for e in card["error_kinds"][:50]])
    return out


def _quantile_lines(card: dict) -> list:
    q = card["quantile_error"]
    out = ["## Score quantiles", "",
           f"Rows with status `ok`. Quantiles come from a streaming sketch: each is within a relative "
           f"error of {q['rel_err']:g} of the exact order statistic of rank {q['rank']}.", ""]
    levels = list(next(iter(card["quantiles"].values()))["q"])
    return out + _table(["column", "n", "mean", *levels],
                        [[c, v["count"], v["mean"], *v["q"].values()] for c, v in card["quantiles"].items()])


def _normality_lines(card: dict) -> list:
    out = ["## Normality diagnostics", "",
           "Fraction of whitened coordinates whose marginal is not rejected as normal (level 0.05), "
           "on the fit rows (in-sample) and on the held-out rows.", ""]
    norm_rows = []
    for tower, splits in card["normality"].items():
        for split, values in splits.items():
            norm_rows.append([tower, split.replace("_", "-"), values.get("anderson_darling"),
                              values.get("dagostino_pearson"), values.get("n_samples")])
    return out + _table(["tower", "split", "Anderson–Darling pass rate", "D'Agostino–Pearson pass rate",
                         "samples"], norm_rows)


def _plot_lines(card: dict) -> list:
    plots, out = card.get("plots", {}), ["## Plots", ""]
    captions = {"loglik_histograms": "Log-likelihood histograms", "qq_heldout":
                "Q–Q plot: held-out sqnorm against chi2(m)", "spectrum": "Eigenvalue spectrum",
                "clipscore_vs_loglik": "CLIP score against image log-likelihood",
                "cluster_sizes": "Cluster sizes: reference and corpus",
                "least_likely": "Least likely images", "most_likely": "Most likely images"}
    for key, caption in captions.items():
        if key in plots:
            out += [f"### {caption}", "", f"![{caption}]({plots[key]})", ""]
    if card.get("notes"):
        out += ["Notes:", ""] + [f"- {text(n)}" for n in card["notes"]] + [""]
    return out


def _method_lines() -> list:
    return ["## Method", "", METHOD, "", f"Citation: {CITATION}.", "",
            "```bibtex", "@inproceedings{betser2025whitened,",
            "  title={Whitened CLIP as a Likelihood Surrogate of Images and Captions},",
            "  author={Betser, Roy and Levi, Meir Yossef and Gilboa, Guy},",
            "  booktitle={International Conference on Machine Learning (ICML)},",
            "  year={2025}, eprint={2505.06934}, archivePrefix={arXiv}}", "```", ""]


MAX_CLUSTERS_SHOWN = 100  # clusters per tower listed in the README; card.json lists them all
LOCAL_METHOD = (
    "The statistics also model each tower as a mixture of K clusters in the whitened space (spherical k-means "
    "of the reference with restarts, then EM of the mixture itself with split-and-merge moves; each cluster a "
    "Gaussian with its own leading directions, their number (the rank) and each cluster's shrinkage toward the "
    "global covariance chosen on held-out rows; with `--clusters auto` K too). `<tower>_local_loglik` is a row's "
    "log-likelihood under that mixture (in the units of `<tower>_loglik`), `<tower>_cluster` its most likely "
    "cluster and `<tower>_local_pvalue` the share of that cluster's held-out reference rows that were less likely. "
    "A low local log-likelihood marks a sample that is atypical even among its nearest kind, which the one global "
    "Gaussian cannot see.")


def _text(value, width: int = 80) -> str:
    """Free text (a caption, a URL) shortened to one line of a Markdown table (escaped by :func:`_fmt`)."""
    if value is None:
        return "–"
    return textwrap.shorten(str(value), width, placeholder="...") or "–"


def _cluster_lines(section: dict) -> list:
    out = ["## Clusters (local likelihood)", "", LOCAL_METHOD, "",
           "Reference: the fit's clustered rows (share = the mixture weight) and its held-out rows per cluster; "
           "a cluster with n held-out rows gives local p-values no smaller than 1 / (n + 1), so a threshold on "
           "`<tower>_local_pvalue` below that cannot separate its rows. Corpus: the scored rows with status "
           "`ok` whose most likely cluster it is.", ""]
    for tower, t in section.items():
        rows = t["clusters"]
        shown = rows[:MAX_CLUSTERS_SHOWN]
        more = [f"The first {len(shown)} of {len(rows)} clusters; card.json lists them all.", ""] \
            if len(rows) > len(shown) else []
        corpus = "" if t["corpus_rows"] is None else f", {t['corpus_rows']:,} corpus rows"
        out += [f"### {tower} tower: {t['k']} clusters, shrinkage {t['shrinkage']:g}, rank {t.get('rank', 0)}"
                f"{corpus}", ""] + _fit_lines(t) + more
        out += _table(["cluster", "reference rows", "reference share", "held-out rows", "smallest p-value",
                       "held-out loglik (local / global)", "corpus rows", "corpus share", "corpus / reference"],
                      [[r["cluster"], r["reference_rows"], _share(r["reference_weight"]), r["heldout_rows"],
                        r["pvalue_floor"], _pair(r.get("heldout_loglik"), r.get("heldout_global_loglik")),
                        r["corpus_rows"], _share(r["corpus_share"]),
                        "–" if r["corpus_over_reference"] is None else f"{r['corpus_over_reference']:.2f}"]
                       for r in shown])
        listed = [[r["cluster"], e["key"], _text(e.get("caption")), _text(e.get("url"), 60), e["local_loglik"],
                   e.get("local_pvalue")] for r in shown for e in r["lowest"]]
        if listed:
            out += [f"Lowest `{tower}_local_loglik` in each cluster (at most {t['examples_per_cluster']} rows "
                    f"with status `ok` per cluster):", ""]
            out += _table(["cluster", "key", "caption", "url", "local loglik", "local p-value"], listed)
    return out


def _fit_lines(t: dict) -> list:
    """How well the mixture fits the held-out rows, and with --clusters auto the K it chose from."""
    lines = []
    if t.get("heldout_loglik") is not None:
        lines.append(f"Held-out mean log-likelihood: {t['heldout_loglik']:.2f} under the mixture, "
                     f"{t['heldout_global_loglik']:.2f} under the global Gaussian.")
    if t.get("k_curve"):
        tried = ", ".join(f"K = {k}: {v:.2f}" for k, v in sorted(t["k_curve"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"K was chosen on the held-out rows (`--clusters auto`): {tried}.")
    return lines + [""] if lines else []


def _pair(a, b) -> str:
    return "–" if a is None else f"{a:.2f} / {b:.2f}"


def _share(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _filter_lines(f) -> list:
    if not f:
        return ["No filter given (`wclip card --filter OUT` shows the one `wclip filter` applied).", ""]
    lines = [f"Kept {_fmt(f['kept'])} of {_fmt(f['rows'])} rows ({_pct(f['kept'], f['rows'])}; "
             f"{_pct(f['kept'], f['eligible'])} of the {_fmt(f['eligible'])} eligible "
             f"{'rows' if f.get('include_failed') else 'rows with status ok'}).", ""]
    lines += _table(["condition", "threshold", "rows passing", "share of eligible"],
                    [[c["spec"], f"{c['op']} {_fmt(c['threshold'], 6)}", c["passed"],
                      _pct(c["passed"], f["eligible"])] for c in f.get("conditions") or []])
    if f.get("shards"):
        s = f["shards"]
        lost = s.get("unreadable_count") or 0
        lines += [f"New shards: {_shard_counts(s['shards'], s['samples'], s['samples_per_shard'])}"
                  + (f"; {_fmt(lost)} could not be read from their input shards and are not in the tars" if lost
                     else "") + ".", ""]
    return lines


def _shard_counts(shards, samples, per_shard) -> str:
    """How many kept samples the filter's tars hold (each ``per_shard``, the last the rest), e.g. ``2 tars,
    748 kept samples: 400 in each but the last, which holds 348``."""
    if not shards or samples is None or not per_shard:
        return f"{_fmt(shards)} tars, {_fmt(samples)} kept samples"
    last = samples - (shards - 1) * per_shard
    if shards == 1:
        return f"1 tar of {_fmt(samples)} kept samples"
    if last == per_shard:
        return f"{_fmt(shards)} tars of {_fmt(per_shard)} kept samples ({_fmt(samples)} in all)"
    return (f"{_fmt(shards)} tars, {_fmt(samples)} kept samples: {_fmt(per_shard)} in each but the last, "
            f"which holds {_fmt(last)}")

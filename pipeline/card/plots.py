"""PNG plots of a dataset card (matplotlib, Agg canvas, imported lazily), written to a local folder or
URL, and thumbnails read from the shards."""

from __future__ import annotations

import contextlib
import io
import textwrap

import numpy as np

from pipeline import storage
from pipeline.config import IMAGE_EXTS, MAX_IMAGE_PIXELS
from pipeline.errors import require

THUMB = 160


def _figure(width: float, height: float):
    require("matplotlib", "wclip card (plots)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, out: str, name: str) -> str:
    with storage.open_atomic(storage.join(out, name)) as fh:
        fig.savefig(fh, format="png")
    return name


def loglik_histograms(out: str, histograms: dict) -> str | None:
    """One panel per tower; the local (mixture) log-likelihood, in the same units, drawn over the global
    one when the scores have it."""
    panels = [c for c in ("image_loglik", "text_loglik") if c in histograms]
    if not panels:
        return None
    fig = _figure(5 * len(panels), 3.6)
    for ax, c in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        h = histograms[c]
        ax.stairs(h.counts, h.edges, fill=True, alpha=0.7, label="global")
        ax.set_xlabel(f"{c} (nats)")
        ax.set_ylabel("rows")
        outside = h.below + h.above
        local = histograms.get(c.replace("_loglik", "_local_loglik"))
        if local is not None:
            ax.stairs(local.counts, local.edges, color="C3", lw=1.2, label="local (cluster mixture)")
            ax.legend(loc="upper left", fontsize=7)
        ax.set_title(c.split("_")[0] + " log-likelihood" + (f"  ({outside} outside)" if outside else ""))
    return _save(fig, out, "loglik_hist.png")


def cluster_sizes(out: str, section: dict) -> str | None:
    """Per clustered tower, one row of panels: each cluster's share of the reference (its weight) and of the scored
    corpus; how well each cluster fits its held-out rows (mean local log-likelihood, beside their global one) when
    the stats recorded it; and with ``--clusters auto`` the held-out log-likelihood of every K tried."""
    towers = [t for t, v in section.items() if v["clusters"]]
    if not towers:
        return None
    widest = max(section[t]["k"] for t in towers)
    fit = any(r.get("heldout_loglik") is not None for t in towers for r in section[t]["clusters"])
    curve = any(section[t].get("k_curve") for t in towers)
    panels = 1 + fit + curve
    fig = _figure(min(4 + 0.35 * widest, 16) + 4 * (panels - 1), 2.8 * len(towers))
    for axes, tower in zip(fig.subplots(len(towers), panels, squeeze=False), towers):
        t = section[tower]
        rows = t["clusters"]
        x = np.arange(len(rows))
        ax = axes[0]
        ax.bar(x - 0.2, [r["reference_weight"] for r in rows], 0.4, label="reference")
        if t["corpus_rows"]:
            ax.bar(x + 0.2, [r["corpus_share"] for r in rows], 0.4, label="corpus (status ok)")
        ax.set_xlabel("cluster")
        ax.set_ylabel("share of rows")
        if len(rows) <= 40:
            ax.set_xticks(x)
        ax.set_title(f"{tower}: {len(rows)} clusters (rank {t.get('rank', 0)}, shrinkage {t['shrinkage']:g})")
        ax.legend(fontsize=7)
        if fit:
            _cluster_fit(axes[1], rows)
        if curve:
            _k_curve(axes[-1], t.get("k_curve"), t["k"])
    return _save(fig, out, "cluster_sizes.png")


def _cluster_fit(ax, rows: list) -> None:
    """Each cluster's held-out rows: mean local log-likelihood, and their mean global one."""
    kept = [(r["cluster"], r["heldout_loglik"], r["heldout_global_loglik"]) for r in rows
            if r.get("heldout_loglik") is not None]
    if kept:
        x, local, glob = (np.array(v, dtype=float) for v in zip(*kept))
        ax.plot(x, local, "o", ms=3, label="local (mixture)")
        ax.plot(x, glob, "x", ms=3, color="C7", label="global")
        ax.legend(fontsize=7)
    ax.set_xlabel("cluster")
    ax.set_ylabel("held-out mean log-likelihood")
    ax.set_title("fit per cluster (held-out rows)")


def _k_curve(ax, k_curve, chosen: int) -> None:
    """Held-out mean log-likelihood of each K that --clusters auto tried, the chosen one marked."""
    if k_curve:
        ks = sorted(int(k) for k in k_curve)
        ax.plot(ks, [k_curve[str(k)] for k in ks], "o-", ms=3)
        ax.axvline(chosen, color="C3", lw=1, ls="--", label=f"chosen K = {chosen}")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    ax.set_xlabel("K")
    ax.set_ylabel("held-out mean log-likelihood")
    ax.set_title("--clusters auto: K by held-out rows" if k_curve else "K given (no curve)")


def qq_plot(out: str, towers: dict) -> tuple[str | None, list]:
    """Held-out sqnorm quantiles against chi2(m) quantiles, one panel per tower."""
    from scipy import stats

    notes, usable = [], {}
    for name, ws in towers.items():
        cal = np.asarray(ws.calibration, dtype=np.float64)
        if cal.size:
            usable[name] = (cal, int(ws.components))
        else:
            notes.append(f"{name} tower: no held-out set in the stats file, so no Q-Q plot.")
    if not usable:
        return None, notes
    fig = _figure(4.2 * len(usable), 4)
    for ax, (name, (cal, m)) in zip(fig.subplots(1, len(usable), squeeze=False)[0], usable.items()):
        theory = stats.chi2(m).ppf((np.arange(cal.size) + 0.5) / cal.size)
        ax.plot(theory, cal, ".", ms=3)
        lim = [0, max(theory.max(), cal.max()) * 1.02]
        ax.plot(lim, lim, "k--", lw=0.8, label="y = x")
        ax.set_xlabel(f"chi2({m}) quantile")
        ax.set_ylabel("held-out sqnorm")
        ax.set_title(f"{name}: held-out sqnorm/m = {cal.mean() / m:.2f}")
        ax.legend(loc="upper left")
    return _save(fig, out, "qq_heldout.png"), notes


def spectrum(out: str, towers: dict) -> str:
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    for name, ws in towers.items():
        lam = np.asarray(ws.eigenvalues, dtype=np.float64)
        line, = ax.semilogy(np.arange(1, lam.size + 1), np.clip(lam, 1e-300, None), label=name)
        ax.axvline(int(ws.components), color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("component (dotted: components kept)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("covariance spectrum")
    ax.legend()
    return _save(fig, out, "spectrum.png")


def density(out: str, hist2d) -> str | None:
    if hist2d is None or not hist2d.counts.any():
        return None
    fig = _figure(5.5, 4.2)
    ax = fig.subplots()
    counts = hist2d.counts.T.astype(np.float64)
    shade = np.ma.masked_invalid(np.log10(np.where(counts > 0, counts, np.nan)))
    mesh = ax.pcolormesh(hist2d.x_edges, hist2d.y_edges, shade, cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log10 rows")
    ax.set_xlabel("image_loglik (nats)")
    ax.set_ylabel("clip_score")
    ax.set_title("CLIP score vs image log-likelihood")
    return _save(fig, out, "clipscore_vs_loglik.png")


def strip(out: str, name: str, title: str, rows: list, thumbs: list) -> str | None:
    if not rows:
        return None
    fig = _figure(1.9 * len(rows), 3.3)
    for ax, (value, row), thumb in zip(fig.subplots(1, len(rows), squeeze=False)[0], rows, thumbs):
        ax.set_xticks([])
        ax.set_yticks([])
        if thumb is not None:
            ax.imshow(np.asarray(thumb))
        else:
            ax.imshow(np.full((THUMB * 3 // 4, THUMB, 3), 215, np.uint8))
            ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", transform=ax.transAxes)
        caption = textwrap.shorten(str(row.get("caption") or ""), 70, placeholder="...")
        # captions are data, drawn as they are: "$5 and $10" is not mathtext
        ax.set_xlabel("\n".join(textwrap.wrap(caption, 22)[:3]) + f"\n{value:.1f}", fontsize=7, parse_math=False)
    fig.suptitle(title, parse_math=False)
    return _save(fig, out, name)


def thumbnails(rows: list, inputs=()) -> tuple[list, list]:
    """A thumbnail (PIL image or None) per row dict with ``shard`` and ``key``, plus notes."""
    from pipeline.flow.read import shard_name

    by_name = {shard_name(u): u for u in inputs}
    wanted: dict = {}
    for i, row in enumerate(rows):
        shard = row.get("shard") or ""
        url = shard if shard in inputs else by_name.get(shard_name(shard), shard) if inputs else shard
        wanted.setdefault(url, {}).setdefault(row.get("key"), []).append(i)
    thumbs, failures, missing = [None] * len(rows), [], []
    for url, keys in wanted.items():
        try:
            for key, data in _find_images(url, set(keys)):
                for i in keys[key]:
                    thumbs[i] = _thumbnail(data)
        except Exception as exc:  # unreachable or broken shard: placeholders, and say so
            failures.append(f"{url} ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        missing += [url for k, idx in keys.items() if thumbs[idx[0]] is None]
    notes = []
    if failures:
        notes.append(f"thumbnails unavailable from {len(failures)} shard(s), placeholders shown: "
                     + "; ".join(failures[:3]) + (" ..." if len(failures) > 3 else ""))
    if missing:
        notes.append(f"{len(missing)} image(s) not found or not decodable in their shards, "
                     f"e.g. in {missing[0]}")
    return thumbs, notes


def _find_images(url: str, keys: set):
    """``(key, image bytes)`` for the first image member of each wanted key, until all are found."""
    from pipeline.flow.read import iter_members

    with contextlib.closing(iter_members(url)) as members:
        for member in members:
            if not keys:
                return
            if member.key in keys and member.ext in IMAGE_EXTS:
                keys.discard(member.key)
                yield member.key, member.read()


def _thumbnail(data: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:   # a decompression bomb: no thumbnail
                return None
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            return img
    except Exception:
        return None


def draw_all(out: str, sf, corpus, cfg, clusters: dict | None = None) -> tuple[dict, list]:
    """Every plot of the card (``clusters``: the card's section on the local likelihood's clusters); returns
    ``({plot: file name}, notes)``."""
    plots, notes = {}, []
    plots["loglik_histograms"] = loglik_histograms(out, corpus.histograms)
    if clusters:
        plots["cluster_sizes"] = cluster_sizes(out, clusters)
    plots["qq_heldout"], qq_notes = qq_plot(out, sf.towers)
    notes += qq_notes
    plots["spectrum"] = spectrum(out, sf.towers)
    plots["clipscore_vs_loglik"] = density(out, corpus.density)
    low, high = corpus.extremes.low, corpus.extremes.high
    rows = [r for _, r in low] + [r for _, r in high]
    if rows and cfg.thumbnails:
        thumbs, thumb_notes = thumbnails(rows, tuple(cfg.inputs))
        notes += thumb_notes
    else:
        thumbs = [None] * len(rows)
        if rows:
            notes.append("thumbnails were not requested; placeholders shown")
    plots["least_likely"] = strip(out, "least_likely.png", "least likely images (image_loglik)",
                                  low, thumbs[:len(low)])
    plots["most_likely"] = strip(out, "most_likely.png", "most likely images (image_loglik)",
                                 high, thumbs[len(low):])
    return {k: v for k, v in plots.items() if v}, notes

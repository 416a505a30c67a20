"""``wclip demo``: an offline end-to-end run on the built-in model and a generated world.

Generates a clean reference corpus and a target corpus with labelled anomalies, fits (with the local
likelihood's clusters), scores, writes the dataset card, and measures how well the likelihoods rank the
anomalies (AUROC) — ``summary.json``. Both worlds withhold a few shape-colour pairs
(:data:`~pipeline.demo.world.UNSEEN_PAIRS`), whose scenes are the target's ``unseen_pairing`` anomalies: the
kind the global Gaussian hardly sees and the local likelihood should, so both AUROCs are reported for it.

The target also holds near-duplicates (:data:`DUPLICATE_RATE` of its rows re-render another normal row's
scene under a worse caption, labelled ``duplicate_of``; normal rows in the AUROCs). The demo scores with
``--save-embeddings``, runs ``wclip dedup`` on the scores (:data:`DEDUP_EPS`, :data:`DEDUP_KEEP`) and reports
how many planted pairs it found (precision and recall, in pairs) and how often it kept the faithful copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import DedupConfig, FitConfig, RayOptions, RunConfig, ScoreConfig
from pipeline.demo import CLUSTERS, MODEL, shards, world
from pipeline.demo.metrics import FIT, auroc, dedup_quality
from pipeline.models import ModelSpec
from pipeline.storage import write_atomic

log = logging.getLogger("wclip")

# Which score ranks which anomalies (lower score = more anomalous).
RANKINGS = {
    "image": ("image_loglik", world.IMAGE_ANOMALIES),
    "caption": ("text_loglik", world.CAPTION_ANOMALIES),
    "mismatch": ("clip_score", world.PAIR_ANOMALIES),
}
OBVIOUS = {"noise": "image_pvalue", "gibberish": "text_pvalue"}  # kinds expected to get p < 0.01
# Kinds the local likelihood should catch where the global one does not: ranked per tower by both.
LOCAL_KINDS = world.SCENE_ANOMALIES
TOWERS = ("image", "text")
TARGET_AUROC = 0.95        # every group and kind, by its global score (the closing note names the others)
LOCAL_TARGET_AUROC = 0.9   # the local kinds, by the local score
#: Share of the target's rows that are near-duplicates of another of its normal rows (world.make_duplicate).
DUPLICATE_RATE = 0.03
#: ``wclip dedup --eps`` of the demo: the planted copies sit at image cosine >= 0.997 to their source (97.5%
#: of them; world.DUPLICATE_NOISE), distinct scenes of one shape, colour and layout up to ~0.995.
DEDUP_EPS = 0.004
DEDUP_KEEP = "clip_score:highest"  # the faithful copy's caption fits its image: the higher CLIP score


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo corpora."""

    workdir: str = "wclip-demo"
    reference_shards: int = 4
    reference_per_shard: int = 1000
    target_shards: int = 2
    target_per_shard: int = 1000
    anomaly_rate: float = 0.3
    seed: int = 7
    clusters: Optional[int] = CLUSTERS  # K of the local likelihood (None: the global fit only)
    num_cpus: int = None  # CPUs to use (default: all)
    progress: bool = None
    executor: str = "auto"  # pipeline.executors: local worker processes, or Ray
    card: bool = True
    duplicate_rate: float = DUPLICATE_RATE  # near-duplicates planted in the target (0: none, and no dedup)
    dedup_eps: float = DEDUP_EPS


def evaluate(scores_dir: Path, target_dir: Path) -> dict:
    """AUROC per anomaly group and per kind (:func:`~pipeline.demo.metrics.auroc`), the p < 0.01 rates of
    the obvious kinds, and for each of :data:`LOCAL_KINDS` per tower the AUROC of the global log-likelihood
    and of the local one (None when the scores have no local columns)."""
    labels = {row["key"]: row["anomaly"] for row in shards.read_labels(target_dir)}
    rows = [r for f in sorted(scores_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    for r in rows:
        r["anomaly"] = labels[r["key"]]
    normal = [r for r in rows if r["anomaly"] is None]
    out: dict = {"rows": len(rows), "normal": len(normal), "groups": {}, "kinds": {}, "obvious": {}, "local": {}}

    def col(rs, c):
        return np.array([np.nan if r[c] is None else r[c] for r in rs], dtype=float)

    def ranked(k_rows, column):
        if not rows or column not in rows[0]:
            return {"score": column, "auroc": None}
        b = col(normal, column)
        return {"score": column, "auroc": auroc(np.nan_to_num(col(k_rows, column), nan=-np.inf), b[np.isfinite(b)])}

    for group, (column, kinds) in RANKINGS.items():
        anomalous = [r for r in rows if r["anomaly"] in kinds]
        a, b = col(anomalous, column), col(normal, column)
        a, b = np.nan_to_num(a, nan=-np.inf), b[np.isfinite(b)]  # an unscorable anomaly counts as caught
        out["groups"][group] = {"score": column, "n": len(anomalous), "auroc": auroc(a, b) if len(a) else None}
        for kind in kinds:
            k_rows = [r for r in rows if r["anomaly"] == kind]
            if k_rows:
                out["kinds"][kind] = {"score": column, "n": len(k_rows),
                                      "auroc": auroc(np.nan_to_num(col(k_rows, column), nan=-np.inf), b)}
    for kind, column in OBVIOUS.items():
        p = col([r for r in rows if r["anomaly"] == kind], column)
        if len(p):
            out["obvious"][kind] = {"score": column, "n": len(p),
                                    "fraction_p_below_0.01": float(np.mean(np.nan_to_num(p, nan=0.0) < 0.01))}
    for kind in LOCAL_KINDS:
        k_rows = [r for r in rows if r["anomaly"] == kind]
        if k_rows:
            out["local"][kind] = {"n": len(k_rows), **{
                tower: {"global": ranked(k_rows, f"{tower}_loglik"), "local": ranked(k_rows, f"{tower}_local_loglik")}
                for tower in TOWERS}}
    return out


def run_dedup(cfg: DemoConfig, work: Path) -> dict:
    """``wclip dedup --scores WORK/scores --output WORK/dedup --eps cfg.dedup_eps --keep DEDUP_KEEP`` (the
    command's own code, :func:`pipeline.runs.dedup.dedup`); returns its summary."""
    from pipeline.runs.dedup import dedup

    return dedup(DedupConfig(scores=str(work / "scores"), output=str(work / "dedup"), keep=DEDUP_KEEP,
                             eps=cfg.dedup_eps, ray=RayOptions(num_cpus=cfg.num_cpus), progress=cfg.progress,
                             executor=cfg.executor))


def evaluate_dedup(dedup_dir: Path, target_dir: Path, found: dict) -> dict:
    """The dedup's settings and counts (``found``: its summary) and how it did on the world's planted
    duplicates (:func:`~pipeline.demo.metrics.dedup_quality`): over every row, and over the normal rows only
    (``normal``: the planted pairs are normal rows; noise and blank images, all alike to CLIP, group among
    themselves), with the anomaly kinds found in groups (``anomalies_grouped``: rows per kind)."""
    labels = {r["key"]: r for r in shards.read_labels(target_dir)}
    planted = {k: r["duplicate_of"] for k, r in labels.items() if r.get("duplicate_of")}
    rows = [r for f in sorted(dedup_dir.glob("*.parquet"))
            for r in pq.read_table(f, columns=["key", "dup_group", "kept"]).to_pylist()]
    normal = dedup_quality(planted, [r for r in rows if labels[r["key"]]["anomaly"] is None])
    sizes = Counter(r["dup_group"] for r in rows if r["dup_group"] is not None)
    grouped = Counter(labels[r["key"]]["anomaly"] for r in rows
                      if sizes[r["dup_group"]] > 1 and labels[r["key"]]["anomaly"] is not None)
    return {"eps": found["eps"], "keep": found["keep"], "clusters": found["clusters"],
            "clusters_source": found["clusters_source"], "rows_removed": found["removed"],
            **dedup_quality(planted, rows),
            "normal": {k: normal[k] for k in ("groups", "found_pairs", "planted_found", "precision", "recall")},
            "anomalies_grouped": dict(sorted(grouped.items()))}


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo under ``cfg.workdir``; returns (and writes) the summary."""
    from pipeline.executors import shared_session
    from pipeline.runs.fit import fit
    from pipeline.runs.score import score
    from pipeline.whitening import StatsFile

    started = time.time()
    work = Path(cfg.workdir)
    for sub in ("reference", "target", "scores", "dedup", "card"):
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log.info("generating the demo world in %s", work)
    ref = shards.generate_world(work / "reference", cfg.reference_shards, cfg.reference_per_shard, cfg.seed,
                                unseen_pairs=True)
    tgt = shards.generate_world(work / "target", cfg.target_shards, cfg.target_per_shard, cfg.seed + 1,
                                anomaly_rate=cfg.anomaly_rate, unseen_pairs=True, duplicate_rate=cfg.duplicate_rate)
    model = ModelSpec(MODEL)
    ray_opts = RayOptions(num_cpus=cfg.num_cpus)
    stats_path = work / "stats.safetensors"
    timings = {}
    run = dict(model=model, ray=ray_opts, progress=cfg.progress, executor=cfg.executor)
    with shared_session(RunConfig(shards=tuple(map(str, ref)), **run)):  # on Ray: one session for both jobs
        t = time.time()
        fit_summary = fit(FitConfig(run=RunConfig(shards=tuple(map(str, ref)), **run), output=str(stats_path),
                                    clusters=cfg.clusters, **FIT))
        timings["fit_s"] = round(time.time() - t, 2)
        stats = StatsFile.load(stats_path)
        t = time.time()
        score_summary = score(ScoreConfig(run=RunConfig(shards=tuple(map(str, tgt)), **run),
                                          stats_path=str(stats_path), output=str(work / "scores"),
                                          save_embeddings=cfg.duplicate_rate > 0), stats)
        timings["score_s"] = round(time.time() - t, 2)
        if cfg.duplicate_rate > 0:
            t = time.time()
            found = run_dedup(cfg, work)
            timings["dedup_s"] = round(time.time() - t, 2)
    summary = evaluate(work / "scores", work / "target")
    if cfg.duplicate_rate > 0:
        summary["dedup"] = evaluate_dedup(work / "dedup", work / "target", found)
    summary.update(model=MODEL, workdir=str(work), stats=str(stats_path), scores=str(work / "scores"),
                   components={t: ws.components for t, ws in stats.towers.items()},
                   clusters={t: ws.clusters.k if ws.clusters is not None else None for t, ws in stats.towers.items()},
                   reference_samples=fit_summary["reference_samples"], scored_rows=score_summary["rows"],
                   timings=timings)
    if cfg.card:
        from pipeline.card.build import build_card
        from pipeline.config import CardConfig

        t = time.time()
        build_card(CardConfig(scores=str(work / "scores"), stats=str(stats_path), output=str(work / "card"),
                              inputs=tuple(map(str, tgt))))
        timings["card_s"] = round(time.time() - t, 2)
        summary["card"] = str(work / "card" / "README.md")
    timings["total_s"] = round(time.time() - started, 2)
    write_atomic(work / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def report(summary: dict) -> str:
    """A short human-readable report of the demo's summary."""
    lines = [f"wclip demo: {summary['scored_rows']} target rows scored against {summary['reference_samples']} "
             f"reference samples (model {summary['model']}, components {summary['components']}) "
             f"in {summary['timings']['total_s']} s", "", "AUROC (anomalies ranked by lower score):"]
    for group, g in summary["groups"].items():
        auc = "n/a" if g["auroc"] is None else f"{g['auroc']:.3f}"
        lines.append(f"  {group:<9} by {g['score']:<13} {auc}   ({g['n']} anomalies)")
    lines.append("per kind: " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in summary["kinds"].items()))
    for kind, o in summary["obvious"].items():
        lines.append(f"{kind}: {100 * o['fraction_p_below_0.01']:.1f}% of {o['n']} have {o['score']} < 0.01")
    if summary.get("local"):
        lines += ["", f"local likelihood ({_clusters_text(summary.get('clusters'))}), on kinds the global one misses:"]
    for kind, entry in summary.get("local", {}).items():
        for tower in TOWERS:
            g, loc = entry[tower]["global"], entry[tower]["local"]
            lines.append(f"  {kind.replace('_', ' ')}: global {g['score']} {_auc(g['auroc'])}, "
                         f"local {loc['score']} {_auc(loc['auroc'])}   ({entry['n']} anomalies)")
    if summary.get("dedup"):
        lines += ["", _dedup_text(summary["dedup"])]
    lines += ["", f"scores:  {summary['scores']}/*.parquet", f"stats:   {summary['stats']}"]
    if summary.get("card"):
        lines.append(f"card:    {summary['card']}")
    lines.append(f"summary: {summary['workdir']}/summary.json")
    return "\n".join(lines)


def _dedup_text(d: dict) -> str:
    share = "n/a" if d["faithful_share"] is None else f"{100 * d['faithful_share']:.0f}%"
    grouped = ", ".join(f"{n} {kind}" for kind, n in d["anomalies_grouped"].items())
    return (f"dedup (eps {d['eps']:g}, keep {d['keep']}): {d['groups']} duplicate groups, {d['rows_removed']} rows "
            f"removed; of {d['planted_pairs']} planted duplicate pairs, recall {_auc(d['recall'])}, precision "
            f"{_auc(d['normal']['precision'])} among normal rows ({_auc(d['precision'])} over all "
            f"{d['found_pairs']} pairs{'; grouped anomalies: ' + grouped if grouped else ''})\n"
            f"  the faithful copy kept in {d['faithful_kept']} of {d['groups_with_planted']} groups holding a "
            f"planted pair ({share})")


def _auc(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _clusters_text(clusters) -> str:
    ks = sorted({k for k in (clusters or {}).values() if k})
    return "no clusters fitted" if not ks else f"{'/'.join(map(str, ks))} clusters"


def shortfalls(summary: dict) -> tuple[dict, dict]:
    """What misses the demo's targets: ``({group or kind: AUROC below TARGET_AUROC}, {"kind/tower": local
    AUROC below LOCAL_TARGET_AUROC})``, rounded to 4 places."""
    below = {name: round(v["auroc"], 4) for part in ("groups", "kinds") for name, v in summary[part].items()
             if v["auroc"] is not None and v["auroc"] < TARGET_AUROC}
    local = {f"{kind}/{tower}": round(entry[tower]["local"]["auroc"], 4)
             for kind, entry in summary.get("local", {}).items() for tower in TOWERS
             if entry[tower]["local"]["auroc"] is not None and entry[tower]["local"]["auroc"] < LOCAL_TARGET_AUROC}
    return below, local

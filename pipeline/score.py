"""The score job: per-shard Parquet likelihood columns for a corpus, resumable and exactly-once.

Before any work it checks the output folder (:mod:`pipeline.scores` defines it): it never
overwrites a file wclip did not write, never mixes scores of two fits or models in one folder, and skips
exactly the shards whose outputs are complete and were made by the same stats and model. A run holds the
folder from before it plans until it ends (:func:`claim_folder`): a second run started on it meanwhile is
refused before it reads or writes anything there.
"""

from __future__ import annotations

import logging

import pipeline
from pipeline.config import ScoreConfig
from pipeline.errors import ConfigError
from pipeline.executors import open_executor
from pipeline.flow.read import check_unique_names, shard_name
from pipeline.models import model_identity
from pipeline.scores.folder import append_failure, claim_folder, describe_plan, open_folder, plan_folder
from pipeline.scores.sinks import ScoreSink
from pipeline.storage import sha256

log = logging.getLogger("wclip")


def check_model_matches(stats, run) -> None:
    """Refuse to score with a model or normalisation other than the fit's."""
    meta = stats.metadata
    refuse_embedding_stats(meta)
    fitted = meta.get("model_identity")
    wanted = model_identity(run.model)
    if fitted is None:
        raise ConfigError("the stats file records no model identity; re-run `wclip fit` with this version")
    if fitted != wanted:
        raise ConfigError(
            f"model mismatch: the stats were fitted with model {fitted['model']!r} ({fitted['weights']}), "
            f"but scoring would use {wanted['model']!r} ({wanted['weights']}). Score with the fit's model "
            f"(omit --model to use it) or re-run `wclip fit` with this model.")
    if bool(meta.get("normalize")) != run.encode.normalize:
        raise ConfigError(
            f"normalisation mismatch: the stats were fitted on "
            f"{'L2-normalised' if meta.get('normalize') else 'raw'} embeddings, but scoring would use "
            f"{'L2-normalised' if run.encode.normalize else 'raw'} ones; drop --normalize/--raw to use the fit's")


def refuse_embedding_stats(meta: dict) -> None:
    """Stats fitted on precomputed embeddings score embeddings only (``wclip score --embeddings``), unless the fit
    declared the model that made them (``--embeddings-model``): then they score that model's shards like a fit on
    tars (the model identity is checked as for any fit)."""
    if meta.get("embeddings") and not meta["embeddings"].get("model"):
        raise ConfigError(f"the stats were fitted on precomputed embeddings ({meta['model_identity']['model']}): score "
                          f"that kind of embeddings with `wclip score --embeddings PATHS`, or fit on these shards "
                          f"with `wclip fit --input`")


def provenance(cfg: ScoreConfig) -> dict:
    """What makes this run's scores: the stats (by digest), the model identity and the normalisation."""
    return {"stats_digest": sha256(cfg.stats_path), "stats_path": str(cfg.stats_path),
            "model": model_identity(cfg.run.model), "normalize": cfg.run.encode.normalize,
            "wclip_version": pipeline.__version__}


def plan_outputs(cfg: ScoreConfig, made: dict) -> list:
    """The shards to (re)score, after refusing what would overwrite others' files or mix two fits."""
    urls = list(cfg.run.shards)
    todo = set(plan_folder(cfg.output, [shard_name(u) for u in urls], made, cfg.overwrite,
                           need_embeddings=cfg.save_embeddings))
    return [u for u in urls if shard_name(u) in todo]


def score(cfg: ScoreConfig, stats, dry_run: bool = False) -> dict:
    """Run the score job; returns the summary dict (also printed by the CLI). ``dry_run``: only say what
    it would read, skip and write (no Ray, no model)."""
    run = cfg.run
    check_unique_names(run.shards)
    check_model_matches(stats, run)
    made = provenance(cfg)
    if dry_run:
        todo = plan_outputs(cfg, made)
        return describe_plan(cfg.output, [shard_name(u) for u in run.shards], [shard_name(u) for u in todo])
    with claim_folder(cfg.output, cfg.stats_path):
        return _score(cfg, stats, made)


def _score(cfg: ScoreConfig, stats, made: dict) -> dict:
    """The score job in a folder this run holds."""
    run = cfg.run
    todo = plan_outputs(cfg, made)
    skipped = len(run.shards) - len(todo)
    open_folder(cfg.output, made, [shard_name(u) for u in todo])
    if skipped:
        log.info("resuming: %d of %d shards already done in %s (--overwrite redoes them)",
                 skipped, len(run.shards), cfg.output)
    if not todo:
        return {"rows": 0, "shards_done": 0, "shards_skipped": skipped, "failed": []}
    with open_executor(run) as jobs:
        encoders = jobs.start_encoders(run, stats)
        info = jobs.encoder_info(run, encoders)
        for tower, ws in stats.towers.items():
            if info["dims"][tower] != ws.dim:
                raise ConfigError(f"the {tower} tower gives {info['dims'][tower]}-d embeddings but the stats "
                                  f"were fitted on {ws.dim}-d ones: wrong model or stats file")
        log.info("encoders: %s on %s (%s)", encoders.describe(), info["device"], info["precision"])
        sink = ScoreSink(cfg.output, provenance=made, keep_embeddings=cfg.save_embeddings,
                         dims={t: ws.dim for t, ws in stats.towers.items()}, local=stats.clustered)
        report = jobs.run_shards(run, todo, encoders, sink, skipped=skipped)
    for url, error in report.failed:
        append_failure(cfg.output, {"shard": url, "name": shard_name(url), "error": error,
                                    "attempts": run.retries + 1})
    return report.summary()

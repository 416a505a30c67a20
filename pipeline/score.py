"""The score job: per-shard Parquet likelihood columns for a corpus, resumable and exactly-once."""

from __future__ import annotations

import logging

from pipeline.config import ScoreConfig
from pipeline.errors import ConfigError
from pipeline.flow.read import check_unique_names, shard_name
from pipeline.flow.write import FAILURES_FILE, ScoreSink, append_failure, completed_names
from pipeline.models import model_identity
from pipeline.storage import exists, join, makedirs, remove, remove_stale_temporaries

log = logging.getLogger("wclip")


def check_model_matches(stats, run) -> None:
    """Refuse to score with a model or normalisation other than the fit's."""
    meta = stats.metadata
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


def score(cfg: ScoreConfig, stats) -> dict:
    """Run the score job; returns the summary dict (also printed by the CLI)."""
    from pipeline import runtime

    run = cfg.run
    check_unique_names(run.shards)
    check_model_matches(stats, run)
    done = set() if cfg.overwrite else completed_names(cfg.output)
    todo = [u for u in run.shards if shard_name(u) not in done]
    skipped = len(run.shards) - len(todo)
    makedirs(cfg.output)
    if exists(join(cfg.output, FAILURES_FILE)):
        remove(join(cfg.output, FAILURES_FILE))
    remove_stale_temporaries(cfg.output)
    if skipped:
        log.info("resuming: %d of %d shards already done in %s (--overwrite redoes them)",
                 skipped, len(run.shards), cfg.output)
    if not todo:
        return {"rows": 0, "shards_done": 0, "shards_skipped": skipped, "failed": []}
    with runtime.ray_session(run.ray):
        encoders = runtime.start_encoders(run, stats)
        info = runtime.encoder_info(run, encoders)
        for tower, ws in stats.towers.items():
            if info["dims"][tower] != ws.dim:
                raise ConfigError(f"the {tower} tower gives {info['dims'][tower]}-d embeddings but the stats "
                                  f"were fitted on {ws.dim}-d ones: wrong model or stats file")
        log.info("encoders: %d on %s (%s)", len(encoders), info["device"], info["precision"])
        report = runtime.run_shards(run, todo, encoders, ScoreSink(cfg.output, cfg.save_embeddings),
                                    skipped=skipped)
    for url, error in report.failed:
        append_failure(cfg.output, {"shard": url, "error": error, "attempts": run.retries + 1})
    return report.summary()

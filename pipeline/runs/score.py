"""The score job, written once over a source (:mod:`pipeline.sources`): per-input Parquet likelihood columns,
resumable and exactly-once.

checks -> claim -> plan -> dry-run -> open folder -> run on the executor -> failure records -> summary.
Before any work it refuses stats the source cannot be scored with, then holds the output folder for this
run (:func:`~pipeline.scores.folder.claim_folder`) and plans in it (:func:`~pipeline.scores.folder.plan_folder`):
it never overwrites a file wclip did not write, never mixes scores of two fits or models in one folder, and
skips exactly the inputs whose outputs are complete and were made by the same stats and model.
"""

from __future__ import annotations

import logging

from pipeline.executors import open_executor
from pipeline.scores.folder import append_failure, claim_folder, describe_plan, open_folder, plan_folder
from pipeline.sources import source_for

log = logging.getLogger("wclip")


def score(cfg, stats, dry_run: bool = False) -> dict:
    """Run ``wclip score`` (``cfg``: a :class:`~pipeline.config.ScoreConfig` or
    :class:`~pipeline.config.EmbeddingScoreConfig`); returns the summary dict (also printed by the CLI).
    ``dry_run``: only say what it would read, skip and write (no executor, no model, nothing written)."""
    source = source_for(cfg, stats)
    source.check_score(cfg, stats)
    made = source.provenance(cfg, stats)
    with claim_folder(cfg.output, cfg.stats_path, hold=not dry_run):
        names = source.names
        todo = plan_folder(cfg.output, names, made, cfg.overwrite, need_embeddings=source.needs_embeddings(cfg))
        if dry_run:
            return describe_plan(cfg.output, names, todo, inputs=source.label)
        return _run(cfg, stats, source, made, todo)


def _run(cfg, stats, source, made: dict, todo: list) -> dict:
    """The score job in a folder this run holds: open it, score ``todo``, record the failures."""
    names = source.names
    skipped = len(names) - len(todo)
    open_folder(cfg.output, made, todo, embeddings=source.needs_embeddings(cfg))
    if skipped:
        log.info("resuming: %d of %d %s already done in %s (--overwrite redoes them)", skipped, len(names),
                 source.units, cfg.output)
    if not todo:
        return {"rows": 0, "shards_done": 0, "shards_skipped": skipped, "failed": []}
    with open_executor(cfg.run) as executor:
        report = source.score(executor, cfg, stats, todo, made, skipped)
    for url, error in report.failed:
        append_failure(cfg.output, {"shard": url, "name": source.name_of(url), "error": error,
                                    "attempts": cfg.run.retries + 1})
    return report.summary()

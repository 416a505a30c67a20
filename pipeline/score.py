"""The score job: per-shard Parquet likelihood columns for a corpus, resumable and exactly-once."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, replace

from pipeline.config import ScoreConfig
from pipeline.models import model_identity
from pipeline.shards import shard_name
from pipeline.writer import (FAILURES_FILE, append_failure, build_table, completed_names, filesystem, join,
                             remove_stale_temporaries, write_shard_outputs)

log = logging.getLogger("wclip")


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any work starts."""


def check_unique_names(urls) -> None:
    seen: dict = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise ConfigError(f"two input shards share the output name {name!r}: {seen[name]} and {url}; "
                              f"score them into different --output folders")
        seen[name] = url


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


@dataclass(frozen=True)
class ScoreSink:
    """Writes one shard's outputs (runs inside the shard task)."""

    output: str
    keep_embeddings: bool = False

    def __call__(self, assembler, damage) -> None:
        table = build_table(assembler.rows, assembler.scores())
        summary = assembler.summary(damage)
        embeddings = assembler.embedding_arrays() if self.keep_embeddings else None
        write_shard_outputs(self.output, assembler.name, table, summary, embeddings)


def score(cfg: ScoreConfig, stats) -> dict:
    """Run the score job; returns the summary dict (also printed by the CLI)."""
    from pipeline import runtime

    run = cfg.run
    check_unique_names(run.shards)
    check_model_matches(stats, run)
    done = set() if cfg.overwrite else completed_names(cfg.output)
    todo = [u for u in run.shards if shard_name(u) not in done]
    skipped = len(run.shards) - len(todo)
    fs, out = filesystem(cfg.output)
    fs.makedirs(out, exist_ok=True)
    if fs.exists(join(out, FAILURES_FILE)):
        fs.rm(join(out, FAILURES_FILE))
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
        report = runtime.run_shards(run, todo, encoders, "score",
                                    sink=ScoreSink(cfg.output, cfg.save_embeddings), skipped=skipped)
    for url, error in report.failed:
        append_failure(cfg.output, {"shard": url, "error": error, "attempts": run.retries + 1})
    return summarize(report, skipped)


def summarize(report, skipped: int) -> dict:
    status = Counter()
    damaged = []
    for d in report.done:
        status.update(d["summary"]["status_counts"])
        if d["summary"].get("damage"):
            damaged.append((d["summary"]["shard"], d["summary"]["damage"]))
    rows = report.rows
    return {"rows": rows, "status_counts": dict(sorted(status.items())),
            "shards_done": len(report.done), "shards_skipped": skipped,
            "failed": [{"shard": u, "error": e} for u, e in report.failed], "damaged": damaged,
            "elapsed_s": round(report.elapsed, 2),
            "samples_per_s": round(rows / report.elapsed, 1) if report.elapsed > 0 else None}


def shards_digest(urls) -> str:
    """sha256 of the shard URL list (order-independent)."""
    return hashlib.sha256("\n".join(sorted(urls)).encode()).hexdigest()


def with_fit_defaults(run, stats):
    """The run with the stats' normalisation when none was asked for explicitly."""
    return replace(run, encode=replace(run.encode, normalize=bool(stats.metadata.get("normalize"))))

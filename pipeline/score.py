"""The score job: per-shard Parquet likelihood columns for a corpus, resumable and exactly-once.

Before any work it checks the output folder (:mod:`pipeline.flow.write` describes its layout): it never
overwrites a file wclip did not write, never mixes scores of two fits or models in one folder, and skips
exactly the shards whose outputs are complete and were made by the same stats and model. A run holds the
folder from before it plans until it ends (:func:`claim_folder`): a second run started on it meanwhile is
refused before it reads or writes anything there.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from typing import Iterator

import pipeline
from pipeline import storage
from pipeline.config import ScoreConfig
from pipeline.errors import ConfigError
from pipeline.executors import open_executor
from pipeline.flow.read import check_unique_names, shard_name
from pipeline.flow.write import (
    EMBEDDING_FILES,
    STATE_DIR,
    ScoreSink,
    append_failure,
    embeddings_folder,
    file_sizes,
    keep_failures_except,
    markers,
    run_path,
    scores_path,
    state_path,
)
from pipeline.models import model_identity
from pipeline.storage import exists, join, makedirs, read_json, remove_stale_temporaries, sha256, write_json
from pipeline.table import read_provenance

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


IDENTITY = ("stats_digest", "model", "normalize")  # what must agree for two scores to share a folder


def provenance(cfg: ScoreConfig) -> dict:
    """What makes this run's scores: the stats (by digest), the model identity and the normalisation."""
    return {"stats_digest": sha256(cfg.stats_path), "stats_path": str(cfg.stats_path),
            "model": model_identity(cfg.run.model), "normalize": cfg.run.encode.normalize,
            "wclip_version": pipeline.__version__}


def _identity(made: dict) -> dict:
    return {k: made.get(k) for k in IDENTITY}


def _describe(made: dict) -> str:
    model = made.get("model") or {}
    return (f"stats {str(made.get('stats_digest'))[:12]} ({made.get('stats_path', '?')}), model "
            f"{model.get('model', '?')} ({model.get('weights', '?')}), "
            f"{'L2-normalised' if made.get('normalize') else 'raw'} embeddings")


def plan_outputs(cfg: ScoreConfig, made: dict) -> list:
    """The shards to (re)score, after refusing what would overwrite others' files or mix two fits."""
    urls = list(cfg.run.shards)
    todo = set(plan_folder(cfg.output, [shard_name(u) for u in urls], made, cfg.overwrite,
                           need_embeddings=cfg.save_embeddings))
    return [u for u in urls if shard_name(u) in todo]


def _plan_fields(shared: dict):
    """What planning keeps of a marker: what made it (one object per distinct identity), the Parquet file's
    size and whether embeddings were saved (a parsed marker takes ~3.6 KB: 2 GB for 585,000 shards)."""

    def project(marker: dict) -> dict:
        made = marker.get("provenance") or {}
        kept = {k: made.get(k) for k in (*IDENTITY, "stats_path")}
        kept = shared.setdefault(json.dumps(kept, sort_keys=True, default=str), kept)
        return {"provenance": kept, "parquet": {"bytes": (marker.get("parquet") or {}).get("bytes")},
                "embeddings": bool(marker.get("embeddings"))}

    return project


def plan_folder(out: str, names: list, made: dict, overwrite: bool, need_embeddings: bool = False) -> list:
    """Of the outputs ``names``, those to (re)make in folder ``out``, after refusing what would overwrite
    others' files or mix two fits; with ``need_embeddings`` a done output without saved embeddings is redone."""
    done = markers(out, _plan_fields({}))
    sizes = file_sizes(out, ".parquet")
    foreign = sorted(n for n in set(names) if n + ".parquet" in sizes and n not in done
                     and read_provenance(scores_path(out, n)) is None)
    if foreign:
        raise ConfigError(f"--output {out} already holds {len(foreign)} file(s) that wclip did not write and this "
                          f"run would replace ({', '.join(f + '.parquet' for f in foreign[:3])}; img2dataset's "
                          f"metadata?); wclip never overwrites them: choose another --output")
    previous = read_json(run_path(out)) if exists(run_path(out)) else None
    others = {n for n, m in done.items() if _identity(m.get("provenance") or {}) != _identity(made)}
    if (previous and _identity(previous) != _identity(made)) or others:
        old = previous or next(m.get("provenance") or {} for n, m in done.items() if n in others)
        if not overwrite:
            raise ConfigError(f"--output {out} holds scores made with {_describe(old)}, but this run uses "
                              f"{_describe(made)}; one folder never mixes two fits: choose a new --output, or "
                              f"pass --overwrite to rescore every shard")
        stray = sorted(others - set(names))
        if stray:
            raise ConfigError(f"--overwrite would leave {len(stray)} shard(s) scored with {_describe(old)} in "
                              f"{out} that this run does not rescore ({', '.join(stray[:3])}); choose a new --output")
    if overwrite:
        return list(names)
    complete = {n for n, m in done.items()
                if (m.get("parquet") or {}).get("bytes") == sizes.get(n + ".parquet")
                and (m.get("embeddings") or not need_embeddings)}
    return [n for n in names if n not in complete]


LOCK = "lock"  # DIR/.wclip/lock: held by the run writing the folder (local folders)


@contextlib.contextmanager
def claim_folder(out: str, stats_path, hold: bool = True) -> Iterator[None]:
    """Hold scores folder ``out`` for this run for the block (planning, opening, scoring): another ``wclip score``
    (tar shards or ``--embeddings``, same stats or not) that starts on it meanwhile is refused in one line
    (:class:`ConfigError`, exit 2) before it reads or writes anything there. ``hold=False`` (``--dry-run``, which
    writes nothing) claims nothing.

    It refuses rather than waits: a score run takes hours, and what the second run should do depends on the
    first (same stats: resume it afterwards, doing only what is left; other stats: the folder is taken), so it
    says who holds the folder and the user reruns. Two runs with the same stats are excluded too: they would
    write the same shards and each clear the other's temporary files as a killed run's.

    A local folder (or ``file://``) is held by ``flock`` on ``DIR/.wclip/lock`` (:func:`storage.exclusive`):
    released by the operating system when the run ends in any way, ``kill -9`` included, so a crash never
    wedges the folder; the next run resumes. An object store (``s3://``, ``gs://``, ...) has no lock fsspec can
    take: there nothing excludes two runs started at the same moment (the check of ``run.json`` refuses a run
    started after another wrote it); run one ``wclip score`` per folder there.

    A run refused before it opened a folder that had no ``.wclip/`` (files of another tool) leaves it as it
    was: the lock file and the folders the claim made are removed while still held (a run that opened the
    removed file in that instant may hold it, but it meets the same files of another tool and is refused too).
    """
    path = storage.local_file(out)
    if not hold or path is None:
        yield
        return
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "stats_path": str(stats_path),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    made = [p for p in (path, state_path(path)) if not os.path.isdir(p)]  # what the claim creates
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(storage.exclusive(state_path(path, LOCK), holder))
        except storage.Held as busy:
            raise ConfigError(f"--output {out} is being written by another `wclip score` ({_holder(busy.holder)}); "
                              f"wait for it to end, then rerun this command (a run with the same stats resumes "
                              f"where it stopped), or choose another --output") from None
        try:
            yield
        except BaseException:
            if state_path(path) in made and not os.path.exists(run_path(path)):  # refused before opening it:
                os.remove(state_path(path, LOCK))                             # leave the folder as it was
                for folder in reversed(made):
                    storage.remove_empty_folder(folder)
            raise


def _holder(made: dict) -> str:
    if not made:
        return "just starting"
    return f"pid {made.get('pid')} on {made.get('host')}, since {made.get('since')}, stats {made.get('stats_path')}"


def open_folder(out: str, made: dict, todo: list) -> None:
    """Record what makes the folder and clear what a killed run left, before the outputs ``todo`` are made."""
    makedirs(out)
    write_json(run_path(out), {**_identity(made), "stats_path": made["stats_path"],
                               "wclip_version": pipeline.__version__, "layout": STATE_DIR,
                               "updated": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    keep_failures_except(out, set(todo))
    folders = [out, state_path(out, "shards")] + [join(embeddings_folder(out), sub) for sub, _, _ in
                                                  EMBEDDING_FILES.values()]
    for folder in folders:
        remove_stale_temporaries(folder)


def describe_plan(out: str, names: list, todo: list, inputs: str = "shards") -> dict:
    """What a run would do (``--dry-run``): how many inputs, which are done and skipped, what it writes."""
    todo_set = set(todo)
    skipped = [n for n in names if n not in todo_set]
    return {"dry_run": True, "inputs": len(names), "input_kind": inputs, "to_do": len(todo),
            "skipped": len(skipped), "skipped_names": skipped[:20], "to_do_names": list(todo)[:20],
            "writes": [scores_path(out, n) for n in list(todo)[:3]] + (["..."] if len(todo) > 3 else []),
            "output": out}


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

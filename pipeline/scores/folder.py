"""The scores folder as a job writes it, each rule defined once: the plan (which inputs to (re)score, after
refusing what would overwrite files wclip did not write or mix two fits: the output-folder rule), the claim
that holds the folder for one run, opening it (recording what makes it, clearing what a killed run left), and
the failure records. Where each file lives is :mod:`pipeline.scores.layout`; what made it,
:mod:`pipeline.scores.provenance`."""

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
from pipeline.errors import ConfigError
from pipeline.flow.read import shard_name
from pipeline.scores.layout import (
    EMBEDDING_FILES,
    LAYOUT,
    LOCK,
    SAVED_STAMP,
    adopt_legacy_state,
    embeddings_folder,
    failures_path,
    file_sizes,
    markers,
    run_path,
    scores_path,
    state_path,
)
from pipeline.scores.provenance import IDENTITY, describe_provenance, identity, read_provenance
from pipeline.storage import (
    exists,
    join,
    makedirs,
    read_bytes,
    read_json,
    remove_stale_temporaries,
    write_atomic,
    write_json,
)


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
    others = {n for n, m in done.items() if identity(m.get("provenance") or {}) != identity(made)}
    if (previous and identity(previous) != identity(made)) or others:
        old = previous or next(m.get("provenance") or {} for n, m in done.items() if n in others)
        if not overwrite:
            raise ConfigError(f"--output {out} holds scores made with {_described(old)}, but this run uses "
                              f"{_described(made)}; one folder never mixes two fits: choose a new --output, or "
                              f"pass --overwrite to rescore every shard")
        stray = sorted(others - set(names))
        if stray:
            raise ConfigError(f"--overwrite would leave {len(stray)} shard(s) scored with {_described(old)} in "
                              f"{out} that this run does not rescore ({', '.join(stray[:3])}); choose a new --output")
    if overwrite:
        return list(names)
    complete = {n for n, m in done.items()
                if (m.get("parquet") or {}).get("bytes") == sizes.get(n + ".parquet")
                and (m.get("embeddings") or not need_embeddings)}
    return [n for n in names if n not in complete]


@contextlib.contextmanager
def claim_folder(out: str, stats_path, hold: bool = True, command: str = "score") -> Iterator[None]:
    """Hold scores folder ``out`` for this run for the block (planning, opening, scoring): another ``wclip score``
    (tar shards or ``--embeddings``, same stats or not) that starts on it meanwhile is refused in one line
    (:class:`ConfigError`, exit 2) before it reads or writes anything there. ``hold=False`` (``--dry-run``, which
    writes nothing) claims nothing.

    It refuses rather than waits: a score run takes hours, and what the second run should do depends on the
    first (same stats: resume it afterwards, doing only what is left; other stats: the folder is taken), so it
    says who holds the folder and the user reruns. Two runs with the same stats are excluded too: they would
    write the same shards and each clear the other's temporary files as a killed run's.

    A local folder (or ``file://``) is held by ``flock`` on ``DIR.wclip/lock`` (:func:`storage.exclusive`):
    released by the operating system when the run ends in any way, ``kill -9`` included, so a crash never
    wedges the folder; the next run resumes. An object store (``s3://``, ``gs://``, ...) has no lock fsspec can
    take: there nothing excludes two runs started at the same moment (the check of ``run.json`` refuses a run
    started after another wrote it); run one ``wclip score`` per folder there.

    A run refused before it opened a folder that had no ``DIR.wclip/`` (files of another tool) leaves it as it
    was: the lock file and the folder the claim made are removed while still held (a run that opened the
    removed file in that instant may hold it, but it meets the same files of another tool and is refused too).
    A folder of wclip 0.1's layout is moved to this one first (:func:`~pipeline.scores.layout.adopt_legacy_state`).
    """
    adopt_legacy_state(out)
    path = storage.local_file(out)
    if not hold or path is None:
        yield
        return
    holder = {"command": command, "pid": os.getpid(), "host": socket.gethostname(), "stats_path": str(stats_path),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    made = [p for p in (state_path(path),) if not os.path.isdir(p)]  # what the claim creates
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(storage.exclusive(state_path(path, LOCK), holder))
        except storage.Held as busy:
            running = (busy.holder or {}).get("command", "score")
            raise ConfigError(f"--output {out} is being written by another `wclip {running}` ({_holder(busy.holder)}); "
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
    what = "scores" if made.get("command", "score") != "score" else "stats"
    return f"pid {made.get('pid')} on {made.get('host')}, since {made.get('since')}, {what} {made.get('stats_path')}"


def open_folder(out: str, made: dict, todo: list, embeddings: bool = False) -> None:
    """Record what makes the folder and clear what a killed run left, before the outputs ``todo`` are made;
    ``embeddings`` (``--save-embeddings``): stamp the embeddings folder with the model that makes them
    (:data:`~pipeline.scores.layout.SAVED_STAMP`), so ``wclip score --embeddings`` scores them as they are."""
    makedirs(out)
    write_json(run_path(out), {**identity(made), "stats_path": made["stats_path"],
                               "wclip_version": pipeline.__version__, "layout": LAYOUT,
                               "updated": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    if embeddings:
        write_json(join(embeddings_folder(out), SAVED_STAMP),
                   {"format": "wclip-embeddings/1", "model": made.get("model"), "normalize": made.get("normalize"),
                    "stats_digest": made.get("stats_digest"), "dtype": "float32",
                    "names": "N: the shard's name when it is a number, else a hash of it; the metadata's shard "
                             "column names each row's input"})
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


def append_failure(output: str, record: dict) -> None:
    """Record a shard that failed after its retries (one JSON object per line). When even that cannot be
    written (a full disk), say so in one line: the summary still names the failure."""
    path = failures_path(output)
    try:
        old = read_bytes(path) if exists(path) else b""
        write_atomic(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())
    except OSError as exc:
        logging.getLogger("wclip").error("could not record the failure of %s: %s", record.get("shard"), exc)


def keep_failures_except(output: str, names: set) -> None:
    """Drop the failure records of the shards about to be redone; the others stay."""
    path = failures_path(output)
    if not exists(path):
        return
    kept = [line for line in read_bytes(path).decode().splitlines() if line.strip() and
            (json.loads(line).get("name") or shard_name(json.loads(line).get("shard", ""))) not in names]
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


def _described(made: dict) -> str:
    return describe_provenance(made, normalisation=True)

"""Write new WebDataset shards holding the kept samples, copying tar members byte for byte.

The shards are in img2dataset's layout (:mod:`pipeline.curate.img2dataset`): ``NNNNN.tar``, ``NNNNN.parquet``
and ``NNNNN_stats.json`` (the completion marker), ``samples_per_shard`` kept rows each (the last one fewer).
The kept rows are numbered in input-shard order, then tar order, so shard ``n`` always holds the rows
``n*S .. n*S+S-1`` and a resumed run writes identical shards. A kept sample that cannot be read (truncated
or changed input shard, see :mod:`pipeline.curate.source`) keeps its number: its row says why and it is
left out of the tar, so one bad sample never costs the others. Each copy task takes a group of
consecutive input shards (each read once); an output shard that spans two groups is written as pieces
and joined afterwards. Member names are only ever written *inside* tars; file names come from the shard
numbers. The shards' metadata carries the local likelihood's columns when the scores have them (``local``).
The tasks run through a ``mapper`` the caller passes in (the command passes
:meth:`pipeline.executors.Executor.map`); every file is written crash-safe through :mod:`pipeline.storage`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow.compute as pc

from pipeline import storage
from pipeline.curate import img2dataset
from pipeline.curate.source import kept_samples
from pipeline.flow.read import shard_name
from pipeline.scores.table import LOCAL_COLUMNS, SCORE_COLUMNS, iter_batches

ROW_COLUMNS = ("key", "shard", "index", "url", "uid", "caption", "status", "error", *SCORE_COLUMNS)
LOCAL_ROW_COLUMNS = ROW_COLUMNS + LOCAL_COLUMNS  # the rows of scores with the local likelihood
MAX_LISTED = 10_000  # unreadable samples listed in the summary (all of them are in the shards' files)


@dataclass(frozen=True)
class InputPart:
    """One input shard: where its kept rows are and where its samples go."""

    url: str                    # the tar to read
    shard: str                  # its value in the scores' ``shard`` column
    kept_files: tuple           # kept Parquet files holding its rows
    start: int                  # global number of its first kept sample
    count: int                  # kept samples in it


@dataclass(frozen=True)
class CopyJob:
    """One task: consecutive input shards, written to output shards or pieces of them."""

    parts: tuple
    out_dir: str
    samples_per_shard: int
    width: int
    total: int                  # kept samples over all jobs
    local: bool = False         # the rows carry the local likelihood's columns (and the shards' metadata)
    input_format: str = "webdataset"  # the input shards' layout (pipeline.config.INPUT_FORMATS)

    @property
    def start(self) -> int:
        return self.parts[0].start

    @property
    def end(self) -> int:
        return self.parts[-1].start + self.parts[-1].count

    def targets(self) -> list:
        """``(shard number, first, end, path, whole)`` for every output shard it touches;
        ``whole`` when the job holds the entire shard (otherwise it writes a piece)."""
        S, out = self.samples_per_shard, self.out_dir
        result = []
        for n in range(self.start // S, (self.end - 1) // S + 1):
            lo, hi = max(self.start, n * S), min(self.end, (n + 1) * S)
            whole = lo == n * S and hi == min((n + 1) * S, self.total)
            path = img2dataset.tar_path(out, n, self.width) if whole else img2dataset.piece_path(out, n, self.width, lo)
            result.append((n, lo, hi, path, whole))
        return result


def match_inputs(urls, shards: dict) -> tuple[list, list, list]:
    """Pair input URLs with the ``shard`` values of the scores: exact URL, else the same shard
    name (``00042`` for ``.../00042.tar``). Returns ``(pairs, unmatched urls, unused shards)``."""
    by_name: dict = {}
    for value in shards:
        by_name.setdefault(shard_name(value), []).append(value)
    pairs, unmatched, used = [], [], set()
    for url in urls:
        value = url if url in shards else None
        if value is None:
            candidates = by_name.get(shard_name(url), [])
            if len(candidates) > 1:
                raise ValueError(f"input {url} matches several scored shards {candidates[:3]}; "
                                 "pass the exact shard URLs that were scored")
            value = candidates[0] if candidates else None
        if value is None or value in used:
            unmatched.append(url)
            continue
        used.add(value)
        pairs.append((url, value))
    return pairs, unmatched, [v for v in shards if v not in used]


def make_plan(pairs, shards: dict, kept_dir, out_dir, samples_per_shard: int,
              samples_per_task: int | None = None, local: bool = False,
              input_format: str = "webdataset") -> tuple[list, dict]:
    """Number the kept samples and group input shards into jobs; returns ``(jobs, plan)``. ``local``: the
    shards' metadata gets the local likelihood's columns; ``input_format``: the inputs' layout (each part of
    the plan's digest only when not the default, so folders written before keep their digest)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1; got {samples_per_shard}")
    per_task = samples_per_task or 4 * samples_per_shard
    parts, start = [], 0
    for url, value in pairs:
        entry = shards[value]
        if entry["kept"]:
            files = tuple(storage.join(kept_dir, f) for f in entry["files"])
            parts.append(InputPart(url, value, files, start, entry["kept"]))
            start += entry["kept"]
    total = start
    n_shards = -(-total // samples_per_shard)
    width = max(5, len(str(max(n_shards - 1, 0))))
    groups, current = [], []
    for part in parts:
        current.append(part)
        if sum(p.count for p in current) >= per_task:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    jobs = [CopyJob(tuple(g), str(out_dir), samples_per_shard, width, total, local, input_format) for g in groups]
    digest = hashlib.sha256(json.dumps(
        [samples_per_shard, width, [(p.url, p.count) for p in parts]] + (["local"] if local else [])
        + ([input_format] if input_format != "webdataset" else [])
    ).encode()).hexdigest()
    plan = {"samples": total, "shards": n_shards, "samples_per_shard": samples_per_shard,
            "width": width, "inputs": len(parts), "digest": digest}
    return jobs, plan


def _done(job: CopyJob, n: int, path: str) -> bool:
    return storage.exists(img2dataset.stats_path(job.out_dir, n, job.width)) or \
        (img2dataset.is_piece(path) and storage.exists(path))


def pending(job: CopyJob) -> bool:
    """Whether the job still has an output shard or piece to write."""
    return not all(_done(job, n, path) for n, _, _, path, _ in job.targets())


class _Outputs:
    """The output shards and pieces of one job, opened one after another as its kept rows arrive."""

    def __init__(self, job: CopyJob):
        self.job, self.targets = job, job.targets()
        self.index, self.pos, self.sink = -1, job.start, None

    def next_sink(self) -> img2dataset.ShardSink:
        """The sink of the next kept row (closing the previous target when it is full)."""
        if self.sink is None or self.pos >= self.targets[self.index][2]:
            if self.sink is not None:
                self.sink.close()
            self.index += 1
            n, _, _, path, whole = self.targets[self.index]
            self.sink = img2dataset.ShardSink(self.job.out_dir, n, self.job.width, path, whole,
                                         skip=_done(self.job, n, path), local=self.job.local)
        self.pos += 1
        return self.sink

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()


def part_rows(part: InputPart, local: bool = False) -> list:
    """The kept rows of one input shard (dicts of :data:`ROW_COLUMNS`, ``local``: :data:`LOCAL_ROW_COLUMNS`),
    as the kept files hold them."""
    rows = []
    for f in part.kept_files:
        for batch in iter_batches(f, LOCAL_ROW_COLUMNS if local else ROW_COLUMNS):
            rows += batch.filter(pc.fill_null(pc.equal(batch.column("shard"), part.shard), False)).to_pylist()
    if len(rows) != part.count:
        raise RuntimeError(f"{part.url}: the kept files hold {len(rows)} rows of it, the plan {part.count}; "
                           "they changed during the run: rerun the filter")
    return rows


def copy_job(job: CopyJob) -> dict:
    """Copy task: every kept row of ``job``'s input shards goes to its output shard: the sample's members
    into the tar when it can be read, its metadata row in any case; returns counts: ``rows`` placed,
    ``unreadable`` samples, ``copied``: samples whose members this run wrote (none into an output shard or
    piece that an earlier run finished)."""
    outputs, unreadable, copied = _Outputs(job), 0, 0
    try:
        for part in job.parts:
            for outcome in kept_samples(part.url, part_rows(part, job.local), job.input_format):
                sink = outputs.next_sink()
                sink.add(outcome)
                unreadable += outcome.sample is None
                copied += outcome.sample is not None and not sink.skip
    except BaseException:
        outputs.abort()
        raise
    outputs.close()
    if outputs.pos != job.end:
        raise RuntimeError(f"copy task over {job.parts[0].url}..: {outputs.pos - job.start} kept rows placed, "
                           f"{job.end - job.start} planned")
    return {"rows": job.end - job.start, "unreadable": unreadable, "copied": copied}


def copied_samples(result: dict) -> int:
    """What the copy line counts for a finished copy task: the samples it copied."""
    return result["copied"]


def straddling(jobs: list) -> list:
    """``(shard number, out dir, width, [piece paths in order], rows, local)`` for shards assembled from
    pieces."""
    pieces: dict = {}
    for job in jobs:
        for n, lo, hi, path, whole in job.targets():
            if not whole:
                pieces.setdefault(n, []).append((lo, hi, path))
    return [(n, jobs[0].out_dir, jobs[0].width, [p for _, _, p in sorted(v)],
             sum(hi - lo for lo, hi, _ in v), jobs[0].local) for n, v in sorted(pieces.items())]


def assemble(item) -> dict:
    """Assembly task: join the pieces of one output shard (tar blocks and rows), then write its marker."""
    n, out, width, paths, rows, local = item
    if storage.exists(img2dataset.stats_path(out, n, width)):
        return {"skipped": True}
    missing = [p for p in paths if not storage.exists(p)]
    if missing:
        raise RuntimeError(f"shard {n}: pieces missing {missing}; rerun to recopy them")
    sink = img2dataset.ShardSink(out, n, width, img2dataset.tar_path(out, n, width), whole=True, local=local)
    try:
        for p in paths:
            sink.add_piece(p)
        if len(sink.rows) != rows:
            raise RuntimeError(f"shard {n}: its pieces hold {len(sink.rows)} rows, not {rows}; rerun to recopy them")
    except BaseException:
        sink.abort()
        raise
    sink.close()
    for p in paths:
        storage.remove(img2dataset.piece_rows_path(p))
        storage.remove(p)
    return {"skipped": False}


def check_plan(out_dir, plan: dict) -> None:
    """Record the plan in ``.wclip/plan.json``; refuse an output folder made by a different filter."""
    if storage.exists(storage.join(out_dir, "plan.json")):
        raise ValueError(f"{out_dir} holds shards written by an older wclip (plan.json, NNNNN.stats.json); "
                         "use a fresh --output")
    path = img2dataset.plan_path(out_dir)
    if storage.exists(path):
        old = storage.read_json(path)
        if old.get("digest") != plan["digest"]:
            raise ValueError(f"{out_dir} holds shards from a different selection or --samples-per-shard "
                             f"(plan {old.get('digest', '?')[:12]} vs {plan['digest'][:12]}); "
                             "use a fresh --output or delete that folder")
        return
    storage.write_json(path, plan)


def finished_shards(out_dir, plan: dict) -> dict:
    """What the finished shards' ``_stats.json`` files say: shards, successes, unreadable samples."""
    done = {"finished": 0, "successes": 0, "unreadable_count": 0, "unreadable": []}
    for n in range(plan["shards"]):
        path = img2dataset.stats_path(out_dir, n, plan["width"])
        if not storage.exists(path):
            continue
        stats = storage.read_json(path)
        done["finished"] += 1
        done["successes"] += int(stats.get("successes") or 0)
        listed = stats.get("unreadable") or []
        done["unreadable_count"] += len(listed)
        room = MAX_LISTED - len(done["unreadable"])
        done["unreadable"] += [{k: u.get(k) for k in ("shard", "key", "index", "reason")} for u in listed[:room]]
    return done


def write_shards(urls, shards: dict, kept_dir, out_dir, mapper, samples_per_shard: int,
                 samples_per_task: int | None = None, max_in_flight: int | None = None, retries: int = 2,
                 progress=None, local: bool = False, input_format: str = "webdataset") -> dict:
    """Copy the kept samples of ``urls`` (in ``input_format``) into ``out_dir`` (resumable); returns a summary.
    ``local``: the kept rows have the local likelihood's columns, which the shards' metadata then carries.

    ``mapper(fn, items, desc=, samples=, max_retries=, max_in_flight=, progress=)`` runs the copy and
    assembly tasks (``samples(result)``: what a finished task counts on the progress line) and returns an
    outcome (``item``, ``ok``, ``error``) per item (:meth:`pipeline.executors.Executor.map`); it is called
    only when there is something to do.
    """
    out_dir = str(out_dir)
    pairs, unmatched, unused = match_inputs(urls, shards)
    jobs, plan = make_plan(pairs, shards, kept_dir, out_dir, samples_per_shard, samples_per_task, local,
                           input_format)
    storage.makedirs(out_dir)
    check_plan(out_dir, plan)
    pieces = img2dataset.pieces_dir(out_dir)
    storage.remove_stale_temporaries(out_dir)
    storage.remove_stale_temporaries(pieces)
    todo = [job for job in jobs if pending(job)]
    assemble_items = [s for s in straddling(jobs) if not storage.exists(img2dataset.stats_path(s[1], s[0], s[2]))] \
        if jobs else []
    failed, ready = [], []
    options = dict(max_retries=retries, max_in_flight=max_in_flight, progress=progress)
    if todo:
        for outcome in mapper(copy_job, todo, desc="copy", samples=copied_samples, **options):
            if not outcome.ok:
                failed.append({"inputs": [p.url for p in outcome.item.parts], "error": outcome.error})
    ready = [s for s in assemble_items if all(storage.exists(p) for p in s[3])]
    if ready:
        for outcome in mapper(assemble, ready, desc="assemble", **options):
            if not outcome.ok:
                failed.append({"shard": outcome.item[0], "error": outcome.error})
    storage.remove_empty_folder(pieces)
    done = finished_shards(out_dir, plan)
    return {"dir": out_dir, "layout": "img2dataset", "input_format": input_format, "shards": plan["shards"],
            "finished": done["finished"],
            "samples": plan["samples"], "samples_per_shard": samples_per_shard, "copied": done["successes"],
            "tasks": len(jobs), "tasks_run": len(todo), "assembled": len(ready), "failed": failed,
            "inputs_matched": len(pairs), "inputs_unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5],
            "kept_not_in_inputs": sum(shards[v]["kept"] for v in unused),
            "unreadable_count": done["unreadable_count"], "unreadable": done["unreadable"]}

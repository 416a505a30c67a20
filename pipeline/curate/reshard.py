"""Write new WebDataset shards holding exactly the kept samples, copying tar members byte for byte.

Layout of ``OUT/shards/``: ``{n:05d}.tar`` with ``samples_per_shard`` samples each (the last one
fewer), a marker ``{n:05d}.stats.json`` written after each shard, and ``plan.json``. The kept
samples are numbered in input-shard order, then tar order, so shard ``n`` always holds the
samples ``n*S .. n*S+S-1`` and a resumed run writes identical shards. Each Ray task copies a
group of consecutive input shards (each read once); an output shard that spans two groups is
written as pieces of raw tar blocks and concatenated afterwards. Member names are only ever
written *inside* tars; file names on disk come from the shard numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.flow.read import open_shard, shard_name, split_member

PIECES = "_pieces"
_EOF = b"\0" * 1024


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

    @property
    def start(self) -> int:
        return self.parts[0].start

    @property
    def end(self) -> int:
        return self.parts[-1].start + self.parts[-1].count

    def targets(self) -> list:
        """``(shard number, first, end, path, whole)`` for every output shard it touches;
        ``whole`` when the job holds the entire shard (otherwise it writes a piece)."""
        S, out = self.samples_per_shard, Path(self.out_dir)
        result = []
        for n in range(self.start // S, (self.end - 1) // S + 1):
            lo, hi = max(self.start, n * S), min(self.end, (n + 1) * S)
            whole = lo == n * S and hi == min((n + 1) * S, self.total)
            path = tar_path(out, n, self.width) if whole else piece_path(out, n, self.width, lo)
            result.append((n, lo, hi, path, whole))
        return result


def tar_path(out: Path, n: int, width: int) -> Path:
    return out / f"{n:0{width}d}.tar"


def marker_path(out: Path, n: int, width: int) -> Path:
    return out / f"{n:0{width}d}.stats.json"


def piece_path(out: Path, n: int, width: int, first: int) -> Path:
    return out / PIECES / f"{n:0{width}d}.{first:012d}.part"


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
              samples_per_task: int | None = None) -> tuple[list, dict]:
    """Number the kept samples and group input shards into jobs; returns ``(jobs, plan)``."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1; got {samples_per_shard}")
    per_task = samples_per_task or 4 * samples_per_shard
    parts, start = [], 0
    for url, value in pairs:
        entry = shards[value]
        if entry["kept"]:
            files = tuple(str(Path(kept_dir) / f) for f in entry["files"])
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
    jobs = [CopyJob(tuple(g), str(out_dir), samples_per_shard, width, total) for g in groups]
    digest = hashlib.sha256(json.dumps(
        [samples_per_shard, width, [(p.url, p.count) for p in parts]]).encode()).hexdigest()
    plan = {"samples": total, "shards": n_shards, "samples_per_shard": samples_per_shard,
            "width": width, "inputs": len(parts), "digest": digest}
    return jobs, plan


def _done(job: CopyJob, n: int, path: Path) -> bool:
    return marker_path(Path(job.out_dir), n, job.width).exists() or \
        (path.parent.name == PIECES and path.exists())


def pending(job: CopyJob) -> bool:
    """Whether the job still has an output shard or piece to write."""
    return not all(_done(job, n, path) for n, _, _, path, _ in job.targets())


class _Sink:
    """Raw tar blocks written to ``path`` (through a temporary name); a shard gets an end marker."""

    def __init__(self, path: Path, whole: bool, marker: Path | None, skip: bool):
        self.path, self.whole, self.marker, self.skip = path, whole, marker, skip
        self.samples, self.size = 0, 0
        self.sha = hashlib.sha256()
        self.tmp = path.with_name(path.name + ".tmp")
        self.fh = None
        if not skip:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        if self.fh is not None:
            self.fh.write(data)
            self.sha.update(data)
            self.size += len(data)

    def add(self, info: tarfile.TarInfo, data: bytes) -> None:
        header = tarfile.TarInfo(info.name)
        header.size, header.mtime, header.mode = len(data), info.mtime, info.mode
        header.uid, header.gid, header.uname, header.gname = info.uid, info.gid, info.uname, info.gname
        self.write(header.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.write(data + b"\0" * (-len(data) % 512))

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            self.fh = None

    def close(self) -> None:
        if self.fh is None:
            return
        if self.whole:
            self.write(_EOF)
        self.fh.close()
        os.replace(self.tmp, self.path)
        if self.marker is not None:
            _write_marker(self.marker, self.samples, self.size, self.sha.hexdigest())


def _write_marker(path: Path, samples: int, size: int, sha256: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"samples": samples, "bytes": size, "sha256": sha256}))
    os.replace(tmp, path)


def _kept_keys(part: InputPart) -> set:
    keys = set()
    for f in part.kept_files:
        table = pq.read_table(f, columns=["key", "shard"])
        keys.update(table.filter(pc.equal(table.column("shard"), part.shard)).column("key").to_pylist())
    return keys


def copy_job(job: CopyJob) -> dict:
    """Ray task: copy the kept samples of ``job``'s input shards; returns counts."""
    targets, out = job.targets(), Path(job.out_dir)
    state = {"sink": None, "t": -1, "pos": job.start}

    def sink_for_next_sample() -> _Sink:
        sink = state["sink"]
        if sink is None or state["pos"] >= targets[state["t"]][2]:
            if sink is not None:
                sink.close()
            state["t"] += 1
            n, _, _, path, whole = targets[state["t"]]
            sink = state["sink"] = _Sink(path, whole, marker_path(out, n, job.width) if whole else None,
                                         skip=_done(job, n, path))
        state["pos"] += 1
        sink.samples += 1
        return sink

    copied = 0
    try:
        for part in job.parts:
            keys, found, current, sink = _kept_keys(part), 0, None, None
            with open_shard(part.url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _ = split_member(info.name)
                    if key.startswith("__") or not posixpath.basename(key):
                        continue
                    if key != current:
                        current, sink = key, None
                        if key in keys:
                            if found == part.count:
                                raise RuntimeError(f"{part.url}: more kept samples than the scores "
                                                   f"say ({part.count}); is key {key!r} repeated?")
                            sink, found = sink_for_next_sample(), found + 1
                    if sink is not None and not sink.skip:
                        data = tar.extractfile(info).read()
                        sink.add(info, data)
                        copied += len(data)
            if found != part.count:
                raise RuntimeError(f"{part.url}: found {found} of its {part.count} kept samples; "
                                   "the shard differs from the one that was scored")
    except BaseException:
        if state["sink"] is not None:
            state["sink"].abort()
        raise
    if state["sink"] is not None:
        state["sink"].close()
    return {"samples": state["pos"] - job.start, "member_bytes": copied}


def straddling(jobs: list) -> list:
    """``(shard number, [piece paths in order], samples)`` for shards assembled from pieces."""
    pieces: dict = {}
    for job in jobs:
        for n, lo, hi, path, whole in job.targets():
            if not whole:
                pieces.setdefault(n, []).append((lo, hi, str(path)))
    return [(n, str(Path(jobs[0].out_dir)), jobs[0].width, [p for _, _, p in sorted(v)],
             sum(hi - lo for lo, hi, _ in v)) for n, v in sorted(pieces.items())]


def assemble(item) -> dict:
    """Ray task: concatenate the pieces of one output shard, then write its marker."""
    n, out, width, paths, samples = item
    out = Path(out)
    if marker_path(out, n, width).exists():
        return {"skipped": True}
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"shard {n}: pieces missing {missing}; rerun to recopy them")
    sink = _Sink(tar_path(out, n, width), True, marker_path(out, n, width), skip=False)
    sink.samples = samples
    for p in paths:
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sink.write(chunk)
    sink.close()
    for p in paths:
        Path(p).unlink()
    return {"skipped": False}


def check_plan(out_dir, plan: dict) -> None:
    """Record the plan in ``plan.json``; refuse an output folder made by a different filter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("digest") != plan["digest"]:
            raise ValueError(f"{out} holds shards from a different selection or --samples-per-shard "
                             f"(plan {old.get('digest', '?')[:12]} vs {plan['digest'][:12]}); "
                             "use a fresh --output or delete that folder")
        return
    tmp = path.with_name("plan.json.tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)


def write_shards(urls, shards: dict, kept_dir, out_dir, samples_per_shard: int,
                 samples_per_task: int | None = None, ray_options=None,
                 max_in_flight: int | None = None, retries: int = 2, progress=None) -> dict:
    """Copy the kept samples of ``urls`` into ``out_dir`` on Ray (resumable); returns a summary."""
    pairs, unmatched, unused = match_inputs(urls, shards)
    jobs, plan = make_plan(pairs, shards, kept_dir, out_dir, samples_per_shard, samples_per_task)
    check_plan(out_dir, plan)
    todo = [job for job in jobs if pending(job)]
    failed, ready = [], []
    assemble_items = [s for s in straddling(jobs) if not marker_path(Path(s[1]), s[0], s[2]).exists()] \
        if jobs else []
    if todo or assemble_items:
        from pipeline.config import RayOptions
        from pipeline.runtime import map_tasks, ray_session

        with ray_session(ray_options or RayOptions()):
            for outcome in map_tasks(copy_job, todo, desc="copy", max_retries=retries,
                                     max_in_flight=max_in_flight, progress=progress):
                if not outcome.ok:
                    failed.append({"inputs": [p.url for p in outcome.item.parts],
                                   "error": outcome.error})
            ready = [s for s in assemble_items if all(Path(p).exists() for p in s[3])]
            for outcome in map_tasks(assemble, ready, desc="assemble", max_retries=retries,
                                     max_in_flight=max_in_flight, progress=progress):
                if not outcome.ok:
                    failed.append({"shard": outcome.item[0], "error": outcome.error})
    pieces_dir = Path(out_dir) / PIECES
    if pieces_dir.is_dir() and not any(pieces_dir.iterdir()):
        pieces_dir.rmdir()
    finished = sum(marker_path(Path(out_dir), n, plan["width"]).exists() for n in range(plan["shards"]))
    return {"dir": str(out_dir), "shards": plan["shards"], "finished": finished,
            "samples": plan["samples"], "samples_per_shard": samples_per_shard,
            "tasks": len(jobs), "tasks_run": len(todo), "assembled": len(ready), "failed": failed,
            "inputs_matched": len(pairs), "inputs_unmatched": len(unmatched),
            "unmatched_examples": unmatched[:5],
            "kept_not_in_inputs": sum(shards[v]["kept"] for v in unused)}

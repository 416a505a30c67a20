"""``wclip dedup``: duplicate groups of a scores folder's rows (cosine >= 1 - eps within a cluster, SemDeDup's
approximation) and the one row each group keeps, by a rule the user names (:class:`Rule`).

Four passes, each a map of file- or cluster-sized tasks on the command's executor (threads or Ray tasks):

1. ``sample`` (own k-means only): per score file, its rows with the smallest key hashes
   (:class:`pipeline.whitening.moments.HashSample`: the sample does not depend on workers or order); the
   driver clusters the merged sample (:func:`pipeline.whitening.clusters.spherical_kmeans`) into
   ``K = ceil(rows / cluster_rows)`` clusters, so the expected cluster holds ``cluster_rows`` rows and the pair
   search costs ``~ rows * cluster_rows`` products whatever the corpus size.
2. ``spill``: per score file, its rows with status ``ok`` and a finite embedding, each given a cluster (the
   scores' ``<tower>_cluster``, or the nearest k-means centre by cosine), written sorted by cluster to
   ``DEDUP.wclip/work/``.
3. ``clusters``: per cluster, its rows gathered from every spill, the blocked pair search
   (:func:`find_groups`: memory bounded by a block and by the cluster, never by the corpus) and the rule.
4. ``write``: per score file, a row per score row (:data:`OUTPUT_SCHEMA`): its cluster, ``dup_group`` (the
   position in the folder, counting rows over the score files in name order, of its group's kept row),
   ``dup_size`` and ``kept``. Rows not compared (status not ``ok``, no embedding) get nulls and ``kept``.

Resume: the outputs are planned like a scores folder's (a file whose marker and size agree is not rewritten);
the passes before are recomputed (groups cross files) and are deterministic, so a resumed folder equals an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

import pipeline
from pipeline import storage
from pipeline.config import DedupConfig
from pipeline.curate.dedup_pairs import Rule, find_groups, representatives, tie_ranks
from pipeline.errors import ConfigError
from pipeline.runs.dedup_io import file_vectors, npy_bytes, pair_embeddings, read_rows
from pipeline.scores.dedup import OUTPUT_SCHEMA, settings_path, work_path, write_output
from pipeline.scores.folder import append_failure
from pipeline.scores.layout import embeddings_folder, list_score_files
from pipeline.scores.provenance import check_scores
from pipeline.scores.table import ALL_SCORE_COLUMNS, file_schema, read_columns, table_bytes

ROW_COLUMNS = ("key", "shard", "index", "status")


@dataclass(frozen=True)
class Plan:
    """What a run reads and how it decides: checked before any work (:func:`prepare`)."""

    cfg: DedupConfig
    rule: Rule
    files: tuple  # score file paths, in name order
    names: tuple  # their names (``<name>.parquet``)
    kind: str  # the embeddings' kind (clip-retrieval / datacomp)
    embeddings: dict  # name -> EmbeddingFile
    cluster_column: Optional[str]  # the scores' cluster column, or None: own k-means
    rows: int
    made: dict  # provenance of every output

    @property
    def out(self) -> str:
        return str(self.cfg.output)


def _scores_identity(check) -> dict:
    made = check.provenance or {}
    return {k: made.get(k) for k in ("stats_digest", "stats_path", "model", "normalize")}


def prepare(cfg: DedupConfig) -> Plan:
    """Every check before work: the score files (readable, one fit), the rule's column, the cluster column,
    which embeddings pair with which file; the provenance the outputs will carry."""
    files = list_score_files(cfg.scores)
    if not files:
        raise ConfigError(f"no score files (*.parquet) in {cfg.scores}; run `wclip score` first")
    check = check_scores(files)
    present = set(file_schema(files[0]).names)
    rule = Rule.parse(cfg.keep, cfg.seed, tuple(c for c in ALL_SCORE_COLUMNS if c in present))
    column = f"{cfg.tower}_cluster"
    if cfg.clusters == "scores" and column not in present:
        raise ConfigError(f"--clusters scores: the scores have no {column} column (their stats had no clusters); "
                          f"use --clusters kmeans, or fit with `wclip fit --clusters K` and score again")
    names = [storage.basename(f)[: -len(".parquet")] for f in files]
    kind, paired = pair_embeddings(cfg.scores, names, cfg.embeddings, cfg.embedding_key)
    if not paired:
        where = ", ".join(cfg.embeddings) or f"{embeddings_folder(cfg.scores)} (score with --save-embeddings)"
        raise ConfigError(f"no embeddings file pairs with a score file of {cfg.scores} in {where}: name the "
                          f"embeddings that were scored with --embeddings PATH")
    cluster_column = column if cfg.clusters != "kmeans" and column in present else None
    settings = {"eps": cfg.eps, "keep": rule.spec, "tower": cfg.tower, "seed": cfg.seed,
                "clusters": cluster_column or f"kmeans (cluster_rows {cfg.cluster_rows}, sample "
                                              f"{cfg.cluster_sample})",
                "embeddings": list(cfg.embeddings) or "saved", "embedding_key": cfg.embedding_key}
    scores = {"folder": str(cfg.scores), **_scores_identity(check),
              "files": {n: storage.size(f) for n, f in zip(names, files)}}
    digest = hashlib.sha256(json.dumps([settings, scores], sort_keys=True, default=str).encode()).hexdigest()
    made = {"format": "wclip-dedup/1", "stats_digest": digest, "stats_path": str(cfg.scores),
            "model": scores.get("model"), "normalize": scores.get("normalize"), "dedup": settings,
            "scores": scores, "wclip_version": pipeline.__version__}
    return Plan(cfg, rule, tuple(files), tuple(names), kind, paired, cluster_column, check.rows, made)


def refuse_other_settings(plan: Plan) -> None:
    """A dedup folder holds one dedup: refuse (before any work) a run with other settings or other scores,
    naming both, unless ``--overwrite``."""
    path = settings_path(plan.out)
    if plan.cfg.overwrite or not storage.exists(path):
        return
    old = storage.read_json(path).get("provenance") or {}
    if old.get("stats_digest") == plan.made["stats_digest"]:
        return
    said = {**(old.get("dedup") or {}), "scores": (old.get("scores") or {}).get("folder")}
    now = {**plan.made["dedup"], "scores": plan.made["scores"]["folder"]}
    diff = [f"{k} {said.get(k)!r} -> {now.get(k)!r}" for k in now if said.get(k) != now.get(k)] or \
        ["the score files changed since"]
    raise ConfigError(f"--output {plan.out} holds a dedup made otherwise ({'; '.join(diff)}); choose a new "
                      f"--output, or pass --overwrite to redo it")


# -- pass 1: the k-means sample ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileTask:
    plan: Plan
    ordinal: int
    centres: Optional[np.ndarray] = None  # own k-means: the unit centres (K, d)

    @property
    def name(self) -> str:
        return self.plan.names[self.ordinal]


def _compared(task: FileTask) -> tuple:
    """``(rows table, positions, vectors, values)`` of the file's rows that take part: status ``ok``, a finite
    embedding (and, with the scores' clusters, a cluster)."""
    plan = task.plan
    extra = [c for c in (plan.rule.column, plan.cluster_column) if c]
    table = read_columns(plan.files[task.ordinal], list(ROW_COLUMNS) + extra)
    keys = table.column("key").to_pylist()
    if task.name not in plan.embeddings:
        raise ValueError(f"no embeddings file pairs with {task.name}.parquet (none named {task.name} or "
                         f"metadata_N of its shard)")
    positions, vectors = file_vectors(plan.embeddings[task.name], plan.kind, keys, plan.cfg.tower)
    if not len(positions):
        return table, positions, vectors
    status = np.asarray(table.column("status").to_pylist(), dtype=object)[positions]
    use = (status == "ok") & np.isfinite(vectors).all(axis=1) & (np.linalg.norm(vectors, axis=1) > 0)
    if plan.cluster_column:
        use &= np.asarray(table.column(plan.cluster_column).is_valid())[positions]
    return table, positions[use], vectors[use]


def sample_file(task: FileTask) -> dict:
    from pipeline.whitening.moments import HashSample, key_hashes

    table, positions, vectors = _compared(task)
    sample = HashSample(task.plan.cfg.cluster_sample, vectors.shape[1] if len(vectors) else 1)
    if len(positions):
        keys = table.column("key").take(pa.array(positions)).to_pylist()
        sample.add(key_hashes([f"{task.name}/{k}/{p}" for k, p in zip(keys, positions)], task.plan.cfg.seed),
                   vectors)
    return {"summary": {"rows": table.num_rows}, "hashes": sample.hashes, "rows": sample.rows,
            "compared": len(positions)}


def kmeans_centres(results: list, cfg: DedupConfig) -> tuple:
    """``(centres, K)`` of the own k-means: K sized so the expected cluster holds ``cluster_rows`` rows."""
    from pipeline.whitening.clusters import spherical_kmeans
    from pipeline.whitening.moments import HashSample

    compared = sum(r["compared"] for r in results)
    dims = {r["rows"].shape[1] for r in results if r["compared"]}
    if not compared:
        return None, 0
    if len(dims) > 1:
        raise ConfigError(f"the embeddings mix widths {sorted(dims)}: one model's embeddings only")
    merged = HashSample(cfg.cluster_sample, dims.pop())
    for r in results:
        if r["compared"]:
            merged.add(r["hashes"], r["rows"])
    sample = merged.rows.astype(np.float64)
    k = max(1, min(math.ceil(compared / cfg.cluster_rows), len(sample)))
    labels = spherical_kmeans(sample, k, seed=cfg.seed)
    units = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    sums = np.zeros((int(labels.max()) + 1, units.shape[1]))
    np.add.at(sums, labels, units)
    centres = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-300)
    return centres.astype(np.float32), len(centres)


# -- pass 2: the spills --------------------------------------------------------------------------------------
def _assign(vectors: np.ndarray, centres: np.ndarray, block: int = 65_536) -> np.ndarray:
    labels = np.empty(len(vectors), dtype=np.int64)
    for s in range(0, len(vectors), block):
        part = vectors[s:s + block].astype(np.float64)
        cos = (part / np.linalg.norm(part, axis=1, keepdims=True)).astype(np.float32) @ centres.T
        labels[s:s + block] = np.argmax(cos, axis=1)
    return labels


def spill_file(task: FileTask) -> dict:
    """Write the file's compared rows sorted by cluster; returns its row count and rows per cluster."""
    plan = task.plan
    table, positions, vectors = _compared(task)
    if plan.cluster_column:
        clusters = np.asarray(table.column(plan.cluster_column).take(pa.array(positions)).to_numpy(
            zero_copy_only=False), dtype=np.int64) if len(positions) else np.zeros(0, np.int64)
    else:
        clusters = _assign(vectors, task.centres) if len(positions) else np.zeros(0, np.int64)
    order = np.argsort(clusters, kind="stable")
    rows = table.select(["key", "shard", "index"]).take(pa.array(positions[order], type=pa.int64()))
    values = (np.full(len(order), np.nan) if not plan.rule.column else
              table.column(plan.rule.column).cast(pa.float64()).to_numpy(zero_copy_only=False)[positions[order]])
    rows = rows.append_column("row", pa.array(positions[order], pa.int64())).append_column(
        "value", pa.array(values, pa.float64()))
    storage.write_atomic(work_path(plan.out, "spill", f"{task.ordinal}.parquet"), table_bytes(rows))
    storage.write_atomic(work_path(plan.out, "spill", f"{task.ordinal}.npy"), npy_bytes(vectors[order]))
    counts = Counter(int(c) for c in clusters)
    return {"summary": {"rows": table.num_rows}, "rows": table.num_rows, "counts": dict(sorted(counts.items()))}


# -- pass 3: the clusters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterTask:
    plan: Plan
    cluster: int
    parts: tuple  # ((file ordinal, start in its spill, rows), ...)
    offsets: tuple  # per file ordinal: its first row's position in the folder


def _gather(task: ClusterTask) -> tuple:
    import pyarrow.parquet as pq

    out, tables, ordinals = task.plan.out, [], []
    vectors = []
    for ordinal, start, count in task.parts:
        spill = pq.read_table(storage.open_read(work_path(out, "spill", f"{ordinal}.parquet")))
        tables.append(spill.slice(start, count))
        vectors.append(read_rows(work_path(out, "spill", f"{ordinal}.npy"), start, count))
        ordinals.append(np.full(count, ordinal, dtype=np.int64))
    return pa.concat_tables(tables), np.concatenate(vectors), np.concatenate(ordinals)


def dedup_cluster(task: ClusterTask) -> dict:
    """The pair search and the rule in one cluster; writes per member ``(ordinal, row, group, size, kept)``
    sorted by file, and returns where each file's members are in it."""
    plan = task.plan
    rows, vectors, ordinals = _gather(task)
    found = find_groups(vectors, plan.cfg.eps, plan.cfg.block, plan.cfg.device)
    keys = rows.column("key").to_pylist()
    order = plan.rule.order(rows.column("value").to_numpy(zero_copy_only=False), vectors, keys)
    rep = representatives(found.group, order, tie_ranks(keys, rows.column("shard").to_pylist(),
                                                          rows.column("index").to_pylist()))
    local = np.asarray(rows.column("row").to_numpy(), dtype=np.int64)
    position = np.asarray(task.offsets, dtype=np.int64)[ordinals] + local
    sizes = found.sizes
    result = np.stack([ordinals, local, position[rep], sizes, (rep == np.arange(len(rep))).astype(np.int64)], 1)
    result = result.reshape(-1, 5).astype(np.float64)  # .npy rows as the readers take them (exact below 2^53)
    storage.write_atomic(work_path(plan.out, "groups", f"{task.cluster}.npy"), npy_bytes(result))
    where = {}
    for ordinal, start, count in task.parts:  # members are in file order already
        where[ordinal] = (int(np.searchsorted(ordinals, ordinal)), count)
    is_rep = rep == np.arange(len(rep))
    return {"summary": {"rows": len(rep)}, "where": where, "rows": len(rep), "pairs": found.pairs,
            "candidates": found.candidates, "groups": dict(Counter(int(s) for s in sizes[is_rep] if s > 1)),
            "removed": int((~is_rep).sum())}


# -- pass 4: the outputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteTask:
    plan: Plan
    ordinal: int
    parts: tuple  # ((cluster, start, count), ...)


def write_file(task: WriteTask) -> dict:
    plan = task.plan
    name = plan.names[task.ordinal]
    table = read_columns(plan.files[task.ordinal], ["key", "shard", "index"])
    n = table.num_rows
    cluster = np.full(n, -1, np.int64)
    group = np.full(n, -1, np.int64)
    size = np.zeros(n, np.int64)
    kept = np.ones(n, bool)
    for c, start, count in task.parts:
        part = read_rows(work_path(plan.out, "groups", f"{c}.npy"), start, count).astype(np.int64)
        rows = part[:, 1]
        cluster[rows], group[rows], size[rows], kept[rows] = c, part[:, 2], part[:, 3], part[:, 4] == 1
    compared = cluster >= 0
    arrays = [table.column("key"), table.column("shard"), table.column("index"),
              pa.array(cluster.astype(np.int32), mask=~compared), pa.array(group, mask=~compared),
              pa.array(size.astype(np.int32), mask=~compared), pa.array(kept)]
    out = pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
                               schema=OUTPUT_SCHEMA)
    summary = {"name": name, "rows": n, "compared": int(compared.sum()), "kept": int(kept.sum()),
               "removed": int((~kept).sum())}
    write_output(plan.out, name, out, plan.made, summary)
    return {"summary": summary}


# -- the job ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    rows: int = 0
    compared: int = 0
    clusters: int = 0
    cost: int = 0  # sum of squared cluster sizes: the products the pair search makes
    largest_cluster: int = 0
    pairs: int = 0
    candidates: int = 0
    sizes: Counter = field(default_factory=Counter)  # group size -> groups
    removed: int = 0
    written: int = 0
    failed: list = field(default_factory=list)

    def to_json(self, plan: Plan, elapsed: float) -> dict:
        groups = sum(self.sizes.values())
        return {"scores": str(plan.cfg.scores), "output": plan.out, "eps": plan.cfg.eps, "keep": plan.rule.spec,
                "clusters_source": plan.made["dedup"]["clusters"], "clusters": self.clusters,
                "largest_cluster": self.largest_cluster, "cost_pairs": self.cost, "rows": self.rows,
                "compared": self.compared, "pairs": self.pairs, "candidates": self.candidates,
                "groups": groups, "duplicates": sum(s * c for s, c in self.sizes.items()),
                "group_sizes": {str(s): c for s, c in sorted(self.sizes.items())},
                "removed": self.removed, "files_written": self.written,
                "failed": [{"file": f, "error": e} for f, e in self.failed], "elapsed_s": round(elapsed, 2)}


def _failed(outcomes, label, report: Report) -> list:
    """The items that failed every attempt, recorded in the report by ``label(item)``."""
    bad = []
    for o in outcomes:
        if not o.ok:
            bad.append(o.item)
            report.failed.append((label(o.item), o.error))
    return bad


def _clusters(plan: Plan, spills: dict, offsets: tuple) -> list:
    per: dict = {}
    for ordinal in sorted(spills):
        start = 0
        for c, count in spills[ordinal]["counts"].items():
            per.setdefault(c, []).append((ordinal, start, count))
            start += count
    return [ClusterTask(plan, c, tuple(parts), offsets) for c, parts in sorted(per.items())]


def run_dedup(plan: Plan, todo: list, mapper) -> dict:
    """Run the passes; write the outputs of ``todo`` (names); returns the summary (also in dedup.json).
    ``mapper(fn, items, desc=...)``: the executor's map (:meth:`pipeline.executors.Executor.map`)."""
    if not todo and storage.exists(settings_path(plan.out)):  # every output is there: nothing to redo
        return storage.read_json(settings_path(plan.out))["summary"]
    started, report = time.time(), Report(rows=plan.rows)
    tasks = [FileTask(plan, i) for i in range(len(plan.files))]
    file_label = (lambda t: plan.names[t.ordinal])
    if plan.cluster_column is None:
        sampled = mapper(sample_file, tasks, desc="dedup: sample", samples=_rows)
        bad = {t.ordinal for t in _failed(sampled, file_label, report)}
        centres, _ = kmeans_centres([o.result for o in sampled if o.ok], plan.cfg)
        tasks = [FileTask(plan, t.ordinal, centres) for t in tasks if t.ordinal not in bad]
    spilled = mapper(spill_file, tasks, desc="dedup: spill", samples=_rows)
    _failed(spilled, file_label, report)
    spills = {o.item.ordinal: o.result for o in spilled if o.ok}
    counts = [spills[i]["rows"] if i in spills else 0 for i in range(len(plan.files))]
    offsets = tuple(int(x) for x in np.cumsum([0] + counts[:-1]))
    clusters = _clusters(plan, spills, offsets)
    done = mapper(dedup_cluster, clusters, desc="dedup: clusters", samples=_rows)
    lost = _failed(done, lambda t: f"cluster {t.cluster}", report)
    parts: dict = {}
    for o in done:
        if o.ok:
            _count(report, o.item, o.result)
            for ordinal, (start, count) in o.result["where"].items():
                parts.setdefault(ordinal, []).append((o.item.cluster, start, count))
    blocked = {ordinal for t in lost for ordinal, _, _ in t.parts}
    for ordinal in sorted(blocked):
        report.failed.append((plan.names[ordinal], "a cluster holding some of its rows failed"))
    wanted = set(todo)
    writes = [WriteTask(plan, i, tuple(parts.get(i, ()))) for i in sorted(spills)
              if plan.names[i] in wanted and i not in blocked]
    written = mapper(write_file, writes, desc="dedup: write", samples=_rows)
    _failed(written, file_label, report)
    report.written = sum(o.ok for o in written)
    for name, error in report.failed:
        append_failure(plan.out, {"shard": name, "name": name, "error": error})
    summary = report.to_json(plan, time.time() - started)
    storage.write_json(settings_path(plan.out), {"provenance": plan.made, "summary": summary})
    remove_work(plan.out)
    return summary


def _rows(result: dict) -> int:
    return result["summary"]["rows"]


def _count(report: Report, task: ClusterTask, result: dict) -> None:
    report.clusters += 1
    report.compared += result["rows"]
    report.cost += result["rows"] ** 2
    report.largest_cluster = max(report.largest_cluster, result["rows"])
    report.pairs += result["pairs"]
    report.candidates += result["candidates"]
    report.removed += result["removed"]
    report.sizes.update({int(s): c for s, c in result["groups"].items()})


def remove_work(out: str) -> None:
    """Remove the spills this run wrote (``DEDUP.wclip/work/``: only wclip writes there)."""
    fs, path = storage.uncached(work_path(out))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def dedup(cfg: DedupConfig) -> dict:
    """Run ``wclip dedup``: hold the folder, plan it as ``score`` plans a scores folder (resume, no mixing of
    settings), run the passes on the executor; returns the summary (``skipped``: outputs already done)."""
    from pipeline.executors import open_executor
    from pipeline.scores.folder import claim_folder, open_folder, plan_folder

    plan = prepare(cfg)
    with claim_folder(plan.out, cfg.scores, command="dedup"):
        refuse_other_settings(plan)
        todo = plan_folder(plan.out, list(plan.names), plan.made, cfg.overwrite)
        open_folder(plan.out, plan.made, todo)
        with open_executor(cfg) as executor:
            summary = run_dedup(plan, todo, executor.map)
    summary["skipped"] = len(plan.names) - len(todo)
    return summary

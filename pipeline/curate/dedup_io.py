"""Where ``wclip dedup`` reads embeddings and scores, and writes its folder: the one module that imports the
scores folder's layout (:mod:`pipeline.table`, :mod:`pipeline.flow.write`) and the embeddings readers
(:mod:`pipeline.flow.vectors`) for it, so that moving those modules re-points dedup here alone. (The scores
folder's planning and hold, :mod:`pipeline.score`, are called by :mod:`pipeline.commands.dedup`: ``curate``
may not import a job module that imports the executors.)

The dedup folder is laid out like a scores folder::

    DEDUP/<name>.parquet              one per score file (same name), a row per score row: key, shard, index,
                                      cluster, dup_group, dup_size, kept; provenance in the file's metadata
    DEDUP/.wclip/run.json             what made the folder (as a scores folder's)
    DEDUP/.wclip/dedup.json           the settings, the scores' identity and the run's summary
    DEDUP/.wclip/shards/<name>.json   completion marker, written last
    DEDUP/.wclip/failures.jsonl       score files that could not be deduplicated
    DEDUP/.wclip/work/                spills between the passes (removed when the run ends)
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.flow.vectors import ArrayReader, discover, read_blocks, read_metadata
from pipeline.flow.write import append_failure, embedding_number, embeddings_folder, write_shard_outputs
from pipeline.table import (  # noqa: F401 (re-exported: what dedup reads of a scores folder)
    ALL_SCORE_COLUMNS,
    CLUSTER_COLUMNS,
    PROVENANCE_KEY,
    check_scores,
    file_schema,
    list_score_files,
    markers,
    read_columns,
    scores_path,
    state_path,
    table_bytes,
)

__all__ = ["ALL_SCORE_COLUMNS", "CLUSTER_COLUMNS", "append_failure", "check_scores", "file_schema",
           "list_score_files", "markers", "read_columns", "scores_path", "state_path", "table_bytes",
           "pair_embeddings", "file_vectors", "npy_bytes", "read_rows", "write_output", "work_path",
           "settings_path", "OUTPUT_SCHEMA"]

OUTPUT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                          ("cluster", pa.int32()), ("dup_group", pa.int64()), ("dup_size", pa.int32()),
                          ("kept", pa.bool_())])


def settings_path(out: str) -> str:
    return state_path(out, "dedup.json")


def work_path(out: str, *names: str) -> str:
    return state_path(out, "work", *names)


def pair_embeddings(scores: str, names: list, paths: tuple = (), key: Optional[str] = None) -> tuple:
    """``(kind, {score file name: EmbeddingFile})``: the embeddings of each score file, from ``paths``
    (clip-retrieval folders or DataComp ``.npz``, as ``wclip score --embeddings`` takes them) or, without them,
    the ones ``wclip score --save-embeddings`` saved beside the scores. A file pairs with a score file of its
    own name (scores of ``wclip score --embeddings``) or of its shard's number (``metadata_N``: saved ones)."""
    source = discover(list(paths) if paths else [embeddings_folder(scores)], key)
    by_name = {f.name: f for f in source.files}
    paired = {}
    for name in names:
        found = by_name.get(name) or by_name.get(f"metadata_{embedding_number(name)}")
        if found is not None:
            paired[name] = found
    return source.kind, paired


def file_vectors(file, kind: str, keys: list, tower: str, block_rows: int = 65_536) -> tuple:
    """``(rows, vectors)``: the score rows (positions in ``keys``) that have a ``tower`` embedding in ``file``,
    and those embeddings (float32). Row-aligned files pair by position; others by key (a key that the
    embeddings hold twice pairs with neither copy)."""
    meta_keys = read_metadata(file, kind).column("key").to_pylist()
    if not any(t == tower for t, _, _ in file.towers):
        raise ValueError(f"{file.url} has no {tower} embeddings")
    if meta_keys == list(keys):
        source_rows = np.arange(len(keys))
    else:
        where: dict = {}
        for i, k in enumerate(meta_keys):
            where[k] = -1 if k in where else i
        source_rows = np.array([where.get(k, -1) if k is not None else -1 for k in keys], dtype=np.int64)
    rows = np.flatnonzero(source_rows >= 0)
    wanted = source_rows[rows]
    out = None
    for start, blocks in read_blocks(file, len(meta_keys), block_rows):
        block = np.asarray(blocks[tower], dtype=np.float32)
        if out is None:
            out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
        take = (wanted >= start) & (wanted < start + len(block))
        out[take] = block[wanted[take] - start]
    if out is None:
        out = np.zeros((0, 0), dtype=np.float32)
    return rows, out


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def read_rows(path: str, start: int, count: int) -> np.ndarray:
    """Rows ``start .. start + count`` of a 2-D ``.npy`` (local or at a URL), reading only those."""
    with storage.open_read(path) as fh:
        reader = ArrayReader(fh, path)
        fh.seek(fh.tell() + start * reader.dim * reader.dtype.itemsize)
        return reader.read(count).copy()


def write_output(out: str, name: str, table: pa.Table, made: dict, summary: dict) -> None:
    """One dedup file (with what made it in its metadata, as score files carry theirs), then its marker."""
    text = json.dumps(made, sort_keys=True, default=str)
    table = table.replace_schema_metadata({PROVENANCE_KEY: text})
    write_shard_outputs(out, name, table, {**summary, "provenance": made})

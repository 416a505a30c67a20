"""Per-shard outputs: the scores Parquet schema, atomic writes through fsspec, completion markers."""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORE_COLUMNS = ("image_sqnorm", "image_loglik", "image_pvalue",
                 "text_sqnorm", "text_loglik", "text_pvalue", "clip_score")

SCHEMA = pa.schema(
    [("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
     ("url", pa.string()), ("uid", pa.string()), ("caption", pa.string()),
     ("status", pa.string()), ("error", pa.string())]
    + [(c, pa.float32()) for c in SCORE_COLUMNS],
    metadata={b"wclip": b"scores/1"},
)

MARKER_SUFFIX = ".stats.json"
FAILURES_FILE = "_failures.jsonl"


def filesystem(path: str):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(path)
    return fs, paths[0]


def join(base: str, name: str) -> str:
    """Join a file name onto a local folder or URL."""
    return posixpath.join(base.rstrip("/"), name) if "://" in base else __import__("os").path.join(base, name)


def marker_path(output: str, name: str) -> str:
    return join(output, name + MARKER_SUFFIX)


def scores_path(output: str, name: str) -> str:
    return join(output, name + ".parquet")


def write_atomic(path: str, data: bytes) -> None:
    """Write bytes so the file appears complete or not at all (temporary name, then rename)."""
    fs, p = filesystem(path)
    parent = posixpath.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    try:
        fs.mv(tmp, p)
    except Exception:
        fs.rm(tmp)
        raise


def _uncached(path: str):
    """:func:`filesystem`, minus any cached listing of ``path``: other processes write these folders."""
    fs, p = filesystem(path)
    fs.invalidate_cache(p)
    return fs, p


def is_complete(output: str, name: str) -> bool:
    fs, p = _uncached(marker_path(output, name))
    return fs.exists(p)


def completed_names(output: str) -> set:
    """Names of shards whose completion marker exists under ``output``."""
    fs, p = _uncached(output)
    if not fs.exists(p):
        return set()
    names = set()
    for entry in fs.ls(p, detail=False):
        base = posixpath.basename(entry.rstrip("/"))
        if base.endswith(MARKER_SUFFIX) and not base.startswith("."):
            names.add(base[: -len(MARKER_SUFFIX)])
    return names


def remove_stale_temporaries(output: str) -> int:
    """Delete temporary files a killed run left behind (never visible as outputs); returns how many."""
    fs, p = _uncached(output)
    if not fs.exists(p):
        return 0
    stale = [e for e in fs.ls(p, detail=False)
             if posixpath.basename(e.rstrip("/")).startswith(".") and e.endswith(".tmp")]
    for entry in stale:
        fs.rm(entry)
    return len(stale)


def build_table(rows: list, scores: dict) -> pa.Table:
    """Rows (dicts of metadata/status) + score columns (float arrays, NaN = null) -> Arrow table in SCHEMA."""
    n = len(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA if f.name not in SCORE_COLUMNS}
    arrays = [pa.array(cols[f.name], type=f.type) for f in SCHEMA if f.name not in SCORE_COLUMNS]
    for c in SCORE_COLUMNS:
        v = np.asarray(scores.get(c, np.full(n, np.nan)), dtype=np.float64)
        arrays.append(pa.array(v.astype(np.float32), type=pa.float32(), mask=~np.isfinite(v)))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def table_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue()


def write_shard_outputs(output: str, name: str, table: pa.Table, summary: dict,
                        embeddings: Optional[dict] = None) -> None:
    """Write one shard's scores (and embeddings), then its completion marker, last."""
    write_atomic(scores_path(output, name), table_bytes(table))
    if embeddings:
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v) for k, v in embeddings.items()}
        write_atomic(join(output, name + ".embeddings.safetensors"),
                     save(tensors, metadata={"rows": "aligned with the shard's Parquet rows; NaN = not encoded"}))
    write_atomic(marker_path(output, name), json.dumps(summary, indent=1, sort_keys=True).encode())


def append_failure(output: str, record: dict) -> None:
    """Record a shard that failed after its retries (one JSON object per line)."""
    path = join(output, FAILURES_FILE)
    fs, p = filesystem(path)
    old = fs.cat_file(p) if fs.exists(p) else b""
    write_atomic(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())

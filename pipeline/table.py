"""The scores Parquet contract: schema and columns (DESIGN.md section 3), building a shard's table, and
reading a scores folder back in bounded-size batches."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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

BATCH_ROWS = 65_536  # rows per batch when streaming a scores folder


def list_score_files(directory) -> list[Path]:
    """The finished score files under ``directory``, sorted by name (temporary files skipped)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"scores directory {str(root)!r} does not exist")
    return sorted(p for p in root.glob("*.parquet")
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp"))


def file_columns(path) -> list[str]:
    """Column names of one Parquet file."""
    return list(pq.ParquetFile(path).schema_arrow.names)


def iter_batches(path, columns, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` from one file; a column the file lacks comes back all null."""
    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=batch_rows, columns=present or None):
        if len(present) == len(columns):
            yield batch.select(list(columns))
            continue
        arrays = []
        for name in columns:
            if name in present:
                arrays.append(batch.column(name))
            else:
                kind = pa.float32() if name in SCORE_COLUMNS else pa.string()
                arrays.append(pa.nulls(batch.num_rows, kind))
        yield pa.RecordBatch.from_arrays(arrays, names=list(columns))


def float_values(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls."""
    column = batch.column(name)
    if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
        raise TypeError(f"column {name!r} is {column.type}, not numeric")
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


def ok_mask(batch: pa.RecordBatch) -> np.ndarray:
    """True where ``status == "ok"``."""
    return pc.fill_null(pc.equal(batch.column("status"), "ok"), False).to_numpy(zero_copy_only=False)


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

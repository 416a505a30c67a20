"""The scores Parquet contract: schema and columns, building a shard's table, its Parquet bytes, and reading
score files (local or any fsspec URL) back in bounded-size batches."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

SCORE_COLUMNS = ("image_sqnorm", "image_loglik", "image_pvalue",
                 "text_sqnorm", "text_loglik", "text_pvalue", "clip_score")

#: The local likelihood's columns (pipeline.whitening.clusters), written only when the stats have clusters:
#: the most likely cluster (int32), the mixture log-likelihood and its p-value in that cluster (float32).
LOCAL_COLUMNS = tuple(f"{t}_{c}" for t in ("image", "text") for c in ("cluster", "local_loglik", "local_pvalue"))
CLUSTER_COLUMNS = ("image_cluster", "text_cluster")
LOCAL_SCORE_COLUMNS = tuple(c for c in LOCAL_COLUMNS if c not in CLUSTER_COLUMNS)
#: Every float score column a scores file may have: what filters, cards and sketches read.
ALL_SCORE_COLUMNS = SCORE_COLUMNS + LOCAL_SCORE_COLUMNS


def scores_schema(local: bool = False) -> pa.Schema:
    """The scores table's schema; ``local``: with the local likelihood's columns at the end."""
    fields = [("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
              ("url", pa.string()), ("uid", pa.string()), ("caption", pa.string()),
              ("status", pa.string()), ("error", pa.string())] + [(c, pa.float32()) for c in SCORE_COLUMNS]
    if local:
        fields += [(c, pa.int32() if c in CLUSTER_COLUMNS else pa.float32()) for c in LOCAL_COLUMNS]
    return pa.schema(fields, metadata={b"wclip": b"scores/1"})


SCHEMA = scores_schema()
LOCAL_SCHEMA = scores_schema(local=True)


def score_array(values, kind: pa.DataType) -> pa.Array:
    """Score values (floats, NaN = no score) as a column of ``kind`` (float32, or int32 for clusters), null
    where a value is not finite."""
    v = np.asarray(values)
    finite = np.isfinite(v)
    mask = None if finite.all() else ~finite
    if pa.types.is_integer(kind):
        v = np.where(finite, v, 0)
    return pa.array(v.astype(kind.to_pandas_dtype(), copy=False), kind, mask=mask)

BATCH_ROWS = 65_536  # rows per batch when streaming a scores folder
def parquet_file(path) -> pq.ParquetFile:
    """One Parquet file, local or at a URL, opened for reading (use it as a context manager)."""
    if storage.is_url(path):
        fs, inner = storage.filesystem(path)
        return pq.ParquetFile(inner, filesystem=fs)
    return pq.ParquetFile(path)


def file_schema(path) -> pa.Schema:
    """The Arrow schema of one Parquet file."""
    with parquet_file(path) as pf:
        return pf.schema_arrow


def read_columns(path, columns, use_threads: bool = True) -> pa.Table:
    """``columns`` of one Parquet file as a table (``use_threads``: decode columns on Arrow's thread pool)."""
    with parquet_file(path) as pf:
        return pf.read(columns=list(columns), use_threads=use_threads)


def iter_batches(path, columns, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` from one file; a column the file lacks comes back all null."""
    with parquet_file(path) as pf:
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
                    kind = LOCAL_SCHEMA.field(name).type if name in LOCAL_SCHEMA.names else pa.string()
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


def build_table(rows: list, scores: dict, local: bool = False) -> pa.Table:
    """Rows (dicts of metadata/status) + score columns (float arrays, NaN = null) -> Arrow table in
    :func:`scores_schema` (``local``: with the local likelihood's columns)."""
    n = len(rows)
    schema = scores_schema(local)
    scored = set(ALL_SCORE_COLUMNS + CLUSTER_COLUMNS)
    arrays = [pa.array([r.get(f.name) for r in rows], type=f.type) if f.name not in scored
              else score_array(scores.get(f.name, np.full(n, np.nan)), f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


DICTIONARY_COLUMNS = ("shard", "status", "error")  # few distinct values per file
FREE_TEXT_COLUMNS = ("url", "caption", "error")  # no min/max statistics: no query filters on their range


def table_bytes(table: pa.Table, compression: str = "zstd") -> memoryview:
    """The table as Parquet bytes (a read-only view of Arrow's buffer). An empty table gets no row group at
    all: a 0-row row group makes Hugging Face ``datasets`` fail ("BatchSize must be greater than 0").

    Encodings, measured on a 100k-row scores table (docs/benchmarks.md): only the columns that repeat
    (:data:`DICTIONARY_COLUMNS`) are dictionary-encoded (for keys, URLs, captions and floats a dictionary
    costs 4x the write time, and bytes: 4.0 vs 2.8 MB). In a table of flat columns, min/max statistics go
    to every column but free text (:data:`FREE_TEXT_COLUMNS`, 10% of the write, and no query filters on
    their range), and float columns are byte-stream-split (Parquet's encoding for floats, read by pyarrow,
    DuckDB >= 0.10, Spark >= 3.2, polars) and compressed with snappy: 20% less write time than zstd on plain
    floats, and smaller (2.75 vs 2.80 MB). The rest is compressed with ``compression``."""
    sink = pa.BufferOutputStream()  # Arrow's own buffer: a Python file object takes the GIL for every page
    names = table.column_names
    options = {"compression": compression, "use_dictionary": [c for c in DICTIONARY_COLUMNS if c in names]}
    if not any(pa.types.is_nested(f.type) for f in table.schema):
        floats = [f.name for f in table.schema if pa.types.is_floating(f.type) and f.type != pa.float16()]
        options.update(write_statistics=[c for c in names if c not in FREE_TEXT_COLUMNS],
                       use_byte_stream_split=floats or False,
                       compression={c: "snappy" if c in floats else compression for c in names})
    if table.num_rows == 0:
        pq.ParquetWriter(sink, table.schema, **options).close()
    else:
        pq.write_table(table, sink, **options)
    return memoryview(sink.getvalue())  # no copy (a 3 MB bytes object is page-faulted in under the GIL)


class UnreadableScores(ValueError):
    """A score file that cannot be read as Parquet (truncated, garbage bytes); the message names it."""


@contextlib.contextmanager
def named_errors(path):
    """Turn a failure to read ``path`` as Parquet into :class:`UnreadableScores`, one line naming the file."""
    try:
        yield
    except (UnreadableScores, FileNotFoundError):
        raise
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnreadableScores(f"cannot read {path} as Parquet ({reason}); if `wclip score` wrote it, rerun that "
                               f"command to redo its shard, else move it out of the scores folder") from exc

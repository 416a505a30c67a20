"""Read a scores directory (one Parquet file per input shard) in bounded-size batches."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCORE_COLUMNS = ("image_sqnorm", "image_loglik", "image_pvalue",
                 "text_sqnorm", "text_loglik", "text_pvalue", "clip_score")
STRING_COLUMNS = ("key", "shard", "url", "uid", "caption", "status", "error")
BATCH_ROWS = 65_536


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


def string_values(batch: pa.RecordBatch, name: str) -> list:
    """A string column as a Python list (None for nulls)."""
    return batch.column(name).to_pylist()

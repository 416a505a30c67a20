"""The sinks a job hands its executor, defined once: :class:`ScoreSink` writes one input's scores (and, with
``--save-embeddings``, its embeddings) and then its completion marker, last, inside the input's task;
:class:`FitSink` hands the fit's reference rows back to the driver. Where each file goes is
:mod:`pipeline.scores.layout`.

Saved embeddings are float32, not clip-retrieval's float16: scoring them again (``wclip score --embeddings``)
then gives the scores of this run, while float16's rounding (5e-4 of each value) is amplified by whitening
along the smallest kept eigenvalues, and raw (not normalised) embeddings need the range. Rows are aligned with
the shard's scores; a tower with no embedding for a row (failed sample) gets a NaN row, kept so the three parts
stay aligned (filter on the scores' ``status`` before building an index from them). The metadata holds
``image_path`` and ``key`` (the sample's key), ``caption``, ``url``, ``uid`` and ``shard`` (the input URL).
"""

from __future__ import annotations

import datetime
import io
import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.scores.layout import embedding_number, embeddings_path, marker_path, scores_path
from pipeline.scores.provenance import PROVENANCE_KEY, SCORES_FORMAT, input_info
from pipeline.scores.table import build_table, table_bytes
from pipeline.storage import write_atomic

EMBEDDING_METADATA = ("image_path", "caption", "url", "key", "uid", "shard")


def write_shard_outputs(output: str, name: str, table, marker: dict, embeddings: Optional[dict] = None) -> None:
    """Write one shard's scores (and embeddings), then its completion marker, last."""
    data = table_bytes(table)
    write_atomic(scores_path(output, name), data)
    marker = dict(marker, parquet={"bytes": len(data), "rows": table.num_rows})
    if embeddings is not None:
        marker["embeddings"] = write_embeddings(output, name, embeddings, table)
    write_atomic(marker_path(output, name), json.dumps(marker, indent=1, sort_keys=True, default=str).encode())


def write_embeddings(output: str, name: str, arrays: dict, table) -> dict:
    """One shard's embeddings (``{tower: (rows, d) array}``) and metadata in clip-retrieval's layout."""
    import pyarrow as pa

    for tower, arr in sorted(arrays.items()):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
        write_atomic(embeddings_path(output, name, tower), buf.getvalue())
    columns = {"image_path": table.column("key"), **{c: table.column(c) for c in ("caption", "url", "key", "uid",
                                                                                    "shard")}}
    write_atomic(embeddings_path(output, name, "metadata"),
                 table_bytes(pa.table({c: columns[c] for c in EMBEDDING_METADATA})))
    return {"number": embedding_number(name), "towers": sorted(arrays), "dtype": "float32"}


@dataclass(frozen=True)
class ScoreSink:
    """``wclip score``: writes one shard's outputs inside its task; the driver gets the summary."""

    output: str
    provenance: dict = field(default_factory=dict)  # what makes these scores (stats digest, model, ...)
    keep_embeddings: bool = False  # also write row-aligned embeddings (clip-retrieval's layout)
    desc: str = "score"  # progress bar label
    dims: dict = field(default_factory=dict)  # {tower: d}: saved towers with no embedding in a shard get NaN rows
    local: bool = False  # the stats have clusters: write the local likelihood's columns

    def finish(self, assembler, damage) -> dict:
        table = build_table(assembler.rows, assembler.scores(), local=self.local)
        embeddings = None
        if self.keep_embeddings:
            embeddings = assembler.embedding_arrays()
            for tower, d in self.dims.items():
                embeddings.setdefault(tower, np.full((table.num_rows, d), np.nan, dtype=np.float32))
        return self.write(assembler.name, assembler.url, table, assembler.summary(damage), embeddings)

    def write(self, name: str, url: str, table, summary: dict, embeddings: Optional[dict] = None) -> dict:
        """Write one input's scores ``table`` (with what made it in its metadata) and its marker, last."""
        made = {"format": SCORES_FORMAT, **self.provenance, "input": input_info(url),
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               PROVENANCE_KEY: json.dumps(made, sort_keys=True, default=str)})
        write_shard_outputs(self.output, name, table, {**summary, "provenance": made}, embeddings)
        return {"summary": summary}


@dataclass(frozen=True)
class FitSink:
    """``wclip fit``: returns the shard's usable reference rows (keys and embeddings per tower)."""

    keep_embeddings: bool = True
    desc: str = "fit"

    def finish(self, assembler, damage) -> dict:
        towers = {t: assembler.ok_embeddings(t) for t in ("image", "text")}
        return {"summary": assembler.summary(damage), "towers": towers}

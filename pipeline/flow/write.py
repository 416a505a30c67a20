"""Per-shard outputs and the scores folder's layout; the sinks a job hands the runtime.

The scores folder holds only score Parquet files (``<shard>.parquet``), so pandas, pyarrow, duckdb and
Hugging Face ``datasets`` read it as it is. Everything else wclip keeps lives apart, under ``.wclip/``
(hidden, so those readers skip it)::

    DIR/<shard>.parquet                 the scores, with what made them in the file's metadata
    DIR/.wclip/run.json                 what made the folder: stats digest, model, normalisation
    DIR/.wclip/shards/<shard>.json      completion marker, written last: counts, timing, provenance
    DIR/.wclip/failures.jsonl           shards that failed every attempt
    DIR/.wclip/embeddings/              --save-embeddings, in clip-retrieval's layout:
        img_emb/img_emb_<N>.npy  text_emb/text_emb_<N>.npy  metadata/metadata_<N>.parquet

A shard is done when its marker exists, was made by the same stats and model, and its Parquet file is
there with the size the marker recorded (with ``--save-embeddings``: and its embeddings were saved).

The embeddings folder is what ``clip-retrieval inference`` writes, so ``clip-retrieval index`` and autofaiss
read it as it is (``--embeddings_folder DIR/.wclip/embeddings``), and so does ``wclip fit/score --embeddings``.
Per shard, ``N`` is the shard's name when it is a number (``00042.tar`` -> ``img_emb_00042.npy``), else a
20-digit number from a hash of the name; either way it depends on the shard alone, so a resumed or extended
run never renumbers. The arrays are float32, not clip-retrieval's float16: scoring them again
(``wclip score --embeddings``) then gives the scores of this run, while float16's rounding (5e-4 of each
value) is amplified by whitening along the smallest kept eigenvalues, and raw (not normalised) embeddings
need the range. Rows are aligned with the shard's scores; a tower with no embedding for a row (failed
sample) gets a NaN row, kept so the three parts stay aligned (filter on the scores' ``status`` before
building an index from them). The metadata holds ``image_path`` and ``key`` (the sample's key),
``caption``, ``url``, ``uid`` and ``shard`` (the input URL).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipeline.flow.assemble import ShardAssembler
from pipeline.storage import exists, join, read_bytes, uncached, write_atomic
from pipeline.table import (  # noqa: F401 (the folder's layout, read back by pipeline.table, re-exported here)
    PROVENANCE_KEY,
    SCORES_FORMAT,
    SCORES_SUFFIX,
    STATE_DIR,
    build_table,
    file_sizes,
    marker_path,
    markers,
    scores_path,
    state_path,
    table_bytes,
)

EMBEDDING_FILES = {"image": ("img_emb", "img_emb_", ".npy"), "text": ("text_emb", "text_emb_", ".npy"),
                   "metadata": ("metadata", "metadata_", ".parquet")}  # clip-retrieval's layout
EMBEDDING_METADATA = ("image_path", "caption", "url", "key", "uid", "shard")


def embeddings_folder(output: str) -> str:
    return state_path(output, "embeddings")


def embedding_number(name: str) -> str:
    """``N`` of a shard's files in the embeddings folder: its name when that is a number, else 20 digits of a
    hash of the name (numbers sort the same in the three subfolders, which is how readers pair them)."""
    if name.isascii() and name.isdigit():
        return name
    return f"{int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), 'big'):020d}"


def embeddings_path(output: str, name: str, part: str) -> str:
    """Where shard ``name``'s ``part`` (``image``, ``text`` or ``metadata``) of the embeddings goes."""
    folder, prefix, suffix = EMBEDDING_FILES[part]
    return join(embeddings_folder(output), folder, f"{prefix}{embedding_number(name)}{suffix}")


def failures_path(output: str) -> str:
    return state_path(output, "failures.jsonl")


def run_path(output: str) -> str:
    return state_path(output, "run.json")


def input_info(url: str) -> dict:
    """The input shard as the storage describes it: URL, and size / ETag / modification time when known."""
    info = {"url": url}
    if url.startswith("pipe:"):
        return info
    try:
        fs, p = uncached(url)
        described = fs.info(p)
    except Exception:  # described as far as possible; never a reason to fail the shard
        return info
    for key, value in described.items():
        lower = str(key).lower()
        if lower == "size":
            info["size"] = int(value) if value is not None else None
        elif lower in ("etag", "e_tag"):
            info["etag"] = str(value).strip('"')
        elif lower in ("mtime", "lastmodified", "last_modified", "updated", "created") and "mtime" not in info:
            info["mtime"] = value.isoformat() if hasattr(value, "isoformat") else value
    return info


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
    from pipeline.flow.read import shard_name

    path = failures_path(output)
    if not exists(path):
        return
    kept = [line for line in read_bytes(path).decode().splitlines() if line.strip() and
            (json.loads(line).get("name") or shard_name(json.loads(line).get("shard", ""))) not in names]
    write_atomic(path, "".join(line + "\n" for line in kept).encode())


@dataclass(frozen=True)
class ScoreSink:
    """``wclip score``: writes one shard's outputs inside its task; the driver gets the summary."""

    output: str
    provenance: dict = field(default_factory=dict)  # what makes these scores (stats digest, model, ...)
    keep_embeddings: bool = False  # also write row-aligned embeddings (clip-retrieval's layout)
    desc: str = "score"  # progress bar label
    dims: dict = field(default_factory=dict)  # {tower: d}: saved towers with no embedding in a shard get NaN rows
    local: bool = False  # the stats have clusters: write the local likelihood's columns

    def finish(self, assembler: ShardAssembler, damage) -> dict:
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

    def finish(self, assembler: ShardAssembler, damage) -> dict:
        towers = {t: assembler.ok_embeddings(t) for t in ("image", "text")}
        return {"summary": assembler.summary(damage), "towers": towers}

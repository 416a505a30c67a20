"""Per-shard outputs: the scores Parquet (and embeddings) written crash-safe, then the completion marker,
last; the failure log; and the two sinks a job hands the runtime: :class:`ScoreSink` writes a shard,
:class:`FitSink` returns its reference rows to the driver."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.flow.assemble import ShardAssembler
from pipeline.storage import basename, exists, join, listdir, read_bytes, write_atomic
from pipeline.table import build_table, table_bytes

MARKER_SUFFIX = ".stats.json"
FAILURES_FILE = "_failures.jsonl"


def marker_path(output: str, name: str) -> str:
    return join(output, name + MARKER_SUFFIX)


def scores_path(output: str, name: str) -> str:
    return join(output, name + ".parquet")


def embeddings_path(output: str, name: str) -> str:
    return join(output, name + ".embeddings.safetensors")


def completed_names(output: str) -> set:
    """Names of shards whose completion marker exists under ``output``."""
    names = set()
    for entry in listdir(output):
        base = basename(entry)
        if base.endswith(MARKER_SUFFIX) and not base.startswith("."):
            names.add(base[: -len(MARKER_SUFFIX)])
    return names


def write_shard_outputs(output: str, name: str, table, summary: dict,
                        embeddings: Optional[dict] = None) -> None:
    """Write one shard's scores (and embeddings), then its completion marker, last."""
    write_atomic(scores_path(output, name), table_bytes(table))
    if embeddings:
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v) for k, v in embeddings.items()}
        write_atomic(embeddings_path(output, name),
                     save(tensors, metadata={"rows": "aligned with the shard's Parquet rows; NaN = not encoded"}))
    write_atomic(marker_path(output, name), json.dumps(summary, indent=1, sort_keys=True).encode())


def append_failure(output: str, record: dict) -> None:
    """Record a shard that failed after its retries (one JSON object per line)."""
    path = join(output, FAILURES_FILE)
    old = read_bytes(path) if exists(path) else b""
    write_atomic(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class ScoreSink:
    """``wclip score``: writes one shard's outputs inside its task; the driver gets the summary."""

    output: str
    keep_embeddings: bool = False  # also write row-aligned embeddings
    desc: str = "score"  # progress bar label

    def finish(self, assembler: ShardAssembler, damage) -> dict:
        table = build_table(assembler.rows, assembler.scores())
        summary = assembler.summary(damage)
        embeddings = assembler.embedding_arrays() if self.keep_embeddings else None
        write_shard_outputs(self.output, assembler.name, table, summary, embeddings)
        return {"summary": summary}


@dataclass(frozen=True)
class FitSink:
    """``wclip fit``: returns the shard's usable reference rows (keys and embeddings per tower)."""

    keep_embeddings: bool = True
    desc: str = "fit"

    def finish(self, assembler: ShardAssembler, damage) -> dict:
        towers = {t: assembler.ok_embeddings(t) for t in ("image", "text")}
        return {"summary": assembler.summary(damage), "towers": towers}

"""The dedup folder (``wclip dedup``), laid out like a scores folder and written with the same machinery::

    DEDUP/<name>.parquet              one per score file (same name), a row per score row: key, shard, index,
                                      cluster, dup_group, dup_size, kept; provenance in the file's metadata
    DEDUP.wclip/run.json              what made the folder (as a scores folder's, beside it)
    DEDUP.wclip/dedup.json            the settings, the scores' identity and the run's summary
    DEDUP.wclip/shards/<name>.json    completion marker, written last
    DEDUP.wclip/failures.jsonl        score files that could not be deduplicated
    DEDUP.wclip/work/                 spills between the passes (removed when the run ends)
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.scores.layout import state_path
from pipeline.scores.provenance import PROVENANCE_KEY
from pipeline.scores.sinks import write_shard_outputs

OUTPUT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("index", pa.int32()),
                          ("cluster", pa.int32()), ("dup_group", pa.int64()), ("dup_size", pa.int32()),
                          ("kept", pa.bool_())])


def settings_path(out: str) -> str:
    return state_path(out, "dedup.json")


def work_path(out: str, *names: str) -> str:
    return state_path(out, "work", *names)


def write_output(out: str, name: str, table: pa.Table, made: dict, summary: dict) -> None:
    """One dedup file (with what made it in its metadata, as score files carry theirs), then its marker."""
    text = json.dumps(made, sort_keys=True, default=str)
    table = table.replace_schema_metadata({PROVENANCE_KEY: text})
    write_shard_outputs(out, name, table, {**summary, "provenance": made})

"""The filter's new shards in img2dataset's layout, so img2dataset, DataComp and webdataset tooling read
them as they read img2dataset's own output::

    SHARDS/NNNNN.tar          the kept samples: member bytes as in the input shards, in order; names
                              as there, made safe to extract (:mod:`pipeline.curate.members`)
    SHARDS/NNNNN.parquet      a row per kept sample: img2dataset's columns (url, caption, uid, key, status,
                              error_message, width, height, original_width, original_height), then wclip's
                              (source_shard, source_index, wclip_status, wclip_error and the score columns;
                              with the local likelihood's columns when the scores have them)
    SHARDS/NNNNN_stats.json   img2dataset's shard stats (count, successes, failed_to_download, failed_to_resize,
                              duration, start_time, end_time, status_dict) plus bytes, sha256 of the tar and the
                              unreadable samples; written last, it is the shard's completion marker
    SHARDS/.wclip/plan.json   the selection the folder holds
    SHARDS/.wclip/pieces/     parts of shards that span two copy tasks, until they are joined

``status`` is img2dataset's: ``success`` for a sample in the tar; a kept sample that could not be read
(:mod:`pipeline.curate.source`) gets ``failed_to_download`` with the reason in ``error_message``, is
counted in ``count`` and is not in the tar, as img2dataset records a sample it could not fetch. The
scores' own status is ``wclip_status``. ``width`` .. ``original_height`` come from the sample's ``.json``
member when img2dataset wrote one.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
from collections import Counter

import pyarrow as pa

from pipeline import storage
from pipeline.curate.members import member_chunks, member_name, member_size, safe_key
from pipeline.scores.table import LOCAL_COLUMNS, LOCAL_SCHEMA, SCORE_COLUMNS, table_bytes

STATE = ".wclip"
SUCCESS, FAILED = "success", "failed_to_download"
SIZE_FIELDS = ("width", "height", "original_width", "original_height")
META_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("uid", pa.string()), ("key", pa.string()),
     ("status", pa.string()), ("error_message", pa.string())]
    + [(f, pa.int32()) for f in SIZE_FIELDS]
    + [("source_shard", pa.string()), ("source_index", pa.int32()), ("wclip_status", pa.string()),
       ("wclip_error", pa.string())]
    + [(c, pa.float32()) for c in SCORE_COLUMNS])
#: ``META_SCHEMA`` then the local likelihood's columns, typed as in the scores: the metadata of shards filtered
#: from scores that have them (scores without them keep :data:`META_SCHEMA`, no empty columns added).
LOCAL_META_SCHEMA = pa.schema(list(META_SCHEMA) + [LOCAL_SCHEMA.field(c) for c in LOCAL_COLUMNS])
_EOF = b"\0" * 1024
_PIECE_INFO = b"wclip-piece"


def _name(n: int, width: int) -> str:
    return f"{n:0{width}d}"


def tar_path(out, n: int, width: int) -> str:
    return storage.join(out, _name(n, width) + ".tar")


def meta_path(out, n: int, width: int) -> str:
    return storage.join(out, _name(n, width) + ".parquet")


def stats_path(out, n: int, width: int) -> str:
    """The shard's ``_stats.json``: its completion marker."""
    return storage.join(out, _name(n, width) + "_stats.json")


def plan_path(out) -> str:
    return storage.join(out, STATE, "plan.json")


def pieces_dir(out) -> str:
    return storage.join(out, STATE, "pieces")


def piece_path(out, n: int, width: int, first: int) -> str:
    return storage.join(pieces_dir(out), f"{_name(n, width)}.{first:012d}.part")


def piece_rows_path(piece: str) -> str:
    return piece[: -len(".part")] + ".parquet"


def is_piece(path: str) -> bool:
    return storage.basename(path).endswith(".part")


def _sizes(sample) -> dict:
    """``width`` .. ``original_height`` from the sample's ``.json`` member (img2dataset writes them)."""
    for info, data in sample.members if sample is not None else ():
        if info.name.rsplit("/", 1)[-1].partition(".")[2].lower() != "json" or not isinstance(data, bytes):
            continue
        try:
            meta = json.loads(data)
        except ValueError:
            return {}
        if not isinstance(meta, dict):
            return {}
        return {f: meta[f] for f in SIZE_FIELDS
                if isinstance(meta.get(f), int) and not isinstance(meta[f], bool) and 0 <= meta[f] < 2**31}
    return {}


def meta_schema(local: bool) -> pa.Schema:
    """The ``NNNNN.parquet`` schema: with the local likelihood's columns when ``local``."""
    return LOCAL_META_SCHEMA if local else META_SCHEMA


def meta_row(outcome) -> dict:
    """The ``NNNNN.parquet`` row of one kept row's :class:`pipeline.curate.source.Outcome` (the local
    likelihood's columns included; :func:`meta_schema` decides whether they are written)."""
    row = outcome.row
    return {"url": row.get("url"), "caption": row.get("caption"), "uid": row.get("uid"),
            "key": None if row.get("key") is None else safe_key(row["key"]),
            "status": SUCCESS if outcome.sample is not None else FAILED, "error_message": outcome.reason,
            **_sizes(outcome.sample), "source_shard": row.get("shard"), "source_index": row.get("index"),
            "wclip_status": row.get("status"), "wclip_error": row.get("error"),
            **{c: row.get(c) for c in SCORE_COLUMNS + LOCAL_COLUMNS}}


def unreadable_record(outcome) -> dict:
    row = outcome.row
    return {"shard": row.get("shard"), "key": row.get("key"), "index": row.get("index"),
            "kind": outcome.kind, "reason": outcome.reason}


class ShardSink:
    """One output shard, or a piece of one: tar blocks streamed crash-safe, a metadata row per kept sample.

    Closing a whole shard writes its tar, then ``NNNNN.parquet``, then ``NNNNN_stats.json`` (the marker);
    closing a piece writes its rows, then its tar part (the piece's marker). With ``skip`` (already written)
    it only counts. ``local``: the rows carry the local likelihood's columns (:func:`meta_schema`).
    """

    def __init__(self, out: str, n: int, width: int, path: str, whole: bool, skip: bool = False,
                 local: bool = False):
        self.out, self.n, self.width, self.path, self.whole, self.skip = out, n, width, path, whole, skip
        self.schema = meta_schema(local)
        self.samples, self.size, self.start = 0, 0, time.time()
        self.rows: list = []
        self.unreadable: list = []
        self.sha = hashlib.sha256()
        self._file = None if skip else storage.open_atomic(path)
        self.fh = None if skip else self._file.__enter__()

    def write(self, data: bytes) -> None:
        if self.fh is not None:
            self.fh.write(data)
            self.sha.update(data)
            self.size += len(data)

    def _member(self, info: tarfile.TarInfo, data) -> None:
        """One member: its name made safe (:func:`member_name`), its bytes (or spooled file) in pieces."""
        header = tarfile.TarInfo(member_name(info.name))
        header.size, header.mtime, header.mode = member_size(data), info.mtime, info.mode
        header.uid, header.gid, header.uname, header.gname = info.uid, info.gid, info.uname, info.gname
        self.write(header.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        for chunk in member_chunks(data):
            self.write(chunk)
        self.write(b"\0" * (-header.size % 512))

    def add(self, outcome) -> None:
        """One kept row: its sample's members into the tar (when readable) and its metadata row."""
        self.samples += 1
        if self.fh is None:
            return
        if outcome.sample is not None:
            for info, data in outcome.sample.members:
                self._member(info, data)
        else:
            self.unreadable.append(unreadable_record(outcome))
        self.rows.append(meta_row(outcome))

    def add_piece(self, piece: str) -> None:
        """Append a piece written by a copy task: its tar blocks and its rows."""
        with storage.open_read(piece) as fh:
            while chunk := fh.read(1 << 20):
                self.write(chunk)
        table, info = read_piece_rows(piece, self.schema)
        self.rows.extend(table.to_pylist())
        self.unreadable.extend(info.get("unreadable", []))
        self.start = min(self.start, info.get("start_time", self.start))

    def abort(self) -> None:
        """Drop what was written (the temporary file goes, the target is untouched)."""
        if self.fh is not None:
            self.fh = None
            error = RuntimeError(f"copy to {self.path} aborted")
            self._file.__exit__(RuntimeError, error, None)

    def close(self) -> None:
        if self.fh is None:
            return
        end = time.time()
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        if self.whole:
            self.write(_EOF)
        else:
            info = {"start_time": self.start, "end_time": end, "unreadable": self.unreadable}
            table = table.replace_schema_metadata({_PIECE_INFO: json.dumps(storage.jsonable(info))})
            storage.write_atomic(piece_rows_path(self.path), table_bytes(table))
        self.fh = None
        self._file.__exit__(None, None, None)
        if self.whole:
            storage.write_atomic(meta_path(self.out, self.n, self.width), table_bytes(table))
            storage.write_json(stats_path(self.out, self.n, self.width), self.stats(end))

    def stats(self, end: float) -> dict:
        """img2dataset's ``_stats.json`` fields, then wclip's."""
        status = Counter(SUCCESS if r["status"] == SUCCESS else None for r in self.rows)
        successes = status.pop(SUCCESS, 0)
        status.pop(None, None)
        status.update(u["kind"] for u in self.unreadable)
        if successes:
            status[SUCCESS] = successes
        return {"count": len(self.rows), "successes": successes, "failed_to_download": len(self.rows) - successes,
                "failed_to_resize": 0, "duration": end - self.start, "start_time": self.start, "end_time": end,
                "status_dict": dict(status), "bytes": self.size, "sha256": self.sha.hexdigest(),
                "unreadable": self.unreadable}


def read_piece_rows(piece: str, schema: pa.Schema = META_SCHEMA) -> tuple[pa.Table, dict]:
    """A piece's rows (in ``schema``: :func:`meta_schema`) and what its copy task recorded (start time,
    unreadable samples)."""
    import pyarrow.parquet as pq

    with storage.open_read(piece_rows_path(piece)) as fh:
        table = pq.read_table(fh)
    raw = (table.schema.metadata or {}).get(_PIECE_INFO)
    return table.cast(schema), (json.loads(raw) if raw else {})

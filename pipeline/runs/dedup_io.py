"""Where ``wclip dedup`` reads embeddings: each score file's embeddings (saved with ``--save-embeddings``, or
released clip-retrieval / DataComp files matched by name and key), and rows of the spilled ``.npy`` files
between its passes."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from pipeline import storage
from pipeline.scores.layout import embedding_number, embeddings_folder
from pipeline.sources.vectors import ArrayReader, discover, read_blocks, read_metadata


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

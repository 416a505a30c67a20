"""The per-shard work, free of Ray: read a shard into chunks of model inputs, then turn the encoder's
answers back into exactly one output row per sample read."""

from __future__ import annotations

import time
from collections import Counter
from typing import Iterator

import numpy as np

from pipeline.decode import InputConfig, Preprocessor, finalize_status, prepare_sample
from pipeline.shards import ShardReader, shard_name
from pipeline.writer import SCORE_COLUMNS


def build_chunk(prepared: list, tokenizer) -> dict:
    """Stack the model inputs of some prepared samples into arrays (what an encoder actor receives).

    ``image_rows`` lists the rows with decoded ``pixels`` first, then those sent as ``jpegs`` (encoded
    bytes the encoder decodes on its device, ``decode="gpu"``).
    """
    pixel_rows = [i for i, p in enumerate(prepared) if p.pixels is not None]
    jpeg_rows = [i for i, p in enumerate(prepared) if p.pixels is None and p.jpeg is not None]
    text_rows = [i for i, p in enumerate(prepared) if p.caption is not None]
    chunk = {"n": len(prepared),
             "image_rows": np.asarray(pixel_rows + jpeg_rows, dtype=np.int32),
             "text_rows": np.asarray(text_rows, dtype=np.int32),
             "pixels": np.stack([prepared[i].pixels for i in pixel_rows]) if pixel_rows else None,
             "jpegs": [prepared[i].jpeg for i in jpeg_rows] if jpeg_rows else None,
             "tokens": None}
    if text_rows:
        tokens = tokenizer([prepared[i].caption for i in text_rows])
        chunk["tokens"] = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens, dtype=np.int64)
    return chunk


def read_chunks(url: str, inputs: InputConfig, preprocessor: Preprocessor, tokenizer,
                chunk_size: int, reader: ShardReader = None) -> Iterator[tuple]:
    """Yield ``(prepared_samples, chunk)`` pairs for a shard, ``chunk_size`` samples at a time."""
    reader = reader or ShardReader(url)
    batch: list = []
    for sample in reader:
        batch.append(prepare_sample(sample, url, inputs, preprocessor))
        if len(batch) >= chunk_size:
            yield batch, build_chunk(batch, tokenizer)
            batch = []
    if batch:
        yield batch, build_chunk(batch, tokenizer)


class ShardAssembler:
    """Collects chunk answers in order and produces the shard's rows, score columns and embeddings."""

    def __init__(self, url: str, keep_embeddings: bool = False):
        self.url = url
        self.name = shard_name(url)
        self.rows: list = []
        self.columns = {c: [] for c in SCORE_COLUMNS}
        self.embeddings = {"image": [], "text": []}
        self.keep_embeddings = keep_embeddings
        self.started = time.time()

    def add(self, prepared: list, chunk: dict, result: dict) -> None:
        n = len(prepared)
        for tower, rows_key, input_key in (("image", "image_rows", "pixels"), ("text", "text_rows", "tokens")):
            idx = chunk[rows_key]
            undecoded = np.zeros(len(idx), dtype=bool)
            for pos, message in result.get(f"{tower}_decode_errors", {}).items():
                prepared[idx[pos]].problems.append(("decode", message))
                undecoded[pos] = True
            error = result.get(f"{tower}_error")
            if error:
                for i in idx[~undecoded]:
                    prepared[i].problems.append(("encode", error))
                idx = idx[:0]
            finite = result.get(f"{tower}_finite")
            if finite is not None:
                for i in idx[~finite & ~undecoded]:
                    prepared[i].problems.append(("encode", f"{tower} embedding is not finite (NaN/inf)"))
            for col in ("sqnorm", "loglik", "pvalue"):
                full = np.full(n, np.nan)
                vals = result.get(f"{tower}_{col}")
                if vals is not None and len(idx):
                    full[idx] = np.where(finite, vals, np.nan) if finite is not None else vals
                self.columns[f"{tower}_{col}"].append(full)
            emb = result.get(f"{tower}_emb")
            if emb is not None and len(idx):
                full = np.full((n, emb.shape[1]), np.nan, dtype=np.float32)
                full[idx] = emb
                self.embeddings[tower].append(full)
            else:
                self.embeddings[tower].append(None)
        clip = result.get("clip_score")
        self.columns["clip_score"].append(clip if clip is not None else np.full(n, np.nan))
        for p in prepared:
            finalize_status(p)
            self.rows.append(p.row)

    def scores(self) -> dict:
        return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in self.columns.items()}

    def embedding_arrays(self) -> dict:
        """Row-aligned embeddings per tower (NaN rows where a tower was not encoded)."""
        out = {}
        for tower, parts in self.embeddings.items():
            dims = [p.shape[1] for p in parts if p is not None]
            if not dims:
                continue
            filled = []
            for p, size in zip(parts, self._chunk_sizes()):
                filled.append(p if p is not None else np.full((size, dims[0]), np.nan, dtype=np.float32))
            out[tower] = np.concatenate(filled) if filled else np.zeros((0, dims[0]), np.float32)
        return out

    def _chunk_sizes(self):
        return [len(v) for v in self.columns["clip_score"]]

    def summary(self, damage=None) -> dict:
        counts = Counter(r["status"] for r in self.rows)
        elapsed = time.time() - self.started
        return {"shard": self.url, "name": self.name, "rows": len(self.rows),
                "status_counts": dict(sorted(counts.items())),
                "ok": counts.get("ok", 0), "damage": damage,
                "duration_s": round(elapsed, 3),
                "samples_per_s": round(len(self.rows) / elapsed, 2) if elapsed > 0 else None}

    def ok_embeddings(self, tower: str):
        """(keys, embeddings) of status-ok rows for one tower: the fit's reference rows."""
        emb = self.embedding_arrays().get(tower)
        if emb is None:
            return [], np.zeros((0, 0), np.float32)
        ok = np.array([r["status"] == "ok" for r in self.rows], dtype=bool)
        ok &= np.isfinite(emb).all(axis=1)
        keys = [f"{self.name}/{r['key']}" for r, k in zip(self.rows, ok) if k]
        return keys, emb[ok]

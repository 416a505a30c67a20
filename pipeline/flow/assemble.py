"""Encoder answers -> exactly one output row per sample read: statuses, score columns and row-aligned
embeddings of one shard."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from pipeline.flow.batch import TOWERS, Chunk, ChunkResult
from pipeline.flow.decode import finalize_status
from pipeline.flow.read import shard_name
from pipeline.scores.table import LOCAL_COLUMNS, SCORE_COLUMNS


class ShardAssembler:
    """Collects chunk answers in order and produces the shard's rows, score columns and embeddings."""

    def __init__(self, url: str):
        self.url = url
        self.name = shard_name(url)
        self.rows: list = []
        self.columns = {c: [] for c in SCORE_COLUMNS + LOCAL_COLUMNS}
        self.embeddings = {"image": [], "text": []}
        self.started = time.time()

    def add(self, prepared: list, chunk: Chunk, result: ChunkResult) -> None:
        n = len(prepared)
        for tower in TOWERS:
            res = result.tower(tower)
            idx = chunk.rows(tower)
            undecoded = np.zeros(len(idx), dtype=bool)
            for pos, message in res.decode_errors.items():
                prepared[idx[pos]].problems.append(("decode", message))
                undecoded[pos] = True
            if res.error:
                for i in idx[~undecoded]:
                    prepared[i].problems.append(("encode", res.error))
                idx = idx[:0]
            finite = res.finite
            if finite is not None:
                for i in idx[~finite & ~undecoded]:
                    prepared[i].problems.append(("encode", f"{tower} embedding is not finite (NaN/inf)"))
            for col in ("sqnorm", "loglik", "pvalue", "cluster", "local_loglik", "local_pvalue"):
                full = np.full(n, np.nan)
                vals = getattr(res, col)
                if vals is not None and len(idx):
                    full[idx] = np.where(finite, vals, np.nan) if finite is not None else vals
                self.columns[f"{tower}_{col}"].append(full)
            emb = res.embeddings
            if emb is not None and len(idx):
                full = np.full((n, emb.shape[1]), np.nan, dtype=np.float32)
                full[idx] = emb
                self.embeddings[tower].append(full)
            else:
                self.embeddings[tower].append(None)
        self.columns["clip_score"].append(result.clip_score)
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

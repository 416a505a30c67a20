"""Embeddings -> scores: whitened squared norm, log-likelihood and calibrated p-value per tower, and with clusters
the local likelihood (:mod:`pipeline.whitening.kernels`' ``auto`` backend: the fused CuPy kernel on CUDA, float64
torch elsewhere, the torch mixture on the same device), and ``clip_score``, scattered back onto the chunk's rows."""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.flow.batch import TOWERS, Chunk, ChunkResult, TowerResult


class ChunkScorer:
    """Scores a chunk's embeddings with one stats file's towers (no stats: embeddings only, for the fit)."""

    def __init__(self, stats, device):
        self.stats = stats
        self.whiteners, self.mixtures = {}, {}
        if stats is not None:
            from pipeline.whitening.kernels import make_mixture, make_whitener

            for tower, ws in stats.towers.items():
                self.whiteners[tower] = make_whitener(ws, device)
                if ws.clusters is not None:
                    self.mixtures[tower] = make_mixture(ws.clusters, device)

    def score(self, chunk: Chunk, towers: dict, keep_embeddings: bool = False) -> ChunkResult:
        """``towers`` is :meth:`pipeline.flow.encode.Encoder.encode`'s answer for ``chunk``."""
        import torch

        results, rows_emb = {}, {}
        for name in TOWERS:
            te = towers[name]
            result = TowerResult(error=te.error, decode_errors=dict(te.decode_errors))
            results[name] = result
            if te.emb is None:
                continue
            n, ok, emb = te.rows, te.positions, te.emb
            result.finite = scatter(torch.isfinite(emb).all(dim=1).cpu().numpy(), ok, n, False)
            rows_emb[name] = emb if ok is None else scatter_rows(emb, ok, n)
            if keep_embeddings:
                result.embeddings = scatter(emb.cpu().numpy(), ok, n, np.nan)
            if name in self.whiteners:
                self._whiten(name, emb, result, ok, n)
        return ChunkResult(image=results["image"], text=results["text"],
                           clip_score=clip_score(chunk, rows_emb))

    def _whiten(self, name: str, emb, result: TowerResult, ok, n: int) -> None:
        """The tower's global scores and, with clusters, its local ones, onto ``result``'s rows."""
        ws = self.stats.towers[name]
        if name in self.mixtures:
            sq, ll, w = self.whiteners[name].score_and_whiten(emb)
            cluster, local, s_own = (t.cpu().numpy() for t in self.mixtures[name].mixture(w, sq, ll))
            local, s_own = local.astype(np.float64), s_own.astype(np.float64)
            result.cluster = scatter(np.where(cluster >= 0, cluster, np.nan), ok, n, np.nan)
            result.local_loglik = scatter(local, ok, n, np.nan)
            result.local_pvalue = scatter(ws.clusters.pvalue(cluster, s_own), ok, n, np.nan)
        else:
            sq, ll = self.whiteners[name].score(emb)
        sqnorm = sq.double().cpu().numpy()
        result.sqnorm = scatter(sqnorm, ok, n, np.nan)
        result.loglik = scatter(ll.double().cpu().numpy(), ok, n, np.nan)
        result.pvalue = scatter(ws.pvalue_from_sqnorm(sqnorm), ok, n, np.nan)


def clip_score(chunk: Chunk, embs: dict) -> np.ndarray:
    """Cosine of image and text embeddings for rows that have both; NaN elsewhere."""
    import torch

    score = np.full(int(chunk.n), np.nan, dtype=np.float64)
    if "image" not in embs or "text" not in embs:
        return score
    img_pos = {int(r): i for i, r in enumerate(chunk.image_rows)}
    pairs = [(img_pos[int(r)], j, int(r)) for j, r in enumerate(chunk.text_rows) if int(r) in img_pos]
    if not pairs:
        return score
    ii, jj, rows = (list(t) for t in zip(*pairs))
    a = torch.nn.functional.normalize(embs["image"][ii].double(), dim=1)
    b = torch.nn.functional.normalize(embs["text"][jj].double(), dim=1)
    score[rows] = (a * b).sum(1).cpu().numpy()
    return score


def scatter(values: np.ndarray, positions: Optional[np.ndarray], n: int, fill) -> np.ndarray:
    """``values`` of rows ``positions`` into a length-``n`` array (``fill`` elsewhere); as is when None."""
    if positions is None:
        return values
    full = np.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    full[positions] = values
    return full


def scatter_rows(emb, positions: np.ndarray, n: int):
    """Torch version of :func:`scatter` for embeddings (NaN rows where there was no input)."""
    import torch

    with torch.inference_mode():
        full = torch.full((n, emb.shape[1]), float("nan"), dtype=emb.dtype, device=emb.device)
        full[torch.as_tensor(positions, device=emb.device)] = emb
    return full

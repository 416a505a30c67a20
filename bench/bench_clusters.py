"""What the local likelihood costs and how it compares with a kNN-local score (issue #28). Not a test: run it by
hand and read the tables. BLAS is held to one thread everywhere (a shared machine; the ratios are what matter).

    .venv/bin/python bench/bench_clusters.py score --dims 64 768 --clusters 64
    .venv/bin/python bench/bench_clusters.py fit --dim 768 --rows 100000 --clusters 64 [--auto]
    .venv/bin/python bench/bench_clusters.py knn --known 32,8,1 256,16,5 [--demo REF_EMB TARGET_EMB LABELS]

* ``score``: per 4096-row block of float32 rows, the embeddings path's global whitening (``BlockScorer`` of a
  tower without clusters) against the whitening plus a K-cluster mixture (``BlockScorer`` with clusters) at rank 0
  and at the largest rank the fit may choose (the grid within :func:`pipeline.whitening.em.max_rank`), random
  parameters.
* ``fit``: on rows of a known mixture (tests/whitening/test_mixture_quality.KnownMixture, ``--modes`` modes), the
  global fit alone, then with ``--clusters K`` (k-means restarts, EM with split-and-merge, the rank path and the
  shrinkages, timed apart) and with ``--auto`` (K chosen on held-out rows).
* ``knn``: a CLIDE-style kNN-local score (arXiv 2512.05590: the ``k`` nearest reference rows, by faiss, whitened
  locally, ``k = 500``, at most ``m = 400`` components) beside the global score and the mixture, AUROC of the
  anomalies and the cost per 1000 rows, on known mixtures and, with ``--demo``, on the demo's embeddings (folders
  written by ``wclip score --save-embeddings`` of the demo's reference and target shards). Needs ``faiss-cpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "whitening"))

from pipeline.whitening import WhiteningStats  # noqa: E402
from pipeline.whitening.clusters import ClusterWhitening  # noqa: E402
from pipeline.whitening.em import RANK_GRID, max_rank  # noqa: E402
from pipeline.whitening.kernels.blocks import BlockScorer  # noqa: E402

BLOCK = 4096


class _Tower:
    def __init__(self, mean, whitening, clusters=None):
        self.mean, self.whitening, self.clusters = mean, whitening, clusters


def _random_clusters(rng, k: int, m: int, rank: int) -> ClusterWhitening:
    w = rng.random(k) + 0.5
    return ClusterWhitening(means=rng.normal(size=(k, m)), variances=rng.random((k, m)) + 0.5, weights=w / w.sum(),
                            calibration=np.zeros(0), calibration_counts=np.zeros(k),
                            factors=0.3 * rng.normal(size=(k, m, rank)) if rank else None)


def _best_of(fn, repeat: int = 5) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _largest_rank(k: int, d: int) -> int:
    """The largest rank of the grid the fit may choose for K clusters of d components."""
    return max(r for r in RANK_GRID if r <= max_rank(k, d))


def bench_score(dims, k: int, rows: int) -> list:
    out = []
    for d in dims:
        rng = np.random.default_rng(d)
        mean, W = rng.normal(size=d), np.linalg.qr(rng.normal(size=(d, d)))[0]
        x = rng.normal(size=(rows, d)).astype(np.float32)
        blocks = [x[i:i + BLOCK] for i in range(0, rows, BLOCK)]
        scratch = np.empty((BLOCK, d), np.float32)

        def run(scorer):
            out_w = np.empty((BLOCK, d), np.float32)
            work = [np.empty(s, np.float32) for s in scorer.work_shapes(BLOCK)]
            for b in blocks:
                n = len(b)
                np.copyto(scratch[:n], b)
                scorer.score(scratch[:n], overwrite_x=True, out=out_w[:n], work=[w[:n] for w in work])

        glob = _best_of(lambda: run(BlockScorer(_Tower(mean, W))))
        row = {"d": d, "k": k, "rows": rows, "global_ms": 1e3 * glob}
        for rank in sorted({0, _largest_rank(k, d)}):
            scorer = BlockScorer(_Tower(mean, W, _random_clusters(rng, k, d, rank)))
            t = _best_of(lambda: run(scorer))
            row[f"rank{rank}_ms"], row[f"rank{rank}_ratio"] = 1e3 * t, t / glob
        out.append(row)
        print(json.dumps(row), flush=True)
    print("\n| d | K | global whitening (ms / %d rows) | + mixture, rank 0 | ratio | + mixture, rank r_max | r_max | "
          "ratio |" % rows)
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        rm = _largest_rank(r["k"], r["d"])
        print(f"| {r['d']} | {r['k']} | {r['global_ms']:.1f} | {r['rank0_ms']:.1f} | {r['rank0_ratio']:.2f}x | "
              f"{r[f'rank{rm}_ms']:.1f} | {rm} | {r[f'rank{rm}_ratio']:.2f}x |")
    return out


def _world(spec: str):
    from test_mixture_quality import KnownMixture

    d, k, seed = (int(v) for v in spec.split(","))
    return KnownMixture(seed, d, k), d, k, seed


def bench_fit(d: int, rows: int, k: int, modes: int, auto: bool) -> dict:
    from test_mixture_quality import KnownMixture

    from pipeline.whitening.kmeans import spherical_kmeans

    world = KnownMixture(0, d, modes)
    X, _ = world.draw(rows, np.random.default_rng(1))
    out = {"d": d, "rows": rows, "modes": modes}
    t = time.perf_counter()
    plain = WhiteningStats.fit(X, holdout=0.1, seed=0)
    out["global_fit_s"] = time.perf_counter() - t
    mask = np.zeros(rows, bool)
    mask[np.random.default_rng(0).permutation(rows)[:rows // 10]] = True
    centred = X[~mask] - plain.mean
    t = time.perf_counter()
    labels = spherical_kmeans(centred, k, seed=0)
    out["kmeans_restarts_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cw = ClusterWhitening.fit(centred @ plain.whitening, (X[mask] - plain.mean) @ plain.whitening, labels, k,
                              plain.calibration)
    out.update(mixture_fit_s=time.perf_counter() - t, k=cw.k, rank=cw.rank, stages_s=cw.diagnostics["fit_seconds"],
               split_merge_moves=cw.diagnostics["split_merge_moves"], em_iterations=cw.diagnostics["em_iterations"])
    if auto:
        t = time.perf_counter()
        fitted = WhiteningStats.fit(X, holdout=0.1, seed=0, clusters="auto")
        out.update(auto_fit_s=time.perf_counter() - t, auto_k=fitted.clusters.k,
                   k_curve=fitted.clusters.diagnostics["k_curve"])
    print(json.dumps(out, indent=1))
    return out


def knn_local(reference_z: np.ndarray, query_z: np.ndarray, k: int = 500, m: int = 400) -> np.ndarray:
    """CLIDE-style score: each query's log-density under the Gaussian of its ``k`` nearest reference rows (faiss,
    exact L2 in the globally whitened space), in their leading ``min(m, d, k - 1)`` principal directions (the
    eigenvalues floored at 1e-3 of the largest)."""
    import faiss

    index = faiss.IndexFlatL2(reference_z.shape[1])
    index.add(np.ascontiguousarray(reference_z, dtype=np.float32))
    _, nn = index.search(np.ascontiguousarray(query_z, dtype=np.float32), k)
    keep = min(m, reference_z.shape[1], k - 1)
    out = np.empty(len(query_z))
    for i, rows in enumerate(nn):
        local = reference_z[rows]
        mu = local.mean(axis=0)
        lam, V = np.linalg.eigh(np.cov(local.T))
        lam, V = np.maximum(lam[::-1][:keep], 1e-3 * lam[-1]), V[:, ::-1][:, :keep]
        y = (query_z[i] - mu) @ V
        out[i] = -0.5 * (np.sum(y * y / lam) + np.sum(np.log(lam)))
    return out


def _auroc(anomalies, normal) -> float:
    from scipy import stats as sps

    r = sps.rankdata(np.concatenate([anomalies, normal]))
    return float((r[len(anomalies):].sum() - len(normal) * (len(normal) + 1) / 2) / (len(anomalies) * len(normal)))


def _compare(name: str, stats, ref_z, normal_x, anomal_x, k_knn: int) -> dict:
    row = {"data": name, "K": stats.clusters.k, "rank": stats.clusters.rank}
    t = time.perf_counter()
    g = [stats.loglik(x) for x in (anomal_x, normal_x)]
    row["global_ms_per_1k"] = 1e3 * (time.perf_counter() - t) / (len(anomal_x) + len(normal_x)) * 1000
    t = time.perf_counter()
    loc = [stats.local_scores(x).loglik for x in (anomal_x, normal_x)]
    row["mixture_ms_per_1k"] = 1e3 * (time.perf_counter() - t) / (len(anomal_x) + len(normal_x)) * 1000
    t = time.perf_counter()
    kn = [knn_local(ref_z, (x - stats.mean) @ stats.whitening, k=k_knn) for x in (anomal_x, normal_x)]
    row["knn_ms_per_1k"] = 1e3 * (time.perf_counter() - t) / (len(anomal_x) + len(normal_x)) * 1000
    row.update(global_auroc=_auroc(*g), mixture_auroc=_auroc(*loc), knn_auroc=_auroc(*kn))
    print(json.dumps(row), flush=True)
    return row


def bench_knn(known, demo, k_knn: int) -> list:
    rows = []
    for spec in known:
        world, d, k, seed = _world(spec)
        rng = np.random.default_rng(100 + seed)
        X, _ = world.draw(800 * k, rng)
        stats = WhiteningStats.fit(X, holdout=0.2, clusters=k, seed=seed)
        Y, _ = world.draw(2000, rng)
        rows.append(_compare(f"known d={d} K={k} seed={seed}", stats, (X - stats.mean) @ stats.whitening, Y,
                             world.between(300, rng), k_knn))
    if demo:
        rows += _demo(*demo, k_knn=k_knn)
    print("\n| data | K (rank) | AUROC global | AUROC mixture | AUROC kNN-local (k=%d) | ms / 1000 rows: global, "
          "mixture, kNN |" % k_knn)
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['K']} ({r['rank']}) | {r['global_auroc']:.3f} | {r['mixture_auroc']:.3f} | "
              f"{r['knn_auroc']:.3f} | {r['global_ms_per_1k']:.2f}, {r['mixture_ms_per_1k']:.2f}, "
              f"{r['knn_ms_per_1k']:.0f} |")
    return rows


def _demo(reference: str, target: str, labels: str, k_knn: int, kind: str = "unseen_pairing") -> list:
    """The demo's unseen pairings against its normal target rows, per tower (clusters: the K of --demo-clusters)."""
    import pyarrow.parquet as pq

    from pipeline.demo import shards

    label = {r["key"]: r["anomaly"] for r in shards.read_labels(Path(labels))}

    def load(folder, tower):
        sub = {"image": "img_emb/img_emb", "text": "text_emb/text_emb"}[tower]
        files = sorted(Path(folder).glob(f"{sub}_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        keys = [k for f in sorted(Path(folder).glob("metadata/metadata_*.parquet"),
                                  key=lambda p: int(p.stem.rsplit("_", 1)[1]))
                for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
        return np.concatenate([np.load(f).astype(np.float64) for f in files]), keys

    rows = []
    for tower in ("image", "text"):
        ref, _ = load(reference, tower)
        tgt, keys = load(target, tower)
        kinds = np.array([label[k] for k in keys], dtype=object)
        for K in (8, 32):
            stats = WhiteningStats.fit(ref, components="auto", holdout=0.2, clusters=K, seed=0)
            rows.append(_compare(f"demo {tower} {kind}", stats, (ref - stats.mean) @ stats.whitening,
                                 tgt[kinds == None], tgt[kinds == kind], min(k_knn, len(ref) // 4)))  # noqa: E711
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="part", required=True)
    s = sub.add_parser("score")
    s.add_argument("--dims", type=int, nargs="+", default=[64, 768])
    s.add_argument("--clusters", type=int, default=64)
    s.add_argument("--rows", type=int, default=40_960)
    f = sub.add_parser("fit")
    f.add_argument("--dim", type=int, default=768)
    f.add_argument("--rows", type=int, default=100_000)
    f.add_argument("--clusters", type=int, default=64)
    f.add_argument("--modes", type=int, default=32)
    f.add_argument("--auto", action="store_true")
    k = sub.add_parser("knn")
    k.add_argument("--known", nargs="*", default=["32,8,1", "256,16,5"], help="d,K,seed of known mixtures")
    k.add_argument("--demo", nargs=3, metavar=("REF_EMB", "TARGET_EMB", "LABELS"))
    k.add_argument("--k", type=int, default=500, help="neighbours of the kNN-local score")
    args = ap.parse_args()
    with threadpool_limits(1):
        if args.part == "score":
            bench_score(args.dims, args.clusters, args.rows)
        elif args.part == "fit":
            bench_fit(args.dim, args.rows, args.clusters, args.modes, args.auto)
        else:
            bench_knn(args.known, args.demo, args.k)


if __name__ == "__main__":
    main()

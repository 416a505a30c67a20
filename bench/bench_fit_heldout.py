"""Peak memory of the tar fit's driver over a large reference, with the held-out set bounded (``--max-heldout``,
default 50,000) and, for comparison, unbounded (as the tar fit was before issue #27: every held-out row kept).

No model runs: the shard results the tar fit's collector receives (``FitSink``: each shard's keys and float32
embeddings per tower) are generated, and fed to the fit's own collector (``sources.tars.ShardParts``) and
reference (``runs.reference.Reference``), then the statistics are computed (``Reference.whiten``) as ``wclip fit``
does. Each setting runs in a fresh process; its peak RSS (``ru_maxrss``) and time are printed as one JSON line and
in a table. The encoder's own memory is not part of it (it does not depend on the corpus size).

    python bench/bench_fit_heldout.py --rows 1000000 --dim 768 --shard-rows 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(rows: int, dim: int, shard_rows: int, max_heldout: int, holdout: float) -> dict:
    import resource
    from types import SimpleNamespace

    import numpy as np

    from pipeline.flow.batch import TOWERS
    from pipeline.runs.reference import Reference
    from pipeline.sources.tars import ShardParts

    cfg = SimpleNamespace(holdout=holdout, max_heldout=max_heldout, clusters=None, cluster_sample=0,
                          components="auto", shrinkage=0.0, seed=0)
    ref = Reference(cfg)
    parts = ShardParts(ref, seed=0, max_samples=None)
    rng = np.random.default_rng(0)
    scale = np.linspace(1.0, 0.05, dim, dtype=np.float32)  # a spectrum to whiten
    started = time.time()
    for shard, first in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - first)
        keys = [f"{shard:06d}/{i:06d}" for i in range(n)]
        towers = {t: (keys, rng.standard_normal((n, dim), dtype=np.float32) * scale) for t in TOWERS}
        parts.add(shard, f"/data/{shard:06d}.tar", {"towers": towers, "summary": {"rows": n}})
    stats = ref.whiten(TOWERS, "shards")
    elapsed = time.time() - started
    return {"rows": rows, "dim": dim, "max_heldout": max_heldout, "holdout": holdout,
            "heldout_kept": {t: stats[t].n_heldout for t in TOWERS}, "seconds": round(elapsed, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--bounds", type=int, nargs="+", default=[50_000, 10**12],
                        help="--max-heldout values to run (10^12: unbounded, the tar fit before issue #27)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.rows, args.dim, args.shard_rows, args.bounds[0], args.holdout)))
        return 0
    results = []
    for bound in args.bounds:
        cmd = [sys.executable, __file__, "--one", "--rows", str(args.rows), "--dim", str(args.dim),
               "--shard-rows", str(args.shard_rows), "--holdout", str(args.holdout), "--bounds", str(bound)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'max_heldout':>14} {'held-out rows kept':>20} {'seconds':>8} {'peak RSS MB':>12}")
    for r in results:
        bound = "unbounded" if r["max_heldout"] >= 10**12 else f"{r['max_heldout']:,}"
        print(f"{bound:>14} {r['heldout_kept']['image']:>20,} {r['seconds']:>8} {r['peak_rss_mb']:>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

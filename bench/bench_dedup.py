"""``wclip dedup``'s cost: time against the sum of squared cluster sizes (the products the pair search must
make) and peak memory against the corpus size, on synthetic L2-normalised embeddings with 10% planted
duplicates, through the real command (clip-retrieval folder -> score --embeddings -> dedup).

    python bench/bench_dedup.py --rows 20000 50000 100000 --dim 64 --cluster-rows 5000
    python bench/bench_dedup.py --rows 10000000 --dim 64        # the issue's sizes (hours on 2 cores)
    python bench/bench_dedup.py --rows 1000000 --dim 768

Each size runs in a fresh process so its peak RSS (ru_maxrss of the child) is its own.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(folder: Path, rows: int, dim: int, per_file: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    import pandas as pd

    for n, start in enumerate(range(0, rows, per_file)):
        count = min(per_file, rows - start)
        img = rng.standard_normal((count, dim)).astype(np.float32)
        dup = rng.random(count) < 0.1  # 10%: a jittered copy of the row before
        img[1:][dup[1:]] = img[:-1][dup[1:]] + 0.05 * rng.standard_normal((int(dup[1:].sum()), dim))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = rng.standard_normal((count, dim)).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        for sub, arr in (("img_emb/img_emb", img), ("text_emb/text_emb", txt)):
            buf = io.BytesIO()
            np.save(buf, arr)
            (folder / f"{sub}_{n}.npy").write_bytes(buf.getbuffer())
        pd.DataFrame({"image_path": [f"{start + i:09d}" for i in range(count)]}).to_parquet(
            folder / "metadata" / f"metadata_{n}.parquet")


def child(args) -> None:
    """Run one wclip command in this process and print its peak RSS."""
    from pipeline.cli import main

    started = time.time()
    code = main(args)
    print(json.dumps({"rc": code, "s": round(time.time() - started, 2),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(argv: list) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=ROOT)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    return {**lines[-1], "summary": lines[0] if len(lines) > 1 else None}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cluster-rows", type=int, default=5000)
    p.add_argument("--per-file", type=int, default=10_000)
    p.add_argument("--eps", type=float, default=0.05)
    a = p.parse_args()
    print(f"{'rows':>10} {'d':>4} {'K':>5} {'sum n_k^2':>14} {'dedup s':>8} {'ns / (n_k^2 d)':>15} "
          f"{'peak MB':>8} {'groups':>7} {'removed':>8}")
    for rows in a.rows:
        with tempfile.TemporaryDirectory(dir=ROOT / ".bench" if (ROOT / ".bench").exists() else None) as tmp:
            tmp = Path(tmp)
            write_corpus(tmp / "emb", rows, a.dim, a.per_file)
            run(["fit", "--embeddings", str(tmp / "emb"), "--output", str(tmp / "s.safetensors"), "--executor",
                 "local", "--components", "8"])
            run(["score", "--embeddings", str(tmp / "emb"), "--stats", str(tmp / "s.safetensors"), "--output",
                 str(tmp / "scores"), "--executor", "local", "--no-progress"])
            r = run(["dedup", "--scores", str(tmp / "scores"), "--output", str(tmp / "d"), "--embeddings",
                     str(tmp / "emb"), "--eps", str(a.eps), "--clusters", "kmeans", "--cluster-rows",
                     str(a.cluster_rows), "--executor", "local", "--no-progress"])
            s = r["summary"]
            per = r["s"] * 1e9 / (s["cost_pairs"] * a.dim)
            print(f"{rows:>10} {a.dim:>4} {s['clusters']:>5} {s['cost_pairs']:>14,} {r['s']:>8.1f} {per:>15.4f} "
                  f"{r['peak_rss_mb']:>8.0f} {s['groups']:>7} {s['removed']:>8}", flush=True)


if __name__ == "__main__":
    main()

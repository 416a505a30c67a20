"""Benchmark of `wclip score --embeddings` against a single-threaded NumPy loop on the same files. Not a test:
run it by hand and read the table.

    .venv/bin/python bench/bench_embeddings.py                       # d = 768: 8 files, d = 64: 32 files, of 100k rows
    .venv/bin/python bench/bench_embeddings.py --dims 768 --rows 50000 --files 8

For each width it writes a clip-retrieval folder (img_emb/img_emb_N.npy, text_emb/text_emb_N.npy float16
L2-normalised, metadata/metadata_N.parquet with image_path, caption, url), fits stats on it with
`wclip fit --embeddings --components all` (m = d: the largest whitening), then times, side by side:

* the baseline: one process, BLAS limited to one thread (OPENBLAS/OMP/MKL_NUM_THREADS=1 before NumPy
  loads), per file and tower ``x = np.load(npy); (((x - mu) @ W) ** 2).sum(1)``;
* the baseline in ``cores`` processes at once (each on its share of the files): how parallel this machine
  is right now, other people's processes included;
* `wclip score --embeddings` as a user runs it, on threads (the default on one machine) and with
  ``--executor ray`` (one Ray task per file): the rate over the span of its files (first file started to
  last marker written), over the job's own elapsed time (Ray started) and over the wall clock (Python and
  Ray start included), with the peak summed PSS of the process tree.

The goal is rate(wclip) >= 0.8 x cores x rate(baseline); the rates are samples (rows, both towers) per s.

With ``--clusters K`` it measures instead what the local likelihood costs (issue #23, goal <= 1.5x): the same
folder scored with stats fitted with and without ``--clusters K``, side by side in rounds, as whole
``wclip score --embeddings`` jobs (file span and job time), and in one process the per-block computation alone:
the global whitening (``BlockScorer`` of the stats without clusters) against the whitening plus the mixture (with them),
on the folder's first file in blocks of 4096 rows, one BLAS thread.
Each width runs ``--repeat`` rounds of all of them, interleaved, and reports the medians (a shared machine
is noisy; the parallel baseline shows how many cores were really free). Everything runs at niceness 15,
the niceness Ray gives its workers, so that other people's processes weigh on every side alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchkit
import numpy as np
from benchkit import ROOT

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_folder(folder: Path, files: int, rows: int, d: int, seed: int = 0) -> None:
    """A clip-retrieval folder, written the way `clip-retrieval inference` writes it."""
    import pandas as pd

    if (folder / "done").exists():
        return
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 0.05, d)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for n in range(files):
        for sub, shift in (("img_emb/img_emb", 0.5), ("text_emb/text_emb", -0.3)):
            x = rng.standard_normal((rows, d), dtype=np.float32) * scales + shift
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            np.save(folder / f"{sub}_{n}.npy", x.astype(np.float16))
        keys = [f"{n:05d}{i:05d}" for i in range(rows)]
        pd.DataFrame({"image_path": keys, "caption": [f"a photo of thing {k} on a table" for k in keys],
                      "url": [f"https://example.com/images/{k}.jpg" for k in keys]}
                     ).to_parquet(folder / "metadata" / f"metadata_{n}.parquet")
    (folder / "done").write_text("")


BASELINE = """
import json, sys, time
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file
folder, stats = Path(sys.argv[1]), load_file(sys.argv[2])
part, parts = (int(v) for v in (sys.argv[3:5] if len(sys.argv) > 3 else (0, 1)))
towers = {"image": "img_emb/img_emb_", "text": "text_emb/text_emb_"}
params = {t: (stats[t + ".mean"].astype(np.float32), stats[t + ".whitening"].astype(np.float32)) for t in towers}
rows, start, check = 0, time.perf_counter(), 0.0
for meta in sorted((folder / "metadata").glob("metadata_*.parquet"))[part::parts]:
    n = meta.name[len("metadata_"):-len(".parquet")]
    for tower, prefix in towers.items():
        mu, W = params[tower]
        x = np.load(folder / f"{prefix}{n}.npy")
        s = (((x - mu) @ W) ** 2).sum(1)
        check += float(s[:10].sum())
    rows += len(x)
print(json.dumps({"rows": rows, "elapsed_s": time.perf_counter() - start, "check": check}))
"""

NICE = ["nice", "-n", "15"]  # Ray runs its workers at niceness 15 (worker_niceness): every side runs at 15


def run(args: list, env_extra=None) -> dict:
    """Run a command to its end, sampling the peak PSS of its process tree; its last stdout line is JSON."""
    args = NICE + list(args)
    return benchkit.run_summary(args, f"{' '.join(args[:5])} ...", cwd=ROOT, interval=0.2,
                                env=benchkit.command_env(None, PYTHONUNBUFFERED="1", **(env_extra or {})))


def parallel_baseline(folder: Path, stats: Path, cores: int) -> float:
    """The baseline in ``cores`` processes at once, each on its share of the files: what this machine's cores
    deliver now (other people's processes included); returns rows per second."""
    script = NICE + [sys.executable, "-c", BASELINE, str(folder), str(stats)]
    env = dict(os.environ, **ONE_THREAD)
    procs = [subprocess.Popen(script + [str(i), str(cores)], stdout=subprocess.PIPE, text=True, env=env)
             for i in range(cores)]
    results = [benchkit.last_json(p.communicate()[0]) for p in procs]
    return sum(r["rows"] for r in results) / max(r["elapsed_s"] for r in results)  # loops, not imports


def task_span(scores: Path) -> float:
    """Seconds from the first file's start to the last file's end, from the completion markers (the job's
    elapsed time less Ray's worker start-up)."""
    import datetime

    from pipeline.scores.layout import state_path

    spans = []
    for path in Path(state_path(scores, "shards")).glob("*.json"):
        m = json.loads(path.read_text())  # duration_s ends as the outputs start; the marker is written last
        begun = datetime.datetime.fromisoformat(m["provenance"]["written"]).timestamp() - m["duration_s"]
        spans.append((begun, path.stat().st_mtime))
    return max(e for _, e in spans) - min(s for s, _ in spans)


def prepare(workdir: Path, d: int, files: int, rows: int) -> tuple:
    folder = workdir / f"clip-retrieval-d{d}-{files}x{rows}"
    started = time.perf_counter()
    make_folder(folder, files, rows, d)
    print(f"d={d}: folder ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    stats = workdir / f"stats-d{d}-{files}x{rows}.safetensors"
    if not stats.exists():
        fitted = run([sys.executable, "-m", "pipeline", "fit", "--embeddings", str(folder), "--output", str(stats),
                      "--components", "all", "--max-samples", str(2 * rows), "--no-progress"])
        print(f"d={d}: fit {fitted['rows']} rows in {fitted['wall_s']:.1f} s", file=sys.stderr)
    return folder, stats


def score(workdir: Path, d: int, folder: Path, stats: Path, cores: int, executor: str) -> dict:
    out = workdir / f"scores-d{d}-{executor}"
    shutil.rmtree(out, ignore_errors=True)
    result = run([sys.executable, "-m", "pipeline", "score", "--embeddings", str(folder), "--stats", str(stats),
                  "--output", str(out), "--no-progress", "--num-cpus", str(cores), "--executor", executor])
    result["span_s"] = task_span(out)
    shutil.rmtree(out, ignore_errors=True)
    return result


def one_round(workdir: Path, d: int, folder: Path, stats: Path, cores: int) -> dict:
    """The measurements once, back to back; rates in rows per second."""
    load = os.getloadavg()[0]
    base = run([sys.executable, "-c", BASELINE, str(folder), str(stats)], ONE_THREAD)
    parallel = parallel_baseline(folder, stats, cores)
    wclip = {e: score(workdir, d, folder, stats, cores, e) for e in ("local", "ray")}
    total = base["rows"]
    assert all(w["rows"] == total for w in wclip.values()), ({e: w["rows"] for e, w in wclip.items()}, total)
    rates = {"baseline": total / base["elapsed_s"], "baseline_parallel": parallel}
    for e, w in wclip.items():
        rates.update({f"{e}_tasks": total / w["span_s"], f"{e}_job": total / w["elapsed_s"],
                      f"{e}_wall": total / w["wall_s"]})
    ratios = {k: v / (cores * rates["baseline"]) for k, v in rates.items() if k != "baseline"}
    ratios["local_job_vs_parallel_baseline"] = rates["local_job"] / parallel
    print(f"d={d}: load {load:.2f}, " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()), file=sys.stderr)
    return {"load_before": load, "rows": total, "rates": rates, "ratios": ratios,
            "peak_pss_mb": {"baseline": base["peak_pss_mb"], **{e: w["peak_pss_mb"] for e, w in wclip.items()}}}


def bench_width(workdir: Path, d: int, files: int, rows: int, cores: int, repeat: int) -> dict:
    """``repeat`` rounds, interleaved so that other people's load falls on every side alike; medians."""
    import statistics

    folder, stats = prepare(workdir, d, files, rows)
    rounds = [one_round(workdir, d, folder, stats, cores) for _ in range(repeat)]
    median = {part: {k: statistics.median(r[part][k] for r in rounds) for k in rounds[0][part]}
              for part in ("rates", "ratios", "peak_pss_mb")}
    return {"d": d, "files": files, "rows_per_file": rows, "cores": cores, **median, "rounds": rounds}


BLOCK_TIMING = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from dataclasses import replace
from pipeline.whitening import StatsFile
from pipeline.whitening.kernels.blocks import BlockScorer
x16 = np.load(sys.argv[1])
ws = StatsFile.load(sys.argv[2]).towers["image"]
scorers = {False: BlockScorer(replace(ws, clusters=None)), True: BlockScorer(ws)}  # the embeddings path's, NumPy
blocks = [x16[i:i + 4096].astype(np.float32) for i in range(0, len(x16), 4096)]
y = np.empty((4096, scorers[True].m), np.float32)
def whiten(local):
    scorer = scorers[local]
    for b in blocks:
        x = b.copy()
        work = [np.empty(shape, np.float32) for shape in scorer.work_shapes(len(b))]
        scorer.score(x, overwrite_x=True, out=y[:len(b)], work=work)
best = {}
with threadpool_limits(1):
    for local in (False, True) * 5:
        t = time.perf_counter(); whiten(local); e = time.perf_counter() - t
        best[local] = min(best.get(local, e), e)
print(json.dumps({"rows": len(x16), "global_s": best[False], "local_s": best[True]}))
"""


def bench_clusters(workdir: Path, d: int, files: int, rows: int, k: int, cores: int, repeat: int) -> dict:
    """What scoring with ``k`` clusters costs against the global score: whole jobs, and the whitening alone."""
    import statistics

    folder, stats = prepare(workdir, d, files, rows)
    clustered = workdir / f"stats-d{d}-{files}x{rows}-k{k}.safetensors"
    if not clustered.exists():
        fitted = run([sys.executable, "-m", "pipeline", "fit", "--embeddings", str(folder), "--output",
                      str(clustered), "--components", "all", "--max-samples", str(2 * rows), "--clusters", str(k),
                      "--no-progress"])
        print(f"d={d}: fit with {k} clusters in {fitted['wall_s']:.1f} s", file=sys.stderr)
    rounds = []
    for _ in range(repeat):
        load = os.getloadavg()[0]
        jobs = {name: score(workdir, d, folder, path, cores, "local")
                for name, path in (("global", stats), ("local", clustered))}
        block = run([sys.executable, "-c", BLOCK_TIMING, str(folder / "img_emb" / "img_emb_0.npy"), str(clustered)],
                    ONE_THREAD)
        rounds.append({"load_before": load, "job_ratio": jobs["local"]["elapsed_s"] / jobs["global"]["elapsed_s"],
                       "span_ratio": jobs["local"]["span_s"] / jobs["global"]["span_s"],
                       "whitening_ratio": block["local_s"] / block["global_s"],
                       "global_job_s": jobs["global"]["elapsed_s"], "local_job_s": jobs["local"]["elapsed_s"],
                       "global_whitening_ms": 1e3 * block["global_s"], "local_whitening_ms": 1e3 * block["local_s"],
                       "block_rows": block["rows"]})
        print(f"d={d} K={k}: load {load:.2f}, " + ", ".join(f"{n} {v:.3g}" for n, v in rounds[-1].items()),
              file=sys.stderr)
    median = {n: statistics.median(r[n] for r in rounds) for n in rounds[0]}
    return {"d": d, "k": k, "files": files, "rows_per_file": rows, "median": median, "rounds": rounds}


def main_clusters(args, workdir: Path) -> None:
    results = [bench_clusters(workdir, d, args.files or (8 if d >= 256 else 32), args.rows, args.clusters,
                              args.cores, args.repeat) for d in args.dims]
    print(json.dumps(results, indent=1))
    print(f"\nmedians of {args.repeat} rounds; K = {args.clusters} clusters against the global score (goal <= 1.5x)")
    print("| d | whitening per file, global / with clusters | ratio | whole job, global / with clusters | ratio | "
          "files' span ratio |")
    print("|---|---|---|---|---|---|")
    for r in results:
        m = r["median"]
        print(f"| {r['d']} | {m['global_whitening_ms']:.1f} / {m['local_whitening_ms']:.1f} ms | "
              f"{m['whitening_ratio']:.2f} | {m['global_job_s']:.2f} / {m['local_job_s']:.2f} s | "
              f"{m['job_ratio']:.2f} | {m['span_ratio']:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[768, 64])
    p.add_argument("--files", type=int, default=None,
                   help="files per width (default: 8 at d >= 256, 32 below: at d = 64 the job takes seconds, and "
                        "8 files would time the first file on each thread, pyarrow's and the allocators' warm-up)")
    p.add_argument("--rows", type=int, default=100_000, help="rows per file")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs given to wclip (and to the threads)")
    p.add_argument("--repeat", type=int, default=3, help="rounds per width (medians are reported)")
    p.add_argument("--workdir", default=None, help="keep the folders here (default: a temporary folder)")
    p.add_argument("--clusters", type=int, default=None,
                   help="measure instead the cost of the local likelihood with this many clusters (e.g. 64)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="wclip-bench-emb-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.clusters:
        main_clusters(args, workdir)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    load_before = os.getloadavg()
    results = [bench_width(workdir, d, args.files or (8 if d >= 256 else 32), args.rows, args.cores, args.repeat)
               for d in args.dims]
    report = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "results": results}
    print(json.dumps(report, indent=1))
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"medians of {args.repeat} rounds; rates in samples (rows, both towers) per second; ratios to "
          f"{args.cores} x the 1-thread baseline (goal >= 0.8)")
    print(f"| d | baseline, 1 thread | baseline, {args.cores} processes | wclip --executor local: tasks / job / wall | "
          "ratio | wclip --executor ray: tasks / job / wall | ratio | peak PSS baseline / local / ray |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        rt, ra, mem = r["rates"], r["ratios"], r["peak_pss_mb"]
        cells = []
        for e in ("local", "ray"):
            cells.append(f"{rt[e + '_tasks']:.0f} / {rt[e + '_job']:.0f} / {rt[e + '_wall']:.0f} | "
                         f"{ra[e + '_tasks']:.2f} / {ra[e + '_job']:.2f} / {ra[e + '_wall']:.2f}")
        print(f"| {r['d']} | {rt['baseline']:.0f} | {rt['baseline_parallel']:.0f} "
              f"({ra['baseline_parallel']:.2f}) | {' | '.join(cells)} | {mem['baseline']:.0f} / "
              f"{mem['local']:.0f} / {mem['ray']:.0f} MB |")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Cost curves (issue #22): wall time and peak memory of wclip's commands against the amount of work, each at
three or more sizes spanning >= 100x, on both executors where they apply. Not a test: run it by hand, one
curve at a time (each run took 1-11 minutes on a 2-core VM: docs/benchmarks.md), and read the table.

    .venv/bin/python bench/bench_scale.py --curve embeddings64              # 2e5, 2e6, 2e7 rows at d = 64
    .venv/bin/python bench/bench_scale.py --curve embeddings768             # 1e4, 1e5, 1e6 rows at d = 768
    .venv/bin/python bench/bench_scale.py --curve shards                    # 1e2, 1e3, 1e4 tiny tar shards (+ resume)
    .venv/bin/python bench/bench_scale.py --curve shards --sizes 300 3000 30000 --executors ray
    .venv/bin/python bench/bench_scale.py --curve shards --resume-only --sizes 1000 10000 100000 [--commit C]
    .venv/bin/python bench/bench_scale.py --curve filter                    # 1e6, 1e7, 1e8 score rows
    .venv/bin/python bench/bench_scale.py --curve card                      # 1e6, 1e7, 1e8 score rows
    .venv/bin/python bench/bench_scale.py --curve shards --sizes 100 1000 --executors local
    .venv/bin/python bench/bench_scale.py --report --plot                   # tables, docs/scale.png from the results
    .venv/bin/python bench/bench_scale.py --clean                           # delete the generated inputs

Curves:

* ``embeddings64`` / ``embeddings768``: ``wclip score --embeddings`` on synthetic clip-retrieval folders
  (``bench_embeddings.make_folder``: float16 L2-normalised vectors, image_path/caption/url metadata) of
  ``--file-rows`` rows per file; the sizes are the first files of one generated folder (hard links), stats
  from ``wclip fit --embeddings --components all`` (m = d, the largest whitening).
* ``shards``: ``wclip score`` with the built-in ``wclip-demo`` model on tiny tar shards (4 samples each, hard
  links to 8 template tars written with tests/shardkit.py), then the same command again: a resume that skips
  every shard. Per-shard overhead, and the driver's own memory (the command's process) beside the tree's.
  The scored folders are kept (.bench/scale/done-shards-N); ``--resume-only`` times the resume alone on them,
  or on folders of hard links to their shards under more names (a resume of 1e5 shards without scoring 1e5).
* ``filter`` / ``card``: ``wclip filter --keep-fraction clip_score=0.3`` (as typed, and with ``--no-uids``)
  and ``wclip card --no-thumbnails`` on a scores folder written directly by this script (``--file-rows``
  rows per file, pipeline.scores.table's SCHEMA and encodings, the provenance of a real ``wclip score`` file,
  ``run.json``); the sizes are the first files of one folder (hard links). Neither command runs tasks
  without ``--input``, so there is no executor to choose.

Every command runs from a snapshot of the library at a commit (``git archive``, default HEAD, under
.bench/scale/snapshot/), so that others' edits of the working tree do not change what is measured. The
peak memory is the summed PSS of the command's whole process tree, sampled every 0.1 s (benchkit.TreeSampler: one
/proc scan for the tree and each process's CPU seconds, PSS from smaps_rollup); "driver" is the
command's own process; CPU seconds count every process seen in the tree (Ray's workers too). Per size the
table gives seconds, the cost per unit (row or shard) and the marginal cost (of the units added since the
previous size: fixed start-up costs drop out), and the ratios largest/smallest of the per-unit cost and of
the peak PSS (the goal: time within 1.3x of linear, memory within 1.2x of flat). Results are appended to
.bench/scale/results.jsonl; ``--report`` prints and ``--plot`` draws the latest point of each curve,
executor and size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import benchkit
import numpy as np
from benchkit import ROOT

WORK = ROOT / ".bench" / "scale"
RESULTS = WORK / "results.jsonl"

CURVES = {  # curve: (default sizes, quick sizes, unit, rows per file, executors)
    "embeddings64": ([200_000, 2_000_000, 20_000_000], [200_000, 2_000_000], "row", 100_000, ("local", "ray")),
    "embeddings768": ([10_000, 100_000, 1_000_000], [10_000, 100_000], "row", 5_000, ("local", "ray")),
    "shards": ([100, 1_000, 10_000], [100, 1_000], "shard", 4, ("local", "ray")),  # 1e5: ~14 min local, ~36 Ray
    "filter": ([1_000_000, 10_000_000, 100_000_000], [1_000_000, 10_000_000], "row", 100_000, ("uids", "no-uids")),
    "card": ([1_000_000, 10_000_000, 100_000_000], [1_000_000, 10_000_000], "row", 100_000, ("none",)),
}
TEMPLATES = 8  # distinct template tars behind the tiny shards


# -- running a command -------------------------------------------------------------------------------------
class Library(benchkit.Library):
    """The library at one commit, extracted once under .bench/scale/snapshot/; commands run with it first on
    PYTHONPATH and with a working directory outside the checkout (``python -m`` puts the working directory
    first on the path)."""

    def __init__(self, commit: str = "HEAD"):
        lib = benchkit.Library.at_commit(commit, WORK / "snapshot")
        super().__init__(lib.path, lib.info)
        self.commit = lib.info["commit"]

    def wclip(self, *args) -> list:
        return [*benchkit.WCLIP, *map(str, args)]

    def env(self) -> dict:
        return super().env(PYTHONUNBUFFERED="1")


def measure(lib: Library, cmd: list, every: float = 0.1) -> dict:
    """Run ``cmd`` to its end: wall seconds, CPU seconds of every process seen in its tree (Ray's workers too,
    which the command does not wait for), peak summed PSS of the tree and of the command's own process (the
    driver), the PSS over time, the 1-minute load average before, and its last stdout line when it is JSON."""
    ran = benchkit.run(cmd, env=lib.env(), cwd=WORK, log_stem=WORK / "last-command", interval=every)
    if ran.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[3:6])} ... exited {ran.returncode}:\n{ran.stderr[-3000:]}")
    try:
        summary = benchkit.last_json(ran.stdout)
    except (ValueError, IndexError):
        summary = None
    mem = ran.memory
    step = max(1, len(mem.timeline) // 40)
    return {"wall_s": ran.wall_s, "cpu_s": mem.cpu_s, "peak_pss_mb": mem.peak_pss_kb / 1024,
            "driver_pss_mb": mem.driver_pss_kb / 1024, "processes": mem.max_procs, "load_before": ran.load_before[0],
            "pss_timeline": mem.timeline[::step], "summary": summary if isinstance(summary, dict) else None}


def repeated(lib: Library, cmd: list, repeat: int, reset) -> dict:
    """``measure`` ``repeat`` times (``reset()`` before each; once when a run takes over a minute): the run
    with the median wall time, with every run's wall seconds."""
    runs = []
    for _ in range(repeat):
        reset()
        runs.append(measure(lib, cmd))
        if runs[0]["wall_s"] > 60:
            break
    runs.sort(key=lambda m: m["wall_s"])
    return dict(runs[len(runs) // 2], walls_s=[round(m["wall_s"], 2) for m in runs])


def state(folder: Path) -> Path:
    """wclip's bookkeeping of a scores folder: the sibling ``FOLDER.wclip/`` (run.json, markers, ...)."""
    return folder.with_name(folder.name + ".wclip")


def link_first(src: Path, dest: Path, names: list) -> None:
    """``dest`` holds hard links to ``names`` of ``src`` (same relative paths)."""
    for name in names:
        target = dest / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(src / name, target)


def free_page_cache_note() -> str:
    return f"{os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB free memory"


# -- curve: wclip score --embeddings --------------------------------------------------------------------------
def embeddings_curve(lib: Library, d: int, sizes: list, file_rows: int, executors, repeat: int) -> list:
    from bench_embeddings import make_folder

    files = [max(1, size // file_rows) for size in sizes]
    base = WORK / f"emb-d{d}-r{file_rows}-f{max(files)}"
    started = time.perf_counter()
    make_folder(base, max(files), file_rows, d)
    print(f"d={d}: folder of {max(files)} x {file_rows} rows ready ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    views = {}
    for n in files:
        view = WORK / f"emb-d{d}-r{file_rows}-n{n}"
        link_first(base, view, [f"{sub}_{i}.{ext}" for i in range(n) for sub, ext in
                                (("img_emb/img_emb", "npy"), ("text_emb/text_emb", "npy"),
                                 ("metadata/metadata", "parquet"))])
        views[n] = view
    stats = WORK / f"stats-d{d}-r{file_rows}.safetensors"
    if not stats.exists():
        measure(lib, lib.wclip("fit", "--embeddings", views[min(files)], "--output", stats, "--components", "all",
                               "--max-samples", min(200_000, min(files) * file_rows), "--no-progress"))
    points = []
    for executor in executors:
        for size, n in zip(sizes, files):
            out = WORK / "out-embeddings"
            m = repeated(lib, lib.wclip("score", "--embeddings", views[n], "--stats", stats, "--output", out,
                                        "--no-progress", "--executor", executor),
                         repeat, lambda out=out: shutil.rmtree(out, ignore_errors=True))
            rows = (m["summary"] or {}).get("rows")
            assert rows == n * file_rows, (rows, n * file_rows)
            shutil.rmtree(out, ignore_errors=True)
            points.append(point(executor, n * file_rows, m, files=n))
    return points


# -- curve: wclip score on tiny shards, and its resume -----------------------------------------------------------
def shard_templates() -> tuple:
    """TEMPLATES tiny tars (4 samples each) and a fit set, written with tests/shardkit.py."""
    kit = benchkit.shardkit()

    folder = WORK / "templates"
    if not (folder / "done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(TEMPLATES):
            kit.write_shard(folder / f"t{t}.tar", [kit.sample(t * 4 + j) for j in range(4)])
        (folder / "fit").mkdir(exist_ok=True)
        kit.clean_shards(folder / "fit", 8, 128, start=1000)
        (folder / "done").write_text("")
    return folder, [str(folder / "fit" / f"{s:05d}.tar") for s in range(8)]


def tiny_shards(count: int) -> tuple:
    """``count`` tiny shards (hard links to the templates) in .bench/scale/shards, and the fit set."""
    templates, fit_set = shard_templates()
    shards = WORK / "shards"
    shards.mkdir(exist_ok=True)
    started = time.perf_counter()
    for i in range(count):
        target = shards / f"{i:06d}.tar"
        if not target.exists():
            os.link(templates / f"t{i % TEMPLATES}.tar", target)
    print(f"{count} shards ready ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return shards, fit_set


def shards_curve(lib: Library, sizes: list, executors) -> list:
    shards, fit_set = tiny_shards(max(sizes))
    stats = WORK / "stats-demo.safetensors"
    if not stats.exists():
        measure(lib, lib.wclip("fit", "--input", *fit_set, "--model", "wclip-demo", "--output", stats,
                               "--no-progress", "--executor", "local"))
    points = []
    for executor in executors:
        for size in sizes:
            out = WORK / "out-shards"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(state(out), ignore_errors=True)
            cmd = lib.wclip("score", "--input", f"{shards}/{{000000..{size - 1:06d}}}.tar", "--stats", stats,
                            "--output", out, "--no-progress", "--executor", executor)
            first = measure(lib, cmd)
            written = len(list((state(out) / "shards").glob("*.json")))
            assert written == size, (written, size)
            points.append(point(executor, size, first, samples=(first["summary"] or {}).get("rows")))
            again = measure(lib, cmd)
            points.append(point(executor + "-resume", size, again))
            done = WORK / f"done-shards-{size}"
            shutil.rmtree(done, ignore_errors=True)
            shutil.rmtree(state(done), ignore_errors=True)
            out.rename(done)
            state(out).rename(state(done))  # kept for --resume-only (a later library's resume)
    return points


def copied_folder(out: Path, size: int) -> None:
    """A scored folder of ``size`` shards made of hard links to the real shards' score files and markers (of
    the smallest done-shards-N a shards run left, in turn) under every shard's name: what a resume reads
    (markers, file sizes, run.json), without scoring them all first."""
    real = min((p for p in WORK.glob("done-shards-*") if p.name.split("-")[-1].isdigit()),
               key=lambda p: int(p.name.split("-")[-1]))
    names = sorted(p.stem for p in real.glob("*.parquet"))  # links to each in turn (a file takes 65,000 at most)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(state(tmp), ignore_errors=True)
    (state(tmp) / "shards").mkdir(parents=True)
    tmp.mkdir()
    shutil.copy(state(real) / "run.json", state(tmp) / "run.json")
    for i in range(size):
        name = names[i % len(names)]
        os.link(real / f"{name}.parquet", tmp / f"{i:06d}.parquet")
        os.link(state(real) / "shards" / f"{name}.json", state(tmp) / "shards" / f"{i:06d}.json")
    tmp.rename(out)
    state(tmp).rename(state(out))


def resume_curve(lib: Library, sizes: list) -> list:
    """The resume alone, on the folders a shards run left (done-shards-SIZE; where there is none, one made by
    :func:`copied_folder`): for measuring another library, or more shards than were scored."""
    (shards, _), stats, points = tiny_shards(max(sizes)), WORK / "stats-demo.safetensors", []
    for size in sizes:
        out = WORK / f"done-shards-{size}"
        if not out.exists():
            copied_folder(out, size)
        m = repeated(lib, lib.wclip("score", "--input", f"{shards}/{{000000..{size - 1:06d}}}.tar", "--stats", stats,
                                    "--output", out, "--no-progress", "--executor", "local"), 3, lambda: None)
        assert (m["summary"] or {}).get("shards_skipped") == size, m["summary"]
        points.append(point(f"local-resume, copies, {lib.commit}", size, m))
    return points


# -- curves: wclip filter and wclip card on a large scores folder -------------------------------------------------
def template_scores(lib: Library) -> tuple:
    """A real scores folder (``wclip score --embeddings`` on 1000 rows at d = 64): the stats file, one score
    file's provenance and the folder's run.json (in its sibling state folder), which the generated files copy."""
    from bench_embeddings import make_folder

    folder, stats, out = WORK / "tiny-emb", WORK / "stats-tiny.safetensors", WORK / "tiny-scores"
    if not (state(out) / "run.json").exists():
        make_folder(folder, 1, 1000, 64)
        measure(lib, lib.wclip("fit", "--embeddings", folder, "--output", stats, "--no-progress"))
        measure(lib, lib.wclip("score", "--embeddings", folder, "--stats", stats, "--output", out, "--no-progress"))
    import pyarrow.parquet as pq

    made = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"wclip"])
    return stats, made, state(out) / "run.json"


def hex_strings(raw: np.ndarray):
    """An Arrow string array of the rows of a (n, k) uint8 array as 2k lowercase hex digits each."""
    import pyarrow as pa

    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    chars = np.empty((raw.shape[0], raw.shape[1] * 2), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = np.arange(raw.shape[0] + 1, dtype=np.int32) * chars.shape[1]
    return pa.Array.from_buffers(pa.string(), raw.shape[0], [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def scores_file(n: int, rows: int, made: dict):
    """Score file number ``n``: ``rows`` rows in pipeline.scores.table's SCHEMA (1% failed at decode, image scores
    null there), scores drawn like a d = 64 fit's, a DataComp-style uid, the provenance of a real file."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.scores.provenance import PROVENANCE_KEY
    from pipeline.scores.table import SCHEMA
    from pipeline.whitening.formulas import loglik_from_sqnorm

    rng = np.random.default_rng([22, n])
    shard = f"/data/laion/{n:06d}.tar"
    index = np.arange(rows, dtype=np.int32)
    key = pc.binary_join_element_wise(f"{n:06d}", pc.utf8_lpad(pa.array(index).cast(pa.string()), 5, "0"), "")
    failed = rng.random(rows) < 0.01
    status = pa.array(np.where(failed, "decode", "ok"))
    error = pa.array(np.where(failed, "decode: cannot identify image file", None), type=pa.string())
    columns = {"key": key, "shard": pa.array([shard] * rows), "index": pa.array(index),
               "url": pc.binary_join_element_wise("https://example.com/images/", key, ".jpg", ""),
               "uid": hex_strings(rng.integers(0, 256, (rows, 16), dtype=np.uint8)),
               "caption": pc.binary_join_element_wise("a photo of thing ", key, " on a table", ""),
               "status": status, "error": error}
    m = 64
    for tower, bad in (("image", failed), ("text", np.zeros(rows, bool))):
        sq = rng.chisquare(m, rows).astype(np.float32)
        columns[f"{tower}_sqnorm"] = pa.array(sq, mask=bad)
        columns[f"{tower}_loglik"] = pa.array(loglik_from_sqnorm(sq, m).astype(np.float32), mask=bad)
        columns[f"{tower}_pvalue"] = pa.array(rng.random(rows, dtype=np.float32), mask=bad)
    columns["clip_score"] = pa.array(rng.normal(0.3, 0.05, rows).astype(np.float32), mask=failed)
    table = pa.Table.from_arrays([columns[f.name] for f in SCHEMA], schema=SCHEMA)
    made = dict(made, input={"url": shard, "size": 10_000 * 40_000, "mtime": "2026-12-04T00:00:00+00:00"})
    return table.replace_schema_metadata({**SCHEMA.metadata, PROVENANCE_KEY: json.dumps(made, sort_keys=True)})


def scores_folders(lib: Library, sizes: list, file_rows: int) -> tuple:
    """One folder of max(sizes) rows in files of ``file_rows``; a view (hard links) per size."""
    lib.import_here()
    from pipeline.scores.table import table_bytes

    stats, made, run_json = template_scores(lib)
    files = [max(1, size // file_rows) for size in sizes]
    base = WORK / f"scores-r{file_rows}"  # files are written atomically, numbered: a larger size adds files
    started = time.perf_counter()
    base.mkdir(parents=True, exist_ok=True)
    state(base).mkdir(parents=True, exist_ok=True)
    shutil.copy(run_json, state(base) / "run.json")
    for n in range(max(files)):
        path = base / f"{n:06d}.parquet"
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(table_bytes(scores_file(n, file_rows, made)))
            tmp.rename(path)
    print(f"scores folder of {max(files)} x {file_rows} rows ready ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr)
    views = {}
    for n in files:
        views[n] = WORK / f"scores-r{file_rows}-n{n}"
        link_first(base, views[n], [f"{i:06d}.parquet" for i in range(n)])
        link_first(state(base), state(views[n]), ["run.json"])
    return stats, views, files


def filter_curve(lib: Library, sizes: list, file_rows: int, repeat: int, variants) -> list:
    """``variants``: "uids" (as typed: kept rows and uids.npy) and/or "no-uids" (``--no-uids``)."""
    _, views, files = scores_folders(lib, sizes, file_rows)
    points = []
    for variant in variants:
        for n in files:
            out = WORK / "out-filter"
            m = repeated(lib, lib.wclip("filter", "--scores", views[n], "--output", out,
                                        "--keep-fraction", "clip_score=0.3", "--no-progress",
                                        *(["--no-uids"] if variant == "no-uids" else [])),
                         repeat, lambda out=out: shutil.rmtree(out, ignore_errors=True))
            report = m["summary"] or {}
            assert report.get("rows") == n * file_rows, (report.get("rows"), n * file_rows)
            shutil.rmtree(out, ignore_errors=True)
            points.append(point(variant, n * file_rows, m, files=n, kept=report.get("kept"),
                                passes=[c.get("passes") for c in report.get("conditions", [])]))
    return points


def card_curve(lib: Library, sizes: list, file_rows: int, repeat: int) -> list:
    stats, views, files = scores_folders(lib, sizes, file_rows)
    points = []
    for n in files:
        out = WORK / "out-card"
        m = repeated(lib, lib.wclip("card", "--scores", views[n], "--stats", stats, "--output", out,
                                    "--no-thumbnails"), repeat, lambda out=out: shutil.rmtree(out, ignore_errors=True))
        card = json.loads((out / "card.json").read_text())
        assert card["rows"] == n * file_rows, (card["rows"], n * file_rows)
        shutil.rmtree(out, ignore_errors=True)
        points.append(point("none", n * file_rows, m, files=n))
    return points


# -- reporting ---------------------------------------------------------------------------------------------------
def point(executor: str, units: int, m: dict, **extra) -> dict:
    job = (m["summary"] or {}).get("elapsed_s")
    return {"executor": executor, "units": units, "wall_s": round(m["wall_s"], 2), "cpu_s": round(m["cpu_s"], 2),
            "job_s": round(job, 2) if isinstance(job, (int, float)) else None,
            "peak_pss_mb": round(m["peak_pss_mb"]), "driver_pss_mb": round(m["driver_pss_mb"]),
            "processes": m["processes"], "load_before": round(m["load_before"], 2), "walls_s": m.get("walls_s"),
            "pss_timeline": m["pss_timeline"], **extra}


def table(curve: str, unit: str, points: list) -> str:
    """Markdown: one row per executor and size (wall and CPU seconds, per unit and marginal: the cost of the
    units added since the previous size), then per executor the ratios largest/smallest."""
    lines = [f"| executor | {unit}s | wall s | CPU s | wall us per {unit} | marginal wall us per {unit} | "
             f"CPU us per {unit} | peak PSS MB (driver) | load before |", "|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for executor in dict.fromkeys(p["executor"] for p in points):
        run = sorted((p for p in points if p["executor"] == executor), key=lambda p: p["units"])
        marginal = [(b["wall_s"] - a["wall_s"]) / (b["units"] - a["units"]) for a, b in zip(run, run[1:])]
        for i, p in enumerate(run):
            lines.append(f"| {executor} | {p['units']:,} | {p['wall_s']:.1f} | {p['cpu_s']:.1f} | "
                         f"{1e6 * p['wall_s'] / p['units']:.3g} | {f'{1e6 * marginal[i - 1]:.3g}' if i else ''} | "
                         f"{1e6 * p['cpu_s'] / p['units']:.3g} | {p['peak_pss_mb']} ({p['driver_pss_mb']}) | "
                         f"{p['load_before']} |")
        lo, hi = run[0], run[-1]
        per = {k: (hi[k] / hi["units"]) / (lo[k] / lo["units"]) for k in ("wall_s", "cpu_s")}
        summary.append(f"{curve} {executor}: {lo['units']:,} -> {hi['units']:,} {unit}s ({hi['units'] / lo['units']:.0f}x): "
                       f"per-{unit} cost ratio largest/smallest: wall {per['wall_s']:.2f}, CPU {per['cpu_s']:.2f}"
                       + (f", marginal last/first segment {marginal[-1] / marginal[0]:.2f}" if len(marginal) > 1 and marginal[0] > 0 else "")
                       + f"; peak PSS ratio {hi['peak_pss_mb'] / lo['peak_pss_mb']:.2f}, "
                       f"driver {hi['driver_pss_mb'] / lo['driver_pss_mb']:.2f}")
    return "\n".join(lines + [""] + summary)


def merged() -> dict:
    """Per curve, the latest measured point of each (executor, size) over every run in RESULTS, with the
    commits and the commands that measured them."""
    curves = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        c = curves.setdefault(r["curve"], {"unit": r["unit"], "points": {}, "runs": {}})
        for p in r["points"]:
            c["points"][(p["executor"], p["units"])] = dict(p, commit=r["commit"], started=r["started"])
        c["runs"][(r["started"], r["command"])] = r["commit"]
    for c in curves.values():
        c["points"] = list(c["points"].values())
        used = {p["started"] for p in c["points"]}
        c["commands"] = [f"{started}: {command} (library {commit})"
                         for (started, command), commit in sorted(c["runs"].items()) if started in used]
        c["commits"] = sorted({p["commit"] for p in c["points"]})
    return curves


def report() -> None:
    """Print every curve's table from the merged results."""
    for curve, c in sorted(merged().items(), key=lambda kv: list(CURVES).index(kv[0])):
        print(f"\n### {curve}\n")
        print("\n".join(f"    {line}" for line in c["commands"]))
        print()
        print(table(curve, c["unit"], c["points"]))


def plot(path: Path) -> None:
    """docs/scale.png: seconds and peak PSS against units, per curve and executor (latest result of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = merged()
    fig, axes = plt.subplots(2, len(latest), figsize=(4 * len(latest), 7), squeeze=False)
    for col, (curve, r) in enumerate(sorted(latest.items(), key=lambda kv: list(CURVES).index(kv[0]))):
        for executor in dict.fromkeys(p["executor"] for p in r["points"]):
            run = sorted((p for p in r["points"] if p["executor"] == executor), key=lambda p: p["units"])
            x = [p["units"] for p in run]
            label = "" if executor == "none" else executor
            axes[0][col].loglog(x, [p["wall_s"] for p in run], "o-", label=label)
            axes[1][col].semilogx(x, [p["peak_pss_mb"] for p in run], "o-", label=label)
        lo = min(p["units"] for p in r["points"])
        hi = max(p["units"] for p in r["points"])
        ref = min(p["wall_s"] for p in r["points"] if p["units"] == hi)
        axes[0][col].loglog([lo, hi], [ref * lo / hi, ref], "k:", lw=1, label="linear")
        axes[0][col].set_title(f"{curve} ({', '.join(r['commits'])})", fontsize=9)
        axes[1][col].set_xlabel(f"{r['unit']}s")
        axes[1][col].set_ylim(bottom=0)
        axes[0][col].legend(fontsize=7)
    axes[0][0].set_ylabel("wall seconds")
    axes[1][0].set_ylabel("peak PSS of the process tree, MB")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--curve", choices=sorted(CURVES))
    p.add_argument("--sizes", type=int, nargs="+", help="units (rows or shards) per point")
    p.add_argument("--quick", action="store_true", help="the two smallest default sizes (minutes)")
    p.add_argument("--executors", help="comma-separated: local,ray (score curves); uids,no-uids (filter: as typed, "
                   "and with --no-uids)")
    p.add_argument("--repeat", type=int, default=1, help="runs per point (the median wall time is kept); "
                   "the shards curve runs each point once")
    p.add_argument("--resume-only", action="store_true", help="shards: time the resume alone on the folders an "
                   "earlier shards run left (.bench/scale/done-shards-SIZE), or on copies of one of its shards")
    p.add_argument("--file-rows", type=int, help="rows per generated file (default: per curve)")
    p.add_argument("--commit", default="HEAD", help="the library commit to measure")
    p.add_argument("--plot", nargs="?", const=str(ROOT / "docs" / "scale.png"), help="draw the plot (path)")
    p.add_argument("--report", action="store_true", help="print the tables of every curve from the saved results")
    p.add_argument("--clean", action="store_true", help="delete .bench/scale's generated inputs and exit")
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.clean:
        for entry in WORK.iterdir():
            if entry.name not in ("results.jsonl", "snapshot"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return 0
    if args.curve is None:
        if not (args.plot or args.report):
            p.error("--curve is needed (or --report / --plot / --clean)")
        if args.report:
            report()
        if args.plot:
            plot(Path(args.plot))
        return 0
    sizes, quick, unit, file_rows, executors = CURVES[args.curve]
    sizes = args.sizes or (quick if args.quick else sizes)
    file_rows = args.file_rows or file_rows
    executors = args.executors.split(",") if args.executors else executors
    lib = Library(args.commit)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{args.curve}: sizes {sizes}, library {lib.commit}, load {os.getloadavg()[0]:.2f}, "
          f"{free_page_cache_note()}", file=sys.stderr)
    if args.curve.startswith("embeddings"):
        points = embeddings_curve(lib, int(args.curve[len("embeddings"):]), sizes, file_rows, executors, args.repeat)
    elif args.curve == "shards" and args.resume_only:
        points = resume_curve(lib, sizes)
    elif args.curve == "shards":
        points = shards_curve(lib, sizes, executors)
    elif args.curve == "filter":
        points = filter_curve(lib, sizes, file_rows, args.repeat, executors)
    else:
        points = card_curve(lib, sizes, file_rows, args.repeat)
    result = {"curve": args.curve, "unit": unit, "commit": lib.commit, "started": started,
              "ended": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "file_rows": file_rows,
              "cpus": os.cpu_count(), "command": "bench/bench_scale.py " + " ".join(argv or sys.argv[1:]),
              "points": points}
    with open(RESULTS, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    print(table(args.curve, unit, points))
    if args.plot:
        plot(Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

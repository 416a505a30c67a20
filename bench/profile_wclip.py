"""Where `wclip score`'s time goes: a wall-clock timeline, an on-CPU breakdown and per-sample stage costs.
Report only: it changes nothing in the library.

    .venv/bin/python bench/profile_wclip.py                      # the 50-sample shard and 12 x 1000
    .venv/bin/python bench/profile_wclip.py --case fixed50 --no-pyspy
    .venv/bin/python bench/profile_wclip.py --use-snapshot .bench/peers/snapshot/<digest>   # as bench_peers ran

Uses the shards and stats of bench_peers.py (.bench/peers/; made when missing).

1. Timeline (no profiler attached): `wclip score` run through a small driver that wraps, in the driver
   process only, ray.init, runtime.start_encoders + runtime.encoder_info (returns once a worker has
   imported torch/open_clip, loaded the model and run a first forward), runtime.run_shards and
   ray.shutdown with timestamps; the process start comes from /proc, the exit from the parent. The
   shards' completion markers (written time, duration) place the reader tasks on the same clock.
2. py-spy over every Python process of a second run (``py-spy record --subprocesses``; raylet and GCS
   are C++ and not sampled; a Ray worker started through an exec, as encoder actors with a runtime env,
   is lost by the follower, so a second py-spy attaches to any encoder actor by pid). Stacks are put in
   stages and processes by their frames. py-spy counts non-idle stacks, including ones waiting for a
   core, and slows the job down: read the shares, not the seconds.
3. Stage costs: one 1000-sample shard through the reader task's own code (runtime._shard_task, the
   model in the task as on CPU-only nodes) in this process, without Ray, under cProfile; per sample.

Output: tables on stdout and .bench/profile/{profile-<case>,stages}-<time>.json (+ the raw py-spy stacks;
``--reparse`` re-reads them).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench_peers  # the benchmark's shards and stats: the same inputs profiled
import benchkit
from benchkit import ROOT, pattern

WORK = ROOT / ".bench" / "profile"


# -- 1. timeline ------------------------------------------------------------------------------------
def _process_start(pid: str = "self") -> float:
    """Epoch seconds at which process ``pid`` started (from /proc)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
    with open("/proc/stat") as fh:
        btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def driver(out_json: str, argv: list) -> int:
    """Run ``wclip ARGV`` in this process with timestamps around the driver's phases."""
    entered = time.time()
    events: list = []

    def wrap(owner, name):
        fn = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.time()
            try:
                return fn(*a, **kw)
            finally:
                events.append({"phase": name, "start": t0, "end": time.time()})
        setattr(owner, name, timed)

    import ray

    import pipeline.executors.ray as runtime
    from pipeline.cli import main

    imported = time.time()
    for owner, name in ((ray, "init"), (ray, "shutdown"), (runtime, "start_encoders"),
                        (runtime, "encoder_info"), (runtime, "run_shards")):
        wrap(owner, name)
    main_start = time.time()
    try:
        rc = main(argv)
    finally:
        Path(out_json).write_text(json.dumps({
            "process_start": _process_start(), "entered": entered, "imported": imported,
            "main_start": main_start, "main_end": time.time(), "events": events}))
    return rc


def timeline(urls: list, stats: Path, out: Path, tag: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    trace = WORK / f"timeline-{tag}.json"
    args = ["score", "--input", pattern(urls), "--stats", str(stats), "--output", str(out)]
    cmd = [sys.executable, __file__, "--driver", str(trace), "--", *args]
    load = os.getloadavg()
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=benchkit.command_env(), cwd=bench_peers.WORK)
    t_exit = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"wclip score failed:\n{proc.stderr[-3000:]}")
    tr = json.loads(trace.read_text())
    ev = {e["phase"]: e for e in tr["events"]}
    start = min(tr["process_start"], t0)
    phases = [
        ("python start + imports (pipeline.cli, ray, runtime)", start, tr["imported"]),
        ("cli: parse, load stats, check inputs", tr["main_start"], ev["init"]["start"]),
        ("ray.init (local Ray: GCS, raylet, workers)", ev["init"]["start"], ev["init"]["end"]),
        ("encoders: start + wait for their info (a worker starts, imports torch/open_clip, loads the model, "
         "runs a first forward; an actor on GPUs, one task on CPU-only nodes)",
         ev["start_encoders"]["start"], ev["encoder_info"]["end"]),
        ("run_shards (read, decode, encode, whiten, write all shards)",
         ev["run_shards"]["start"], ev["run_shards"]["end"]),
        ("ray.shutdown", ev["shutdown"]["start"], ev["shutdown"]["end"]),
        ("after shutdown: summary, interpreter exit", ev["shutdown"]["end"], t_exit),
    ]
    total = t_exit - start
    rows = [{"phase": name, "seconds": round(b - a, 3), "share": round((b - a) / total, 3)} for name, a, b in phases]
    rows.append({"phase": "unaccounted (between phases)",
                 "seconds": round(total - sum(r["seconds"] for r in rows), 3), "share": None})
    # reader tasks on the same clock, from the completion markers
    tasks = []
    for marker in sorted(out.with_name(out.name + ".wclip").glob("shards/*.json")):  # the sibling state folder
        m = json.loads(marker.read_text())
        end = datetime.datetime.fromisoformat(m["provenance"]["written"]).timestamp()
        tasks.append({"shard": m["name"], "start": end - m["duration_s"], "end": end, "rows": m["rows"]})
    rs = ev["run_shards"]
    shard_view = {}
    if tasks:
        tasks.sort(key=lambda t: t["start"])
        shard_view = {
            "first_task_starts_after_run_shards_s": round(tasks[0]["start"] - rs["start"], 3),
            "first_shard_done_after_run_shards_s": round(min(t["end"] for t in tasks) - rs["start"], 3),
            "last_shard_done_after_run_shards_s": round(max(t["end"] for t in tasks) - rs["start"], 3),
            "median_task_duration_s": round(sorted(t["end"] - t["start"] for t in tasks)[len(tasks) // 2], 3),
            "task_seconds_total": round(sum(t["end"] - t["start"] for t in tasks), 3),
            "rows": sum(t["rows"] for t in tasks),
        }
    summary = benchkit.last_json(proc.stdout)
    return {"total_s": round(total, 3), "phases": rows, "shards": shard_view, "load_before": list(load),
            "command": "wclip " + " ".join(args), "wclip_summary_samples_per_s": summary.get("samples_per_s")}


# -- 2. on-CPU breakdown ----------------------------------------------------------------------------
# (stage, test on the frame list), first match wins; frames are "function (file:line)" strings, methods
# as "Class.method"
def _has(frames, func=None, file=None):
    for f in frames:
        m = _FRAME.match(f)
        if not m:
            continue
        fn, path = m.group(1), m.group(2)
        if (func is None or fn == func or fn.endswith("." + func)) and (file is None or file in path):
            return True
    return False


_FRAME = re.compile(r"^(.*?) \((.*?)(?::\d+)?\)$")
RULES = [
    ("imports", lambda f: _has(f, "_find_and_load")),
    ("Ray start (ray.init, driver)", lambda f: _has(f, "init", "ray/_private/worker.py")),
    ("Ray stop (ray.shutdown, driver)", lambda f: _has(f, "shutdown", "ray/_private/worker.py")),
    ("model load (open_clip create + weights)", lambda f: _has(f, "load_spec", "pipeline/models.py")),
    ("encode: image tower", lambda f: _has(f, "embed_images", "pipeline/flow/encode.py")),
    ("encode: text tower", lambda f: _has(f, "embed_texts", "pipeline/flow/encode.py")),
    ("encode: other (first forward, device decode)", lambda f: _has(f, None, "pipeline/flow/encode.py")
     or _has(f, "info", "pipeline/executors/ray.py")),
    ("whiten (NumPy/torch)", lambda f: _has(f, None, "pipeline/flow/whiten.py")),
    ("write (Parquet + marker)", lambda f: _has(f, "finish", "pipeline/scores/sinks.py")
     or _has(f, None, "pipeline/scores/table.py")),
    ("assemble rows", lambda f: _has(f, None, "pipeline/flow/assemble.py")),
    ("decode: JPEG (PIL)", lambda f: _has(f, None, "pipeline/flow/decode.py")
     and (_has(f, "load", "PIL/ImageFile.py") or _has(f, "draft", "PIL/") or _has(f, "open", "PIL/Image.py"))),
    ("preprocess (resize/crop)", lambda f: _has(f, None, "pipeline/flow/preprocess.py")),
    ("decode: other (checks, metadata)", lambda f: _has(f, None, "pipeline/flow/decode.py")),
    ("tokenize + stack chunk", lambda f: _has(f, "build_chunk", "pipeline/flow/batch.py")),
    ("read (tar members)", lambda f: _has(f, None, "pipeline/flow/read.py")),
    ("Ray: object transfer / serialisation", lambda f: _has(f, None, "ray/_private/serialization.py")
     or _has(f, "get", "ray/_private/worker.py") or _has(f, "put", "ray/_private/worker.py")),
    ("Ray: worker main loop / task plumbing", lambda f: _has(f, None, "ray/_private/worker.py")
     or _has(f, None, "ray/_private/function_manager.py") or _has(f, None, "ray/_raylet")),
    ("Ray: agents, log monitor, other Ray Python", lambda f: _has(f, None, "ray/")),
]


def _where(frames: list) -> str:
    """Which process a stack comes from (py-spy's raw output labels every stack with the root process)."""
    top = frames[0] if frames else ""
    if "(wclip:" in top:
        return "driver"
    if _has(frames, "_shard_task", "pipeline/executors/ray.py"):
        return "reader task (on CPU-only nodes it also encodes)"
    if _has(frames, None, "pipeline/flow/encode.py") or _has(frames, None, "pipeline/flow/stage.py") \
            or _has(frames, "_local_info", "pipeline/executors/ray.py") or _has(frames, None, "pipeline/models.py"):
        return "encoder (actor, or the task that checks the model)"
    if "default_worker.py" in top or "setup_worker.py" in top:
        return "Ray worker outside a task (start-up, first-task deserialisation, idle loop)"
    return "Ray's own Python processes (dashboard, agents, log monitor, monitor)"


def parse_pyspy(paths: list) -> dict:
    stages: collections.Counter = collections.Counter()
    where: collections.Counter = collections.Counter()
    by: collections.Counter = collections.Counter()
    total = 0
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            # --subprocesses output starts each line with 'process PID:"cmdline";', --pid output does not
            m = re.match(r'^(?:process (\d+):"(.*)";)?(.*) (\d+)$', line)
            if not m:
                continue
            frames, n = m.group(3).split(";"), int(m.group(4))
            stage = next((name for name, test in RULES if test(frames)), "other")
            if stage == "imports" and _has(frames, "_deserialize_pickle5_data"):
                stage = "imports (Ray worker, triggered by its first task's function/arguments)"
            place = _where(frames)
            stages[stage] += n
            where[place] += n
            by[(place, stage)] += n
            total += n
    return {"samples": total, "stages": stages.most_common(), "where": where.most_common(),
            "by_where_stage": [(a, b, n) for (a, b), n in by.most_common()]}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find_pyspy() -> str:
    """py-spy beside this Python, else on PATH; exits saying how to install it."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy (into .venv or a virtualenv under .bench/)")
    return spy


def pyspy(urls: list, stats: Path, out: Path, tag: str, rate: int) -> dict:
    """py-spy over the job's process tree. The encoder actor is started through Ray's runtime-env set-up
    (an exec), which the --subprocesses follower loses, so a second py-spy attaches to it by pid."""
    import threading

    spy = find_pyspy()
    shutil.rmtree(out, ignore_errors=True)
    raw, raw_enc = WORK / f"pyspy-{tag}.txt", WORK / f"pyspy-{tag}-encoder.txt"
    raw_enc.unlink(missing_ok=True)
    wclip = str(Path(sys.executable).parent / "wclip")
    common = ["--nonblocking", "--rate", str(rate), "--format", "raw"]
    cmd = [spy, "record", "--subprocesses", *common, "--output", str(raw), "--", wclip, "score",
           "--input", pattern(urls), "--stats", str(stats), "--output", str(out)]
    load = os.getloadavg()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=benchkit.command_env(),
                            cwd=bench_peers.WORK)
    attached: list = []

    def watch():
        while proc.poll() is None and not attached:
            for pid in benchkit.tree(proc.pid):
                if _cmdline(pid).startswith(("ray::EncoderActor", "ray::EncodeStage")):
                    attached.append(subprocess.Popen([spy, "record", "--pid", str(pid), *common, "--output",
                                                      str(raw_enc)], stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL))
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    for p in attached:
        p.wait(timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"py-spy run failed:\n{err[-3000:]}")
    res = parse_pyspy([raw] + ([raw_enc] if raw_enc.exists() else []))
    res.update(wall_s=round(time.time() - t0, 2), rate=rate, load_before=list(load), raw=str(raw),
               encoder_actor_seen=bool(attached), encoder_attached=bool(attached and raw_enc.exists()))
    return res


# -- 3. stage costs in one process --------------------------------------------------------------------
def stages(url: str, stats_path: Path, out: Path, threads: int = 1) -> dict:
    """One shard through the job's own code in this process, without Ray: the reader task
    (runtime._shard_task) with the model in the task, as on CPU-only nodes, under cProfile. Gives the cost of
    each stage per sample, free of start-up and scheduling, with one torch thread (what each of this
    machine's reader tasks gets: CPUs / tasks in flight)."""
    import cProfile
    import pstats
    import types
    import uuid

    from pipeline.config import EncodeConfig, RunConfig
    from pipeline.executors import ray as runtime
    from pipeline.models import ModelSpec
    from pipeline.scores.sinks import ScoreSink
    from pipeline.whitening import StatsFile

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stats = StatsFile.load(str(stats_path))
    run = RunConfig(shards=(url,), model=ModelSpec("wclip-demo"),
                    encode=EncodeConfig(normalize=bool(stats.metadata.get("normalize")), threads=threads))
    t0 = time.perf_counter()
    real_ray = runtime.ray
    if hasattr(runtime, "Encoders"):  # the model inside the reader task (CPU-only nodes)
        encoders = runtime.Encoders([], (uuid.uuid4().hex, run.model, run.encode, stats))
        transforms = None
        runtime._local_stage(encoders.local)
    else:  # an encoder actor, called in-process: .process.remote(...) returns the result, ray.get is the identity
        actor = runtime.EncoderActor(run.model, run.encode, stats)
        encoders = [types.SimpleNamespace(process=types.SimpleNamespace(remote=actor.process))]
        transforms = actor.transforms()
        runtime.ray = types.SimpleNamespace(get=lambda ref: ref)
    setup_s = time.perf_counter() - t0
    try:
        sink = ScoreSink(str(out))
        runtime._shard_task(url, run, encoders, transforms, sink)  # warm-up (first forward, lazy imports)
        t0 = time.perf_counter()
        runtime._shard_task(url, run, encoders, transforms, sink)
        plain_s = time.perf_counter() - t0
        prof = cProfile.Profile()
        prof.enable()
        runtime._shard_task(url, run, encoders, transforms, sink)
        prof.disable()
    finally:
        runtime.ray = real_ray
    st = pstats.Stats(prof)
    cum: dict = {}
    for (path, _line, fn), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        cum[(path, fn)] = cum.get((path, fn), 0.0) + ct

    def c(file_part, fn):
        return sum(v for (p, f), v in cum.items() if file_part in p and f == fn)

    total = c("pipeline/executors/ray.py", "_shard_task")
    decode = c("pipeline/flow/decode.py", "_load_image")
    preprocess = c("pipeline/flow/preprocess.py", "__call__")
    prepare = c("pipeline/flow/decode.py", "prepare_sample")
    build = c("pipeline/flow/batch.py", "build_chunk")
    image = c("pipeline/flow/encode.py", "embed_images")
    text = c("pipeline/flow/encode.py", "embed_texts")
    encode = c("pipeline/flow/encode.py", "encode")
    whiten = c("pipeline/flow/whiten.py", "score")
    local_stage = c("pipeline/executors/ray.py", "_local_stage")
    assemble = c("pipeline/flow/assemble.py", "add")
    write = c("pipeline/scores/sinks.py", "finish")
    read = total - prepare - build - encode - whiten - assemble - write - local_stage  # reader generator, loop
    rows = [("read tar + group members (ShardReader, loop)", read),
            ("decode JPEG (PIL open + load)", decode),
            ("preprocess (resize, crop, to uint8)", preprocess),
            ("rest of prepare_sample (metadata JSON, checks)", prepare - decode - preprocess),
            ("tokenize + stack chunk (build_chunk)", build),
            ("image tower (incl. ToTensor/Normalize)", image),
            ("text tower", text),
            ("rest of encode", encode - image - text),
            ("whiten + p-values + clip_score (ChunkScorer.score)", whiten),
            ("assemble rows", assemble),
            ("write Parquet + marker (ScoreSink.finish)", write)]
    samples = bench_peers.count_samples([url])
    return {"shard": url, "samples": samples, "torch_threads": threads, "encoder_setup_s": round(setup_s, 3),
            "model_in_task": hasattr(runtime, "Encoders"),
            "shard_s_without_profiler": round(plain_s, 3), "shard_s_profiled": round(total, 3),
            "stages": [{"stage": k, "s": round(v, 4), "ms_per_sample": round(1000 * v / samples, 3),
                        "share": round(v / total, 3)} for k, v in rows]}


def print_stages(st: dict) -> None:
    print(f"\n## stage costs, one {st['samples']}-sample shard in one process without Ray (cProfile; "
          f"{st['shard_s_without_profiler']:.2f} s without the profiler, {st['shard_s_profiled']:.2f} s with; "
          f"torch threads {st['torch_threads']}; encoder set-up {st['encoder_setup_s']:.2f} s)")
    print("| stage | ms/sample | share |\n|---|---|---|")
    for r in st["stages"]:
        print(f"| {r['stage']} | {r['ms_per_sample']:.3f} | {100 * r['share']:.0f}% |")


def print_report(tag: str, tl: dict, spy: dict | None) -> None:
    if tl:
        print(f"\n## {tag}: timeline (no profiler), total {tl['total_s']:.2f} s, load before {tl['load_before'][0]:.2f}")
        print("| phase | s | share |\n|---|---|---|")
        for r in tl["phases"]:
            share = f"{100 * r['share']:.0f}%" if r["share"] is not None else ""
            print(f"| {r['phase']} | {r['seconds']:.2f} | {share} |")
        if tl["shards"]:
            print("reader tasks (from the markers):", json.dumps(tl["shards"]))
    if spy:
        print(f"\n## {tag}: on-CPU samples under py-spy ({spy['samples']} samples at {spy['rate']} Hz, "
              f"run {spy['wall_s']} s with the profiler, load before {spy['load_before'][0]:.2f})")
        print("| stage | share of CPU samples |\n|---|---|")
        for stage, n in spy["stages"]:
            print(f"| {stage} | {100 * n / spy['samples']:.1f}% |")
        print("| process | share of CPU samples |\n|---|---|")
        for w, n in spy["where"]:
            print(f"| {w} | {100 * n / spy['samples']:.1f}% |")
        if spy.get("encoder_actor_seen") and not spy.get("encoder_attached"):
            print("(the encoder actor was not sampled: py-spy could not attach to it)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--driver"]:
        return driver(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("fixed50", "12x1000", "both"), default="both")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--no-pyspy", action="store_true")
    ap.add_argument("--no-stages", action="store_true", help="skip the one-process stage costs")
    ap.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    ap.add_argument("--snapshot", action="store_true", help="as bench_peers.py --snapshot")
    ap.add_argument("--use-snapshot", metavar="DIR", help="as bench_peers.py --use-snapshot")
    ap.add_argument("--reparse", action="store_true",
                    help="only re-read the raw py-spy files of the last run (.bench/profile/pyspy-*.txt)")
    args = ap.parse_args(argv)
    if args.reparse:
        for raw in sorted(WORK.glob("pyspy-*.txt")):
            if not raw.name.endswith("-encoder.txt"):
                enc = raw.with_name(raw.stem + "-encoder.txt")
                res = parse_pyspy([raw] + ([enc] if enc.exists() else []))
                res.update(rate=args.rate, wall_s="?", load_before=[float("nan")], encoder_attached=enc.exists())
                print_report(raw.stem[len("pyspy-"):], {}, res)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    bench_peers.WORK.mkdir(parents=True, exist_ok=True)
    benchkit.use_snapshot(args)
    wclip = str(Path(sys.executable).parent / "wclip")
    pool = bench_peers.ensure_shards(bench_peers.WORK / "data" / f"s{args.samples}", max(args.shards, 2),
                                     args.samples, 0)
    stats = bench_peers.ensure_stats(wclip, pool[:2], bench_peers.WORK / f"stats-s{args.samples}.safetensors")
    cases = {"fixed50": bench_peers.ensure_shards(bench_peers.WORK / "data" / "fixed50", 1, 50, 1),
             f"{args.shards}x{args.samples}": pool[:args.shards]}
    if args.case != "both":
        cases = {k: v for k, v in cases.items() if k == args.case or (args.case == "12x1000" and k != "fixed50")}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for tag, urls in cases.items():
        tl = timeline(urls, stats, WORK / f"out-{tag}", tag)
        spy = None if args.no_pyspy else pyspy(urls, stats, WORK / f"out-{tag}-pyspy", tag, args.rate)
        print_report(tag, tl, spy)
        path = WORK / f"profile-{tag}-{stamp}.json"
        path.write_text(json.dumps({"case": tag, "timeline": tl, "pyspy": spy, "cpus": os.cpu_count(),
                                    "snapshot": dict(benchkit.SNAPSHOT) or None}, indent=1))
        print(f"results: {path}")
    if not args.no_stages:
        st = stages(pool[0], stats, WORK / "out-stages")
        print_stages(st)
        path = WORK / f"stages-{stamp}.json"
        path.write_text(json.dumps(st, indent=1))
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

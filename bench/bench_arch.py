"""Real architectures (issue #22): `wclip score` end to end against the model alone, for ViT-B-32 and ViT-L-14
with random weights, side by side in one run. Not a test: run it by hand and read the table.

    .venv/bin/python bench/bench_arch.py --snapshot                        # 3 rounds of loop + wclip per model
    .venv/bin/python bench/bench_arch.py --snapshot --tools loop,loop-split,wclip --rounds 2
    .venv/bin/python bench/bench_arch.py --snapshot --profile --rounds 0     # where wclip's time goes (py-spy)
    python3 bench/bench_arch.py --device cuda                                # on a GPU: bf16, batches of 256

Data: tar shards (tests/shardkit.py) of photographic-like JPEGs of 300-800 px per side (bench/bench_decode.py's
generator, quality 90) with a caption and a .json each, under ``.bench/arch/``; a model uses the first
``--images NAME=N`` of them, ``--per-shard`` to a shard. With ``--distinct K`` only K shards are made and the
others are hard links to them (on a GPU, tens of thousands of images; all are still decoded). Stats: an untimed
``wclip fit`` with the same ``--model NAME --random-init`` (the stats file records that identity; ``score``
refuses another model), all components with shrinkage 0.1 (a real-size d x d whitening on a few dozen samples).

Sides, each a fresh process, in rounds that alternate their order:

* ``loop``: the model only. The shards are read, decoded, preprocessed and tokenized by wclip's own reader code
  *before* the clock starts, and normalised to float tensors; timed is only ``encode_image`` + ``encode_text``
  on batches of ``--per-shard`` samples (the chunk wclip's model sees), torch's default threads (all cores),
  fp32, inference mode, after one untimed warm-up batch. No decode, read or write. With ``--device cuda``: the
  tensors already on the GPU, bf16 autocast and channels_last as wclip's encoder, batches of 256.
* ``loop-split``: the same model-only loop in one process per core, one torch thread each, the batches split
  between them (the thread split wclip's local executor uses), all started together: the model's own rate under
  wclip's split, without wclip's reading, decoding and writing.
* ``wclip``: ``wclip score --model NAME --random-init`` as a user types it. Its steady rate is its job summary
  (``samples_per_s``: from the first shard to the last marker; imports and the model's build excluded); the
  wall rate counts the whole command. With ``--device cuda``: ``--device cuda --precision bf16 --batch-size B
  --chunk-size B`` (a private local Ray: GPUs need the Ray executor).

Ratios: wclip steady / loop (the goal: >= 0.9), and, with ``loop-split``, wclip / loop-split (what reading,
decoding and writing cost beside the model) and loop-split / loop (what the thread split costs or gives).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchkit
from benchkit import ROOT, WCLIP, pattern

WORK = ROOT / ".bench" / "arch"
TOOLS = ("loop", "loop-split", "wclip")
DEFAULTS = {  # per device: samples per shard (= the batch), images per model, distinct shards (None: all)
    "cpu": {"per_shard": 16, "images": {"ViT-B-32": 128, "ViT-L-14": 64}, "distinct": None},
    "cuda": {"per_shard": 256, "images": {"ViT-B-32": 16384, "ViT-L-14": 8192}, "distinct": 16},
}
NOUNS = ("dog", "harbour", "mountain", "bicycle", "kitchen", "street market", "forest path", "violin")
ADJECTIVES = ("a small", "an old", "a red", "a blurry", "a sunlit", "a crowded", "a quiet", "a wet")


# -- data and stats -------------------------------------------------------------------------------------
def _make_shard(args) -> None:
    from bench_decode import make_jpegs

    path, s, per_shard = args
    samples = []
    for j, data in enumerate(make_jpegs(per_shard, seed=1000 + s)):
        i = s * per_shard + j
        caption = f"{ADJECTIVES[i % 8]} {NOUNS[(i // 8) % 8]} photographed on day {i}"
        samples.append((f"{i:09d}", {"jpg": data, "txt": caption.encode(),
                                     "json": json.dumps({"url": f"http://example.com/{i}.jpg",
                                                         "uid": f"{i:032x}"}).encode()}))
    tmp = Path(path).with_suffix(".tmp")
    benchkit.shardkit().write_shard(tmp, samples)
    tmp.rename(path)


def ensure_shards(count: int, per_shard: int, distinct: int | None = None) -> list:
    """``count`` shards of ``per_shard`` samples under .bench/arch/shards-<per_shard>/ (made once, on all cores,
    and reused); with ``distinct``, shard s is a hard link to shard s % distinct."""
    from multiprocessing import get_context

    folder = WORK / f"shards-{per_shard}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{s:05d}.tar" for s in range(count)]
    distinct = min(distinct or count, count)
    todo = [(str(p), s, per_shard) for s, p in enumerate(paths[:distinct]) if not p.exists()]
    if todo:
        with get_context("spawn").Pool(min(len(todo), len(os.sched_getaffinity(0)))) as pool:
            pool.map(_make_shard, todo)
    for s, path in enumerate(paths[distinct:], start=distinct):
        if not path.exists():
            os.link(paths[s % distinct], path)
    return [str(p) for p in paths]


def ensure_stats(model: str, urls: list, device: str) -> Path:
    """An untimed `wclip fit --model MODEL --random-init` on ``urls`` (reused while the model identity holds)."""
    from pipeline.models import ModelSpec, model_identity

    path = WORK / f"stats-{model}.safetensors"
    if benchkit.stats_match(path, model_identity(ModelSpec(model, random_init=True))):
        return path
    cmd = [*WCLIP, "fit", "--input", pattern(urls), "--output", str(path), "--model", model,
           "--random-init", "--components", "all", "--shrinkage", "0.1", "--device", device, "--no-progress"]
    print(f"fitting (not timed): {shlex.join(cmd)}", flush=True)
    benchkit.run_command(cmd, WORK / "logs" / f"fit-{model}", WORK)
    return path


# -- the model-only loop (runs in child processes) ------------------------------------------------------
def loop_child(model: str, urls: list, threads: int, device: str) -> None:
    """Prepare the shards' model inputs with wclip's reader code (a shard hard-linked to another: once), say
    ``ready``, wait for ``go`` on stdin, then time only the two towers over them; print one JSON line."""
    import contextlib

    import torch

    if threads:
        torch.set_num_threads(threads)
    import pipeline
    from pipeline.config import EncodeConfig, InputConfig
    from pipeline.flow.batch import read_chunks
    from pipeline.flow.preprocess import Preprocessor

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    clip, preprocess, tokenizer = pipeline.load_clip(model, random_init=True, device=dev)
    layout = torch.channels_last if cuda and EncodeConfig().channels_last else torch.contiguous_format
    if cuda:
        clip.visual.to(memory_format=layout)
    pre = Preprocessor(preprocess)
    prepared, batches = {}, []
    for url in urls:
        inode = os.stat(url).st_ino
        if inode not in prepared:
            prepared[inode] = [(pre.to_tensor_normalize(c.pixels, device=dev).contiguous(memory_format=layout),
                                torch.as_tensor(c.tokens).to(dev))
                               for _, c in read_chunks(url, InputConfig(), pre, tokenizer, chunk_size=10 ** 9)]
        batches += prepared[inode]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode(), amp:  # warm-up, untimed
        clip.encode_image(batches[0][0])
        clip.encode_text(batches[0][1])
    sync()
    print("ready", flush=True)
    sys.stdin.readline()
    start, cpu = time.time(), time.process_time()
    n = 0
    with torch.inference_mode(), amp:
        for pixels, tokens in batches:
            clip.encode_image(pixels)
            clip.encode_text(tokens)
            n += len(pixels)
    sync()
    end, cpu = time.time(), time.process_time() - cpu
    print(json.dumps({"images": n, "start": start, "end": end, "cpu_s": cpu, "threads": torch.get_num_threads()}),
          flush=True)


def run_loop(model: str, urls: list, processes: int, threads: int, device: str) -> dict:
    """The model-only loop in ``processes`` child processes (shards dealt round-robin) started together."""
    parts = [urls[i::processes] for i in range(processes)]
    load = os.getloadavg()
    procs = [subprocess.Popen([sys.executable, __file__, "--child", model, "--threads", str(threads),
                               "--device", device, *part],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=benchkit.command_env())
             for part in parts]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"loop child failed before it was ready (got {line!r})")
    for p in procs:  # all start together
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"loop child exited {p.returncode}")
        results.append(benchkit.last_json(out))
    images = sum(r["images"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"images": images, "seconds": span, "images_per_s": images / span, "processes": processes,
            "cpu_s": sum(r["cpu_s"] for r in results),
            "threads": [r["threads"] for r in results], "load_before": list(load)}


# -- wclip ---------------------------------------------------------------------------------------------
def run_wclip(model: str, urls: list, stats: Path, tag: str, device: str, batch: int) -> dict:
    out = WORK / f"scores-{model}"
    gpu = ["--device", "cuda", "--precision", "bf16", "--batch-size", str(batch), "--chunk-size", str(batch)] \
        if device == "cuda" else []
    cmd = [*WCLIP, "score", "--input", pattern(urls), "--stats", str(stats), "--output", str(out),
           "--model", model, "--random-init", "--overwrite", "--no-progress", *gpu]
    res = benchkit.run_command(cmd, WORK / "logs" / f"score-{model}-{tag}", WORK)
    summary = benchkit.last_json(res.pop("stdout"))
    if summary["rows"] != summary.get("status_counts", {}).get("ok"):
        raise SystemExit(f"wclip score: not every row is ok: {summary['status_counts']}")
    return {"images": summary["rows"], "images_per_s": summary["samples_per_s"],
            "wall_images_per_s": summary["rows"] / res["wall_s"], "elapsed_s": summary["elapsed_s"],
            "command": shlex.join(cmd), **res}


def measure(tool: str, model: str, urls: list, stats: Path, tag: str, args) -> dict:
    cores = len(os.sched_getaffinity(0))
    if tool == "loop":
        return run_loop(model, urls, 1, 0, args.device)
    if tool == "loop-split":
        return run_loop(model, urls, cores, 1, args.device)
    return run_wclip(model, urls, stats, tag, args.device, args.per_shard)


# -- profile -------------------------------------------------------------------------------------------
def profile(model: str, urls: list, stats: Path, rate: int) -> dict:
    """py-spy over one `wclip score` (all its processes): the share of samples per stage."""
    from profile_wclip import find_pyspy, parse_pyspy

    spy = find_pyspy()
    raw = WORK / f"pyspy-{model}.txt"
    cmd = [spy, "record", "--subprocesses", "--nonblocking", "--rate", str(rate), "--format", "raw",
           "--output", str(raw), "--", *WCLIP, "score", "--input", pattern(urls), "--stats",
           str(stats), "--output", str(WORK / f"scores-{model}-pyspy"), "--model", model, "--random-init",
           "--overwrite", "--no-progress"]
    res = benchkit.run_command(cmd, WORK / "logs" / f"pyspy-{model}", WORK)
    parsed = parse_pyspy([raw])
    total = parsed["samples"] or 1
    return {"command": shlex.join(cmd), "wall_s": res["wall_s"], "load_before": res["load_before"],
            "samples": parsed["samples"], "stages": [(s, round(100 * n / total, 1)) for s, n in parsed["stages"]]}


# -- report --------------------------------------------------------------------------------------------
def med(values: list) -> float:
    return statistics.median(values) if values else float("nan")


def report(runs: list, tools: list, models: list) -> dict:
    out = {}
    for model in models:
        rates = {t: [r["images_per_s"] for r in runs if r["model"] == model and r["tool"] == t] for t in tools}
        m = {t: med(v) for t, v in rates.items()}
        rounds = sorted({r["round"] for r in runs if r["model"] == model})
        per_round = {}
        for rnd in rounds:
            got = {r["tool"]: r for r in runs if r["model"] == model and r["round"] == rnd}
            if "wclip" in got and "loop" in got:
                per_round.setdefault("wclip/loop", []).append(got["wclip"]["images_per_s"]
                                                              / got["loop"]["images_per_s"])
                per_round.setdefault("wclip wall/loop", []).append(got["wclip"]["wall_images_per_s"]
                                                                   / got["loop"]["images_per_s"])
            if "wclip" in got and "loop-split" in got:
                per_round.setdefault("wclip/loop-split", []).append(got["wclip"]["images_per_s"]
                                                                    / got["loop-split"]["images_per_s"])
            if "loop-split" in got and "loop" in got:
                per_round.setdefault("loop-split/loop", []).append(got["loop-split"]["images_per_s"]
                                                                   / got["loop"]["images_per_s"])
        out[model] = {"median_images_per_s": m, "rates": rates, "ratios_per_round": per_round,
                      "ratio_medians": {k: med(v) for k, v in per_round.items()}}
    return out


def print_tables(summary: dict, runs: list) -> None:
    for model, s in summary.items():
        print(f"\n{model}: images/s per round (1-minute load average before the run)")
        tools = [t for t in s["rates"] if s["rates"][t]]
        print("| side | " + " | ".join(f"round {r['round']}" for r in runs
                                         if r["model"] == model and r["tool"] == tools[0]) + " | median |")
        print("|---" * (2 + len(s["rates"][tools[0]])) + "|")
        for t in tools:
            cells = [f"{r['images_per_s']:.2f} ({r['load_before'][0]:.2f})" for r in runs
                     if r["model"] == model and r["tool"] == t]
            print(f"| {t} | " + " | ".join(cells) + f" | {s['median_images_per_s'][t]:.2f} |")
            if t == "wclip":
                walls = [r["wall_images_per_s"] for r in runs if r["model"] == model and r["tool"] == t]
                print("| wclip, whole command | " + " | ".join(f"{w:.2f}" for w in walls) + f" | {med(walls):.2f} |")
        for k, v in s["ratios_per_round"].items():
            print(f"| **{k}** | " + " | ".join(f"{x:.2f}x" for x in v) + f" | **{med(v):.2f}x** |")


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        p = argparse.ArgumentParser()
        p.add_argument("--child")
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("urls", nargs="+")
        a = p.parse_args()
        loop_child(a.child, a.urls, a.threads, a.device)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=sorted(DEFAULTS), default="cpu")
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--images", nargs="*", default=[], metavar="NAME=N",
                   help="images per model (default: " + ", ".join(f"{d}: {v['images']}" for d, v in DEFAULTS.items())
                        + "; other models: 4 shards)")
    p.add_argument("--per-shard", type=int, help="samples per shard, and the batch of both sides (default: "
                   + ", ".join(f"{d}: {v['per_shard']}" for d, v in DEFAULTS.items()) + ")")
    p.add_argument("--distinct", type=int, help="distinct shards; the others are hard links to them (default: "
                   + ", ".join(f"{d}: {v['distinct'] or 'all'}" for d, v in DEFAULTS.items()) + ")")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tools", default="loop,wclip", help=f"comma-separated, of {','.join(TOOLS)}")
    p.add_argument("--profile", action="store_true", help="also one py-spy run of wclip per model")
    p.add_argument("--pyspy-rate", type=int, default=50)
    p.add_argument("--snapshot", action="store_true",
                   help="run everything from a copy of pipeline/ taken now (others may edit the checkout)")
    p.add_argument("--use-snapshot", help="a snapshot folder made earlier")
    p.add_argument("--json", type=Path, help="default: .bench/arch/results-<time>.json")
    args = p.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if set(tools) - set(TOOLS):
        p.error(f"--tools: unknown {sorted(set(tools) - set(TOOLS))}")
    if args.device == "cuda" and "loop-split" in tools:
        p.error("--tools loop-split: the thread split of CPU workers; not a GPU measurement")
    defaults = DEFAULTS[args.device]
    args.per_shard = args.per_shard or defaults["per_shard"]
    images = dict(defaults["images"])
    images.update({k: int(v) for k, v in (x.split("=", 1) for x in args.images)})
    benchkit.use_snapshot(args)
    WORK.mkdir(parents=True, exist_ok=True)  # run_command's working directory

    n_shards = {m: max(1, images.get(m, 4 * args.per_shard) // args.per_shard) for m in args.models}
    all_urls = ensure_shards(max(n_shards.values()), args.per_shard, args.distinct or defaults["distinct"])
    urls = {m: all_urls[:n] for m, n in n_shards.items()}
    stats = {m: ensure_stats(m, urls[m][:2], args.device) for m in args.models}
    print(f"{len(os.sched_getaffinity(0))} cores; shards of {args.per_shard}: "
          + ", ".join(f"{m} {len(u)} shards ({len(u) * args.per_shard} images)" for m, u in urls.items()), flush=True)

    runs = []
    for rnd in range(1, args.rounds + 1):
        order = tools if rnd % 2 else tools[::-1]
        for model in args.models:
            for tool in order:
                r = measure(tool, model, urls[model], stats[model], f"r{rnd}", args)
                r.update(model=model, tool=tool, round=rnd)
                runs.append(r)
                print(f"round {rnd} {model} {tool}: {r['images_per_s']:.2f} images/s "
                      f"(load {r['load_before'][0]:.2f})", flush=True)
    prof = {m: profile(m, urls[m], stats[m], args.pyspy_rate) for m in args.models} if args.profile else {}
    summary = report(runs, tools, args.models) if runs else {}
    result = {"device": args.device, "cores": len(os.sched_getaffinity(0)), "per_shard": args.per_shard,
              "images": {m: len(u) * args.per_shard for m, u in urls.items()},
              "snapshot": benchkit.SNAPSHOT, "runs": runs, "summary": summary, "profile": prof,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    path = args.json or WORK / f"results-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    if runs:
        print_tables(summary, runs)
    for model, pr in prof.items():
        print(f"\n{model}: py-spy shares of one `wclip score` ({pr['samples']} samples, wall {pr['wall_s']:.1f} s)")
        for stage, pct in pr["stages"]:
            print(f"  {pct:5.1f}%  {stage}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

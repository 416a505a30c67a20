"""`wclip score` side by side with clip-retrieval and a bare loop (issue "Faster than a plain loop and
than clip-retrieval"). Not a test: run it by hand and read the table.

    .venv/bin/python bench/bench_peers.py                    # 12 shards x 1000 samples, 3 rounds
    .venv/bin/python bench/bench_peers.py --scale 4          # 4x the samples (48 shards)
    .venv/bin/python bench/bench_peers.py --samples 250 --rounds 1 --tools wclip,loop   # a quick look
    .venv/bin/python bench/bench_peers.py --snapshot         # while others edit pipeline/: measure one copy of it
    .venv/bin/python bench/bench_peers.py --markdown .bench/peers/results-....json      # tables for the docs

Three tools, the same shards (96-px JPEG + caption .txt + .json with url/uid: coloured shapes on a
background, made deterministically with PIL under .bench/peers/data/, reused when present), the same model
(the built-in ``wclip-demo``), each run as a whole command the way a user types it and timed
wall-clock from start to exit:

1. clip-retrieval 2.45 ``clip_inference``: webdataset input, batch 256, 2 preprocessing workers (1 on
   the single-shard input: it fails with more workers than shards), image + text + metadata. It lives
   in its own virtualenv, .bench/clip-retrieval/, set up on first use with setuptools<81 and the
   project's torch pins (constraints/local.txt, as bin/_bootstrap installs them). bench/peers_clip_retrieval.py registers
   the wclip-demo architecture with open_clip and calls clip-retrieval's entry point; the fp16
   safetensors checkpoint is passed as the pretrained value (open_clip loads it as it is).
2. ``wclip score`` with stats from a ``wclip fit`` on the first shards (the fit is not timed).
3. bench/peers_loop.py: a bare single-process loop (tarfile, PIL, the model's preprocess, both towers
   in batches of 256, whitening in NumPy).

Rounds alternate the order of the tools. Reported per round: samples/s of each tool (rows / whole
process wall time), the ratios wclip/loop and wclip/clip-retrieval, and the 1-minute load average
before each run (this machine is shared: read ratios, not absolute rates). Also: the fixed cost
(whole process time on a 50-sample single-shard input; wclip minus the loop), and the peak memory
of the whole process tree of each command (RSS summed over the processes, and PSS, which counts a
shared page once). The row counts of all three tools are asserted equal, their key sets identical,
and, in the first round, wclip's image log-likelihoods are compared with the loop's, and wclip's
clip_score and clip-retrieval's embeddings with a reference computed here (pipeline.load_clip, eval
mode) on the first 256 samples. clip-retrieval (all_clip) never puts open_clip models in eval mode, so
the demo model's BatchNorm layers run on batch statistics: its image embeddings differ from the
reference (cosine 0.7-1.0, median ~0.92) while its text embeddings match; speed is not affected.

Results: a JSON file under .bench/peers/ (path printed at the end), logs under .bench/peers/logs/;
``bench_peers.py --markdown RESULT.json`` prints its tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import benchkit
import numpy as np
from benchkit import BENCH, ROOT, pattern

WORK = ROOT / ".bench" / "peers"
CR_REQUIREMENTS = ("clip-retrieval==2.45.0", "setuptools<81")  # clip-anytorch imports pkg_resources
DEMO_CONFIG = ROOT / "pipeline" / "assets" / "wclip-demo.json"
DEMO_WEIGHTS = ROOT / "pipeline" / "assets" / "wclip-demo.safetensors"
TOOLS = ("clip-retrieval", "wclip", "wclip-ray", "loop", "loop-1t")
# wclip: the default (local) executor; loop: torch's default threads (all cores); loop-1t: torch on one thread
IMAGE_SIZE = 96
TAR_MTIME = 946684800


# -- data -------------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), TAR_MTIME, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (35, 65, 215), "yellow": (235, 215, 35),
           "white": (242, 242, 242), "black": (18, 18, 18), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("one", "two", "three")


def make_pair(rng: np.random.Generator) -> tuple:
    """A 96-px scene (1-3 shapes of one colour on a background, light gradient and noise) and its caption.
    Self-contained (PIL and NumPy only), so the shards do not change when the library does."""
    from PIL import Image, ImageDraw

    names = list(COLOURS)
    bg, fg = (str(c) for c in rng.choice(names, 2, replace=False))
    shape, count = str(rng.choice(SHAPES)), int(rng.integers(1, 4))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS[bg])
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        r = float(rng.uniform(8, 18))
        x, y = (float(v) for v in rng.uniform(r, IMAGE_SIZE - r, 2))
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[fg])
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=COLOURS[fg])
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=COLOURS[fg])
    pixels = np.asarray(img, dtype=np.float32)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1) - 0.5
    pixels += (rng.uniform(-14, 14) * yy + rng.uniform(-14, 14) * xx)[..., None]
    pixels += rng.normal(0, rng.uniform(2, 6), pixels.shape)
    noun = shape + ("es" if shape.endswith("s") else "s") if count > 1 else shape
    caption = (f"a photo of {NUMBERS[count - 1] if count > 1 else 'a'} {fg} {noun} on a {bg} background"
               if rng.random() < 0.7 else f"{NUMBERS[count - 1]} {fg} {noun}, {bg} background")
    return np.clip(pixels, 0, 255).round().astype(np.uint8), caption


def make_shard(path: Path, shard: int, samples: int, seed: int) -> None:
    """One tar of ``samples`` (96-px JPEG, caption, JSON with url/uid); same arguments, same bytes."""
    from PIL import Image

    digits = max(4, len(str(samples - 1)))
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            key = f"{shard:05d}{i:0{digits}d}"
            pixels, caption = make_pair(np.random.default_rng([seed, shard, i]))
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            meta = {"url": f"https://bench.wclip.invalid/s{seed}/{key}.jpg",
                    "uid": hashlib.md5(f"bench:{seed}:{key}".encode()).hexdigest(), "key": key}
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
    os.replace(tmp, path)


def ensure_shards(folder: Path, count: int, samples: int, seed: int) -> list:
    """The first ``count`` shards of a pool (made when missing: a shard appears by rename, complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{s:05d}.tar" for s in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"making {len(missing)} shard(s) of {samples} samples under {folder} ...", flush=True)
        t0 = time.time()
        for p in missing:
            make_shard(p, int(p.stem), samples, seed)
        print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return [str(p) for p in paths]


# -- set-up -----------------------------------------------------------------------------------------
def ensure_clip_retrieval() -> Path:
    """clip-retrieval in its own virtualenv (``.bench/clip-retrieval``) with the project's torch pins."""
    from peer_env import PeerSetupError, peer_python

    try:
        return peer_python("clip-retrieval", CR_REQUIREMENTS, torch=True,
                           check="import torch, open_clip, clip_retrieval.clip_inference.main; "
                                 "print('torch', torch.__version__, 'open_clip', open_clip.__version__)")
    except PeerSetupError as exc:
        raise SystemExit(str(exc)) from None


def ensure_stats(wclip: str, urls: list, path: Path) -> Path:
    """`wclip fit` on ``urls`` (not timed); reused while the demo model's weights are the same."""
    from pipeline.models import ModelSpec, model_identity

    if benchkit.stats_match(path, model_identity(ModelSpec("wclip-demo"))):
        return path
    cmd = [wclip, "fit", "--input", *urls, "--output", str(path), "--model", "wclip-demo"]
    print(f"fitting: {shlex.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=benchkit.command_env(), cwd=WORK)
    if proc.returncode != 0:
        raise SystemExit(f"wclip fit failed:\n{proc.stderr[-3000:]}")
    return path


# -- the three tools ---------------------------------------------------------------------------------
def wclip_command(wclip: str, urls: list, stats: Path, out: Path, tool: str = "wclip") -> list:
    """`wclip score` as a user types it; ``wclip-ray`` adds ``--executor ray`` (a private local Ray)."""
    extra = ["--executor", "ray"] if tool == "wclip-ray" else []
    return [wclip, "score", "--input", pattern(urls), "--stats", str(stats), "--output", str(out), *extra]


def loop_command(urls: list, stats: Path, out: Path, tool: str = "loop") -> list:
    threads = ["--threads", "1"] if tool == "loop-1t" else []
    return [sys.executable, str(BENCH / "peers_loop.py"), "--stats", str(stats), "--output", str(out), *threads,
            *urls]


def cr_command(cr_python: Path, urls: list, out: Path) -> list:
    # clip-retrieval's webdataset reader hands shards to its DataLoader workers; a worker left without a
    # shard fails the job ("No samples found in dataset; perhaps you have fewer shards than workers"),
    # so a single-shard input gets one worker.
    workers = str(min(2, len(urls)))
    return [str(cr_python), str(BENCH / "peers_clip_retrieval.py"), "--model-config", str(DEMO_CONFIG),
            "inference", "--input_dataset", pattern(urls), "--output_folder", str(out),
            "--input_format", "webdataset", "--batch_size", "256", "--num_prepro_workers", workers,
            "--enable_image", "True", "--enable_text", "True", "--enable_metadata", "True",
            "--clip_model", f"open_clip:wclip-demo/{DEMO_WEIGHTS}"]


def display_command(tool: str, urls: list, ctx: dict, out: str = "OUT") -> str:
    """The command as typed in bash (the loop's shard list as a brace pattern the shell expands)."""
    if tool.startswith("wclip"):
        return shlex.join(wclip_command(ctx["wclip"], urls, ctx["stats"], Path(out), tool))
    if tool.startswith("loop"):
        return shlex.join(loop_command([], ctx["stats"], Path(out), tool)) + " " + pattern(urls)
    return shlex.join(cr_command(ctx["cr_python"], urls, Path(out)))


def read_wclip(out: Path) -> dict:
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["key", "status", "image_loglik", "clip_score"])
              for p in sorted(out.glob("*.parquet"))]
    cols = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
            for c in ("key", "status", "image_loglik", "clip_score")}
    return cols


def read_loop(out: Path) -> dict:
    parts = [np.load(p) for p in sorted(out.glob("*.npz"))]
    return {c: np.concatenate([p[c] for p in parts]) for c in ("key", "image_loglik")}


def read_cr(out: Path) -> dict:
    import pyarrow.parquet as pq

    meta = [pq.read_table(p) for p in sorted((out / "metadata").glob("*.parquet"))]
    keys = np.concatenate([t.column("image_path").to_numpy(zero_copy_only=False) for t in meta])
    img = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))]).astype(np.float64)
    txt = np.concatenate([np.load(p) for p in sorted((out / "text_emb").glob("*.npy"))]).astype(np.float64)
    uids = sum(t.num_rows for t in meta if "uid" in t.column_names)
    return {"key": keys, "img": img, "txt": txt, "uid_rows": uids}


def rows_of(tool: str, out: Path) -> tuple:
    """(row count, data) of a finished run; asserts each tool's outputs agree with themselves."""
    if tool.startswith("wclip"):
        d = read_wclip(out)
        assert (d["status"] == "ok").all(), f"wclip: rows not ok in {out}"
        return len(d["key"]), d
    if tool.startswith("loop"):
        d = read_loop(out)
        return len(d["key"]), d
    d = read_cr(out)
    assert len(d["key"]) == len(d["img"]) == len(d["txt"]) == d["uid_rows"], \
        f"clip-retrieval: metadata {len(d['key'])} rows, image {len(d['img'])}, text {len(d['txt'])}, " \
        f"metadata with uid {d['uid_rows']}"
    return len(d["key"]), d


def reference_embeddings(url: str, n: int = 256) -> tuple:
    """Keys and (image, text) embeddings of the first ``n`` samples of ``url``, straight from
    ``pipeline.load_clip`` (eval mode, one batch): the yardstick for the tools' outputs."""
    import torch
    from PIL import Image

    import pipeline

    model, preprocess, tokenizer = pipeline.load_clip("wclip-demo")
    with tarfile.open(url) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    keys = sorted(k[:-4] for k in members if k.endswith(".jpg"))[:n]
    with torch.inference_mode():
        img = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(members[k + ".jpg"])).convert("RGB"))
                                              for k in keys])).double().numpy()
        txt = model.encode_text(tokenizer([members[k + ".txt"].decode() for k in keys])).double().numpy()
    return keys, img, txt


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cross_check(data: dict, first_shard: str) -> dict:
    """Same keys everywhere; wclip's numbers against the loop's, and everyone's against a reference."""
    out = {}
    keysets = {t: set(map(str, d["key"])) for t, d in data.items()}
    assert all(len(k) == len(d["key"]) for k, d in zip(keysets.values(), data.values())), "duplicate keys"
    first = next(iter(keysets.values()))
    assert all(k == first for k in keysets.values()), "the tools saw different samples"
    out["same_keys"] = True
    w = data.get("wclip")
    if w is not None and "loop" in data:
        order = {k: i for i, k in enumerate(map(str, w["key"]))}
        lp = data["loop"]
        idx = np.array([order[k] for k in map(str, lp["key"])])
        diff = np.abs(w["image_loglik"][idx].astype(np.float64) - lp["image_loglik"])
        out["image_loglik_max_abs_diff_wclip_vs_loop"] = float(diff.max())
        out["image_loglik_median_abs"] = float(np.median(np.abs(lp["image_loglik"])))
    keys, img, txt = reference_embeddings(first_shard)
    ref_cos = (_unit(img) * _unit(txt)).sum(1)
    if w is not None:
        order = {k: i for i, k in enumerate(map(str, w["key"]))}
        got = w["clip_score"][[order[k] for k in keys]].astype(np.float64)
        out["clip_score_max_abs_diff_wclip_vs_reference"] = float(np.abs(got - ref_cos).max())
    if "clip-retrieval" in data:
        cr = data["clip-retrieval"]
        order = {k: i for i, k in enumerate(map(str, cr["key"]))}
        idx = [order[k] for k in keys]
        ci, ct = _unit(cr["img"][idx]), _unit(cr["txt"][idx])
        out["clip_retrieval_text_cos_to_reference_min"] = float((ct * _unit(txt)).sum(1).min())
        img_cos = (ci * _unit(img)).sum(1)
        out["clip_retrieval_image_cos_to_reference_min_median"] = [float(img_cos.min()), float(np.median(img_cos))]
        out["clip_score_max_abs_diff_clip_retrieval_vs_reference"] = float(np.abs((ci * ct).sum(1) - ref_cos).max())
    return out


def measure(tool: str, urls: list, label: str, run_no: int, ctx: dict) -> dict:
    out = WORK / "out" / f"{label}-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    if tool.startswith("wclip"):
        cmd = wclip_command(ctx["wclip"], urls, ctx["stats"], out, tool)
    elif tool.startswith("loop"):
        cmd = loop_command(urls, ctx["stats"], out, tool)
    else:
        cmd = cr_command(ctx["cr_python"], urls, out)
    res = benchkit.run_command(cmd, WORK / "logs" / ctx["stamp"] / f"{label}-r{run_no}-{tool}", WORK)
    rows, data = rows_of(tool, out)
    res.update(tool=tool, round=run_no, rows=rows, samples_per_s=rows / res["wall_s"],
               command=shlex.join(cmd), typed=display_command(tool, urls, ctx, str(out)))
    if tool.startswith("wclip"):
        summary = benchkit.last_json(res["stdout"])
        res["wclip_summary"] = {k: summary.get(k) for k in ("rows", "elapsed_s", "samples_per_s", "status_counts")}
        assert summary["rows"] == rows
    res.pop("stdout")
    res["_data"] = data
    return res


def run_rounds(tools: list, urls: list, label: str, rounds: int, ctx: dict, check: bool) -> list:
    expected = count_samples(urls)
    results = []
    for r in range(rounds):
        order = tools[r % len(tools):] + tools[:r % len(tools)]
        data = {}
        for tool in order:
            res = measure(tool, urls, label, r + 1, ctx)
            data[tool] = res.pop("_data")
            print(f"  [{label} round {r + 1}] {tool:>14}: {res['rows']} rows in {res['wall_s']:7.2f} s = "
                  f"{res['samples_per_s']:8.1f} samples/s; load before {res['load_before'][0]:.2f}; "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB / PSS {res['peak_pss_mb']:.0f} MB "
                  f"({res['max_processes']} processes)", flush=True)
            assert res["rows"] == expected, f"{tool} wrote {res['rows']} rows, the shards hold {expected}"
            results.append(res)
        if check and r == 0:
            results.append({"cross_check": cross_check(data, urls[0]), "round": 1})
            print(f"  [{label}] cross-check: {results[-1]['cross_check']}", flush=True)
            if "clip-retrieval" in data:
                results.append({"embeddings_interop": embeddings_interop(WORK / "out" / f"{label}-clip-retrieval",
                                                                         data["clip-retrieval"], ctx), "round": 1})
                print(f"  [{label}] wclip on clip-retrieval's folder: {results[-1]['embeddings_interop']}", flush=True)
    return results


def embeddings_interop(folder: Path, cr: dict, ctx: dict) -> dict:
    """`wclip fit --embeddings` and `wclip score --embeddings` on the folder clip-retrieval just wrote: one
    row per clip-retrieval row, its keys, and clip_score = the cosine of clip-retrieval's two vectors."""
    import pyarrow.parquet as pq

    stats, out = WORK / "interop-stats.safetensors", WORK / "out" / "interop-scores"
    shutil.rmtree(out, ignore_errors=True)
    for cmd in ([ctx["wclip"], "fit", "--embeddings", str(folder), "--output", str(stats), "--no-progress"],
                [ctx["wclip"], "score", "--embeddings", str(folder), "--stats", str(stats), "--output", str(out),
                 "--no-progress"]):
        subprocess.run(cmd, check=True, capture_output=True)
    parts = [pq.read_table(p, columns=["key", "status", "clip_score"]) for p in sorted(out.glob("*.parquet"))]
    keys = [k for t in parts for k in t["key"].to_pylist()]
    assert keys == list(map(str, cr["key"])), "wclip's rows are not clip-retrieval's rows"
    score = np.concatenate([t["clip_score"].to_numpy(zero_copy_only=False) for t in parts]).astype(np.float64)
    cosine = (_unit(cr["img"]) * _unit(cr["txt"])).sum(1)
    return {"rows": len(keys), "ok": sum(s == "ok" for t in parts for s in t["status"].to_pylist()),
            "clip_score_max_abs_diff_vs_clip_retrieval_vectors": float(np.abs(score - cosine).max())}


def count_samples(urls: list) -> int:
    n = 0
    for url in urls:
        with tarfile.open(url) as tar:
            n += sum(1 for m in tar if m.name.endswith(".jpg"))
    return n


# -- report -----------------------------------------------------------------------------------------
def _by(results: list, tool: str) -> list:
    return [r for r in results if r.get("tool") == tool]


def summarise(results: list, tools: list) -> dict:
    rounds = sorted({r["round"] for r in results if "tool" in r})
    table = {t: {"samples_per_s": [r["samples_per_s"] for r in _by(results, t)],
                 "wall_s": [r["wall_s"] for r in _by(results, t)],
                 "cpu_s": [r["cpu_s"] for r in _by(results, t)],
                 "load_before": [r["load_before"][0] for r in _by(results, t)],
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in _by(results, t)),
                 "peak_pss_mb": max(r["peak_pss_mb"] for r in _by(results, t))} for t in tools}
    for w in ("wclip", "wclip-ray"):  # wclip's own figure: rows / time in run_shards (start-up, exit excluded)
        if w in table:
            table[w]["summary_samples_per_s"] = [r["wclip_summary"]["samples_per_s"] for r in _by(results, w)]
    ratios = {}
    for w in ("wclip", "wclip-ray"):
        for other in ("loop", "loop-1t", "clip-retrieval"):
            if w in tools and other in tools:
                ratios[f"{w}/{other}"] = [
                    next(r["samples_per_s"] for r in _by(results, w) if r["round"] == k)
                    / next(r["samples_per_s"] for r in _by(results, other) if r["round"] == k) for k in rounds]
    return {"tools": table, "ratios": ratios}


def print_throughput(title: str, summary: dict) -> None:
    print(f"\n{title}")
    tools = summary["tools"]
    n = len(next(iter(tools.values()))["samples_per_s"])
    head = " | ".join(f"round {i + 1}" for i in range(n))
    print(f"| tool | {head} | median | peak RSS (sum) | peak PSS |")
    print("|---|" + "---|" * (n + 3))
    for t, v in tools.items():
        cells = " | ".join(f"{s:.0f}/s (load {l:.2f})" for s, l in zip(v["samples_per_s"], v["load_before"]))
        print(f"| {t} | {cells} | {statistics.median(v['samples_per_s']):.0f}/s | {v['peak_rss_mb']:.0f} MB | "
              f"{v['peak_pss_mb']:.0f} MB |")
    for name, vals in summary["ratios"].items():
        cells = " | ".join(f"{x:.2f}x" for x in vals)
        print(f"| ratio {name} | {cells} | {statistics.median(vals):.2f}x | | |")
    if "summary_samples_per_s" in tools.get("wclip", {}):
        vals = tools["wclip"]["summary_samples_per_s"]
        print("| wclip's own summary (shards only) | " + " | ".join(f"{v:.0f}/s" for v in vals)
              + f" | {statistics.median(vals):.0f}/s | | |")
    print("CPU seconds (all processes of the command's tree, sampled): "
          + "; ".join(f"{t} " + ", ".join(f"{c:.0f}" for c in v["cpu_s"]) for t, v in tools.items()))


def print_fixed(summary: dict) -> None:
    tools = summary["tools"]
    print("\nFixed cost (50-sample shard, whole process wall time)")
    for t, v in tools.items():
        print(f"| {t} | " + " | ".join(f"{w:.2f} s (load {l:.2f})" for w, l in zip(v["wall_s"], v["load_before"]))
              + f" | median {statistics.median(v['wall_s']):.2f} s | peak RSS {v['peak_rss_mb']:.0f} MB"
              f" / PSS {v['peak_pss_mb']:.0f} MB |")
    if "loop" in tools:
        for t in tools:
            if t != "loop":
                d = [a - b for a, b in zip(tools[t]["wall_s"], tools["loop"]["wall_s"])]
                print(f"| {t} minus loop | " + " | ".join(f"{x:+.2f} s" for x in d)
                      + f" | median {statistics.median(d):+.2f} s |")


def markdown(result: dict) -> str:
    """Markdown tables of a result file (for docs/benchmarks.md)."""
    lines = []
    thr = result["throughput"]["summary"]["tools"]
    rounds = len(next(iter(thr.values()))["samples_per_s"])
    runs = [r for r in result["throughput"]["runs"] if "tool" in r]
    order = {k: [r["tool"] for r in runs if r["round"] == k] for k in range(1, rounds + 1)}
    lines.append("| samples/s (rows / whole-process wall time) | " + " | ".join(
        f"round {k} ({' → '.join(order[k])})" for k in range(1, rounds + 1)) + " | median |")
    lines.append("|---|" + "---|" * (rounds + 1))
    names = {"clip-retrieval": "clip-retrieval 2.45 `clip_inference`", "wclip": "`wclip score`",
             "wclip-ray": "`wclip score --executor ray`", "loop": "bare loop (1 process)",
             "loop-1t": "bare loop, torch on 1 thread"}
    for t, v in thr.items():
        lines.append(f"| {names[t]} | " + " | ".join(f"{x:.1f} (load {l:.2f})" for x, l in
                                                      zip(v["samples_per_s"], v["load_before"]))
                     + f" | {statistics.median(v['samples_per_s']):.1f} |")
    for name, vals in result["throughput"]["summary"]["ratios"].items():
        lines.append(f"| **{name}** | " + " | ".join(f"{x:.2f}x" for x in vals) + f" | **{statistics.median(vals):.2f}x** |")
    if "summary_samples_per_s" in thr.get("wclip", {}):
        vals = thr["wclip"]["summary_samples_per_s"]
        lines.append("| `wclip score`'s own summary (shards only: Ray start, model load, exit excluded) | "
                     + " | ".join(f"{x:.1f}" for x in vals) + f" | {statistics.median(vals):.1f} |")
    lines.append("| CPU seconds, all processes of the command | " + " | ".join(
        ", ".join(f"{r['tool']} {r['cpu_s']:.0f}" for r in runs if r["round"] == k) for k in range(1, rounds + 1)) + " | |")
    if "fixed" in result:
        fx = result["fixed"]["summary"]["tools"]
        n = len(next(iter(fx.values()))["wall_s"])
        lines += ["", "| 50-sample shard, whole-process wall time | " + " | ".join(f"round {k}" for k in range(1, n + 1))
                  + " | median |", "|---|" + "---|" * (n + 1)]
        for t, v in fx.items():
            lines.append(f"| {names[t]} | " + " | ".join(f"{w:.1f} s (load {l:.2f})" for w, l in
                                                          zip(v["wall_s"], v["load_before"]))
                         + f" | {statistics.median(v['wall_s']):.1f} s |")
        if "loop" in fx:
            for t in fx:
                if t != "loop":
                    d = [a - b for a, b in zip(fx[t]["wall_s"], fx["loop"]["wall_s"])]
                    lines.append(f"| **fixed cost: {t} minus loop** | " + " | ".join(f"{x:+.1f} s" for x in d)
                                 + f" | **{statistics.median(d):+.1f} s** |")
    lines += ["", "| peak memory of the command's process tree (max over rounds) | processes | RSS summed | PSS |",
              "|---|---|---|---|"]
    size = f"{result['size']['shards']} x {result['size']['samples_per_shard']}"
    for label, block in ((size, result["throughput"]), ("50-sample shard", result.get("fixed"))):
        if not block:
            continue
        for t in block["summary"]["tools"]:
            rs = [r for r in block["runs"] if r.get("tool") == t]
            lines.append(f"| {names[t]}, {label} | {max(r['max_processes'] for r in rs)} | "
                         f"{max(r['peak_rss_mb'] for r in rs):.0f} MB | {max(r['peak_pss_mb'] for r in rs):.0f} MB |")
    checks = [r["cross_check"] for r in result["throughput"]["runs"] if "cross_check" in r]
    if checks:
        lines += ["", "cross-check: `" + json.dumps(checks[0]) + "`"]
    return "\n".join(lines)


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--markdown"]:
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=12, help="shards at scale 1")
    ap.add_argument("--samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--scale", type=int, default=1, help="multiply the number of shards (4: 4x the samples)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fixed-rounds", type=int, help="rounds on the 50-sample shard (default: --rounds; 0 skips)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ", ".join(TOOLS))
    ap.add_argument("--fit-shards", type=int, default=2, help="shards the (untimed) `wclip fit` uses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="result file (default: .bench/peers/results-<size>-<time>.json)")
    ap.add_argument("--snapshot", action="store_true",
                    help="run wclip and the loop from a copy of pipeline/ taken now (for a checkout that "
                         "others are editing while it runs)")
    ap.add_argument("--use-snapshot", metavar="DIR", help="run against an earlier snapshot (.bench/peers/snapshot/<digest>)")
    args = ap.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        ap.error(f"unknown tools {sorted(unknown)}")

    started = datetime.datetime.now(datetime.timezone.utc)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    n_shards = args.shards * args.scale
    WORK.mkdir(parents=True, exist_ok=True)
    benchkit.use_snapshot(args)
    urls = ensure_shards(WORK / "data" / f"s{args.samples}", max(n_shards, args.fit_shards), args.samples, args.seed)
    fixed = ensure_shards(WORK / "data" / "fixed50", 1, 50, args.seed + 1)
    ctx = {"stamp": stamp, "wclip": str(Path(sys.executable).parent / "wclip")}
    if "clip-retrieval" in tools:
        ctx["cr_python"] = ensure_clip_retrieval()
    ctx["stats"] = ensure_stats(ctx["wclip"], urls[:args.fit_shards], WORK / f"stats-s{args.samples}.safetensors")
    urls = urls[:n_shards]
    label = f"{n_shards}x{args.samples}"

    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; {label} samples; "
          f"rounds {args.rounds}; tools {', '.join(tools)}", flush=True)
    for tool in tools:
        print(f"  {tool}: {display_command(tool, urls, ctx)}")
    result = {"started": started.isoformat(), "cpus": os.cpu_count(), "argv": sys.argv,
              "size": {"shards": n_shards, "samples_per_shard": args.samples, "image_px": IMAGE_SIZE},
              "stats": str(ctx["stats"]), "tools": tools, "snapshot": dict(benchkit.SNAPSHOT) or None}

    fixed_rounds = args.rounds if args.fixed_rounds is None else args.fixed_rounds
    if fixed_rounds:
        print("\nfixed cost: 50-sample single shard", flush=True)
        fixed_results = run_rounds(tools, fixed, "fixed50", fixed_rounds, ctx, check=False)
        result["fixed"] = {"runs": fixed_results, "summary": summarise(fixed_results, tools)}
    print(f"\nthroughput: {label}", flush=True)
    runs = run_rounds(tools, urls, label, args.rounds, ctx, check=True)
    result["throughput"] = {"runs": runs, "summary": summarise(runs, tools)}
    result["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    result["load_after"] = list(os.getloadavg())

    print_throughput(f"Throughput, {label} samples (rows / whole-process wall time)", result["throughput"]["summary"])
    if fixed_rounds:
        print_fixed(result["fixed"]["summary"])
    path = Path(args.json) if args.json else WORK / f"results-{label}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
